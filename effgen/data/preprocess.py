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
   first rows). Rows are spilled, unprocessed: one piece per (shard, chunk), its columns'
   raw bytes, in one scratch file per (chunk, split);
2. the preprocessing (DOMAIN.md section 2's ColumnTransformer: a normal-output
   QuantileTransformer on the 8 continuous features, passthrough on the 4 flags) is
   fitted on that sample: its quantile tables here, with numpy (fit_quantiles), and the
   pickled ColumnTransformer in a child process started with pass 1
   (effgen.data.fit_process: scikit-learn's import runs beside pass 1, its fit beside
   pass 2, and this process never imports it; its tables are checked to be these);
   each shard's pieces are read (in input order), ordered by their rows' hash (a seeded
   shuffle), transformed and written as one shard.
So each shard is a random subset of the whole sample in random order, and an input
sorted by momentum or by event trains like a shuffled one. Peak memory is one input
chunk, the fit sample and one shard per worker, whatever the input size.

Chunks (pass 1) and shards (pass 2) are tasks run by effgen.data.parallel: in parallel
with dask (`workers`, default one per CPU; threads, since numpy, uproot and Arrow release
the GIL) or one after the other in this process (`workers=1`, no dask). Their results
are merged in input order, so the outputs are byte for byte the same either way.

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
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from effgen import schema
from effgen.atomic import atomic_file, atomic_outputs, scratch_dir
from effgen.config import add_knob, default_paths, positive_int
from effgen.data import split as rowsplit
from effgen.data.columnar import to_arrow
from effgen.data.derive import (
    KEY,
    KEY_WITH,
    PASSED,
    REQUIRED,
    TREE,
    Counts,
    derive,
    species_flags,
    track_labels,
)
from effgen.data.fit_process import FitProcess
from effgen.data.parallel import SCHEDULERS, Runner
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
# mc_is_e, mc_is_mu, mc_is_h: derived from the pid again in pass 2, not spilled.
FLAGS = slice(len(schema.CONTINUOUS_FEATURES), len(schema.CONTINUOUS_FEATURES) + 3)
SPILLED_FEATURES = [j for j in range(len(schema.FEATURES)) if not FLAGS.start <= j < FLAGS.stop]
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


def _raw_features(X_raw) -> np.ndarray:
    X_raw = np.asarray(X_raw)
    if X_raw.ndim != 2 or X_raw.shape[1] != N_FEATURES:
        raise ValueError(f"expected an (n, {N_FEATURES}) array of raw features, got {X_raw.shape}")
    return X_raw


def fit_preprocessing(X_raw: np.ndarray, seed: int):
    """Fit the ColumnTransformer on an (n, 12) numpy array of raw features.

    The result is the fitted ColumnTransformer(...).fit(X_raw), without the full
    transform of X_raw that ColumnTransformer.fit runs and throws away (a third of a
    2M-row preprocessing): the column layout is fitted on a few rows, then its quantile
    step is replaced by the same QuantileTransformer fitted on every row (the step
    ColumnTransformer.fit would have fitted, as a clone, on the same columns)."""
    import warnings

    from sklearn.base import clone

    X_raw = _raw_features(X_raw)
    X = X_raw.astype(np.float64)
    ct = _column_transformer(seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="n_quantiles", category=UserWarning)
        ct.fit(X[:2])
    name, step, columns = ct.transformers_[0]
    ct.transformers_[0] = (name, clone(step).fit(X[:, columns]), columns)
    return ct


# scikit-learn's QuantileTransformer defaults, which fit_preprocessing keeps.
N_QUANTILES, FIT_SUBSAMPLE = 1000, 10_000


def fit_quantiles(X_raw: np.ndarray, seed: int, order=None) -> "Quantiles":
    """The quantile tables of fit_preprocessing(X_raw[order], seed) (order: a row index
    array; default all rows as they are), computed here with numpy alone (no
    scikit-learn): the same steps as QuantileTransformer.fit (dense input) on the same
    float64 columns, so the same numbers, bit for bit (preprocess checks them against the
    child's fit, and falls back on it if they ever differ). Only the rows the fit reads
    are gathered."""
    X_raw = _raw_features(X_raw)
    n = len(X_raw) if order is None else len(order)
    rows = _fit_rows(n, seed)
    if order is not None:
        rows = order[rows]
    return _quantiles(X_raw[rows, :N_CONTINUOUS], n)


def _fit_rows(n: int, seed: int):
    """The rows QuantileTransformer.fit reads out of n, in its order: all of them, or
    sklearn.utils.resample's (replace=False) seeded subsample."""
    if FIT_SUBSAMPLE >= n:
        return slice(None)
    rows = np.arange(n)
    np.random.RandomState(seed).shuffle(rows)
    return rows[:FIT_SUBSAMPLE]


def _quantiles(X: np.ndarray, n: int) -> "Quantiles":
    """QuantileTransformer's tables from the continuous columns of the rows it reads
    (_fit_rows) out of n."""
    references = np.linspace(0, 1, max(1, min(N_QUANTILES, n)), endpoint=True)
    return Quantiles(np.nanpercentile(X.astype(np.float64), references * 100, axis=0), references)


