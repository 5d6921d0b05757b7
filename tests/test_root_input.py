"""The real front door: LHCb tuples (TrackingTupler/sim) in ROOT, feather or parquet,
streamed through `effgen preprocess`; bad inputs refused by name with nothing written;
and a tuple WITHOUT truth columns, sorted by momentum, through preprocess, train and
validate."""

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest
import uproot

from effgen import schema
from effgen.data import derive, preprocess, synth
from effgen.data.reader import FeatherReader
from effgen.errors import DataError

TREE = "TrackingTupler/sim"
SPLITS = list(preprocess.SPLITS)


def tuple_arrays(n, seed, drop=()):
    chunks = list(synth.generate_tuple(n, seed))
    return {c: np.concatenate([ch[c] for ch in chunks]) for c in synth.TUPLE_BRANCHES if c not in drop}


def take(arrays, rows):
    return {c: v[rows] for c, v in arrays.items()}


def write_root(path, arrays, tree=TREE, chunk=None, compression=None):
    with uproot.recreate(path, compression=compression) as f:
        f.mktree(tree, {c: v.dtype for c, v in arrays.items()})
        n = len(next(iter(arrays.values())))
        step = chunk or max(n, 1)
        for lo in range(0, max(n, 1), step):
            f[tree].extend({c: v[lo:lo + step] for c, v in arrays.items()})
    return path


def run(inputs, out, seed=1, **kw):
    kw.setdefault("shard_rows", 1500)
    return preprocess.preprocess(inputs, out / "data", out / "tX.pkl", seed, progress=False, **kw)


def shards(out, drop=()):
    """{split: [table per shard]} with the columns in `drop` removed."""
    got = {}
    for split in SPLITS:
        reader = FeatherReader(out / "data" / split)
        got[split] = [feather.read_table(f).drop_columns(list(drop)) for f in reader.data_files]
    return got


def assert_same_shards(a, b, drop=()):
    sa, sb = shards(a, drop), shards(b, drop)
    for split in SPLITS:
        assert len(sa[split]) == len(sb[split]), split
        for ta, tb in zip(sa[split], sb[split]):
            assert ta.equals(tb), split
    assert (a / "tX.pkl").read_bytes() == (b / "tX.pkl").read_bytes()


@pytest.fixture(scope="module")
def arrays():
    return tuple_arrays(12_000, 21)


@pytest.fixture(scope="module")
def reference(arrays, tmp_path_factory):
    """One ROOT file, preprocessed once."""
    d = tmp_path_factory.mktemp("root_reference")
    write_root(d / "t.root", arrays)
    run(d / "t.root", d)
    return d


# ---- formats and invariance --------------------------------------------------------------

def test_root_shards_carry_the_notebook_derivation(reference, arrays):
    frame = {s: FeatherReader(reference / "data" / s).as_pandas() for s in SPLITS}
    view = synth.features_view(arrays)
    for df in frame.values():
        ids = df["row_id"].to_numpy()
        # mc_log10_p = float32(log(mc_p) / log(10)); tx, ty recomputed from the momenta.
        p = arrays["mc_p"][ids].astype(np.float64)
        np.testing.assert_array_equal(df["raw_mc_log10_p"], (np.log(p) / np.log(10)).astype(np.float32))
        np.testing.assert_array_equal(
            df["raw_mc_tx"], (arrays["mc_px"][ids].astype(np.float64) / arrays["mc_pz"][ids]).astype(np.float32))
        for name in schema.FEATURES:
            np.testing.assert_array_equal(df["raw_" + name], view[name][ids], err_msg=name)
        t = arrays["type"][ids]
        for j, code in enumerate((3, 4, 5), start=1):
            np.testing.assert_array_equal(df[schema.LABELS[j]] == 1, t == code)
        np.testing.assert_array_equal(df["not_recoed"] == 1, ~np.isin(t, [3, 4, 5]))
        for name in ("acceptance", "type"):
            np.testing.assert_array_equal(df[name], arrays[name][ids])
        np.testing.assert_array_equal(df[schema.PID], arrays["mcID"][ids])
    report = json.loads((reference / "data" / preprocess.REPORT).read_text())
    assert report["entries"] == report["kept"] == len(arrays["mc_p"])
    assert report["split_key"] == ["runNumber", "evtNumber", "mc_key", "mc_px", "mc_py", "mc_pz"]
    unknown = {str(c): int(k) for c, k in zip(*np.unique(arrays["type"], return_counts=True))
               if c not in (0, 3, 4, 5)}
    assert unknown and report["unknown_types_as_not_recoed"] == unknown


