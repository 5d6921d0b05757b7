"""Reading a directory of feather shards described by `definitions.json`.

A data directory holds `part-NNNNN.feather` shards (Arrow IPC files) and a
`definitions.json` = {"features": [...], "labels": [...], "extra": [...]}. Every shard
is checked when the reader is opened (schema and row count come from the Arrow footer,
so this is cheap); any later problem, e.g. a shard deleted while training, raises
`DataError` naming the file.

Iteration reads whole shards with pyarrow into numpy and hands TensorFlow large blocks,
never single rows from Python: the seed notebook's reader yielded rows one by one.
"""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.ipc as ipc

from effgen.errors import DataError  # noqa: F401 (re-exported)

DEFINITIONS = "definitions.json"
SHARD_GLOB = "*.feather"




def _is_numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)


def read_definitions(path) -> dict:
    """Parse `path/definitions.json` into {"features", "labels", "extra"} lists."""
    file = Path(path) / DEFINITIONS
    try:
        defs = json.loads(file.read_text())
    except FileNotFoundError:
        raise DataError(f"{file}: missing (a data directory needs {DEFINITIONS})") from None
    except (OSError, ValueError) as err:
        raise DataError(f"{file}: unreadable or not JSON: {err}") from err
    if not isinstance(defs, dict):
        raise DataError(f"{file}: expected a JSON object, got {type(defs).__name__}")
    out = {}
    for key in ("features", "labels", "extra"):
        value = defs.get(key, [] if key == "extra" else None)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise DataError(f"{file}: '{key}' must be a list of column names, got {value!r}")
        out[key] = value
    if not out["features"] or not out["labels"]:
        raise DataError(f"{file}: 'features' and 'labels' must not be empty")
    sha = defs.get("preprocessing_sha256")
    if sha is not None and not isinstance(sha, str):
        raise DataError(f"{file}: 'preprocessing_sha256' must be a string, got {sha!r}")
    out["preprocessing_sha256"] = sha
    return out


def write_definitions(path, features, labels, extra=(), preprocessing_sha256=None):
    """`preprocessing_sha256`: the tX.pkl that made the features, so that training and
    export can tell a model from data preprocessed another way."""
    from effgen.atomic import atomic_file

    defs = {"features": list(features), "labels": list(labels), "extra": list(extra)}
    if preprocessing_sha256 is not None:
        defs["preprocessing_sha256"] = preprocessing_sha256
    text = json.dumps(defs, indent=2)
    with atomic_file(Path(path) / DEFINITIONS, "w") as f:
        f.write(text + "\n")


def check_schema(file, sch: pa.Schema, columns):
    """Raise DataError if a column is missing from `sch` or is not numeric."""
    for name in columns:
        idx = sch.get_field_index(name)
        if idx < 0:
            raise DataError(f"{file}: column '{name}' is missing")
        if not _is_numeric(sch.field(idx).type):
            raise DataError(f"{file}: column '{name}' is not numeric ({sch.field(idx).type})")


def check_finite(file, name, values, first_row=0, kind="column", row="row"):
    """DataError naming the file, column (or branch), count and first row (or entry) of
    any NaN / inf. Integer columns pass."""
    values = np.asarray(values)
    if values.dtype.kind not in "fc":
        return
    bad = ~np.isfinite(values)
    if bad.any():
        first = int(np.argmax(bad))
        raise DataError(f"{file}: {kind} '{name}' has {int(bad.sum())} non-finite values "
                        f"(first at {row} {first_row + first}: {values[first]})")


def check_one_hot(file, labels: dict, first_row=0):
    """DataError naming the file, column and first bad row unless every label column is
    0 or 1 and every row holds exactly one 1."""
    for name, values in labels.items():
        values = np.asarray(values)
        bad = ~((values == 0) | (values == 1))
        if bad.any():
            first = int(np.argmax(bad))
            raise DataError(f"{file}: label column '{name}' is not one-hot 0/1: {int(bad.sum())} "
                            f"values (first at row {first_row + first}: {values[first]})")
    total = sum(np.asarray(v, dtype=np.float64) for v in labels.values())
    bad = np.asarray(total != 1)
    if bad.any():
        first = int(np.argmax(bad))
        raise DataError(f"{file}: labels {list(labels)} are not one-hot: {int(bad.sum())} rows do "
                        f"not hold exactly one 1 (first at row {first_row + first})")


