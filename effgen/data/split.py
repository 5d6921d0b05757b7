"""Seeded, streaming, order-free decisions per row: its split, its shard and its place in
the shard, and whether it joins the preprocessing's fit sample.

Each row gets a 64-bit hash of its key (splitmix64 mixing, seeded):
- the key is (runNumber, evtNumber, mc_key) when the input has all three (a generated
  particle's identity in the tuple), with (mc_px, mc_py, mc_pz), so that two particles
  sharing a key (files from jobs that restart their numbering) still split independently;
- otherwise the row's own values: the bits of every branch the derivation reads, as
  float64 (so a float32 branch and its float64 copy hash alike). Identical rows then
  share a split, which is harmless.
From that hash alone come the split (its top 53 bits as a uniform number in [0, 1) against
the cumulative fractions), the shard bucket within the split, the row's position within
its shard, and its priority for the fit sample (the lowest priorities of the training rows
are a uniform random subsample: bottom-k sampling). None of these depends on the chunk
size, on how the rows are divided into files, or on their order: a tuple sorted by
momentum gives the same shards as a shuffled one.
"""

import numpy as np

_GOLDEN = 0x9E3779B97F4A7C15
GOLDEN = np.uint64(_GOLDEN)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
# Distinct streams derived from one row hash.
BUCKET, ORDER, PRIORITY = 1, 2, 3


def mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, vectorised (uint64 arithmetic wraps)."""
    x = x ^ (x >> np.uint64(30))
    x *= _M1
    x ^= x >> np.uint64(27)
    x *= _M2
    x ^= x >> np.uint64(31)
    return x


def _bits(values) -> np.ndarray:
    v = np.asarray(values)
    if v.dtype.kind in "iub":
        return v.astype(np.int64).view(np.uint64)
    return v.astype(np.float64).view(np.uint64)


def row_hash(columns, seed: int) -> np.ndarray:
    """uint64 hash per row of the given columns (a list of equal-length arrays)."""
    n = len(columns[0])
    h = mix(np.full(n, np.uint64(seed & 0xFFFFFFFFFFFFFFFF) + GOLDEN, dtype=np.uint64))
    for c in columns:
        h ^= _bits(c)
        h += GOLDEN
        h = mix(h)
    return h


def stream(h: np.ndarray, which: int) -> np.ndarray:
    """An independent uint64 stream derived from the row hash."""
    return mix(h ^ np.uint64((which * _GOLDEN) & 0xFFFFFFFFFFFFFFFF))


def unit(h: np.ndarray) -> np.ndarray:
    """The top 53 bits as float64 in [0, 1)."""
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def assign_split(h: np.ndarray, fractions) -> np.ndarray:
    """Index into `fractions` (a list summing to 1 or not) per row."""
    bounds = np.cumsum(fractions, dtype=np.float64)
    bounds /= bounds[-1]
    return np.minimum(np.searchsorted(bounds, unit(h), side="right"), len(bounds) - 1)


def assign_bucket(h: np.ndarray, n_buckets: int) -> np.ndarray:
    return (stream(h, BUCKET) % np.uint64(n_buckets)).astype(np.int64)


def argsort_stable(keys: np.ndarray) -> np.ndarray:
    """np.argsort(keys, kind="stable"), faster for keys that are (as hashes almost always
    are) all distinct: then every sort gives that one permutation, and the default sort
    is the quicker one; with ties, the stable sort itself."""
    order = np.argsort(keys)
    ranked = keys[order]
    if len(ranked) > 1 and bool((ranked[1:] == ranked[:-1]).any()):
        return np.argsort(keys, kind="stable")
    return order


class BottomK:
    """The k rows of lowest priority seen so far (a seeded uniform subsample that does
    not depend on the order or chunking of the rows offered).

    Offered rows that can still make it (below the k-th lowest priority kept at the last
    merge) wait in a buffer, merged into the kept rows once it holds k rows, and by
    `sample`: a merge per k candidates rather than per offer."""

    def __init__(self, k: int, width: int, dtype=np.float32):
        self.k = k
        self.priority = np.empty(0, dtype=np.uint64)
        self.rows = np.empty((0, width), dtype=dtype)
        self._pending, self._pending_rows, self._threshold = [], 0, None

    def offer(self, priority: np.ndarray, rows: np.ndarray):
        if self._threshold is not None:  # full: only rows below the k-th kept can enter
            take = priority < self._threshold
            priority, rows = priority[take], rows[take]
        if len(priority) == 0:
            return
        self._pending.append((priority, np.asarray(rows)))
        self._pending_rows += len(priority)
        if self._pending_rows >= self.k:
            self._merge()

    def _merge(self):
        if not self._pending:
            return
        pri = np.concatenate([self.priority] + [p for p, _ in self._pending])
        all_rows = np.concatenate([self.rows] + [r for _, r in self._pending])
        self._pending, self._pending_rows = [], 0
        if len(pri) > self.k:
            keep = np.argpartition(pri, self.k - 1)[: self.k]
            pri, all_rows = pri[keep], all_rows[keep]
        self.priority, self.rows = pri, all_rows
        if len(pri) >= self.k:
            self._threshold = pri.max()

    def sample(self) -> np.ndarray:
        """The kept rows in priority order (so the result is independent of arrival order)."""
        self._merge()
        return self.rows[argsort_stable(self.priority)]