def transform(ct, X_raw: np.ndarray, threads=None) -> np.ndarray:
    """ct.transform(X_raw) as float32, faster for what fit_preprocessing builds, with
    `threads` (default: one per CPU) transforming columns at once.

    Same arithmetic as scikit-learn's QuantileTransformer (normal output), without its
    per-call overheads, and with ONE interpolation per column whose quantiles are strictly
    increasing (scikit-learn averages an ascending and a descending interpolation, which
    only differ, in the last bits, where quantiles repeat; such columns still get both).
    Anything else is handed to ct.transform. `ct` may also be the fit's Quantiles."""
    from scipy.special import ndtri

    quantile = ct if isinstance(ct, Quantiles) else _quantile_step(ct)
    if quantile is None:
        return ct.transform(np.asarray(X_raw, dtype=np.float64)).astype(np.float32)
    bound = BOUNDS_THRESHOLD
    clip_lo, clip_hi = ndtri(bound - np.spacing(1)), ndtri(1 - (bound - np.spacing(1)))
    refs = quantile.references_
    out = np.empty((N_FEATURES, len(X_raw)), dtype=np.float32).T  # column-major: contiguous columns
    fast = _interpolators(quantile) if X_raw.dtype == np.float32 else [None] * N_CONTINUOUS

    def column(j):
        x32 = X_raw[:, j]
        # float32 sums cannot overflow float64: a finite sum means finite values.
        if fast[j] is not None and math.isfinite(x32.sum(dtype=np.float64)):
            y = fast[j](x32)  # np.interp and the clamping below in one table lookup
        else:
            q = quantile.quantiles_[:, j]
            x = x32.astype(np.float64)
            y = np.interp(x, q, refs)
            if not np.all(q[1:] > q[:-1]):
                y = 0.5 * (y - np.interp(-x, -q[::-1], -refs[::-1]))
            y[x + bound > q[-1]] = 1
            y[x - bound < q[0]] = 0
        y = ndtri(y, out=y)
        out[:, j] = np.clip(y, clip_lo, clip_hi, out=y)

    # Columns are independent and np.interp / ndtri release the GIL: one thread per core,
    # each writing its own columns of `out` (the same arithmetic as one at a time).
    workers = _threads() if threads is None else threads
    if workers > 1 and len(X_raw) >= 50_000:
        with ThreadPoolExecutor(min(workers, N_CONTINUOUS)) as pool:
            list(pool.map(column, range(N_CONTINUOUS)))
    else:
        for j in range(N_CONTINUOUS):
            column(j)
    out[:, N_CONTINUOUS:] = X_raw[:, N_CONTINUOUS:]
    return out


class Quantiles:
    """What transform needs of a fitted normal-output QuantileTransformer laid out as
    fit_preprocessing lays it out: its quantiles_ (n_quantiles, 8) and references_,
    without scikit-learn (see effgen.data.fit_process)."""

    def __init__(self, quantiles_, references_):
        self.quantiles_, self.references_ = np.asarray(quantiles_), np.asarray(references_)

    @classmethod
    def of(cls, ct):
        """The tables of a fitted ColumnTransformer, or None if transform cannot use them."""
        quantile = _quantile_step(ct)
        return None if quantile is None else cls(quantile.quantiles_, quantile.references_)


def _quantile_step(ct):
    """The normal-output QuantileTransformer of a ColumnTransformer laid out as
    fit_preprocessing lays it out (transform's fast path), or None."""
    from sklearn.preprocessing import QuantileTransformer

    spec, steps = getattr(ct, "transformers", []), getattr(ct, "transformers_", [])
    quantile = steps[0][1] if steps else None
    if (len(spec) == 2 and isinstance(quantile, QuantileTransformer)
            and quantile.output_distribution == "normal"
            and list(spec[0][2]) == list(range(N_CONTINUOUS)) and spec[1][1] == "passthrough"
            and list(spec[1][2]) == list(range(N_CONTINUOUS, N_FEATURES))
            and getattr(ct, "remainder", None) == "drop"):
        return quantile
    return None


def transform_tables(ct):
    """Build transform's lookup tables for `ct` (or its Quantiles) now (they are cached
    per fitted transformer): before tasks on several threads transform with it."""
    quantile = ct if isinstance(ct, Quantiles) else _quantile_step(ct)
    if quantile is not None:
        _interpolators(quantile)


BOUNDS_THRESHOLD = 1e-7  # sklearn.preprocessing._data.BOUNDS_THRESHOLD


