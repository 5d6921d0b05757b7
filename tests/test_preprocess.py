import contextlib
import hashlib
import pickle
import subprocess
import sys
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather
import pytest

from effgen import errors, provenance, schema
from effgen.data import preprocess, synth
from effgen.data.reader import DataError, FeatherReader

SPLITS = ["train", "test", "validation"]


def _frame(path):
    r = FeatherReader(path)
    return r, r.as_pandas().sort_values("row_id").reset_index(drop=True)


@pytest.fixture(scope="module")
def frames(tiny_dataset):
    return {s: _frame(tiny_dataset[s]) for s in SPLITS}


@pytest.fixture(scope="module")
def sample(tiny_dataset):
    """The tiny tuple's derived columns (what preprocess must carry), as a DataFrame."""
    import pandas as pd
    import uproot

    with uproot.open(tiny_dataset["sample"]) as f:
        tup = f["TrackingTupler/sim"].arrays(library="np")
    frame = pd.DataFrame(synth.features_view(tup))
    for name in ("acceptance", "type", "runNumber", "evtNumber", "mc_key", "mc_px", "mc_py", "mc_pz"):
        frame[name] = tup[name]
    return frame


def test_split_is_disjoint_complete_and_sized(tiny_dataset, frames):
    ids = {s: frames[s][1]["row_id"].to_numpy() for s in SPLITS}
    n = sum(len(v) for v in ids.values())
    assert n == 20_000
    allids = np.concatenate(list(ids.values()))
    assert np.array_equal(np.sort(allids), np.arange(n))  # complete and disjoint
    for split, frac in preprocess.SPLITS.items():
        # Each row's split is a seeded coin toss of its key: binomial sizes.
        assert abs(len(ids[split]) - frac * n) < 5 * np.sqrt(n * frac * (1 - frac))
        assert tiny_dataset["rows"][split] == len(ids[split])
    # Shuffled: a split is not a contiguous block of the sample.
    assert ids["validation"].max() - ids["validation"].min() > 0.9 * n


def test_definitions_and_columns(tiny_dataset, frames):
    tx_sha = hashlib.sha256(tiny_dataset["preprocessing"].read_bytes()).hexdigest()
    assert [frames[s][0].preprocessing_sha256 for s in SPLITS] == [tx_sha] * 3
    reader, df = frames["train"]
    assert reader.features == schema.FEATURES
    assert reader.labels == schema.LABELS
    assert reader.extra == preprocess.EXTRA
    assert list(df.columns) == schema.FEATURES + schema.LABELS + preprocess.EXTRA
    shard = feather.read_table(reader.data_files[0])
    for name in schema.FEATURES + schema.LABELS + schema.TRUTH:
        assert shard.schema.field(name).type == pa.float32(), name
    assert len(reader.data_files) == 3  # ~10k rows in shards of ~4k


def test_rows_carry_the_sample_values(sample, frames):
    for split in SPLITS:
        _, df = frames[split]
        src = sample.iloc[df["row_id"].to_numpy()]
        for name in schema.FEATURES:
            np.testing.assert_array_equal(df["raw_" + name].to_numpy(), src[name].to_numpy())
        for name in schema.LABELS + schema.TRUTH + [schema.PID, "acceptance", "type"]:
            np.testing.assert_array_equal(df[name].to_numpy(), src[name].to_numpy())


def test_features_are_the_saved_preprocessing_of_raw(tiny_dataset, frames):
    ct = provenance.load_preprocessing(tiny_dataset["preprocessing"], n_features=12)
    for split in SPLITS:
        _, df = frames[split]
        raw = df[["raw_" + c for c in schema.FEATURES]].to_numpy()
        expected = ct.transform(raw.astype(np.float64)).astype(np.float32)
        np.testing.assert_array_equal(df[schema.FEATURES].to_numpy(), expected)
    # Continuous columns are ~N(0, 1) on the training split, flags pass through.
    _, train = frames["train"]
    cont = train[schema.CONTINUOUS_FEATURES].to_numpy()
    assert np.abs(cont.mean(axis=0)).max() < 0.05
    assert np.abs(cont.std(axis=0) - 1).max() < 0.1
    for name in schema.FLAG_FEATURES:
        np.testing.assert_array_equal(train[name].to_numpy(), train["raw_" + name].to_numpy())