def open_shard(file):
    """(schema, n_rows) of one shard, from its Arrow footer; DataError if unusable."""
    try:
        with pa.memory_map(str(file)) as source:
            r = ipc.open_file(source)
            return r.schema, r.count_rows()
    except FileNotFoundError:
        raise DataError(f"{file}: shard vanished after the reader was opened") from None
    except (OSError, pa.ArrowException) as err:
        raise DataError(f"{file}: unreadable or corrupt feather shard: {err}") from err


def read_shard(file, columns, float_columns=(), copy=True) -> dict:
    """Read `columns` of one shard into numpy arrays (float_columns converted to
    float32). With copy=False, arrays may be read-only views of the memory-mapped file,
    for callers that copy them at once. Raises DataError naming the file on any problem."""
    try:
        table = feather.read_table(str(file), memory_map=True)
    except FileNotFoundError:
        raise DataError(f"{file}: shard vanished after the reader was opened") from None
    except (OSError, pa.ArrowException) as err:
        raise DataError(f"{file}: unreadable or corrupt feather shard: {err}") from err
    check_schema(file, table.schema, columns)
    float_columns = set(float_columns)
    out = {}
    try:
        for name in columns:
            col = table.column(name).to_numpy()
            dtype = np.float32 if name in float_columns else None
            out[name] = np.array(col, dtype=dtype) if copy else np.asarray(col, dtype=dtype)
    except (OSError, pa.ArrowException) as err:
        raise DataError(f"{file}: cannot read column data: {err}") from err
    return out