class _Interp:
    """np.interp(x, q, refs) for float32 x (as float64), bit for bit, a few times faster;
    with `bound`, QuantileTransformer's clamping too: 1 where x + bound > q[-1], then 0
    where x - bound < q[0] (float64 sums).

    np.interp binary-searches q for each x (a branch mispredicted per level) and returns
    refs[j] + 0 or slope[j] * (x - q[j]) + refs[j] with slope[j] = (refs[j+1] - refs[j]) /
    (q[j+1] - q[j]), refs[0] below q[0] and refs[-1] from q[-1] on. Here j comes without
    a search: q[j] <= x holds for a float32 x exactly when t[j] <= x, t[j] being the
    smallest float32 >= q[j]; float32 values order like their bits' integer keys, so the
    count of t[j] <= x is a table lookup on the top bits of x's key (the boundaries below
    its cell) plus a few vectorised steps (the boundaries inside the cell, at most
    `maxcnt`). Then the same formula, in float64, with slope 0 and the end values padded
    on either side (0 * (x - q) + refs[end] is refs[end] exactly). The clamping is
    monotone in x, so it holds beyond two float32 keys found by bisection: two more
    segments (slope 0, value 0 or 1) replace the boundaries beyond them. Only for
    strictly increasing, finite q, refs and slopes (`ok`); callers check x is finite."""

    CELL_BITS = 20  # lookup table of at most 2**20 int16 entries per column
    KEY_MIN, KEY_MAX = 0x00800000, 0xFF7FFFFF  # keys of the lowest and highest finite float32

    @staticmethod
    def keys(x32: np.ndarray) -> np.ndarray:
        """uint32 keys ordered like the float32 values (-0.0 keyed as +0.0)."""
        b = (x32 + np.float32(0)).view(np.uint32)
        return b ^ ((b >> np.uint32(31)) * np.uint32(0x7FFFFFFF) | np.uint32(0x80000000))

    @staticmethod
    def value(key: int) -> float:
        """The float32 of a key (the inverse of keys), as a Python float."""
        bits = key ^ 0x80000000 if key >= 0x80000000 else key ^ 0xFFFFFFFF
        return float(np.array(bits, np.uint32).view(np.float32))

    @classmethod
    def first_key(cls, holds) -> int:
        """The lowest finite float32 key where `holds` (false, then true, as x grows), or
        KEY_MAX + 1 (the key of +inf) if none."""
        lo, hi = cls.KEY_MIN, cls.KEY_MAX
        while lo <= hi:
            mid = (lo + hi) // 2
            if holds(cls.value(mid)):
                hi = mid - 1
            else:
                lo = mid + 1
        return lo

    def __init__(self, q, refs, bound=None):
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
        # Segment c (c boundaries at or below x): y = (x - qs[c]) * s[c] + r[c].
        s = np.concatenate([[0.0], slopes, [0.0]])
        qs = np.concatenate([[q[0]], q[:-1], [q[-1]]])
        r = np.concatenate([[refs[0]], refs[:-1], [refs[-1]]])
        if bound is not None:
            q0, q1 = float(q[0]), float(q[-1])
            one = self.first_key(lambda x: x + bound > q1)  # y = 1 from this key on
            zero = self.first_key(lambda x: not x - bound < q0) - 1  # y = 0 up to this key
            if not zero < one:  # the clamps overlap: not worth a table
                self.ok = False
                return
            c0 = int(np.searchsorted(tk, zero + 1, side="right"))
            inner = tk[(tk > zero + 1) & (tk < one)]
            tk = np.concatenate([[zero + 1], inner, [one]]).astype(np.uint32)
            cut = slice(c0, c0 + len(inner) + 1)
            s = np.concatenate([[0.0], s[cut], [0.0]])
            qs = np.concatenate([[0.0], qs[cut], [0.0]])
            r = np.concatenate([[0.0], r[cut], [1.0]])
        self.s, self.q, self.r = s, qs, r
        self.k0 = tk[0]
        span = int(tk[-1]) - int(tk[0]) + 1
        self.shift = np.uint32(max(0, span.bit_length() - self.CELL_BITS))
        cell = (tk - tk[0]) >> self.shift
        counts = np.bincount(cell, minlength=int(cell[-1]) + 1)
        self.maxcnt = int(counts.max())
        base = np.zeros(len(counts), np.int16 if len(tk) < 32_000 else np.int64)
        np.cumsum(counts[:-1], out=base[1:])
        self.base, self.last = base, np.uint32(len(counts) - 1)
        self.tk = np.append(tk, np.uint32(0xFFFFFFFF))  # read only for keys in the last cell

    def __call__(self, x32: np.ndarray, x: np.ndarray = None) -> np.ndarray:
        """float64 results for the finite float32 values x32 (x: ignored, their float64
        copy in older callers)."""
        k = self.keys(x32)
        c = np.maximum(k, self.k0)
        c -= self.k0
        c >>= self.shift
        np.minimum(c, self.last, out=c)
        # np.take: the same values as indexing (self.base[c]), 1.6x faster; mode="clip"
        # skips the bounds errors (the indices are in range by construction).
        cnt = np.take(self.base, c, mode="clip").astype(np.intp)  # boundaries below x's cell
        for _ in range(self.maxcnt):  # and those in it, up to x
            cnt += np.take(self.tk, cnt, mode="clip") <= k
        y = np.subtract(x32, np.take(self.q, cnt, mode="clip"), dtype=np.float64)  # exact: f32 -> f64
        y *= np.take(self.s, cnt, mode="clip")
        y += np.take(self.r, cnt, mode="clip")
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
        f = _Interp(q[:, j], refs, bound=BOUNDS_THRESHOLD)
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


_SYNC_FILE_RANGE = []  # [libc's sync_file_range, or None where there is none]


