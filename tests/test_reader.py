import json
import os
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.feather as feather
import pytest

from effgen.data import preprocess
from effgen.data.reader import DataError, FeatherReader

FEATURES = ["a", "b", "c"]
LABELS = ["l0", "l1"]
EXTRA = ["row_id"]


def make_dir(path, shard_sizes=(500, 300, 200), seed=0):
    """A small data directory of random float32 shards with a unique row_id."""
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    start = 0
    for k, n in enumerate(shard_sizes):
        cols = {c: rng.normal(size=n).astype(np.float32) for c in FEATURES}
        cls = rng.integers(0, 2, n)
        cols["l0"] = (cls == 0).astype(np.float32)
        cols["l1"] = (cls == 1).astype(np.float32)
        cols["row_id"] = np.arange(start, start + n, dtype=np.int64)
        start += n
        feather.write_feather(pa.table(cols), path / f"part-{k:05d}.feather", compression="uncompressed")
    (path / "definitions.json").write_text(json.dumps(
        {"features": FEATURES, "labels": LABELS, "extra": EXTRA}))
    return path


def source_frame(path):
    return pd.concat([feather.read_table(p).to_pandas() for p in sorted(path.glob("*.feather"))],
                     ignore_index=True)


@pytest.fixture
def data_dir(tmp_path):
    return make_dir(tmp_path / "d")


def test_attributes(data_dir):
    r = FeatherReader(data_dir)
    assert r.path == data_dir
    assert (r.features, r.labels, r.extra) == (FEATURES, LABELS, EXTRA)
    assert r.data_files == sorted(data_dir.glob("*.feather"))
    assert r.n_rows == 1000
    assert "3 shards" in repr(r)


def test_as_pandas_round_trip(data_dir):
    r = FeatherReader(data_dir)
    df = r.as_pandas()
    src = source_frame(data_dir)
    pd.testing.assert_frame_equal(df, src[FEATURES + LABELS + EXTRA])
    assert df["row_id"].dtype == np.int64  # extra columns keep their type
    head = r.as_pandas(columns=["b"], max_rows=650)
    np.testing.assert_array_equal(head["b"].to_numpy(), src["b"].to_numpy()[:650])


def test_iter_numpy_batches(data_dir):
    r = FeatherReader(data_dir)
    src = source_frame(data_dir)
    batches = list(r.iter_numpy(300))
    assert [len(b["a"]) for b in batches] == [300, 300, 300, 100]  # across shard boundaries
    for c in FEATURES + LABELS:
        got = np.concatenate([b[c] for b in batches])
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, src[c].to_numpy())
    xy = list(r.iter_xy(400))
    X = np.concatenate([x for x, _ in xy])
    y = np.concatenate([y for _, y in xy])
    np.testing.assert_array_equal(X, src[FEATURES].to_numpy())
    np.testing.assert_array_equal(y, src[LABELS].to_numpy())


def test_iter_numpy_shuffle_and_repeat(data_dir):
    r = FeatherReader(data_dir)

    def ids(**kw):
        return np.concatenate([b["row_id"] for b in r.iter_numpy(250, columns=["row_id"], **kw)])

    a, b, c = ids(shuffle=True, seed=1), ids(shuffle=True, seed=1), ids(shuffle=True, seed=2)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.array_equal(np.sort(a), np.arange(1000)) and not np.array_equal(a, np.arange(1000))
    it = r.iter_numpy(300, columns=["row_id"], shuffle=True, seed=1, repeat=True)
    two = np.concatenate([next(it)["row_id"] for _ in range(7)])[:2000]
    assert np.array_equal(np.sort(two), np.repeat(np.arange(1000), 2))
    assert not np.array_equal(two[:1000], two[1000:])  # each pass is reshuffled


def _collect(ds):
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in ds])
    return np.concatenate(xs), np.concatenate(ys), [len(x) for x in xs]