class FeatherReader:
    """A data directory of feather shards.

    Attributes: path, features, labels, extra (column-name lists from definitions.json),
    preprocessing_sha256 (of the tX.pkl that made the features, when recorded),
    data_files (sorted shard paths, fixed at open), n_rows (total, from the footers).
    """

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise DataError(f"{self.path}: not a data directory")
        defs = read_definitions(self.path)
        self.features, self.labels, self.extra = defs["features"], defs["labels"], defs["extra"]
        self.preprocessing_sha256 = defs["preprocessing_sha256"]  # None for foreign data
        # Dot-files are other writers' temporaries (effgen.atomic), never shards.
        self.data_files = sorted(f for f in self.path.glob(SHARD_GLOB)
                                 if not f.name.startswith("."))
        if not self.data_files:
            raise DataError(f"{self.path}: no {SHARD_GLOB} shards")
        self.shard_rows = []
        for file in self.data_files:
            sch, rows = open_shard(file)
            check_schema(file, sch, self.columns)
            self.shard_rows.append(rows)
        self.n_rows = int(sum(self.shard_rows))

    @property
    def columns(self):
        return self.features + self.labels + self.extra

    def __repr__(self):
        return f"FeatherReader({str(self.path)!r}, {len(self.data_files)} shards, {self.n_rows} rows)"

    def _read(self, file, columns, copy=True):
        return read_shard(file, columns, float_columns=self.features + self.labels, copy=copy)

    # ---- numpy -----------------------------------------------------------------------
    def _shard_order(self, rng):
        order = np.arange(len(self.data_files))
        if rng is not None:
            rng.shuffle(order)
        return [self.data_files[i] for i in order]

    def iter_numpy(self, batch_size, columns=None, shuffle=False, seed=None, repeat=False):
        """Yield dicts {column: numpy array} of `batch_size` rows (the last one of a
        finite pass may be shorter). Features and labels are float32, extra columns keep
        their stored type. Shuffling permutes the shard order and the rows within each
        shard, differently for each pass, reproducibly for a given seed."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        columns = list(columns) if columns is not None else self.features + self.labels
        rng = np.random.default_rng(seed) if shuffle else None
        pending, pending_rows = [], 0
        while True:
            for file in self._shard_order(rng):
                data = self._read(file, columns)
                if rng is not None:
                    perm = rng.permutation(len(data[columns[0]]))
                    data = {c: v[perm] for c, v in data.items()}
                pending.append(data)
                pending_rows += len(data[columns[0]])
                while pending_rows >= batch_size:
                    yield _pop_rows(pending, batch_size, columns)
                    pending_rows -= batch_size
            if not repeat:
                break
        if pending_rows:
            yield _pop_rows(pending, pending_rows, columns)

    def iter_xy(self, batch_size, shuffle=False, seed=None, repeat=False):
        """Like iter_numpy, but yield (X, y) float32 matrices of features and labels."""
        for batch in self.iter_numpy(batch_size, None, shuffle, seed, repeat):
            yield _stack(batch, self.features), _stack(batch, self.labels)

    # ---- TensorFlow ------------------------------------------------------------------
    def _blocks(self, rng, shuffle_buffer, block_rows):
        """Yield (X, y) float32 blocks. With rng, gather shards (in shuffled order) until
        shuffle_buffer rows are held, permute the rows of the buffer, then emit it."""
        buffer, held = [], 0

        def flush():
            X = np.concatenate([b[0] for b in buffer])
            y = np.concatenate([b[1] for b in buffer])
            if rng is not None:
                perm = rng.permutation(len(X))
                X, y = X[perm], y[perm]
            buffer.clear()
            for s in range(0, len(X), block_rows):
                yield X[s:s + block_rows], y[s:s + block_rows]

        for file in self._shard_order(rng):
            data = self._read(file, self.features + self.labels, copy=False)  # _stack copies
            buffer.append((_stack(data, self.features), _stack(data, self.labels)))
            held += len(buffer[-1][0])
            if rng is None or held >= shuffle_buffer:
                yield from flush()
                held = 0
        if buffer:
            yield from flush()

    def as_tf_dataset(self, shuffle=False, seed=None, shuffle_buffer=1_000_000,
                      batch_size=None, repeat=False, block_rows=1 << 18):
        """A tf.data.Dataset of per-row (features, labels) float32 pairs, as the seed
        notebook's reader gave, so `.batch(n)` works.

        The rows travel as large numpy blocks; the returned dataset's own `.batch()` and
        `.repeat()` re-cut those blocks (tf.data `rebatch`) instead of unbatching and
        batching again row by row, which is ~30x faster and gives the same batches.
        `batch_size` / `repeat` here do the same explicitly. Shuffling: shard order and
        rows within a buffer of `shuffle_buffer` rows, seeded, new order on each pass.
        """
        import tensorflow as tf

        root = np.random.SeedSequence(seed)

        def generate():
            # Each new iterator over the dataset (each pass) spawns the next stream.
            rng = np.random.default_rng(root.spawn(1)[0]) if shuffle else None
            yield from self._blocks(rng, shuffle_buffer, block_rows)

        signature = (tf.TensorSpec((None, len(self.features)), tf.float32),
                     tf.TensorSpec((None, len(self.labels)), tf.float32))
        blocks = tf.data.Dataset.from_generator(generate, output_signature=signature)
        if repeat:
            blocks = blocks.repeat()
        blocks = blocks.prefetch(2)
        if batch_size is not None:
            return blocks.rebatch(batch_size)
        return _rows_dataset(blocks)

    def iter_batches(self, batch_size, shuffle=False, seed=None, shuffle_buffer=1_000_000,
                     repeat=False, block_rows=1 << 18):
        """(X, y) float32 numpy batches of exactly `batch_size` rows (a pass's last rows
        that fill no batch are dropped), in the order of
        `as_tf_dataset(shuffle, seed, shuffle_buffer).batch(batch_size, drop_remainder=True)`
        (`.repeat()` with `repeat`): the same shuffle, without TensorFlow, holding at most
        about `shuffle_buffer` rows (Keras on JAX trains from this; effgen/training/feed.py)."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        root = np.random.SeedSequence(seed)
        while True:
            rng = np.random.default_rng(root.spawn(1)[0]) if shuffle else None
            carry_x, carry_y = [], []
            for X, y in self._blocks(rng, shuffle_buffer, block_rows):
                if carry_x:
                    X, y = np.concatenate(carry_x + [X]), np.concatenate(carry_y + [y])
                full = len(X) - len(X) % batch_size
                for s in range(0, full, batch_size):
                    yield X[s:s + batch_size], y[s:s + batch_size]
                carry_x, carry_y = ([X[full:]], [y[full:]]) if full < len(X) else ([], [])
            if not repeat:
                return

    # ---- pandas / dask ---------------------------------------------------------------
    def as_pandas(self, columns=None, max_rows=None):
        """A pandas DataFrame of `columns` (default: features, labels, extra) from the
        first shards, at most max_rows rows."""
        import pandas as pd

        columns = list(columns) if columns is not None else self.columns
        frames, rows = [], 0
        for file in self.data_files:
            if max_rows is not None and rows >= max_rows:
                break
            frame = pd.DataFrame(self._read(file, columns), columns=columns)
            if max_rows is not None:
                frame = frame.iloc[: max_rows - rows]
            frames.append(frame)
            rows += len(frame)
        return pd.concat(frames, ignore_index=True)

    def as_dask_dataframe(self, columns=None):
        """A lazy dask DataFrame with one partition per shard (needs dask)."""
        try:
            import dask.dataframe as dd
        except ImportError as err:
            raise ImportError(
                "FeatherReader.as_dask_dataframe needs dask: pip install 'effgen[dask]' "
                "(or use FeatherReader.as_pandas / iter_numpy)") from err
        import pandas as pd

        columns = list(columns) if columns is not None else self.columns
        meta = pd.DataFrame(self._read(self.data_files[0], columns), columns=columns).iloc[:0]
        return dd.from_map(lambda f: pd.DataFrame(self._read(f, columns), columns=columns),
                           self.data_files, meta=meta)

    # ---- checks ----------------------------------------------------------------------
    def validate(self, progress=False):
        """Read every shard fully; DataError naming the file, column and first bad row on
        NaN / inf in a feature or label, or labels that are not one-hot 0/1. Returns the
        number of rows checked."""
        from tqdm import tqdm

        rows = 0
        for file in tqdm(self.data_files, desc=f"validate {self.path.name}", disable=not progress):
            data = self._read(file, self.features + self.labels)
            for name, values in data.items():
                check_finite(file, name, values)
            check_one_hot(file, {name: data[name] for name in self.labels})
            rows += len(data[self.features[0]])
        return rows


