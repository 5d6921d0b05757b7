"""`effgen preprocess`: from the LHCb tuple to training shards, in bounded memory.

Input: one or more ROOT files holding `TrackingTupler/sim` (or feather / parquet files
with the same branches; see effgen.data.sources), read in chunks. Each chunk goes through
the seed notebook's derivations (effgen.data.derive): 12 raw features, 4 one-hot labels
from `type`, plus the pid, `acceptance`, `type` and, when present, the truth columns.

One streaming pass over the input, then one over a scratch copy:
1. every row gets a seeded hash of its key (effgen.data.split), which alone decides its
   split (50/40/10 train/test/validation), its shard and its place in the shard; training
   rows also compete, by the same hash, for the preprocessing's fit sample (the
   `max_fit_rows` of lowest priority: a uniform subsample of the whole input, not its
   first rows). Rows are spilled, unprocessed, to one scratch file per shard;
2. the preprocessing (DOMAIN.md section 2's ColumnTransformer: a normal-output
   QuantileTransformer on the 8 continuous features, passthrough on the 4 flags) is
   fitted on that sample; each scratch file is then read, ordered by its rows' hash (a
   seeded shuffle), transformed and written as one shard.
So each shard is a random subset of the whole sample in random order, and an input
sorted by momentum or by event trains like a shuffled one. Peak memory is one input
chunk, the fit sample and one shard, whatever the input size.

Each split directory holds `part-NNNNN.feather` shards with the PREPROCESSED features
under the feature names, the raw one-hot labels, and extra columns: the raw features
(`raw_<name>`), mc_pid, acceptance, type, the truth columns when the input has them, and
`row_id` (the row's entry number counted across the input files in the order given).
`preprocess.json` beside the split directories records the counts: entries read, rows
dropped and why, track types seen (codes other than 0/3/4/5 count as not_recoed).
"""

import argparse
import hashlib
import json
import math
import os
import pickle
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from effgen import schema
from effgen.atomic import atomic_file, atomic_outputs, scratch_dir
from effgen.config import add_knob, default_paths
from effgen.data import split as rowsplit
from effgen.data.derive import KEY, KEY_WITH, PASSED, REQUIRED, TREE, Counts, derive
from effgen.data.reader import DataError, write_definitions
from effgen.data.sources import DEFAULT_STEP, expand_inputs, open_inputs
from effgen.errors import (
    EffgenError,
    PreprocessingError,  # noqa: F401 (re-exported)
)

SPLITS = {"train": 0.5, "test": 0.4, "validation": 0.1}
RAW_PREFIX = "raw_"
ROW_ID = "row_id"
ORDER = "_order"  # scratch-only: the row's place in its shard
RAW = [RAW_PREFIX + c for c in schema.FEATURES]
N_CONTINUOUS = len(schema.CONTINUOUS_FEATURES)
N_FEATURES = len(schema.FEATURES)
REPORT = "preprocess.json"


def extra_columns(truth: bool) -> list:
    """The shards' extra columns, with or without the truth columns."""
    return RAW + PASSED + (schema.TRUTH if truth else []) + [ROW_ID]


EXTRA = extra_columns(truth=True)


def _column_transformer(seed):
    from sklearn.compose import ColumnTransformer
    from sklearn.preprocessing import QuantileTransformer

    return ColumnTransformer([
        ("quantile", QuantileTransformer(output_distribution="normal", random_state=seed),
         list(range(N_CONTINUOUS))),
        ("flags", "passthrough", list(range(N_CONTINUOUS, N_FEATURES))),
    ])