def test_preprocessing_is_fitted_on_training_rows_only(tiny_dataset, frames, sample):
    """The fit sample is the training rows (all of them here: fewer than max_fit_rows),
    taken in the order of their seeded priority, so refitting on them reproduces it."""
    from effgen.data import split

    ct = provenance.load_preprocessing(tiny_dataset["preprocessing"], n_features=12)
    _, train = frames["train"]
    ids = train["row_id"].to_numpy()
    key = ("runNumber", "evtNumber", "mc_key", "mc_px", "mc_py", "mc_pz")
    h = split.row_hash([sample[c].to_numpy()[ids] for c in key], tiny_dataset["seed"])
    order = np.argsort(split.stream(h, split.PRIORITY))
    raw = train[["raw_" + c for c in schema.FEATURES]].to_numpy()
    refit = preprocess.fit_preprocessing(raw[order], tiny_dataset["seed"])
    np.testing.assert_array_equal(ct.named_transformers_["quantile"].quantiles_,
                                  refit.named_transformers_["quantile"].quantiles_)
    _, test = frames["test"]
    other = preprocess.fit_preprocessing(test[["raw_" + c for c in schema.FEATURES]].to_numpy(),
                                         tiny_dataset["seed"])
    assert not np.array_equal(ct.named_transformers_["quantile"].quantiles_,
                              other.named_transformers_["quantile"].quantiles_)


def test_fit_on_plain_arrays():
    X = np.random.default_rng(0).normal(size=(2000, 12)).astype(np.float32)
    ct = preprocess.fit_preprocessing(X, 0)
    assert not hasattr(ct, "feature_names_in_")
    assert [t[0] for t in ct.transformers] == ["quantile", "flags"]
    assert ct.transformers[0][2] == list(range(8)) and ct.transformers[1][2] == list(range(8, 12))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = ct.transform(X[:10])
    assert out.shape == (10, 12)
    with pytest.raises(ValueError, match="12"):
        preprocess.fit_preprocessing(X[:, :11], 0)


def test_fit_is_the_plain_column_transformer_fit_and_transform_is_bit_exact():
    """fit_preprocessing skips ColumnTransformer.fit's throw-away transform, and
    preprocess.transform skips scikit-learn's overheads: same numbers either way."""
    from sklearn.compose import ColumnTransformer
    from sklearn.preprocessing import QuantileTransformer
    from support import raw_features

    X = raw_features(30_000, 4)  # a discrete z and a spike at 0 in tx: repeated quantiles
    ours = pickle.loads(pickle.dumps(preprocess.fit_preprocessing(X, 7)))
    plain = ColumnTransformer([
        ("quantile", QuantileTransformer(output_distribution="normal", random_state=7), list(range(8))),
        ("flags", "passthrough", list(range(8, 12)))]).fit(X.astype(np.float64))
    np.testing.assert_array_equal(ours.named_transformers_["quantile"].quantiles_,
                                  plain.named_transformers_["quantile"].quantiles_)
    q = ours.named_transformers_["quantile"].quantiles_
    assert not all(np.all(np.diff(q[:, j]) > 0) for j in range(8))  # both paths of transform
    probe = np.concatenate([raw_features(20_000, 5), X[:5000]])
    probe[:50, :8] = q[:50, :8].astype(np.float32)  # exactly on knots
    probe[50:60, 0] = [-1e30, 1e30, 0.0, -0.0, 3e38, -3e38, 1e-30, -1e-30, 5.0, -5.0]
    expected = plain.transform(probe.astype(np.float64)).astype(np.float32)
    np.testing.assert_array_equal(ours.transform(probe.astype(np.float64)).astype(np.float32), expected)
    np.testing.assert_array_equal(preprocess.transform(ours, probe), expected)