def test_tf_dataset_rows_and_batches(data_dir):
    import tensorflow as tf

    r = FeatherReader(data_dir)
    src = source_frame(data_dir)
    ds = r.as_tf_dataset(block_rows=128)
    assert ds.element_spec == (tf.TensorSpec((3,), tf.float32), tf.TensorSpec((2,), tf.float32))
    X, y, sizes = _collect(ds.batch(300))
    np.testing.assert_array_equal(X, src[FEATURES].to_numpy())
    np.testing.assert_array_equal(y, src[LABELS].to_numpy())
    assert sizes == [300, 300, 300, 100]
    # The fast .batch() is the same as TensorFlow's row-by-row batching (the base
    # class' batch): same batches, same static shapes.
    for drop in (False, True):
        fast = ds.batch(300, drop_remainder=drop)
        slow = tf.data.Dataset.batch(ds, 300, drop_remainder=drop)
        assert type(fast).__name__ != type(slow).__name__
        assert fast.element_spec == slow.element_spec
        for (fx, fy), (sx, sy) in zip(fast, slow, strict=True):
            np.testing.assert_array_equal(fx.numpy(), sx.numpy())
            np.testing.assert_array_equal(fy.numpy(), sy.numpy())
    X2, _, _ = _collect(ds.repeat(2).batch(300))
    np.testing.assert_array_equal(X2, np.concatenate([X, X]))
    X3, _, sizes3 = _collect(r.as_tf_dataset(batch_size=256))
    np.testing.assert_array_equal(X3, X)
    assert sizes3 == [256, 256, 256, 232]
    taken = list(r.as_tf_dataset(batch_size=400, repeat=True).take(5))
    assert [len(x) for x, _ in taken] == [400] * 5
    rows = np.stack([x.numpy() for x, _ in ds.take(5)])  # per-row elements
    np.testing.assert_array_equal(rows, X[:5])


def test_tf_dataset_shuffle(data_dir):
    r = FeatherReader(data_dir)
    X, _, _ = _collect(r.as_tf_dataset().batch(1000))

    def rows(ds):
        return _collect(ds)[0]

    a_ds = r.as_tf_dataset(shuffle=True, seed=3, shuffle_buffer=400).batch(1000)
    a1, a2 = rows(a_ds), rows(a_ds)  # a second pass over the same dataset: a new order
    b1 = rows(r.as_tf_dataset(shuffle=True, seed=3, shuffle_buffer=400).batch(1000))
    c1 = rows(r.as_tf_dataset(shuffle=True, seed=4, shuffle_buffer=400).batch(1000))
    # Column a is continuous random: sorting by it identifies the rows.
    np.testing.assert_array_equal(a1[np.argsort(a1[:, 0])], X[np.argsort(X[:, 0])])
    np.testing.assert_array_equal(a1, b1)
    assert not np.array_equal(a1, a2)
    assert not np.array_equal(a1, c1)
    assert not np.array_equal(a1, X)


def test_reads_preprocess_output(tiny_dataset):
    r = FeatherReader(tiny_dataset["validation"])
    assert r.n_rows == tiny_dataset["rows"]["validation"]
    assert r.extra == preprocess.EXTRA
    X, y, _ = _collect(r.as_tf_dataset().batch(100_000))
    df = r.as_pandas()
    np.testing.assert_array_equal(X, df[r.features].to_numpy())
    np.testing.assert_array_equal(y, df[r.labels].to_numpy())
    assert r.validate() == r.n_rows


# ---- error paths ----------------------------------------------------------------------

def test_missing_or_bad_definitions(data_dir):
    (data_dir / "definitions.json").write_text("{not json")
    with pytest.raises(DataError, match="definitions.json.*JSON"):
        FeatherReader(data_dir)
    (data_dir / "definitions.json").write_text(json.dumps({"features": "a", "labels": ["l0"]}))
    with pytest.raises(DataError, match="definitions.json.*'features'"):
        FeatherReader(data_dir)
    (data_dir / "definitions.json").unlink()
    with pytest.raises(DataError, match="definitions.json.*missing"):
        FeatherReader(data_dir)
    with pytest.raises(DataError, match="not a data directory"):
        FeatherReader(data_dir / "nope")


def test_hidden_temporaries_are_not_shards(data_dir):
    n_files = len(FeatherReader(data_dir).data_files)
    (data_dir / ".part-00009.feather.tmp-host-1-x.feather").write_bytes(b"half written")
    r = FeatherReader(data_dir)
    assert len(r.data_files) == n_files and r.validate() == 1000


def test_no_shards(tmp_path):
    d = make_dir(tmp_path / "d", shard_sizes=())
    with pytest.raises(DataError, match="no .*feather"):
        FeatherReader(d)


def test_column_missing_from_a_shard(data_dir):
    shard = data_dir / "part-00001.feather"
    feather.write_feather(feather.read_table(shard).drop_columns(["b"]), shard)
    with pytest.raises(DataError, match=r"part-00001\.feather: column 'b' is missing"):
        FeatherReader(data_dir)


def test_non_numeric_column(data_dir):
    shard = data_dir / "part-00002.feather"
    t = feather.read_table(shard)
    feather.write_feather(t.set_column(t.schema.get_field_index("l1"), "l1",
                                       pa.array(["x"] * t.num_rows)), shard)
    with pytest.raises(DataError, match=r"part-00002\.feather: column 'l1' is not numeric"):
        FeatherReader(data_dir)


def test_corrupt_shard(data_dir):
    shard = data_dir / "part-00001.feather"
    shard.write_bytes(shard.read_bytes()[:200])  # truncated
    with pytest.raises(DataError, match=r"part-00001\.feather: unreadable or corrupt"):
        FeatherReader(data_dir)