@pytest.mark.parametrize("fmt", ["feather", "parquet", "zlib-root"])
def test_other_formats_give_identical_shards(reference, arrays, tmp_path, fmt):
    table = pa.table(arrays)
    if fmt == "feather":
        path = tmp_path / "t.feather"
        feather.write_feather(table, path, compression="uncompressed", chunksize=1000)
    elif fmt == "parquet":
        path = tmp_path / "t.parquet"
        pq.write_table(table, path, row_group_size=2500)
    else:  # what real tuples are: compressed baskets
        path = write_root(tmp_path / "t.root", arrays, chunk=3000, compression=uproot.ZLIB(4))
    run(path, tmp_path)
    assert_same_shards(reference, tmp_path)


def test_chunk_size_and_file_count_do_not_change_the_output(reference, arrays, tmp_path):
    cuts = [0, 1000, 5500, 12_000]
    files = [write_root(tmp_path / f"part{k}.root", take(arrays, slice(lo, hi)))
             for k, (lo, hi) in enumerate(zip(cuts[:-1], cuts[1:]))]
    # The notebook's INPUT_FILES form: one space-separated string.
    run(" ".join(str(f) for f in files), tmp_path, step_size=777)
    assert_same_shards(reference, tmp_path)
    globbed = tmp_path / "glob"
    run([str(tmp_path / "part*.root")], globbed, step_size=4096)
    assert_same_shards(reference, globbed)
    spaced = tmp_path / "my tuples"
    spaced.mkdir()
    for f in files:
        f.rename(spaced / f.name)
    run([str(spaced / f.name) for f in files], tmp_path / "spaced")  # a path with a space
    assert_same_shards(reference, tmp_path / "spaced")