def test_fast_interpolation_is_np_interp_bit_for_bit():
    """preprocess._Interp (a table lookup instead of np.interp's binary search) returns
    np.interp's float64 bits for float32 inputs: on the knots, next to them, on either
    side of the range, at +-0, denormals and extremes, for knots of either sign and of
    very different scales."""
    rng = np.random.default_rng(3)
    refs = np.linspace(0, 1, 1000)
    knot_sets = [np.sort(rng.normal(size=1000)), np.sort(rng.lognormal(0, 4, size=1000)),
                 np.sort(-rng.lognormal(0, 4, size=1000)),
                 np.sort(np.r_[rng.normal(0, 1e-6, 500), rng.normal(0, 100, 500)]),
                 np.unique(rng.integers(0, 2000, 1500))[:1000] + 0.5]
    for q in knot_sets:
        q = q.astype(np.float64)
        f = preprocess._Interp(q, refs[:len(q)])
        assert f.ok
        k32 = q.astype(np.float32)
        probe = np.concatenate([
            k32, np.nextafter(k32, np.float32(np.inf)), np.nextafter(k32, -np.float32(np.inf)),
            np.float32([0.0, -0.0, 1e-45, -1e-45, 1e-38, -1e-38, 3.4e38, -3.4e38]),
            rng.uniform(q[0] - 1, q[-1] + 1, 50_000).astype(np.float32),
            rng.choice(k32, 50_000)]).astype(np.float32)
        x = probe.astype(np.float64)
        expected = np.interp(x, q, refs[:len(q)])
        np.testing.assert_array_equal(f(probe, x).view(np.int64), expected.view(np.int64))
        # With QuantileTransformer's clamping folded in, probed around q[0] +- 1e-7 too.
        clamped = preprocess._Interp(q, refs[:len(q)], bound=1e-7)
        assert clamped.ok
        ends = np.float32([q[0] - 1e-7, q[0] + 1e-7, q[-1] - 1e-7, q[-1] + 1e-7, q[0], q[-1]])
        near = np.concatenate([ends + np.float32(d) * np.spacing(ends) for d in range(-40, 41)])
        probe = np.concatenate([probe, near]).astype(np.float32)
        x = probe.astype(np.float64)
        expected = np.interp(x, q, refs[:len(q)])
        expected[x + 1e-7 > q[-1]] = 1
        expected[x - 1e-7 < q[0]] = 0
        np.testing.assert_array_equal(clamped(probe).view(np.int64), expected.view(np.int64))
    assert not preprocess._Interp(np.array([0.0, 1.0, 1.0, 2.0]), refs[:4]).ok  # repeated knots


def test_transform_of_a_large_block_is_bit_exact():
    """Blocks large enough for transform's column threads and fast interpolation."""
    from support import raw_features

    X = raw_features(60_000, 8)
    ct = preprocess.fit_preprocessing(X, 3)
    expected = ct.transform(X.astype(np.float64)).astype(np.float32)
    np.testing.assert_array_equal(preprocess.transform(ct, X), expected)
    np.testing.assert_array_equal(preprocess.transform(ct, X), expected)  # cached interpolators


@pytest.fixture
def small_sample(tmp_path):
    path = tmp_path / "small.root"
    synth.write_sample(path, 3000, 11, progress=False)
    return path


def _run(sample, out, seed=1, **kw):
    return preprocess.preprocess(sample, out / "data", out / "model" / "tX.pkl", seed,
                                 shard_rows=700, progress=False, **kw)


