"""Draw statistics: track types drawn by a library against random_category applied to
reference probabilities, row by row (same uniforms) and as a distribution (class
counts, overall and per momentum bin, Pearson chi-square with sparse cells merged)."""

import numpy as np

from effgen.checks.random_category import cumulative_boundaries, python_track_type

P_EDGES_GEV = (0.5, 3.0, 5.0, 10.0, 30.0, 100.0, 200.0)
P_VALUE_MIN = 1e-3
MIN_EXPECTED = 5.0


def draw_agreement(c_types, ref_probs, c_probs, r, tol, max_listed=10_000) -> dict:
    """C track types against random_category on TF's probabilities with the same
    uniforms; every disagreement listed (up to max_listed, a guard against a broken
    library filling the report) and classified."""
    r = np.asarray(r, np.float32)
    c_types = np.asarray(c_types, np.int64)
    ref_types = python_track_type(ref_probs, r)
    own_types = python_track_type(c_probs, r)
    bounds = cumulative_boundaries(ref_probs).astype(np.float64)
    # Boundary k sums k+1 probabilities, each within tol of TF's.
    slack = tol * np.array([1.0, 2.0, 3.0])
    dist = np.abs(r.astype(np.float64)[:, None] - bounds)
    near = (dist <= slack).any(axis=1)
    diff = np.flatnonzero(c_types != ref_types)
    unexplained = diff[~near[diff]]
    listed = []
    for i in diff[:max_listed]:
        k = int(np.argmin(dist[i]))
        listed.append({"row": int(i), "r": float(r[i]), "c_type": int(c_types[i]),
                       "reference_type": int(ref_types[i]), "nearest_boundary": k,
                       "boundary_value": float(bounds[i, k]), "distance": float(dist[i, k]),
                       "rounding": bool(near[i])})
    own_diff = np.flatnonzero(c_types != own_types)
    return {"n": int(len(r)), "disagreements": int(len(diff)),
            "rounding": int(len(diff) - len(unexplained)), "unexplained": int(len(unexplained)),
            "listed": listed,
            "self_disagreements": int(len(own_diff)),
            "self_disagreement_rows": [int(i) for i in own_diff[:max_listed]],
            "boundary_slack": [float(s) for s in slack]}


def chisquare_merged(observed, expected, labels, min_expected=MIN_EXPECTED) -> dict:
    """Pearson chi-square of observed vs expected counts; cells with expected below
    min_expected are merged (smallest first) into the next-smallest cell."""
    from scipy import stats

    obs = np.asarray(observed, np.float64)
    exp = np.asarray(expected, np.float64)
    cells = [[lab] for lab in labels]
    obs, exp = list(obs), list(exp)
    while len(exp) > 1:
        order = np.argsort(exp, kind="stable")
        i = int(order[0])
        if exp[i] >= min_expected:
            break
        j = int(order[1])
        obs[j] += obs[i]
        exp[j] += exp[i]
        cells[j] = cells[j] + cells[i]
        del obs[i], exp[i], cells[i]
    out = {"cells": ["+".join(map(str, c)) for c in cells], "observed": [int(o) for o in obs],
           "expected": [float(e) for e in exp]}
    if len(exp) < 2:
        out.update(dof=0, chi2=0.0, p_value=None)
        return out
    exp_a = np.array(exp) * (sum(obs) / sum(exp))  # TF rows sum to 1 within float32
    res = stats.chisquare(np.array(obs), exp_a)
    out.update(dof=len(exp) - 1, chi2=float(res.statistic), p_value=float(res.pvalue))
    return out


def momentum_bins(log10_p, edges_gev=P_EDGES_GEV):
    """Bin index per row on raw mc_log10_p = log10(p / MeV): 0 = below the first edge,
    len(edges) = above the last."""
    edges = np.log10(np.asarray(edges_gev) * 1000.0)
    names = ([f"p<{edges_gev[0]:g}"]
             + [f"{a:g}-{b:g}" for a, b in zip(edges_gev[:-1], edges_gev[1:])]
             + [f"p>{edges_gev[-1]:g}"])
    return np.searchsorted(edges, np.asarray(log10_p, np.float64), side="right"), names


def draw_distribution(draws, ref_probs, log10_p, p_min=P_VALUE_MIN) -> dict:
    """Counts of draws (draw d on row d % n) per track type vs TF expectations,
    overall and per momentum bin."""
    types = [0, 3, 4, 5]
    draws = np.asarray(draws, np.int64)
    n = len(ref_probs)
    rows = np.arange(len(draws)) % n
    bounds = cumulative_boundaries(ref_probs).astype(np.float64)
    # Expected class probabilities as random_category sees them (downstream = remainder).
    p = np.column_stack([bounds[:, 0], bounds[:, 1] - bounds[:, 0], bounds[:, 2] - bounds[:, 1],
                         np.clip(1.0 - bounds[:, 2], 0.0, None)])
    weights = np.bincount(rows, minlength=n).astype(np.float64)  # draws per row
    bins, names = momentum_bins(log10_p)
    other = int((~np.isin(draws, types)).sum())

    def table(mask_rows, mask_draws):
        exp = (p[mask_rows] * weights[mask_rows, None]).sum(axis=0)
        obs = np.array([(draws[mask_draws] == t).sum() for t in types])
        return obs, exp

    obs, exp = table(np.ones(n, bool), np.ones(len(draws), bool))
    overall = chisquare_merged(obs, exp, types)
    per_bin = []
    for b, name in enumerate(names):
        rmask = bins == b
        if not rmask.any():
            continue
        o, e = table(rmask, rmask[rows])
        res = chisquare_merged(o, e, types)
        res["bin"] = name
        per_bin.append(res)
    tests = [overall] + per_bin
    failing = [t.get("bin", "overall") for t in tests
               if t["p_value"] is not None and t["p_value"] < p_min]
    return {"n_draws": int(len(draws)), "rows": int(n), "other_types": other,
            "overall": overall, "per_bin": per_bin, "p_value_min": p_min,
            "min_p_value": min([t["p_value"] for t in tests if t["p_value"] is not None], default=None),
            "failing_tests": failing, "passed": not failing and other == 0}