def _start_writeback(path: Path):
    """Start writing a finished shard to disk now, without waiting for the disk (Linux's
    sync_file_range; elsewhere nothing). The system would write it within seconds
    anyway; started here, the shards' dirty pages do not pile up on top of the scratch
    files' until the kernel's background writeback starts, which writes the oldest files
    first: scratch files about to be deleted (disk time wasted, and deleting a file being
    written waits for the disk: seconds at the end of a 20M-row run)."""
    if not _SYNC_FILE_RANGE:
        import ctypes
        import ctypes.util

        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            sync_file_range = libc.sync_file_range
            sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        except (OSError, AttributeError):
            sync_file_range = None
        _SYNC_FILE_RANGE.append(sync_file_range)
    if _SYNC_FILE_RANGE[0] is not None:
        SYNC_FILE_RANGE_WRITE = 2
        fd = os.open(path, os.O_WRONLY)
        try:
            _SYNC_FILE_RANGE[0](fd, 0, 0, SYNC_FILE_RANGE_WRITE)  # a failure leaves it to the system
        finally:
            os.close(fd)


def _has_truth(sources) -> bool:
    """Whether the inputs hold every truth column (all files hold the same ones)."""
    return all(c in sources[0].optional for c in schema.TRUTH)


def _bucket_counts(total, shard_rows) -> dict:
    """Shards per split, from the entry count known before reading (a shard then holds
    about shard_rows rows)."""
    return {name: max(1, math.ceil(total * frac / sum(SPLITS.values()) / shard_rows))
            for name, frac in SPLITS.items()}


class _Chunk:
    """Pass 1's task: entries [start, stop) of one input file. `index` numbers the chunks
    in input order (it orders the scratch pieces of each shard like the input)."""

    def __init__(self, index, source, start, stop, offset, key, seed, group_offsets, fit_rows,
                 scratch, fit_bound, buffers, truth):
        self.index, self.source, self.start, self.stop = index, source, start, stop
        self.offset, self.key, self.seed = offset, key, seed  # offset: row_id of entry 0
        self.group_offsets, self.fit_rows, self.scratch = group_offsets, fit_rows, scratch
        # Fit-sample candidates: training rows of priority below fit_bound (None: all).
        self.fit_bound = fit_bound
        self.spill = True  # False: only the fit-sample candidates (see _spill_pass)
        self.buffers = buffers  # _Buffers shared by the chunks
        self.truth = truth  # the truth columns are spilled (the input has them all)


class _Spilled(NamedTuple):
    """What pass 1 learnt from one chunk (small: kept until every chunk is done)."""
    entries: int
    counts: Counts
    rows: tuple      # rows per split
    groups: dict     # {group: (rows spilled, offset in the split's scratch file)}, see _groups
    error: object    # the chunk's DataError, raised in input order by the caller


def _groups(n_buckets) -> np.ndarray:
    """First group number of each split: groups number every (split, bucket) in order."""
    return np.concatenate([[0], np.cumsum([n_buckets[s] for s in SPLITS])]).astype(np.int64)


def _scratch_path(scratch: Path, index, split) -> Path:
    """Chunk `index`'s scratch file for split number `split`: one piece per group (shard)
    of that split (see _write_pieces). A file per (chunk, split), not per
    (chunk, group): creating and deleting ~1,500 small files cost more than a second of
    system time at 20M rows, and a split's files can go as soon as its shards are done."""
    return scratch / f"{index:06d}-{split}.bin"


def _spill_chunk(job: _Chunk):
    """Pass 1 on one chunk: derive it, hash its rows' keys, write each row to the scratch
    piece of its (split, bucket) and keep the chunk's fit-sample candidates (its training
    rows, at most fit_rows of the lowest priority). Returns (_Spilled, FitSample)."""
    counts = Counts()
    none = rowsplit.bottom_k(job.fit_rows)
    try:
        chunk = job.source.read(job.start, job.stop)
        d = derive(chunk, counts, job.source.path, job.start)
    except DataError as err:
        return _Spilled(job.stop - job.start, counts, (0,) * len(SPLITS), {}, err), none
    kept = np.flatnonzero(d["kept"])
    every = len(kept) == len(d["kept"])  # the usual case: no copies of the key columns
    h = rowsplit.row_hash([chunk[c] if every else chunk[c][kept] for c in job.key], job.seed)
    del chunk
    row_ids = job.offset + job.start + kept

    which = rowsplit.assign_split(h, list(SPLITS.values()))
    train = np.flatnonzero(which == 0)
    priority = rowsplit.stream(h[train], rowsplit.PRIORITY)
    if job.fit_bound is not None:
        below = priority < np.uint64(job.fit_bound)
        train, priority = train[below], priority[below]
    fit = rowsplit.bottom_k(job.fit_rows, rowsplit.FitSample(
        priority, row_ids[train], d["features"][:, train].T))
    rows = tuple(int(np.count_nonzero(which == j)) for j in range(len(SPLITS)))
    if not job.spill:
        return _Spilled(job.stop - job.start, counts, rows, {}, None), fit

    offsets = job.group_offsets
    nb = np.diff(offsets).astype(np.uint64)
    group = offsets[which] + (rowsplit.stream(h, rowsplit.BUCKET) % nb[which]).astype(np.int64)
    # Rows grouped by (split, bucket), in input order within a group; each column then
    # gathered through that permutation (np.take, mode="clip": faster than scattering
    # through its inverse, which also costs the inversion).
    order = rowsplit.group_order(group, int(offsets[-1]))

    # Labels and species flags are not spilled: pass 2 derives them from type and pid.
    values = {RAW[j]: d["features"][j] for j in SPILLED_FEATURES}
    values.update(d["extra"])
    values[ROW_ID] = row_ids
    values[ORDER] = rowsplit.stream(h, rowsplit.ORDER)
    layout = _scratch_columns(job.truth)
    with job.buffers.get(sum(_aligned(len(order) * dt.itemsize) for _, dt in layout)) as buf:
        cols, at = [], 0
        for name, dt in layout:
            out = buf[at:at + len(order) * dt.itemsize].view(dt)
            np.take(values[name].astype(dt, copy=False), order, out=out, mode="clip")
            cols.append(out)
            at += _aligned(out.nbytes)
        sizes = np.bincount(group, minlength=int(offsets[-1]))
        groups = _write_pieces(job, cols, sizes, offsets)
    return _Spilled(job.stop - job.start, counts, rows, groups, None), fit