def fit_preprocessing(X_raw: np.ndarray, seed: int):
    """Fit the ColumnTransformer on an (n, 12) numpy array of raw features.

    The result is the fitted ColumnTransformer(...).fit(X_raw), without the full
    transform of X_raw that ColumnTransformer.fit runs and throws away (a third of a
    2M-row preprocessing): the column layout is fitted on a few rows, then its quantile
    step is replaced by the same QuantileTransformer fitted on every row (the step
    ColumnTransformer.fit would have fitted, as a clone, on the same columns)."""
    import warnings

    from sklearn.base import clone

    X_raw = np.asarray(X_raw)
    if X_raw.ndim != 2 or X_raw.shape[1] != N_FEATURES:
        raise ValueError(f"expected an (n, {N_FEATURES}) array of raw features, got {X_raw.shape}")
    X = X_raw.astype(np.float64)
    ct = _column_transformer(seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="n_quantiles", category=UserWarning)
        ct.fit(X[:2])
    name, step, columns = ct.transformers_[0]
    ct.transformers_[0] = (name, clone(step).fit(X[:, columns]), columns)
    return ct


def transform(ct, X_raw: np.ndarray) -> np.ndarray:
    """ct.transform(X_raw) as float32, faster for what fit_preprocessing builds.

    Same arithmetic as scikit-learn's QuantileTransformer (normal output), without its
    per-call overheads, and with ONE interpolation per column whose quantiles are strictly
    increasing (scikit-learn averages an ascending and a descending interpolation, which
    only differ, in the last bits, where quantiles repeat; such columns still get both).
    Anything else is handed to ct.transform."""
    from scipy.special import ndtri
    from sklearn.preprocessing import QuantileTransformer

    spec, steps = getattr(ct, "transformers", []), getattr(ct, "transformers_", [])
    quantile = steps[0][1] if steps else None
    if not (len(spec) == 2 and isinstance(quantile, QuantileTransformer)
            and quantile.output_distribution == "normal"
            and list(spec[0][2]) == list(range(N_CONTINUOUS)) and spec[1][1] == "passthrough"
            and list(spec[1][2]) == list(range(N_CONTINUOUS, N_FEATURES))
            and getattr(ct, "remainder", None) == "drop"):
        return ct.transform(np.asarray(X_raw, dtype=np.float64)).astype(np.float32)
    bound = 1e-7  # sklearn.preprocessing._data.BOUNDS_THRESHOLD
    clip_lo, clip_hi = ndtri(bound - np.spacing(1)), ndtri(1 - (bound - np.spacing(1)))
    refs = quantile.references_
    out = np.empty((N_FEATURES, len(X_raw)), dtype=np.float32).T  # column-major: contiguous columns
    fast = _interpolators(quantile) if X_raw.dtype == np.float32 else [None] * N_CONTINUOUS

    def column(j):
        q = quantile.quantiles_[:, j]
        x = X_raw[:, j].astype(np.float64)
        if fast[j] is not None and np.isfinite(x).all():
            y = fast[j](X_raw[:, j], x)  # == np.interp(x, q, refs), bit for bit
        else:
            y = np.interp(x, q, refs)
            if not np.all(q[1:] > q[:-1]):
                y = 0.5 * (y - np.interp(-x, -q[::-1], -refs[::-1]))
        y[x + bound > q[-1]] = 1
        y[x - bound < q[0]] = 0
        y = ndtri(y, out=y)
        out[:, j] = np.clip(y, clip_lo, clip_hi, out=y)

    # Columns are independent and np.interp / ndtri release the GIL: one thread per core,
    # each writing its own columns of `out` (the same arithmetic as one at a time).
    workers = _threads()
    if workers > 1 and len(X_raw) >= 50_000:
        with ThreadPoolExecutor(min(workers, N_CONTINUOUS)) as pool:
            list(pool.map(column, range(N_CONTINUOUS)))
    else:
        for j in range(N_CONTINUOUS):
            column(j)
    out[:, N_CONTINUOUS:] = X_raw[:, N_CONTINUOUS:]
    return out


