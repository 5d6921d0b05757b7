"""Lamarr's random_category rules, as SQLamarr applies them to an efficiency model's
outputs: random_category(p0, 0, 0, p1, p2) accumulates its arguments in float, in
that order, and returns the first index whose running sum exceeds the uniform r
(5 if none); a running sum above 1 aborts the step. The parity, draw and SQLamarr
checks compare libraries against these references."""

import numpy as np


def python_track_type(probs, r) -> np.ndarray:
    """Reference of SQLamarr's random_category(p0, 0, 0, p1, p2) for rows of `probs`
    (n x >=3) and uniforms `r` (scalar or n): float32 accumulation in argument order,
    first index i with r < running sum, 5 if none. Returns int array of track types."""
    p = np.asarray(probs, dtype=np.float32)
    if p.ndim == 1:
        p = p[None, :]
    r = np.broadcast_to(np.asarray(r, dtype=np.float32), (p.shape[0],))
    zero = np.zeros(p.shape[0], dtype=np.float32)
    args = (p[:, 0], zero, zero, p[:, 1], p[:, 2])
    result = np.full(p.shape[0], 5, dtype=np.int64)
    undecided = np.ones(p.shape[0], dtype=bool)
    s = np.zeros(p.shape[0], dtype=np.float32)
    for i, a in enumerate(args):
        s = (s + a).astype(np.float32)
        hit = undecided & (r < s)
        result[hit] = i
        undecided &= ~hit
    return result


def cumulative_boundaries(p) -> np.ndarray:
    """random_category's running sums after not_recoed, long and upstream (float32)."""
    p = np.asarray(p, np.float32)
    c0 = p[:, 0]
    c1 = (c0 + p[:, 1]).astype(np.float32)
    c2 = (c1 + p[:, 2]).astype(np.float32)
    return np.stack([c0, c1, c2], axis=1)


def lamarr_safety(p) -> dict:
    """What SQLamarr's random_category would reject or mis-handle."""
    p = np.asarray(p, np.float32)
    s = p[:, 0].copy()
    for k in (1, 2):
        s = (s + p[:, k]).astype(np.float32)
    return {"nan_values": int(np.isnan(p).sum()),
            "negative_values": int((p < 0).sum()), "above_one_values": int((p > 1).sum()),
            "lamarr_sum_above_one": int((s > 1).sum()),
            "max_lamarr_sum": float(np.nanmax(s)) if len(s) else 0.0}