def _aligned(nbytes: int) -> int:
    return -(-nbytes // 64) * 64


def _scratch_columns(truth: bool) -> list:
    """[(name, dtype)] of the columns spilled per row, in their order in a scratch piece
    (8-byte columns first: a piece starting on 64 bytes has every column aligned)."""
    return ([(ROW_ID, np.dtype(np.int64)), (ORDER, np.dtype(np.uint64))]
            + [(RAW[j], np.dtype(np.float32)) for j in SPILLED_FEATURES]
            + [(schema.PID, np.dtype(np.int32)), ("acceptance", np.dtype(np.int32)),
               ("type", np.dtype(np.int32))]
            + [(c, np.dtype(np.float32)) for c in (schema.TRUTH if truth else [])])


def _write_pieces(job, cols, sizes, offsets) -> dict:
    """The chunk's rows (`cols`, arrays in _scratch_columns' order, grouped: `sizes` rows
    per group) written to its scratch files: per group, one piece, each column's bytes
    after the other's (pass 2 reads them straight into its columns: no Arrow IPC, no
    copies). Returns {group: (rows, byte offset of the piece in its split's file)}."""
    ends = np.cumsum(sizes)
    groups = {}
    for s in range(len(SPLITS)):
        present = [g for g in range(offsets[s], offsets[s + 1]) if sizes[g]]
        if not present:
            continue
        at = 0
        with open(_scratch_path(job.scratch, job.index, s), "wb", buffering=0) as f:
            for g in present:
                lo, hi = int(ends[g] - sizes[g]), int(ends[g])
                at = _aligned(at)  # pieces start on 64 bytes (see _read_pieces)
                f.seek(at)
                groups[g] = (hi - lo, at)
                for col in cols:
                    at += _write_all(f, memoryview(col[lo:hi]).cast("B"))
    return groups


def _write_all(f, view) -> int:
    """Write a byte view to a raw file whole (a raw write may take part of it)."""
    n = len(view)
    while len(view):
        view = view[f.write(view):]
    return n


def _read_exactly(f, view):
    """Fill a writable byte view from a raw file, or raise (a scratch file cut short)."""
    while len(view):
        got = f.readinto(view)
        if not got:
            raise OSError(f"{f.name}: scratch file shorter than written")
        view = view[got:]


class _Buffers:
    """Byte buffers lent to pass 1's tasks and taken back, so that each chunk's grouped
    columns are written into memory already mapped (fresh arrays cost a page fault per
    page: ~0.8 s of system time at 20M rows). At most one buffer per task running at
    once; a copy sent to another process starts empty."""

    def __init__(self):
        self._free, self._lock = [], threading.Lock()

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()

    @contextmanager
    def get(self, nbytes: int):
        with self._lock:
            buf = self._free.pop() if self._free else np.empty(0, np.uint8)
        if len(buf) < nbytes:
            buf = np.empty(nbytes, np.uint8)
        try:
            yield buf
        finally:
            with self._lock:
                self._free.append(buf)


def _read_pieces(pieces, truth: bool) -> dict:
    """{name: column} of a shard's rows from its scratch pieces ((file, rows, offset), in
    input order), each column read straight into place."""
    layout = _scratch_columns(truth)
    width = sum(dt.itemsize for _, dt in layout)
    n = sum(rows for _, rows, _ in pieces)
    cols = {name: np.empty(n, dt) for name, dt in layout}
    # Each piece read whole into a staging buffer starting on 64 bytes, like the piece in
    # its file, then copied into place: the kernel copies page cache to a destination
    # misaligned with it (by 4 to 28 bytes modulo 64 here) 5x slower than to an aligned one.
    raw = np.empty(max((rows for _, rows, _ in pieces), default=0) * width + 64, np.uint8)
    stage = raw[-raw.ctypes.data % 64:]
    lo = 0
    for path, rows, offset in pieces:
        piece = stage[:rows * width]
        with open(path, "rb", buffering=0) as f:  # plain reads, not mapped: bounded RSS
            f.seek(offset)
            _read_exactly(f, memoryview(piece))
        at = 0
        for name, dt in layout:
            cols[name][lo:lo + rows] = piece[at:at + rows * dt.itemsize].view(dt)
            at += rows * dt.itemsize
        lo += rows
    return cols


def _shard_table(scratch: dict, ct, truth: bool, threads=None) -> pa.Table:
    """One shard from its scratch columns: rows ordered by their hash, features
    transformed."""
    # Rows with equal hashes (duplicate keys) keep their input order: stable sort.
    order = rowsplit.argsort_stable(scratch.pop(ORDER))
    # mode="clip": no bounds errors to check for (order is a permutation), faster.
    raw = np.empty((N_FEATURES, len(order)), dtype=np.float32)  # column-major
    for j in SPILLED_FEATURES:
        np.take(scratch.pop(RAW[j]), order, out=raw[j], mode="clip")
    rows = {name: np.take(values, order, mode="clip") for name, values in scratch.items()}
    species_flags(rows[schema.PID], out=raw[FLAGS])
    pre = transform(ct, raw.T, threads)
    cols = {name: to_arrow(pre[:, j]) for j, name in enumerate(schema.FEATURES)}
    cols.update(zip(schema.LABELS, map(to_arrow, track_labels(rows["type"]))))
    for name in extra_columns(truth):
        cols[name] = to_arrow(raw[RAW.index(name)] if name in RAW else rows[name])
    return pa.table(cols)


def _write_shard_task(key, pieces, ct, truth, path, threads):
    """Pass 2 on one shard: its scratch pieces ((file, rows, offset), in input order)
    read, ordered, transformed and written to `path`. Returns (the shard's rows, key,
    path)."""
    scratch = _read_pieces(pieces, truth)
    n = len(scratch[ROW_ID])
    _write_shard(_shard_table(scratch, ct, truth, threads), path)
    return n, key, path


class _ScratchFiles:
    """Pass 2's scratch files, each deleted (on a background thread: deleting a file whose
    pages are being written back waits for the disk) once every shard reading it is
    written, so the scratch disk is freed as the shards appear; and the shards' writeback
    started (_start_writeback) on the same thread. `read(key, shard)` is called in the
    calling process as each shard task ends (tasks may run in other processes)."""

    def __init__(self):
        self._readers, self._files = {}, {}  # file -> shards still to read it; key -> files
        self._pool = ThreadPoolExecutor(1)

    def add(self, key, files):
        self._files[key] = sorted(set(files))
        for f in self._files[key]:
            self._readers[f] = self._readers.get(f, 0) + 1

    def read(self, key, shard=None):
        if shard is not None:
            self._pool.submit(_start_writeback, shard)
        for f in self._files.pop(key):
            self._readers[f] -= 1
            if not self._readers[f]:
                self._pool.submit(f.unlink, missing_ok=True)

    def close(self):
        self._pool.shutdown(wait=True)


def preprocess(inputs, output_dir, preprocessing_path, seed, force=False, shard_rows=500_000,
               max_fit_rows=1_000_000, progress=True, tree=TREE, step_size=DEFAULT_STEP,
               workers=None, scheduler="threads") -> dict:
    """Derive, split, fit and shard `inputs` (a path, or a list of paths / globs /
    space-separated lists). Returns the split directories, the preprocessing path, the
    rows per split and the selection counts.

    `workers` (default: the CPUs this process may use) tasks run at once with dask's
    `scheduler` ("threads" or "processes"); 1 runs everything in this process without
    dask. The outputs are byte for byte the same whatever the workers and scheduler.

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
    workers = _threads() if workers is None else workers

    specs = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    files = expand_inputs(specs)
    # The fit runs in a child process that imports scikit-learn while pass 1 runs (and
    # pickles from a fresh process: tX.pkl's bytes do not depend on this one's past).
    fitter = FitProcess.start()
    try:
        sources = open_inputs(files, tree)
        total = sum(s.num_entries for s in sources)
        if total == 0:
            raise DataError(f"the inputs hold no entries: {[str(s.path) for s in sources]}")
        has_truth = _has_truth(sources)
        key = KEY + KEY_WITH if all(c in sources[0].optional for c in KEY) else REQUIRED
        n_buckets = _bucket_counts(total, shard_rows)

        created = not output_dir.exists()
        try:
            with scratch_dir(output_dir / "scratch") as tmp, \
                    tqdm(total=2 * total, unit="row", unit_scale=True, desc="preprocess",
                         disable=not progress) as bar:
                files = _ScratchFiles()

                def advance(name, value):
                    if name == _spill_chunk.__name__:
                        bar.update(value[0].entries)
                    elif name == _write_shard_task.__name__:
                        bar.update(value[0])
                        files.read(value[1], value[2])

                runner = Runner(workers, scheduler, on_result=advance)
                with _frozen_gc(runner):
                    counts, fit_sample, rows, groups = _spill_pass(runner, sources, tmp, key, seed,
                                                                   n_buckets, max_fit_rows, step_size)
                    if counts.kept == 0:
                        raise DataError(f"no rows left after the selection: {counts.summary()}")
                    empty = [name for name, k in rows.items() if k == 0]
                    if empty:
                        raise DataError(f"too few rows ({counts.kept}) to split: split(s) {empty} would be "
                                        f"empty; {counts.summary()}")
                    fit = _Fit(fitter, fit_sample, seed, tmp)
                    report = {"inputs": [str(s.path) for s in sources], "tree": tree, "seed": seed,
                              "split_key": key, "rows": rows, "fit_rows": int(len(fit_sample.priority)),
                              **counts.as_dict()}
                    tables = fit.tables
                    while True:
                        try:
                            done = _write_outputs(runner, tmp, groups, fit, tables, n_buckets, has_truth,
                                                  out_dirs, output_dir / REPORT, report, preprocessing_path,
                                                  force, files)
                        finally:
                            files.close()
                        if done:
                            break
                        # The child's tables differ from fit_quantiles' (ever, with another
                        # scikit-learn): pass 1 again (pass 2 deleted its scratch), pass 2 with
                        # the child's tables, which then match.
                        tables = fit.result()[1]
                        bar.total += 2 * total
                        files = _ScratchFiles()
                        groups = _spill_pass(runner, sources, tmp, key, seed, n_buckets, max_fit_rows,
                                             step_size)[3]
        except BaseException:
            if created and output_dir.is_dir() and not any(output_dir.iterdir()):
                output_dir.rmdir()  # made for the scratch files only: leave nothing behind
            raise
        return {**out_dirs, "preprocessing": preprocessing_path, "rows": rows, "counts": counts}
    finally:
        fitter.close()


@contextmanager
def _frozen_gc(runner):
    """The objects alive now (the imported modules': uproot, pyarrow, dask) left out of
    the garbage collector's full collections until the block ends: the task graphs
    allocate enough objects to trigger several, each walking every module object (~1 s of
    CPU at 20M rows). Objects made inside the block are collected as usual."""
    import gc

    if runner.parallel:
        import dask  # noqa: F401 (imported by the first task otherwise: frozen with the rest)
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


# Chunks offer the fit sample only their training rows of priority below a bound that
# FIT_MARGIN times max_fit_rows rows are expected to pass (uniform priorities): the merges
# then move a few max_fit_rows rows, not the whole training split. Exact whenever at
# least max_fit_rows rows pass, as they do unless the selection drops half the input;
# otherwise the candidates are gathered again without the bound.
FIT_MARGIN = 2.0


def _fit_bound(total, max_fit_rows):
    """The priority bound for an input of `total` entries, or None (every training row)."""
    fraction = FIT_MARGIN * max_fit_rows / (total * SPLITS["train"] / sum(SPLITS.values()))
    return None if fraction >= 1 else int(fraction * 2.0**64)


def _spill_pass(runner, sources, scratch, key, seed, n_buckets, max_fit_rows, step_size):
    """Pass 1: every chunk derived and spilled (_spill_chunk), the chunks' fit-sample
    candidates merged pairwise (a tree whose shape depends only on the chunk count), then
    the chunks' results taken in input order. Returns (counts, fit sample, rows per
    split, {group: [chunk index per scratch piece]})."""
    offsets = _groups(n_buckets)
    bound = _fit_bound(sum(s.num_entries for s in sources), max_fit_rows)
    jobs, offset, buffers = [], 0, _Buffers()
    for src in sources:
        for start, stop in src.ranges(step_size):
            jobs.append(_Chunk(len(jobs), src, start, stop, offset, key, seed, offsets,
                               max_fit_rows, scratch, bound, buffers, _has_truth(sources)))
        offset += src.num_entries
    spilled, fit = runner.compute(*_chunk_graph(runner, jobs, max_fit_rows))

    counts, rows, groups = Counts(), dict.fromkeys(SPLITS, 0), {}
    last = {id(job.source): job.index for job in jobs}
    for job, meta in zip(jobs, spilled):
        if meta.error is not None:
            raise meta.error
        counts.merge(meta.counts)
        for name, k in zip(SPLITS, meta.rows):
            rows[name] += k
        for g, (n, at) in meta.groups.items():
            groups.setdefault(g, []).append((job.index, n, at))
        if last[id(job.source)] == job.index:
            counts.raise_bad(job.source.path)  # non-finite values, bad truth: whole file
    if len(fit.priority) < min(max_fit_rows, rows["train"]):  # the bound let too few through
        for job in jobs:
            job.spill, job.fit_bound = False, None
        fit = runner.compute(*_chunk_graph(runner, jobs, max_fit_rows))[1]
    return counts, fit, rows, groups


def _chunk_graph(runner, jobs, max_fit_rows):
    """(the chunks' _Spilled, in order; their fit samples merged) as runner tasks."""
    spilled, stack = [], []  # stack: (level, partial sample) of a binary-counter merge
    for job in jobs:
        meta, fit = runner.task(_spill_chunk, job, nout=2)
        spilled.append(meta)
        level = 0
        while stack and stack[-1][0] == level:
            fit = runner.task(rowsplit.bottom_k, max_fit_rows, stack.pop()[1], fit)
            level += 1
        stack.append((level, fit))
    return spilled, runner.task(rowsplit.bottom_k, max_fit_rows, *[s for _, s in stack])


def _write_outputs(runner, scratch, groups, fit, ct, n_buckets, has_truth, out_dirs, report_path,
                   report, preprocessing_path, force, files) -> bool:
    """Pass 2: one shard per (split, bucket) that received rows, transformed with `ct` (the
    fitted preprocessing or its Quantiles), then definitions, report and pickle (the
    `fit`'s), staged and renamed together. False (nothing renamed) if the fit's tables
    are not `ct`'s."""
    offsets = _groups(n_buckets)
    # Parallel tasks transform one column at a time; alone, a task uses every core.
    threads = 1 if runner.parallel else _threads()
    if threads == 1 and runner.scheduler == "threads":
        transform_tables(ct)  # built once here rather than raced for by the tasks
    with atomic_outputs() as staged:
        split_dirs, shards = {}, []
        for s, (name, out_dir) in enumerate(out_dirs.items()):
            split_dirs[name] = staged.dir(out_dir, force=force)
            present = [g for g in range(offsets[s], offsets[s + 1]) if g in groups]
            for k, g in enumerate(present):
                pieces = [(_scratch_path(scratch, i, s), n, at) for i, n, at in groups[g]]
                files.add(g, [f for f, _, _ in pieces])  # every reader counted before any task ends
                shards.append((g, pieces, split_dirs[name] / f"part-{k:05d}.feather"))

        def finish() -> bool:
            """Definitions, report and pickle staged as soon as the child's fit is in,
            beside the shards (flushing them to disk waits for the disk, which by the end
            of pass 2 holds seconds of shard writes); False if its tables are not ct's."""
            blob, tables = fit.result()
            if not _same_tables(tables, ct):
                return False
            sha = hashlib.sha256(blob).hexdigest()
            for name in out_dirs:
                write_definitions(split_dirs[name], schema.FEATURES, schema.LABELS,
                                  extra_columns(has_truth), preprocessing_sha256=sha)
            with staged.file(report_path, "w") as f:
                f.write(json.dumps(report, indent=2) + "\n")
            # Staged last, so renamed last: a replaced pickle means every split is new too.
            with staged.file(preprocessing_path) as f:
                f.write(blob)
            return True

        with ThreadPoolExecutor(1) as pool:
            finishing = pool.submit(finish)
            runner.compute([runner.task(_write_shard_task, g, pieces, ct, has_truth, path, threads)
                            for g, pieces, path in shards])
            done = finishing.result()
        if not done:
            staged._discard()
            return False
    return True


def _same_tables(a, b) -> bool:
    """Whether two Quantiles hold the same numbers, bit for bit."""
    return all(x.shape == y.shape and x.dtype == y.dtype and x.tobytes() == y.tobytes()
               for x, y in ((a.quantiles_, b.quantiles_), (a.references_, b.references_)))


class _Fit:
    """The preprocessing's fit on pass 1's sample, off pass 2's path: its quantile tables
    computed here at once (fit_quantiles: pass 2 transforms with them), the pickled
    ColumnTransformer made by the child process (effgen.data.fit_process) meanwhile, on a
    thread that hands it the sample and waits. result() returns the child's (pickle,
    tables); preprocess checks they are these tables."""

    def __init__(self, fitter, sample, seed, scratch):
        order = rowsplit.sample_order(sample)
        # Only the rows the fit reads, gathered here; the whole sample on the thread.
        self.tables = fit_quantiles(sample.rows, seed, order)
        self._result = self._error = None

        def run():
            try:
                fitter.submit(np.take(sample.rows, order, axis=0), seed, scratch)
                self._result = fitter.result()
            except BaseException as err:  # raised by result()
                self._error = err

        self._thread = threading.Thread(target=run, name="effgen-fit", daemon=True)
        self._thread.start()

    def result(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._result


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
    p.add_argument("--workers", type=positive_int("--workers"), default=None,
                   help="chunks and shards processed at once with dask (default: one per CPU; "
                        "1: in this process, without dask); the outputs do not depend on it")
    p.add_argument("--scheduler", choices=SCHEDULERS, default="threads",
                   help="dask's scheduler when --workers > 1 (default %(default)s)")
    p.set_defaults(func=_main)


def reuse_freed_memory():
    """Make this process keep the memory it frees for its next allocations (glibc's malloc
    for numpy, and Arrow's pool switched to it), instead of handing it back to the system
    at once: preprocessing allocates and frees arrays of a chunk's or a shard's size all
    along, and memory fresh from the system costs a page fault and a page clearing per
    4 kB (~3 s of system time at 20M rows). Peak memory stays that of the largest working
    set, whatever the input size (and lower: 640 MB instead of 760 MB at 20M rows).
    Process-wide, and before any thread starts: for the command line, not the library."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc: leave the defaults
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
    # Blocks up to 64 MB (a chunk's columns, a shard's) from the heap, not mmap; the heap
    # trimmed only when 512 MB of it are free; one heap for every thread (a thread's own
    # arena is made of 64 MB heaps, each unmapped once empty: faults again).
    ok = (mallopt(M_MMAP_THRESHOLD, 64 << 20) == 1 and mallopt(M_TRIM_THRESHOLD, 512 << 20) == 1
          and mallopt(M_ARENA_MAX, 1) == 1)
    if ok:
        pa.set_memory_pool(pa.system_memory_pool())
    return ok


def _main(args: argparse.Namespace):
    reuse_freed_memory()
    try:
        out = preprocess(args.input, args.output_dir, args.preprocessing, args.seed,
                         force=args.force, shard_rows=args.shard_rows,
                         max_fit_rows=args.max_fit_rows, tree=args.tree, step_size=args.step_size,
                         workers=args.workers, scheduler=args.scheduler)
    except (FileExistsError, DataError, ValueError) as err:
        raise EffgenError(str(err)) from err
    counts = ", ".join(f"{k} {v}" for k, v in out["rows"].items())
    print(f"effgen preprocess: {out['counts'].summary()}")
    print(f"effgen preprocess: wrote {counts} rows under {args.output_dir}; "
          f"preprocessing {args.preprocessing}")
    return 0