class _Interp:
    """np.interp(x, q, refs) for float32 x (as float64), bit for bit, a few times faster.

    np.interp binary-searches q for each x (a branch mispredicted per level) and returns
    refs[j] + 0 or slope[j] * (x - q[j]) + refs[j] with slope[j] = (refs[j+1] - refs[j]) /
    (q[j+1] - q[j]), refs[0] below q[0] and refs[-1] from q[-1] on. Here j comes without
    a search: q[j] <= x holds for a float32 x exactly when t[j] <= x, t[j] being the
    smallest float32 >= q[j]; float32 values order like their bits' integer keys, so the
    count of t[j] <= x is a table lookup on the top bits of x's key (the boundaries below
    its cell) plus a few vectorised steps (the boundaries inside the cell, at most
    `maxcnt`). Then the same formula, in float64, with slope 0 and the end values padded
    on either side (0 * (x - q) + refs[end] is refs[end] exactly). Only for strictly
    increasing, finite q, refs and slopes (`ok`); callers check x is finite."""

    CELL_BITS = 20  # lookup table of at most 2**20 int16 entries per column

    @staticmethod
    def keys(x32: np.ndarray) -> np.ndarray:
        """uint32 keys ordered like the float32 values (-0.0 keyed as +0.0)."""
        b = (x32 + np.float32(0)).view(np.uint32)
        return b ^ ((b >> np.uint32(31)) * np.uint32(0x7FFFFFFF) | np.uint32(0x80000000))

    def __init__(self, q, refs):
        q, refs = np.asarray(q, np.float64), np.asarray(refs, np.float64)
        n = len(q)
        self.ok = (n >= 2 and len(refs) == n and bool(np.all(q[1:] > q[:-1]))
                   and bool(np.isfinite(q).all()) and bool(np.isfinite(refs).all()))
        if not self.ok:
            return
        with np.errstate(all="ignore"):
            slopes = (refs[1:] - refs[:-1]) / (q[1:] - q[:-1])
        if not np.isfinite(slopes).all():
            self.ok = False
            return
        t = q.astype(np.float32)
        low = t.astype(np.float64) < q
        t[low] = np.nextafter(t[low], np.float32(np.inf))
        tk = self.keys(t)
        self.k0 = tk[0]
        span = int(tk[-1]) - int(tk[0]) + 1
        self.shift = np.uint32(max(0, span.bit_length() - self.CELL_BITS))
        cell = (tk - tk[0]) >> self.shift
        counts = np.bincount(cell, minlength=int(cell[-1]) + 1)
        self.maxcnt = int(counts.max())
        base = np.zeros(len(counts), np.int16 if n < 32_000 else np.int64)
        np.cumsum(counts[:-1], out=base[1:])
        self.base, self.last = base, np.uint32(len(counts) - 1)
        self.tk = np.append(tk, np.uint32(0xFFFFFFFF))  # read only for keys in the last cell
        self.s = np.concatenate([[0.0], slopes, [0.0]])
        self.q = np.concatenate([[q[0]], q[:-1], [q[-1]]])
        self.r = np.concatenate([[refs[0]], refs[:-1], [refs[-1]]])

    def __call__(self, x32: np.ndarray, x: np.ndarray) -> np.ndarray:
        k = self.keys(x32)
        c = np.maximum(k, self.k0)
        c -= self.k0
        c >>= self.shift
        np.minimum(c, self.last, out=c)
        cnt = self.base[c].astype(np.intp)  # boundaries below x's cell
        for _ in range(self.maxcnt):  # and those in it, up to x
            cnt += self.tk[cnt] <= k
        y = x - self.q[cnt]  # cnt = j + 1
        y *= self.s[cnt]
        y += self.r[cnt]
        return y


_INTERPOLATORS = weakref.WeakKeyDictionary()


def _interpolators(quantile) -> list:
    """The fitted QuantileTransformer's _Interp per column (None where it does not apply),
    built once per fitted transformer."""
    q, refs = quantile.quantiles_, quantile.references_
    cached = _INTERPOLATORS.get(quantile)
    if cached is not None and np.array_equal(cached[0], q) and np.array_equal(cached[1], refs):
        return cached[2]
    fast = []
    for j in range(N_CONTINUOUS):
        f = _Interp(q[:, j], refs)
        fast.append(f if f.ok else None)
    _INTERPOLATORS[quantile] = (q.copy(), refs.copy(), fast)
    return fast