def _stack(data, columns):
    return np.stack([data[c] for c in columns], axis=1)


def _pop_rows(pending, rows, columns):
    """Remove the first `rows` rows from a list of column dicts and return them."""
    parts, need = [], rows
    while need:
        size = len(pending[0][columns[0]])
        if size <= need:
            parts.append(pending.pop(0))
            need -= size
        else:
            parts.append({c: v[:need] for c, v in pending[0].items()})
            pending[0] = {c: v[need:] for c, v in pending[0].items()}
            need = 0
    if len(parts) == 1:
        return parts[0]
    return {c: np.concatenate([p[c] for p in parts]) for c in columns}


def _rows_dataset(blocks):
    """blocks.unbatch(), whose .batch()/.repeat() go through the blocks (fast path).

    Falls back to a plain unbatched dataset if TensorFlow's internals change."""
    try:
        from tensorflow.python.data.ops.dataset_ops import UnaryUnchangedStructureDataset
    except ImportError:  # pragma: no cover - depends on the TensorFlow version
        return blocks.unbatch()

    class RowsDataset(UnaryUnchangedStructureDataset):
        def __init__(self, blocks):
            self._blocks = blocks
            rows = blocks.unbatch()
            super().__init__(rows, rows._variant_tensor)

        def batch(self, batch_size, drop_remainder=False, num_parallel_calls=None,
                  deterministic=None, name=None):
            if num_parallel_calls is None and deterministic is None:
                return self._blocks.rebatch(batch_size, drop_remainder=drop_remainder, name=name)
            return super().batch(batch_size, drop_remainder, num_parallel_calls,
                                 deterministic, name)

        def repeat(self, count=None, name=None):
            return RowsDataset(self._blocks.repeat(count, name=name))

    return RowsDataset(blocks)