def _snapshot(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic_for_a_seed(small_sample, tmp_path):
    a, b, c = _run(small_sample, tmp_path / "a"), _run(small_sample, tmp_path / "b"), \
        _run(small_sample, tmp_path / "c", seed=2)
    for split in SPLITS:
        ta = FeatherReader(a[split]).as_pandas()
        assert ta.equals(FeatherReader(b[split]).as_pandas())
        assert not np.array_equal(ta["row_id"], FeatherReader(c[split]).as_pandas()["row_id"])


@pytest.mark.filterwarnings("ignore:n_quantiles")  # 1000 quantiles > 500 rows, expected here
def test_max_fit_rows(small_sample, tmp_path):
    out = _run(small_sample, tmp_path, max_fit_rows=500)
    ct = provenance.load_preprocessing(out["preprocessing"], n_features=12)
    assert ct.named_transformers_["quantile"].n_quantiles_ == 500


def test_refuses_to_overwrite_without_force(small_sample, tmp_path):
    _run(small_sample, tmp_path)
    before = _snapshot(tmp_path / "data"), (tmp_path / "model" / "tX.pkl").read_bytes()
    with pytest.raises(FileExistsError, match="force"):
        _run(small_sample, tmp_path, seed=5)
    cmd = [sys.executable, "-m", "effgen", "preprocess", "--input", str(small_sample),
           "--output-dir", str(tmp_path / "data"), "--preprocessing",
           str(tmp_path / "model" / "tX.pkl"), "--seed", "5", "--shard-rows", "700"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode != 0 and "--force" in res.stderr
    assert (_snapshot(tmp_path / "data"), (tmp_path / "model" / "tX.pkl").read_bytes()) == before
    res = subprocess.run(cmd + ["--force"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert _snapshot(tmp_path / "data") != before[0]
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == sorted(SPLITS + [preprocess.REPORT])


def _failing_writer(monkeypatch, fail_at):
    import threading

    calls, lock = [], threading.Lock()  # shards may be written by several threads
    real = preprocess._write_shard

    def writer(table, path):
        with lock:
            calls.append(path)
            n = len(calls)
        if n == fail_at:
            raise OSError("disk full (simulated)")
        real(table, path)

    monkeypatch.setattr(preprocess, "_write_shard", writer)
    return calls


def test_scratch_files_are_few_and_freed_split_by_split(small_sample, tmp_path, monkeypatch):
    """One scratch file per (chunk, split), not per (chunk, shard); a split's files are
    deleted once its shards are written (here, in order: train's before test's shards)."""
    seen, real = [], preprocess._write_shard

    def writer(table, path):
        seen.append(sorted(p.name for p in (tmp_path / "data").rglob("*.bin")))
        return real(table, path)

    class Now:  # the deletions run at once, not on a thread: what the shards see is fixed
        def submit(self, fn, *args, **kwargs):
            fn(*args, **kwargs)

        def shutdown(self, wait):
            pass

    class Files(preprocess._ScratchFiles):
        def __init__(self):
            super().__init__()
            self._pool.shutdown(wait=True)
            self._pool = Now()

    monkeypatch.setattr(preprocess, "_write_shard", writer)
    monkeypatch.setattr(preprocess, "_ScratchFiles", Files)
    out = _run(small_sample, tmp_path, workers=1, step_size=500)  # 6 chunks; shards 3 + 2 + 1
    assert sum(out["rows"].values()) == 3000 and len(seen) == 6
    chunks = 3000 // 500
    assert seen[0] == [f"{i:06d}-{s}.bin" for i in range(chunks) for s in range(3)]
    for first_test_shard in seen[3:5]:
        assert not [f for f in first_test_shard if f.endswith("-0.bin")]
        assert len(first_test_shard) == 2 * chunks
    assert not list((tmp_path / "data").rglob("*.bin"))


def test_chunk_buffers_are_reused_and_gc_frozen_during_passes(small_sample, tmp_path, monkeypatch):
    import gc

    lent, frozen = [], []

    class Buffers(preprocess._Buffers):
        @contextlib.contextmanager
        def get(self, nbytes):
            with super().get(nbytes) as buf:
                lent.append(buf.__array_interface__["data"][0])
                frozen.append(gc.get_freeze_count())
                yield buf

    monkeypatch.setattr(preprocess, "_Buffers", Buffers)
    before = gc.get_freeze_count()
    _run(small_sample, tmp_path, workers=1, step_size=500)
    assert len(lent) == 6 and len(set(lent)) == 1  # chunks of 500 rows: one buffer for all
    assert min(frozen) > before and gc.get_freeze_count() == before


def test_reuse_freed_memory_switches_arrow_to_the_tuned_malloc():
    code = ("import pyarrow as pa; from effgen.data import preprocess; "
            "print(preprocess.reuse_freed_memory(), pa.default_memory_pool().backend_name)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "system"]


@pytest.mark.parametrize("workers", [1, 2])
def test_failure_midway_leaves_no_output(small_sample, tmp_path, monkeypatch, workers):
    calls = _failing_writer(monkeypatch, fail_at=4)  # train has 3 shards: fails in test
    with pytest.raises(OSError, match="simulated"):
        _run(small_sample, tmp_path, workers=workers)
    # In parallel, the shard being written beside the failing one may still be written.
    assert len(calls) == 4 if workers == 1 else 4 <= len(calls) <= 4 + workers - 1
    assert not (tmp_path / "data").exists()  # no split dir, no temporaries, no empty dir
    assert not (tmp_path / "model" / "tX.pkl").exists()


@pytest.mark.parametrize("workers", [1, 2])
def test_failure_midway_with_force_keeps_old_output(small_sample, tmp_path, monkeypatch, workers):
    _run(small_sample, tmp_path)
    before = _snapshot(tmp_path)
    _failing_writer(monkeypatch, fail_at=6)
    with pytest.raises(OSError, match="simulated"):
        _run(small_sample, tmp_path, seed=9, force=True, workers=workers)
    assert _snapshot(tmp_path) == before
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == sorted(SPLITS + [preprocess.REPORT])


def _tuple_table(n, seed):
    return pa.Table.from_batches([pa.RecordBatch.from_pydict(c) for c in synth.generate_tuple(n, seed)])


def test_sample_schema_is_checked(tmp_path):
    table = _tuple_table(100, 1)
    bad = tmp_path / "bad.feather"
    feather.write_feather(table.drop_columns(["mc_eta"]), bad)
    with pytest.raises(DataError, match=r"bad\.feather: missing branches \['mc_eta'\]; it holds .*'mc_phi'"):
        _run(bad, tmp_path)
    with pytest.raises(DataError, match=r"nope\.feather.*missing"):
        _run(tmp_path / "nope.feather", tmp_path)
    junk = tmp_path / "junk.feather"
    junk.write_bytes(b"not arrow at all")
    with pytest.raises(DataError, match=r"junk\.feather: not a ROOT, feather or parquet file"):
        _run(junk, tmp_path)
    text = tmp_path / "text.feather"
    j = table.schema.get_field_index("mc_eta")
    feather.write_feather(table.set_column(j, "mc_eta", pa.array(["x"] * 100)), text)
    with pytest.raises(DataError, match=r"text\.feather: branch 'mc_eta' is not a flat numeric column"):
        _run(text, tmp_path)
    assert not (tmp_path / "data").exists()


def test_non_finite_sample_values_are_refused_naming_branch_and_entry(tmp_path):
    table = _tuple_table(200, 1)
    for column, value in (("mc_p", np.nan), ("mc_x", np.inf), ("truth_long", np.nan)):
        j = table.schema.get_field_index(column)
        values = table.column(column).to_numpy().copy()
        values[[37, 120]] = value
        bad = tmp_path / f"bad_{column}.feather"
        feather.write_feather(table.set_column(j, column, pa.array(values)), bad)
        with pytest.raises(DataError, match=rf"bad_{column}\.feather: branch '{column}' has 2 "
                                            rf"non-finite values \(first at entry 37"):
            _run(bad, tmp_path)
    assert not (tmp_path / "data").exists()


def test_truth_columns_must_be_probabilities(tmp_path):
    table = _tuple_table(200, 1)
    j = table.schema.get_field_index("truth_long")
    values = table.column("truth_long").to_numpy().copy()
    values[[50, 60]] += 0.5
    bad = tmp_path / "truth.feather"
    feather.write_feather(table.set_column(j, "truth_long", pa.array(values)), bad)
    with pytest.raises(DataError, match=r"truth\.feather: truth columns .* not probabilities summing "
                                        r"to 1 in 2 rows \(first at entry 50"):
        _run(bad, tmp_path)
    assert not (tmp_path / "data").exists()


def test_load_preprocessing_errors(tmp_path):
    from sklearn.compose import ColumnTransformer

    with pytest.raises(errors.PreprocessingError, match=r"missing\.pkl.*missing"):
        provenance.load_preprocessing(tmp_path / "missing.pkl", n_features=12)
    (tmp_path / "junk.pkl").write_bytes(b"\x00garbage")
    with pytest.raises(errors.PreprocessingError, match=r"junk\.pkl"):
        provenance.load_preprocessing(tmp_path / "junk.pkl", n_features=12)
    (tmp_path / "dict.pkl").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(errors.PreprocessingError, match=r"dict\.pkl.*ColumnTransformer"):
        provenance.load_preprocessing(tmp_path / "dict.pkl", n_features=12)
    (tmp_path / "unfitted.pkl").write_bytes(pickle.dumps(ColumnTransformer([])))
    with pytest.raises(errors.PreprocessingError, match=r"unfitted\.pkl.*not fitted"):
        provenance.load_preprocessing(tmp_path / "unfitted.pkl", n_features=12)
    X = np.random.default_rng(0).normal(size=(100, 13))
    ct13 = ColumnTransformer([("p", "passthrough", list(range(13)))]).fit(X)
    preprocess.save_preprocessing(ct13, tmp_path / "13.pkl")
    with pytest.raises(errors.PreprocessingError, match=r"13\.pkl.*13 inputs"):
        provenance.load_preprocessing(tmp_path / "13.pkl", n_features=12)


def test_cli_defaults(monkeypatch, tmp_path):
    import argparse

    for var in ("TRAIN_DATA", "OUTPUT_PREPROCESSING"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("EFFGEN_WORKDIR", str(tmp_path))
    parser = argparse.ArgumentParser()
    preprocess.register(parser.add_subparsers())
    monkeypatch.delenv("INPUT_FILES", raising=False)
    args = parser.parse_args(["preprocess"])
    assert args.input == [str(tmp_path / "data" / "sample.root")]
    assert args.tree == "TrackingTupler/sim"
    assert args.output_dir == tmp_path / "data"
    assert args.preprocessing == tmp_path / "model" / "tX.pkl"
    assert args.max_fit_rows == 1_000_000 and not args.force
    monkeypatch.setenv("INPUT_FILES", "a.root b.root")
    parser = argparse.ArgumentParser()
    preprocess.register(parser.add_subparsers())
    assert parser.parse_args(["preprocess"]).input == ["a.root b.root"]


def test_bottom_k_and_argsort_stable_match_plain_numpy():
    """bottom_k keeps the k lowest (priority, row_id) whatever the cuts and the merge
    order, ties included; sample_rows orders them so; argsort_stable is
    np.argsort(kind="stable"), ties included."""
    from effgen.data import split

    rng = np.random.default_rng(5)
    for pri in (rng.integers(0, 2**64 - 1, 40_000, dtype=np.uint64),
                rng.integers(0, 300, 40_000).astype(np.uint64)):  # many ties
        ids = rng.permutation(40_000).astype(np.int64)
        rows = rng.random((40_000, 3)).astype(np.float32)
        expected = rows[np.lexsort((ids, pri))]
        for k in (1, 7, 999, 39_999, 40_000, 10**6):
            cuts = np.sort(rng.integers(0, 40_000, 30))
            parts = [split.bottom_k(k, split.FitSample(pri[lo:hi], ids[lo:hi], rows[lo:hi]))
                     for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, 40_000])]
            rng.shuffle(parts)
            merged = split.bottom_k(k, *parts[:10])
            merged = split.bottom_k(k, *parts[20:], merged, *parts[10:20])
            np.testing.assert_array_equal(split.sample_rows(merged), expected[:k])
            assert len(merged.priority) == min(k, 40_000)
    pri = rng.integers(0, 2**64 - 1, 40_000, dtype=np.uint64)
    tied = rng.integers(0, 50, 10_000).astype(np.uint64)
    np.testing.assert_array_equal(split.argsort_stable(tied), np.argsort(tied, kind="stable"))
    np.testing.assert_array_equal(split.argsort_stable(pri), np.argsort(pri, kind="stable"))
    # Keys sharing their high bits but not their low ones (the packed sort cannot order
    # them: the fallback must), ties among them, extreme values, tiny inputs.
    low = rng.integers(0, 2**13, 5_000, dtype=np.uint64)
    for high in (rng.integers(0, 100, 5_000).astype(np.uint64), np.full(5_000, 2**51 - 1, np.uint64)):
        keys = (high << np.uint64(13)) | low
        keys[::7] = keys[0]
        np.testing.assert_array_equal(split.argsort_stable(keys), np.argsort(keys, kind="stable"))
    for keys in ([5, 3], [2**64 - 1, 0, 2**64 - 1], [7]):
        keys = np.array(keys, np.uint64)
        np.testing.assert_array_equal(split.argsort_stable(keys), np.argsort(keys, kind="stable"))


def test_truth_check_and_species_flags_match_the_plain_numpy_forms():
    """derive's column-wise truth check flags the rows the (n, 4) form flags (row sums in
    float64, any(axis=1)), edge sums and NaNs included; species_flags matches np.isin on
    the pid as int64, for every integer and float pid type."""
    from effgen.data import derive

    rng = np.random.default_rng(11)
    n = 50_000
    truth = rng.dirichlet(np.ones(4), n).astype(np.float32)
    truth[rng.random(n) < 0.01, 2] *= -1
    truth[rng.random(n) < 0.01, 1] += 1
    truth[rng.random(n) < 0.01, 3] = np.nan
    edge = rng.random(n) < 0.05  # sums within a few ulps of 1 +- the tolerance
    truth[edge, 0] += np.float32(derive.TRUTH_SUM_TOLERANCE) * rng.choice([-1, 1], edge.sum()) \
        * (1 + rng.normal(0, 1e-3, edge.sum())).astype(np.float32)
    for t in (truth, truth.astype(np.float64)):
        stacked = t.astype(np.float64)
        with np.errstate(invalid="ignore"):
            expected = (stacked < 0).any(axis=1) | (stacked > 1).any(axis=1)
            expected |= np.abs(stacked.sum(axis=1) - 1.0) > derive.TRUTH_SUM_TOLERANCE
        got = derive._bad_truth([np.ascontiguousarray(c) for c in t.T])
        np.testing.assert_array_equal(got, expected)
        assert 0 < got.sum() < n

    codes = np.array([11, -11, 13, -13, 211, -211, 321, -321, 2212, -2212, 22, 0, 1000020040])
    pid = rng.choice(codes, n)
    for dtype in (np.int32, np.int64, np.float32, np.float64):
        p = pid.astype(dtype)
        a = np.abs(p.astype(np.int64))
        expected = np.stack([a == 11, a == 13, np.isin(a, derive.HADRONS)]).astype(np.float32)
        np.testing.assert_array_equal(derive.species_flags(p), expected)
    extreme = np.array([np.iinfo(np.int32).min, np.iinfo(np.int32).max, -11], np.int32)
    np.testing.assert_array_equal(derive.species_flags(extreme)[0], [0, 0, 1])


def test_row_hash_blocks_give_the_whole_array_hash():
    """row_hash works in blocks of HASH_BLOCK rows: the hash of each row is splitmix64's
    chain over its columns, computed here on the whole arrays at once."""
    from effgen.data import split

    def mix(x):
        x = x ^ (x >> np.uint64(30))
        x = x * np.uint64(0xBF58476D1CE4E5B9)
        x = x ^ (x >> np.uint64(27))
        x = x * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))

    rng = np.random.default_rng(3)
    n = 3 * split.HASH_BLOCK + 17
    cols = [rng.integers(-2**31, 2**31, n).astype(np.int32), rng.normal(size=n).astype(np.float32),
            rng.integers(0, 2**62, n)]
    for seed in (0, 42, 2**64 - 1):
        h = mix(np.full(n, (seed + 0x9E3779B97F4A7C15) % 2**64, dtype=np.uint64))
        for c in cols:
            bits = c.astype(np.int64 if c.dtype.kind == "i" else np.float64).view(np.uint64)
            h = mix((h ^ bits) + np.uint64(0x9E3779B97F4A7C15))
        np.testing.assert_array_equal(split.row_hash(cols, seed), h)
        np.testing.assert_array_equal(split.row_hash([c[:5] for c in cols], seed), h[:5])
    x = rng.integers(0, 2**63, 1000).astype(np.uint64)
    before = x.copy()
    np.testing.assert_array_equal(split.mix(x), mix(before))
    np.testing.assert_array_equal(x, before)  # mix leaves its input alone


def test_fit_in_a_child_process_is_the_fresh_process_fit(tmp_path):
    """FitProcess (the fit beside pass 1, so that scikit-learn is imported on another
    core) returns the bytes pickle.dumps gives for the same fit in a fresh process (the
    old in-process path of the CLI), and quantile tables that transform exactly as the
    fitted object does; its files are removed."""
    from support import raw_features

    from effgen.data.fit_process import FitProcess

    X = raw_features(30_000, 4)  # repeated quantiles: both paths of transform
    np.save(tmp_path / "x.npy", X)
    code = ("import pickle, sys, numpy as np; from effgen.data import preprocess; "
            f"ct = preprocess.fit_preprocessing(np.load({str(tmp_path / 'x.npy')!r}), 7); "
            "sys.stdout.buffer.write(pickle.dumps(ct, protocol=pickle.HIGHEST_PROTOCOL))")
    fresh = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True).stdout
    (tmp_path / "x.npy").unlink()
    fitter = FitProcess.start()
    try:
        blob, tables = fitter.fit(X, 7, tmp_path)
    finally:
        fitter.close()
    assert blob == fresh
    ct = preprocess.fit_preprocessing(X, 7)
    quantile = ct.named_transformers_["quantile"]
    np.testing.assert_array_equal(tables.quantiles_, quantile.quantiles_)
    np.testing.assert_array_equal(tables.references_, quantile.references_)
    probe = np.concatenate([raw_features(20_000, 5), X[:5000]])
    probe[:50, 0] = [-1e30, 1e30, 0.0, -0.0, 3e38] * 10
    expected = ct.transform(probe.astype(np.float64)).astype(np.float32)
    np.testing.assert_array_equal(preprocess.transform(tables, probe), expected)
    assert list(tmp_path.iterdir()) == []


def test_fit_process_failures_name_the_cause(tmp_path):
    from effgen.data.fit_process import FitProcess

    fitter = FitProcess.start()
    with pytest.raises(errors.PreprocessingError, match=r"child process .*expected an \(n, 12\)"):
        fitter.fit(np.zeros((5, 11), np.float32), 0, tmp_path)
    fitter.close()
    fitter.close()  # closing twice is harmless


def test_fit_process_imports_scikit_learn_before_the_request():
    """The child's point: scikit-learn is imported as soon as it starts (beside pass 1),
    not when the fit sample arrives. Given no request at all, it still imports it."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "effgen.data.fit_process"],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, check=True)
    assert "sklearn.preprocessing" in proc.stderr and "sklearn.compose" in proc.stderr


@pytest.mark.parametrize("n", [1, 700, 5000, 30_000])
def test_fit_quantiles_are_scikit_learns(n):
    """fit_quantiles (numpy alone: pass 2 transforms with it while the child pickles the
    fit) gives QuantileTransformer's tables bit for bit: fewer rows than quantiles, fewer
    than its 10,000-row subsample, more (then its seeded subsample), repeated values."""
    from support import raw_features

    X = raw_features(n, 3)
    order = np.random.default_rng(5).permutation(n)  # preprocess hands its sample's order
    for seed, rows in ((0, None), (11, None), (11, order)):
        ours = preprocess.fit_quantiles(X, seed, rows)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # n_quantiles > n
            quantile = preprocess.fit_preprocessing(X if rows is None else X[rows], seed
                                                    ).named_transformers_["quantile"]
        assert ours.quantiles_.tobytes() == quantile.quantiles_.tobytes()
        assert ours.quantiles_.shape == quantile.quantiles_.shape
        assert ours.references_.tobytes() == quantile.references_.tobytes()
    with pytest.raises(ValueError, match="expected an"):
        preprocess.fit_quantiles(X[:, :11], 0)


@pytest.mark.parametrize("workers", [1, 2])
def test_each_shards_writeback_starts_once_it_is_written(small_sample, tmp_path, monkeypatch, workers):
    """Every shard's pages are handed to the disk as soon as it is written (so that they
    do not pile up on the scratch files' and make the kernel write those), whole."""
    started = []

    def start(path):
        started.append((path.name, path.stat().st_size))

    monkeypatch.setattr(preprocess, "_start_writeback", start)
    _run(small_sample, tmp_path, workers=workers, step_size=500)
    shards = sorted((p.name, p.stat().st_size) for p in (tmp_path / "data").rglob("part-*.feather"))
    assert len(shards) == 6 and sorted(started) == shards
    preprocess._SYNC_FILE_RANGE.clear()
    monkeypatch.undo()
    preprocess._start_writeback(next((tmp_path / "data").rglob("part-*.feather")))  # really runs


def test_assign_split_and_group_order_match_plain_numpy():
    """The integer split assignment is the float search it replaces, at the bounds too;
    group_order is a stable argsort (16- and 32-bit packings, ties everywhere)."""
    from effgen.data import split

    rng = np.random.default_rng(5)
    for fractions in ([0.5, 0.4, 0.1], [1, 2, 3, 4], [0.3, 0.7, 0.0], [1.0]):
        bounds = np.cumsum(fractions, dtype=np.float64)
        bounds /= bounds[-1]
        edges = [int(np.ceil(b * 2.0**53)) + d for b in bounds for d in (-1, 0, 1)]
        m = np.array([e for e in edges if 0 <= e < 2**53] + [0, 2**53 - 1], np.uint64)
        h = np.concatenate([m << np.uint64(11), (m << np.uint64(11)) | np.uint64(2047),
                            rng.integers(0, 2**64 - 1, 10_000, dtype=np.uint64)])
        old = np.minimum(np.searchsorted(bounds, split.unit(h), side="right"), len(bounds) - 1)
        np.testing.assert_array_equal(split.assign_split(h, fractions), old)
    for n, groups in ((0, 3), (1, 1), (5000, 40), (70_000, 3000), (1 << 17, 1 << 16)):
        group = rng.integers(0, groups, n)
        np.testing.assert_array_equal(split.group_order(group, groups), np.argsort(group, kind="stable"))