def _threads() -> int:
    """Worker threads for the numpy-bound steps: the CPUs this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def save_preprocessing(ct, path):
    with atomic_file(path) as f:
        pickle.dump(ct, f, protocol=pickle.HIGHEST_PROTOCOL)


def _write_shard(table: pa.Table, path: Path):
    with pa.OSFile(str(path), "wb") as sink, ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


class _Spill:
    """One scratch Arrow stream per (split, bucket), opened on first use."""

    def __init__(self, root: Path):
        self.root = root
        self.writers = {}

    def path(self, split, bucket):
        return self.root / f"{split}-{bucket:05d}.arrows"

    def write(self, split, bucket, batch: pa.RecordBatch):
        key = (split, bucket)
        if key not in self.writers:
            sink = pa.OSFile(str(self.path(split, bucket)), "wb")
            self.writers[key] = (sink, ipc.new_stream(sink, batch.schema))
        self.writers[key][1].write_batch(batch)

    def close(self):
        for sink, writer in self.writers.values():
            writer.close()
            sink.close()
        self.writers = {}


def _bucket_counts(total, shard_rows) -> dict:
    """Shards per split, from the entry count known before reading (a shard then holds
    about shard_rows rows)."""
    return {name: max(1, math.ceil(total * frac / sum(SPLITS.values()) / shard_rows))
            for name, frac in SPLITS.items()}


def _spill_chunk(spill, d, row_ids, h, n_buckets):
    """Send each row of a derived chunk to its (split, bucket) scratch file."""
    names = list(SPLITS)
    which = rowsplit.assign_split(h, list(SPLITS.values()))
    nb = np.array([n_buckets[s] for s in names], dtype=np.uint64)
    offsets = np.concatenate([[0], np.cumsum(nb)[:-1]]).astype(np.int64)
    bucket = (rowsplit.stream(h, rowsplit.BUCKET) % nb[which]).astype(np.int64)
    group = offsets[which] + bucket
    # A stable sort of small integers is a radix sort in numpy.
    order = np.argsort(group.astype(np.int16 if nb.sum() < (1 << 15) else np.int64), kind="stable")
    group = group[order]
    cols = {name: d["features"][j][order] for j, name in enumerate(RAW)}
    cols.update({name: d["labels"][j][order] for j, name in enumerate(schema.LABELS)})
    cols.update({name: v[order] for name, v in d["extra"].items()})
    cols[ROW_ID] = row_ids[order]
    cols[ORDER] = rowsplit.stream(h, rowsplit.ORDER)[order]
    table = pa.table(cols)
    starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]]) if len(group) else []
    ends = list(starts[1:]) + [len(group)]
    for lo, hi in zip(starts, ends):
        g = int(group[lo])
        s = int(np.searchsorted(offsets, g, side="right") - 1)
        for batch in table.slice(lo, hi - lo).to_batches():
            spill.write(names[s], g - int(offsets[s]), batch)
    return which


def _shard_table(scratch: pa.Table, ct, truth: bool) -> pa.Table:
    """One shard from one scratch file: rows ordered by their hash, features transformed."""
    # Rows with equal hashes (duplicate keys) keep their input order: stable sort.
    order = rowsplit.argsort_stable(scratch.column(ORDER).to_numpy())
    scratch = scratch.take(pa.array(order))
    raw = np.stack([scratch.column(c).to_numpy() for c in RAW]).T  # column-major (n, 12)
    pre = transform(ct, raw)
    cols = {name: pre[:, j] for j, name in enumerate(schema.FEATURES)}
    for name in schema.LABELS + extra_columns(truth):
        cols[name] = scratch.column(name)
    return pa.table(cols)


def preprocess(inputs, output_dir, preprocessing_path, seed, force=False, shard_rows=500_000,
               max_fit_rows=1_000_000, progress=True, tree=TREE, step_size=DEFAULT_STEP) -> dict:
    """Derive, split, fit and shard `inputs` (a path, or a list of paths / globs /
    space-separated lists). Returns the split directories, the preprocessing path, the
    rows per split and the selection counts.

    All outputs are refused up front if they exist (unless force); the split
    directories, the pickle and preprocess.json are built under temporary names and
    renamed together, back to back, only once everything has been written: a kill or an
    error leaves the old outputs or the new ones, a mix only if it lands within the
    microseconds of the renames."""
    from tqdm import tqdm

    output_dir = Path(output_dir)
    preprocessing_path = Path(preprocessing_path)
    out_dirs = {name: output_dir / name for name in SPLITS}
    if not force:
        for d in out_dirs.values():
            if d.exists() and any(d.iterdir()):
                raise FileExistsError(f"{d} exists and is not empty (use --force to replace it)")
        if preprocessing_path.exists():
            raise FileExistsError(f"{preprocessing_path} exists (use --force to replace it)")
    if shard_rows <= 0 or max_fit_rows <= 0 or step_size <= 0:
        raise ValueError("shard_rows, max_fit_rows and step_size must be positive")

    specs = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    sources = open_inputs(expand_inputs(specs), tree)
    total = sum(s.num_entries for s in sources)
    if total == 0:
        raise DataError(f"the inputs hold no entries: {[str(s.path) for s in sources]}")
    has_truth = all(c in sources[0].optional for c in schema.TRUTH)
    key = KEY + KEY_WITH if all(c in sources[0].optional for c in KEY) else REQUIRED
    n_buckets = _bucket_counts(total, shard_rows)

    created = not output_dir.exists()
    try:
        with scratch_dir(output_dir / "scratch") as tmp, \
                tqdm(total=2 * total, unit="row", unit_scale=True, desc="preprocess",
                     disable=not progress) as bar:
            spill = _Spill(tmp)
            try:
                counts, fit_sample, rows = _spill_pass(sources, spill, key, seed, n_buckets,
                                                       max_fit_rows, step_size, bar)
            finally:
                spill.close()
            if counts.kept == 0:
                raise DataError(f"no rows left after the selection: {counts.summary()}")
            empty = [name for name, k in rows.items() if k == 0]
            if empty:
                raise DataError(f"too few rows ({counts.kept}) to split: split(s) {empty} would be "
                                f"empty; {counts.summary()}")
            ct = fit_preprocessing(fit_sample.sample(), seed)
            report = {"inputs": [str(s.path) for s in sources], "tree": tree, "seed": seed,
                      "split_key": key, "rows": rows, "fit_rows": int(len(fit_sample.priority)),
                      **counts.as_dict()}
            _write_outputs(spill, ct, n_buckets, has_truth, out_dirs, output_dir / REPORT, report,
                           preprocessing_path, force, bar)
    except BaseException:
        if created and output_dir.is_dir() and not any(output_dir.iterdir()):
            output_dir.rmdir()  # made for the scratch files only: leave nothing behind
        raise
    return {**out_dirs, "preprocessing": preprocessing_path, "rows": rows, "counts": counts}


def _spill_pass(sources, spill, key, seed, n_buckets, max_fit_rows, step_size, bar):
    """Pass 1: derive every chunk, send each row to its (split, bucket) scratch file and
    offer the training rows to the fit sample. Returns (counts, fit sample, rows per split)."""
    counts = Counts()
    fit_sample = rowsplit.BottomK(max_fit_rows, N_FEATURES)
    rows = dict.fromkeys(SPLITS, 0)
    offset = 0
    for src in sources:
        for first, chunk in src.chunks(step_size):
            d = derive(chunk, counts, src.path, first)
            kept = np.flatnonzero(d["kept"])
            h = rowsplit.row_hash([chunk[c][kept] for c in key], seed)
            which = _spill_chunk(spill, d, offset + first + kept, h, n_buckets)
            train = which == 0
            fit_sample.offer(rowsplit.stream(h[train], rowsplit.PRIORITY), d["features"][:, train].T)
            for j, name in enumerate(SPLITS):
                rows[name] += int(np.count_nonzero(which == j))
            bar.update(len(chunk["mc_pz"]))
        counts.raise_bad(src.path)  # non-finite values, bad truth: counted over the whole file
        offset += src.num_entries
    return counts, fit_sample, rows


def _write_outputs(spill, ct, n_buckets, has_truth, out_dirs, report_path, report,
                   preprocessing_path, force, bar):
    """Pass 2: one shard per scratch file, then definitions, report and pickle, staged
    and renamed together."""
    blob = pickle.dumps(ct, protocol=pickle.HIGHEST_PROTOCOL)
    sha = hashlib.sha256(blob).hexdigest()
    with atomic_outputs() as staged:
        for name, out_dir in out_dirs.items():
            split_dir = staged.dir(out_dir, force=force)
            k = 0
            for bucket in range(n_buckets[name]):
                path = spill.path(name, bucket)
                if not path.exists():
                    continue
                with pa.OSFile(str(path)) as source:  # not mapped: bounded RSS
                    scratch = ipc.open_stream(source).read_all()
                _write_shard(_shard_table(scratch, ct, has_truth), split_dir / f"part-{k:05d}.feather")
                bar.update(scratch.num_rows)
                k += 1
                del scratch
                path.unlink()  # frees the scratch disk as the shards appear
            write_definitions(split_dir, schema.FEATURES, schema.LABELS, extra_columns(has_truth),
                              preprocessing_sha256=sha)
        with staged.file(report_path, "w") as f:
            f.write(json.dumps(report, indent=2) + "\n")
        # Staged last, so renamed last: a replaced pickle means every split is new too.
        with staged.file(preprocessing_path) as f:
            f.write(blob)


def register(subparsers):

    paths = default_paths()
    p = subparsers.add_parser("preprocess", help="derive the features from the tuple, fit the "
                                                 "preprocessing, split and shard")
    # The seed notebook's INPUT_FILES (space-separated; expand_inputs splits it) by default.
    p.add_argument("--input", nargs="+", default=[os.environ.get("INPUT_FILES") or str(paths["sample"])],
                   help="ROOT files with the tuple (or feather / parquet files with its branches): "
                        "paths, globs or a space-separated list (default $INPUT_FILES or %(default)s)")
    p.add_argument("--tree", default=TREE, help="tree path inside the ROOT files (default %(default)s)")
    p.add_argument("--output-dir", type=Path, default=paths["train"].parent,
                   help="where train/, test/ and validation/ are written")
    p.add_argument("--preprocessing", type=Path, default=paths["preprocessing"],
                   help="pickled ColumnTransformer (tX.pkl)")
    add_knob(p, "--seed", "SEED")
    p.add_argument("--force", action="store_true", help="replace existing outputs")
    p.add_argument("--max-fit-rows", type=int, default=1_000_000,
                   help="training rows (a seeded uniform subsample) the preprocessing is fitted on")
    p.add_argument("--shard-rows", type=int, default=500_000)
    p.add_argument("--step-size", type=int, default=DEFAULT_STEP, help="entries read per chunk")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace):
    try:
        out = preprocess(args.input, args.output_dir, args.preprocessing, args.seed,
                         force=args.force, shard_rows=args.shard_rows,
                         max_fit_rows=args.max_fit_rows, tree=args.tree, step_size=args.step_size)
    except (FileExistsError, DataError, ValueError) as err:
        raise EffgenError(str(err)) from err
    counts = ", ".join(f"{k} {v}" for k, v in out["rows"].items())
    print(f"effgen preprocess: {out['counts'].summary()}")
    print(f"effgen preprocess: wrote {counts} rows under {args.output_dir}; "
          f"preprocessing {args.preprocessing}")
    return 0