def test_shard_changed_after_open(data_dir):
    r = FeatherReader(data_dir)
    shard = data_dir / "part-00002.feather"
    feather.write_feather(feather.read_table(shard).drop_columns(["a"]), shard)
    with pytest.raises(DataError, match=r"part-00002\.feather: column 'a' is missing"):
        list(r.iter_numpy(100))


def test_shard_vanished_after_open_numpy(data_dir):
    r = FeatherReader(data_dir)
    os.unlink(data_dir / "part-00001.feather")
    with pytest.raises(DataError, match=r"part-00001\.feather: shard vanished"):
        list(r.iter_numpy(100))
    with pytest.raises(DataError, match=r"part-00001\.feather: shard vanished"):
        r.validate()


def test_shard_vanished_after_open_tf(data_dir):
    """TensorFlow wraps the generator's exception; the message must still say which
    shard and what happened (the seed notebook's crash only said FileNotFoundError)."""
    r = FeatherReader(data_dir)
    ds = r.as_tf_dataset(block_rows=100).batch(100)
    os.unlink(data_dir / "part-00002.feather")
    with pytest.raises(Exception) as info:
        for _ in ds:
            pass
    assert "part-00002.feather: shard vanished after the reader was opened" in str(info.value)
    assert "DataError" in str(info.value)


def test_validate_reports_non_finite(data_dir):
    r = FeatherReader(data_dir)
    assert r.validate() == 1000
    shard = data_dir / "part-00001.feather"
    t = feather.read_table(shard)
    c = t.column("c").to_numpy().copy()
    c[17] = np.inf
    feather.write_feather(t.set_column(t.schema.get_field_index("c"), "c", pa.array(c)), shard)
    with pytest.raises(DataError, match=r"part-00001\.feather: column 'c' has 1 non-finite.*row 17"):
        r.validate()


def test_dask_is_optional(data_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "dask", None)
    monkeypatch.setitem(sys.modules, "dask.dataframe", None)
    with pytest.raises(ImportError, match=r"effgen\[dask\]"):
        FeatherReader(data_dir).as_dask_dataframe()


def test_benchmark_readers_agree(data_dir):
    """The benchmark's re-implementation of the original reader reads the same rows."""
    from effgen.bench import data as bench_data

    r = FeatherReader(data_dir)
    X, y, _ = _collect(r.as_tf_dataset().batch(300))
    Xo, yo, sizes = _collect(bench_data.original_tf_dataset(r).batch(300))
    np.testing.assert_array_equal(Xo, X)
    np.testing.assert_array_equal(yo, y)
    Xu, _, _ = _collect(bench_data.unbatch_batch_tf_dataset(r, 300))
    np.testing.assert_array_equal(Xu, X)
    results = bench_data.bench_reader(data_dir, batch_size=300, repeats=1,
                                      original_max_rows=300, progress=False)
    assert [res["rows"] for res in results] == [1000, 1000, 300]
    assert results[-1]["speedup_vs_original"] == 1.0
    assert "x original" in bench_data.format_table(results)


@pytest.mark.parametrize("value, message", [
    (2.0, r"label column 'l1' is not one-hot 0/1: 1 values \(first at row 41: 2.0\)"),
    (-1.0, r"label column 'l1' is not one-hot 0/1: 1 values \(first at row 41: -1.0\)"),
])
def test_validate_refuses_labels_that_are_not_one_hot(data_dir, value, message):
    shard = data_dir / "part-00002.feather"
    t = feather.read_table(shard)
    col = t.column("l1").to_numpy().copy()
    col[41] = value
    feather.write_feather(t.set_column(t.schema.get_field_index("l1"), "l1", pa.array(col)), shard)
    with pytest.raises(DataError, match=r"part-00002\.feather: " + message):
        FeatherReader(data_dir).validate()


def test_validate_refuses_rows_without_exactly_one_label(data_dir):
    shard = data_dir / "part-00000.feather"
    t = feather.read_table(shard)
    both = t.column("l0").to_numpy().copy()
    both[12] = 1.0  # and l1 too: two labels
    l1 = t.column("l1").to_numpy().copy()
    l1[12] = 1.0
    t = t.set_column(t.schema.get_field_index("l0"), "l0", pa.array(both))
    t = t.set_column(t.schema.get_field_index("l1"), "l1", pa.array(l1))
    feather.write_feather(t, shard)
    with pytest.raises(DataError, match=r"part-00000\.feather: labels \['l0', 'l1'\] are not one-hot: "
                                        r"1 rows do not hold exactly one 1 \(first at row 12\)"):
        FeatherReader(data_dir).validate()