def _output_bytes(out):
    return {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_dask_workers_give_byte_identical_outputs(arrays, tmp_path):
    """Several files, several chunk sizes: dask with 2 or 3 threads, or 2 processes,
    writes exactly the single-process run's bytes (shards, definitions.json, tX.pkl,
    preprocess.json)."""
    cuts = [0, 2500, 2501, 9000, 12_000]
    files = [write_root(tmp_path / f"part{k}.root", take(arrays, slice(lo, hi)), chunk=1000)
             for k, (lo, hi) in enumerate(zip(cuts[:-1], cuts[1:]))]
    for step, runs in ((700, [(2, "threads"), (3, "threads")]),
                       (4096, [(2, "threads"), (2, "processes")])):
        single = tmp_path / f"single-{step}"
        run(files, single, step_size=step, workers=1)
        expected = _output_bytes(single)
        assert len([p for p in expected if p.suffix == ".feather"]) > 3
        for workers, scheduler in runs:
            out = tmp_path / f"{scheduler}-{workers}-{step}"
            run(files, out, step_size=step, workers=workers, scheduler=scheduler)
            assert _output_bytes(out) == expected, (workers, scheduler, step)


def _preprocess_in_fresh_python(arrays, tmp_path, workers, assertion):
    """Preprocess 3000 rows in a new interpreter, then run `assertion` there (which
    modules a run imports can only be seen in a process that imported nothing before)."""
    path = write_root(tmp_path / "t.root", take(arrays, slice(0, 3000)))
    code = ("import sys; from effgen.data import preprocess; "
            f"preprocess.preprocess({str(path)!r}, {str(tmp_path / 'data')!r}, "
            f"{str(tmp_path / 'tX.pkl')!r}, 1, shard_rows=1500, progress=False, workers={workers}); "
            + assertion)
    subprocess.run([sys.executable, "-c", code], check=True)


def test_single_process_path_does_not_use_dask(arrays, tmp_path):
    _preprocess_in_fresh_python(arrays, tmp_path, 1, "assert 'dask' not in sys.modules")
    assert (tmp_path / "data" / "train" / "part-00000.feather").exists()


@pytest.mark.parametrize("workers", [1, 2])
def test_the_fit_runs_in_a_child_and_preprocess_never_imports_scikit_learn(arrays, tmp_path, workers):
    """The fit runs in effgen.data.fit_process's child, started before pass 1: this
    process never imports scikit-learn, with or without dask."""
    _preprocess_in_fresh_python(arrays, tmp_path, workers,
                                "assert 'sklearn' not in sys.modules, 'sklearn imported'")
    assert (tmp_path / "tX.pkl").exists()


def test_sorted_input_gives_the_same_shuffled_shards(reference, arrays, tmp_path):
    """A tuple sorted by momentum: same rows in every split, every shard and every place
    in a shard (only row_id, the input position, differs), same preprocessing. So each
    training shard is a random subset of the sample in random order."""
    order = np.argsort(arrays["mc_p"], kind="stable")
    path = write_root(tmp_path / "sorted.root", take(arrays, order), chunk=2000)
    run(path, tmp_path, step_size=1000)
    assert_same_shards(reference, tmp_path, drop=["row_id"])
    all_p = np.log10(arrays["mc_p"])
    for table in shards(tmp_path)["train"]:
        logp = table.column("raw_mc_log10_p").to_numpy()
        position = np.arange(len(logp))
        assert abs(np.corrcoef(position, logp)[0, 1]) < 0.1  # not sorted within the shard
        assert abs(np.median(logp) - np.median(all_p)) < 0.05  # a subset of the whole range
        assert logp.min() < np.quantile(all_p, 0.01) and logp.max() > np.quantile(all_p, 0.99)


def test_fit_sample_is_drawn_from_the_whole_input(arrays, tmp_path):
    """On a momentum-sorted tuple, a fit sample of 1000 rows spans the whole momentum
    range (the first 1000 rows would be the softest particles)."""
    order = np.argsort(arrays["mc_p"], kind="stable")
    path = write_root(tmp_path / "sorted.root", take(arrays, order))
    out = run(path, tmp_path, max_fit_rows=1000, step_size=500)
    from effgen import provenance

    ct = provenance.load_preprocessing(out["preprocessing"], n_features=12)
    q = ct.named_transformers_["quantile"].quantiles_[:, schema.FEATURES.index("mc_log10_p")]
    all_logp = np.sort(np.log10(arrays["mc_p"]))
    assert abs(np.median(q) - np.median(all_logp)) < 0.05
    assert q[-1] > all_logp[int(0.99 * len(all_logp))]


@pytest.mark.parametrize("dropped", [0.0, 0.9])
def test_fit_candidates_bound_is_exact(arrays, tmp_path, monkeypatch, dropped):
    """Chunks offer only training rows below a priority bound (far fewer rows merged);
    the fit sample, so tX.pkl, is the one every training row competing gives, also when
    most rows are dropped and too few pass the bound (then the candidates are gathered
    again without it)."""
    data = {c: v.copy() for c, v in arrays.items()}
    data["mc_pz"][np.random.default_rng(3).random(len(data["mc_pz"])) < dropped] *= -1
    path = write_root(tmp_path / "t.root", data)
    bounds = []
    real = preprocess._fit_bound
    monkeypatch.setattr(preprocess, "_fit_bound", lambda *a: bounds.append(real(*a)) or bounds[-1])
    gathered = []
    real_chunk = preprocess._spill_chunk

    def chunk(job):
        gathered.append((job.spill, job.fit_bound))
        return real_chunk(job)

    monkeypatch.setattr(preprocess, "_spill_chunk", chunk)
    for workers in (1, 2):
        run(path, tmp_path / f"bound-{workers}", max_fit_rows=500, step_size=1000, workers=workers)
    assert bounds[0] is not None and bounds[0] < 2**63  # a third of the priorities
    again = [g for g in gathered if not g[0]]
    assert bool(again) == (dropped > 0) and all(b is None for _, b in again)
    monkeypatch.setattr(preprocess, "_fit_bound", lambda *a: None)
    run(path, tmp_path / "all", max_fit_rows=500, step_size=1000, workers=1)
    for workers in (1, 2):
        assert (tmp_path / f"bound-{workers}" / "tX.pkl").read_bytes() == (tmp_path / "all" / "tX.pkl").read_bytes()
        assert _output_bytes(tmp_path / f"bound-{workers}" / "data") == _output_bytes(tmp_path / "all" / "data")


def test_without_key_branches_the_split_hashes_the_values(arrays, tmp_path):
    no_key = {c: v for c, v in arrays.items() if c not in derive.KEY}
    whole = write_root(tmp_path / "whole.root", no_key)
    a = run(whole, tmp_path / "a")
    halves = [write_root(tmp_path / f"h{k}.root", take(no_key, s))
              for k, s in enumerate((slice(0, 7000), slice(7000, None)))]
    run(halves, tmp_path / "b", step_size=999)
    assert_same_shards(tmp_path / "a", tmp_path / "b")
    report = json.loads((tmp_path / "a" / "data" / preprocess.REPORT).read_text())
    assert report["split_key"] == derive.REQUIRED
    assert all(5000 < n < 7000 for n in [a["rows"]["train"]])


def test_files_that_restart_their_numbering_still_split_independently(arrays, tmp_path):
    """Two jobs' tuples with the same (runNumber, evtNumber, mc_key) for different
    particles: a particle's split does not follow its namesake's."""
    other = tuple_arrays(12_000, 22)
    np.testing.assert_array_equal(other["evtNumber"], arrays["evtNumber"])
    a, b = write_root(tmp_path / "a.root", arrays), write_root(tmp_path / "b.root", other)
    run([a, b], tmp_path)
    split_of = np.empty(24_000, dtype=int)
    for k, s in enumerate(SPLITS):
        split_of[FeatherReader(tmp_path / "data" / s).as_pandas()["row_id"].to_numpy()] = k
    same = (split_of[:12_000] == split_of[12_000:]).mean()
    assert abs(same - (0.5**2 + 0.4**2 + 0.1**2)) < 0.03  # independent, not always together


def test_without_truth_columns(arrays, tmp_path):
    path = write_root(tmp_path / "t.root", {c: v for c, v in arrays.items() if c not in schema.TRUTH})
    run(path, tmp_path)
    reader = FeatherReader(tmp_path / "data" / "train")
    assert reader.extra == preprocess.extra_columns(truth=False)
    assert not set(schema.TRUTH) & set(feather.read_table(reader.data_files[0]).column_names)


# ---- selection and counts ----------------------------------------------------------------

def test_lamarr_never_sends_pz_le_0_or_neutral_rows_they_are_dropped_and_counted(arrays, tmp_path):
    bad = {c: v.copy() for c, v in arrays.items()}
    bad["mc_pz"][[3, 10, 11]] = [-5.0, 0.0, -1e3]
    bad["mc_charge"][[20, 21]] = 0
    bad["acceptance"][[30]] = 2
    path = write_root(tmp_path / "t.root", bad)
    res = subprocess.run([sys.executable, "-m", "effgen", "preprocess", "--input", str(path),
                          "--output-dir", str(tmp_path / "data"), "--preprocessing",
                          str(tmp_path / "tX.pkl"), "--shard-rows", "1500"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "3 with mc_pz <= 0" in res.stdout and "2 with mc_charge == 0" in res.stdout
    assert "1 with acceptance > 1" in res.stdout
    assert "track types counted as not_recoed: type 1:" in res.stdout
    report = json.loads((tmp_path / "data" / preprocess.REPORT).read_text())
    assert report["dropped"] == {"acceptance > 1": 1, "mc_pz <= 0": 3, "mc_charge == 0": 2}
    ids = np.concatenate([FeatherReader(tmp_path / "data" / s).as_pandas()["row_id"] for s in SPLITS])
    assert sorted(set(range(len(bad["mc_pz"]))) - set(ids.tolist())) == [3, 10, 11, 20, 21, 30]


# ---- bad input: a clear answer, nothing written ------------------------------------------

def _refused(inputs, tmp_path, match, **kw):
    with pytest.raises(DataError, match=match):
        run(inputs, tmp_path / "out", **kw)
    assert not (tmp_path / "out" / "data").exists() and not (tmp_path / "out" / "tX.pkl").exists()


def test_missing_tree_lists_what_the_file_holds(arrays, tmp_path):
    path = write_root(tmp_path / "t.root", arrays, tree="Other/reco")
    _refused(path, tmp_path, r"t\.root: no tree 'TrackingTupler/sim'; the file holds "
                             r"\['Other \(TDirectory\)', 'Other/reco \(TTree\)'\]")
    res = subprocess.run([sys.executable, "-m", "effgen", "preprocess", "--input", str(path),
                          "--tree", "Other/reco", "--output-dir", str(tmp_path / "o"),
                          "--preprocessing", str(tmp_path / "o" / "tX.pkl")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr  # the tree path is a flag


def test_missing_branch_lists_the_branches(arrays, tmp_path):
    path = write_root(tmp_path / "t.root", {c: v for c, v in arrays.items() if c != "mcID"})
    _refused(path, tmp_path, r"tree 'TrackingTupler/sim' of .*t\.root: missing branches \['mcID'\]; "
                             r"it holds \[.*'mc_charge'")


def test_not_root_and_truncated_files(arrays, tmp_path):
    junk = tmp_path / "junk.root"
    junk.write_bytes(b"\x00" * 1000)
    _refused(junk, tmp_path, r"junk\.root: not a ROOT, feather or parquet file")
    good = write_root(tmp_path / "good.root", arrays, chunk=2000)
    data = good.read_bytes()
    for cut in (len(data) // 2, 300):
        cut_file = tmp_path / f"cut{cut}.root"
        cut_file.write_bytes(data[:cut])
        _refused(cut_file, tmp_path, rf"cut{cut}\.root: (truncated ROOT file: its header says "
                                     rf"{len(data):,} bytes, the file has {cut:,}|.*truncated or corrupt)")
    # Damaged inside (same length, compressed baskets): found while reading, by name.
    data = write_root(tmp_path / "z.root", arrays, chunk=2000, compression=uproot.ZLIB(4)).read_bytes()
    damaged = bytearray(data)
    damaged[len(data) // 3: len(data) // 3 + 5000] = b"\xff" * 5000
    (tmp_path / "damaged.root").write_bytes(bytes(damaged))
    _refused(tmp_path / "damaged.root", tmp_path, r"damaged\.root: reading failed \(truncated or corrupt "
                                                  r"file\?\): \w+")


def test_non_finite_branch_names_file_branch_count_and_entry(arrays, tmp_path):
    bad = {c: v.copy() for c, v in arrays.items()}
    bad["mc_py"][[5000, 5003, 9000]] = [np.nan, np.inf, np.nan]
    bad["truth_upstream"][7] = 0.7
    good = write_root(tmp_path / "good.root", take(arrays, slice(0, 100)))
    path = write_root(tmp_path / "bad.root", bad, chunk=2000)
    # Counted over the whole file, whatever the chunks.
    _refused([good, path], tmp_path, r"bad\.root: branch 'mc_py' has 3 non-finite values \(first at "
                                     r"entry 5000: nan\); truth columns .* not probabilities summing to "
                                     r"1 in 1 rows \(first at entry 7: .*\)$", step_size=5002)


def test_inconsistent_branches_across_files(arrays, tmp_path):
    a = write_root(tmp_path / "a.root", arrays)
    b = write_root(tmp_path / "b.root", {c: v for c, v in arrays.items() if c not in schema.TRUTH})
    _refused([a, b], tmp_path, r"inconsistent branches across input files: .*a\.root has optional "
                               r"branches .*truth_long.*b\.root has \['runNumber'")


def test_empty_selection_and_empty_inputs(arrays, tmp_path):
    neutral = {c: v.copy() for c, v in arrays.items()}
    neutral["mc_charge"][:] = 0
    _refused(write_root(tmp_path / "n.root", neutral), tmp_path,
             r"no rows left after the selection: 12,000 entries read, 0 kept; dropped 12,000 with "
             r"mc_charge == 0")
    _refused(write_root(tmp_path / "e.root", take(arrays, slice(0, 0))), tmp_path, "hold no entries")
    _refused(write_root(tmp_path / "two.root", take(arrays, slice(0, 2))), tmp_path,
             r"too few rows \(2\) to split")
    _refused(str(tmp_path / "nothing*.root"), tmp_path, "matches no file")
    f = write_root(tmp_path / "f.root", arrays)
    _refused([f, str(f)], tmp_path, "named twice")


# ---- end to end without truth ------------------------------------------------------------

def test_sorted_tuple_without_truth_goes_through_preprocess_train_and_validate(tmp_path):
    """The real sample's situation: tuple branches only (no truth_*), ordered by momentum."""
    from effgen.training.train import train
    from effgen.training.validate import NO_TRUTH, validate

    arrays = tuple_arrays(20_000, 5, drop=schema.TRUTH)
    order = np.argsort(arrays["mc_p"], kind="stable")
    path = write_root(tmp_path / "LamarrTraining.root", take(arrays, order), chunk=5000)
    out = run(path, tmp_path, shard_rows=4000, step_size=3000)
    model = tmp_path / "model.keras"
    train(out["train"], out["validation"], model, batch_size=512, steps_per_epoch=10,
          max_epochs=100, pre_limit_s=3, ft_limit_s=4, width=16, blocks=1, seed=0, verbose=0)
    metrics = validate(model, out["validation"], tmp_path / "report", max_rows=1500,
                       preprocessing_path=out["preprocessing"])
    assert metrics["truth_scores"] == NO_TRUTH
    assert "truth" not in metrics["log_loss"] and "kl_truth_to_model" not in metrics
    assert metrics["log_loss"]["model"] < metrics["log_loss"]["prior"]
    assert set(metrics["per_species"]) == {"e", "mu", "hadron"}
    for entry in metrics["per_species"].values():
        assert set(entry) == {"n", "label_counts", "predicted_sums"}
    assert metrics["preprocessing_max_abs_diff"] < 1e-4
    written = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert written["truth_scores"] == NO_TRUTH
    html = (tmp_path / "report" / "report.html").read_text()
    assert "truth scores" in html.lower() and "need them" in html
    assert {"eta_by_momentum.png", "z_by_momentum.png", "calibration.png"} <= set(metrics["plots"])


def _ordered(monkeypatch, first, then, timeout):
    """Patch `first` (an (object, name) pair) to signal once it has run, and `then` to wait
    for that signal before running; returns the wait results, one per call of `then`."""
    import threading

    done, waited = threading.Event(), []
    (a, a_name), (b, b_name) = first, then
    real_a, real_b = getattr(a, a_name), getattr(b, b_name)

    def signal(*args, **kwargs):
        out = real_a(*args, **kwargs)
        done.set()
        return out

    def wait(*args, **kwargs):
        waited.append(done.wait(timeout=timeout))
        return real_b(*args, **kwargs)

    monkeypatch.setattr(a, a_name, signal)
    monkeypatch.setattr(b, b_name, wait)
    return waited


def test_pass_two_does_not_wait_for_the_fit_child(arrays, tmp_path, monkeypatch):
    """Pass 2 transforms with fit_quantiles' tables at once: the child's pickle is awaited
    only once the shards are written (the child here answers only after the first shard)."""
    from effgen.data.fit_process import FitProcess

    path = write_root(tmp_path / "t.root", take(arrays, slice(0, 4000)))
    waited = _ordered(monkeypatch, (preprocess, "_write_shard"), (FitProcess, "result"), timeout=20)
    run(path, tmp_path / "a", workers=1)
    assert waited == [True]
    monkeypatch.undo()
    run(path, tmp_path / "b", workers=1)
    assert _output_bytes(tmp_path / "a") == _output_bytes(tmp_path / "b")


def test_tables_unlike_the_childs_fit_are_not_used(arrays, tmp_path, monkeypatch):
    """Should fit_quantiles ever disagree with scikit-learn's fit (a new version), the run
    starts again with the child's tables: the outputs are those of the child's fit."""
    path = write_root(tmp_path / "t.root", take(arrays, slice(0, 4000)))
    run(path, tmp_path / "right", workers=2)
    real = preprocess._quantiles
    spills = []
    real_spill = preprocess._spill_pass

    def off(X, n):
        q = real(X, n)
        return preprocess.Quantiles(q.quantiles_ * 1.001, q.references_)

    monkeypatch.setattr(preprocess, "_quantiles", off)
    monkeypatch.setattr(preprocess, "_spill_pass", lambda *a: spills.append(1) or real_spill(*a))
    run(path, tmp_path / "wrong", workers=2)
    assert len(spills) == 2
    assert _output_bytes(tmp_path / "wrong") == _output_bytes(tmp_path / "right")


def test_definitions_and_pickle_are_staged_beside_pass_two(arrays, tmp_path, monkeypatch):
    """The small outputs (definitions, preprocess.json, tX.pkl) are written and flushed as
    soon as the child's fit is in, while shards are still being written (flushing at the
    end would wait for the disk behind the shards): here each shard waits for them."""
    path = write_root(tmp_path / "t.root", take(arrays, slice(0, 4000)))
    waited = _ordered(monkeypatch, (preprocess, "write_definitions"), (preprocess, "_write_shard"),
                      timeout=30)
    run(path, tmp_path / "a", workers=1)
    assert waited and all(waited)
    monkeypatch.undo()
    run(path, tmp_path / "b", workers=1)
    assert _output_bytes(tmp_path / "a") == _output_bytes(tmp_path / "b")
