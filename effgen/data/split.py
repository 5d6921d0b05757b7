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

import math
from typing import NamedTuple

import numpy as np

_GOLDEN = 0x9E3779B97F4A7C15
GOLDEN = np.uint64(_GOLDEN)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
# Distinct streams derived from one row hash.
BUCKET, ORDER, PRIORITY = 1, 2, 3


def mix(x: np.ndarray, out: np.ndarray = None, tmp: np.ndarray = None) -> np.ndarray:
    """splitmix64's finaliser, vectorised (uint64 arithmetic wraps), into `out` (a new
    array by default; x itself allowed), with `tmp` (x's shape) as scratch if given."""
    tmp = np.right_shift(x, np.uint64(30), out=tmp)
    out = np.bitwise_xor(x, tmp, out=out)
    out *= _M1
    out ^= np.right_shift(out, np.uint64(27), out=tmp)
    out *= _M2
    out ^= np.right_shift(out, np.uint64(31), out=tmp)
    return out


def _bits(values) -> np.ndarray:
    v = np.asarray(values)
    if v.dtype.kind in "iub":
        return v.astype(np.int64).view(np.uint64)
    return v.astype(np.float64).view(np.uint64)


# Rows hashed per block: the block's arrays stay in the CPU's cache across the rounds.
HASH_BLOCK = 1 << 15


def row_hash(columns, seed: int) -> np.ndarray:
    """uint64 hash per row of the given columns (a list of equal-length arrays)."""
    n = len(columns[0])
    start = mix(np.full(1, (seed + _GOLDEN) & 0xFFFFFFFFFFFFFFFF, dtype=np.uint64))[0]
    h = np.full(n, start, dtype=np.uint64)
    tmp = np.empty(min(n, HASH_BLOCK), np.uint64)
    for lo in range(0, n, HASH_BLOCK):
        hb = h[lo:lo + HASH_BLOCK]
        t = tmp[:len(hb)]
        for c in columns:
            hb ^= _bits(c[lo:lo + HASH_BLOCK])
            hb += GOLDEN
            mix(hb, out=hb, tmp=t)
    return h


def stream(h: np.ndarray, which: int) -> np.ndarray:
    """An independent uint64 stream derived from the row hash."""
    x = h ^ np.uint64((which * _GOLDEN) & 0xFFFFFFFFFFFFFFFF)
    return mix(x, out=x)


def unit(h: np.ndarray) -> np.ndarray:
    """The top 53 bits as float64 in [0, 1)."""
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def assign_split(h: np.ndarray, fractions) -> np.ndarray:
    """Index into `fractions` (a list summing to 1 or not) per row: the number of
    cumulative fractions at or below unit(h) (at most len(fractions) - 1), as uint8 for
    up to 255 fractions.

    Counted on the integers: unit(h) = m / 2**53 (m = h >> 11) is at or above a bound b
    exactly when m >= ceil(b * 2**53) (b * 2**53 is exact), 10x faster than searching
    the bounds with the floats."""
    bounds = np.cumsum(fractions, dtype=np.float64)
    bounds /= bounds[-1]
    m = h >> np.uint64(11)
    which = np.zeros(len(h), np.uint8 if len(bounds) <= 256 else np.int64)
    for b in bounds[:-1]:
        which += m >= np.uint64(math.ceil(float(b) * 2.0**53))
    return which


def group_order(group: np.ndarray, n_groups: int) -> np.ndarray:
    """np.argsort(group, kind="stable") for group numbers in [0, n_groups): each row's
    index packed under its group in one unsigned integer, the keys sorted (all distinct,
    so any sort gives the stable order: numpy's vectorised sort of 32-bit keys is 2x
    faster than its radix argsort of 16-bit ones)."""
    n = len(group)
    bits = max(1, (n - 1).bit_length())
    width = np.uint32 if max(1, n_groups - 1).bit_length() + bits <= 32 else np.uint64
    key = np.left_shift(group.astype(width), width(bits))
    key |= np.arange(n, dtype=width)
    key.sort()
    key &= width((1 << bits) - 1)
    return key.astype(np.intp)


def assign_bucket(h: np.ndarray, n_buckets: int) -> np.ndarray:
    return (stream(h, BUCKET) % np.uint64(n_buckets)).astype(np.int64)


def argsort_stable(keys: np.ndarray) -> np.ndarray:
    """np.argsort(keys, kind="stable"), faster for keys that are (as hashes almost always
    are) all distinct: then every sort gives that one permutation, and the default sort
    is the quicker one; with ties, the stable sort itself.

    For uint64 keys, first a sort of values rather than an argsort (2-3x faster): each key's
    low bits replaced by its index, sorted; the indices then come out in key order unless
    two keys share their remaining high bits (a few in a thousand shards of 500k hashes),
    in which case the argsorts below decide."""
    if keys.dtype == np.uint64 and 1 < len(keys) < (1 << 32):
        low = np.uint64((1 << (len(keys) - 1).bit_length()) - 1)
        packed = keys & ~low
        packed |= np.arange(len(keys), dtype=np.uint64)
        packed.sort()
        high = packed & ~low
        if not bool((high[1:] == high[:-1]).any()):
            return (packed & low).astype(np.intp)
    order = np.argsort(keys)
    ranked = keys[order]
    if len(ranked) > 1 and bool((ranked[1:] == ranked[:-1]).any()):
        return np.argsort(keys, kind="stable")
    return order


class FitSample(NamedTuple):
    """Training rows competing for the preprocessing's fit sample: their priority (a hash
    stream), their row_id (unique: breaks ties) and their raw features (n, width)."""
    priority: np.ndarray
    row_id: np.ndarray
    rows: np.ndarray


def bottom_k(k: int, *samples: FitSample) -> FitSample:
    """The k rows of lowest (priority, row_id) among `samples`, in their given order.

    (priority, row_id) orders the rows totally, so the k lowest are the same rows however
    the input is cut into chunks and files and in whatever order the partial samples are
    merged: a seeded uniform subsample, not the first rows."""
    samples = [s for s in samples if len(s.priority)]
    if not samples:
        return FitSample(np.empty(0, np.uint64), np.empty(0, np.int64), np.empty((0, 0), np.float32))
    if len(samples) == 1:
        pri, ids, rows = samples[0]
    else:
        pri = np.concatenate([s.priority for s in samples])
        ids = np.concatenate([s.row_id for s in samples])
        rows = np.concatenate([s.rows for s in samples])
    if len(pri) <= k:
        return FitSample(pri, ids, rows)
    kth = pri[np.argpartition(pri, k - 1)[k - 1]]
    keep = pri < kth
    tied = np.flatnonzero(pri == kth)
    # The k-th priority may be shared: the lowest row_ids among those rows go in.
    keep[tied[np.argsort(ids[tied], kind="stable")[: k - int(np.count_nonzero(keep))]]] = True
    keep = np.flatnonzero(keep)
    return FitSample(pri[keep], ids[keep], np.take(rows, keep, axis=0))  # take: 3x rows[keep]


def sample_order(sample: FitSample) -> np.ndarray:
    """The permutation putting the sample's rows in (priority, row_id) order."""
    order = np.argsort(sample.priority)
    ranked = sample.priority[order]
    if len(ranked) > 1 and bool((ranked[1:] == ranked[:-1]).any()):
        order = np.lexsort((sample.row_id, sample.priority))
    return order


def sample_rows(sample: FitSample) -> np.ndarray:
    """The sample's rows in (priority, row_id) order (independent of how it was built)."""
    return np.take(sample.rows, sample_order(sample), axis=0)
