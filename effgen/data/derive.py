"""The seed notebook's derivations from the LHCb tuple `TrackingTupler/sim` (DOMAIN.md section 9).

One chunk of tuple branches (a dict of numpy arrays) becomes the 12 raw features, the 4
one-hot labels and the extra columns later models need (pid, `acceptance`, `type`, the
truth columns when present). Rows Lamarr never sends (`mc_pz <= 0`, zero charge) are
dropped and counted; `type` codes other than 0/3/4/5 count as not_recoed, as in the
notebook, and are counted too. Bad values raise DataError naming the file, the branch,
the count and the first entry.
"""

import numpy as np

from effgen import schema
from effgen.errors import DataError

TREE = "TrackingTupler/sim"
# Branches the derivation reads; every input must hold them.
REQUIRED = ["mc_x", "mc_y", "mc_z", "mc_px", "mc_py", "mc_pz", "mc_p", "mc_eta", "mc_phi",
            "mc_charge", "mcID", "type", "acceptance"]
# A per-row key, used for the split when all three are present (see effgen.data.split),
# with the momentum, so that particles sharing a key (files from jobs that restart their
# run and event numbers) still get independent splits.
KEY = ["runNumber", "evtNumber", "mc_key"]
KEY_WITH = ["mc_px", "mc_py", "mc_pz"]
OPTIONAL = KEY + schema.TRUTH
KNOWN_TYPES = {0: "not_recoed", 3: "recoed_as_long", 4: "recoed_as_upstream", 5: "recoed_as_downstream"}
HADRONS = [211, 321, 2212]
# Extra columns every shard carries besides raw features and labels.
PASSED = [schema.PID, "acceptance", "type"]
TRUTH_SUM_TOLERANCE = 1e-4


class Counts:
    """What the selection dropped and which track types it saw, summed over chunks."""

    def __init__(self):
        self.entries = 0
        self.dropped = {"acceptance > 1": 0, "mc_pz <= 0": 0, "mc_charge == 0": 0}
        self.types = {}
        # {file: {problem: [count, first entry, first value, rank]}}, see note_bad
        self.bad = {}

    def note_bad(self, file, problem, mask, first_entry, values, rank=0):
        """Count the rows of `mask` under `problem` for `file`, remembering the first.
        Problems are reported by `rank`, so in the same order however the file is chunked."""
        k = int(mask.sum())
        if k:
            entry = self.bad.setdefault(str(file), {}).setdefault(problem, [0, None, None, rank])
            if entry[1] is None:
                first = int(np.argmax(mask))
                entry[1], entry[2] = first_entry + first, values(first)
            entry[0] += k

    def raise_bad(self, file):
        """DataError listing every problem noted for `file`: the file, the branch, the count
        over the whole file and the first entry."""
        problems = self.bad.get(str(file))
        if problems:
            ranked = sorted(problems.items(), key=lambda item: item[1][3])
            raise DataError(f"{file}: " + "; ".join(
                f"{what.format(count=count)} (first at entry {first}: {value})"
                for what, (count, first, value, _) in ranked))

    def merge(self, other: "Counts"):
        """Add the counts of `other` (a later part of the input: the first bad entries
        noted here stay first)."""
        self.entries += other.entries
        for why, k in other.dropped.items():
            self.dropped[why] = self.dropped.get(why, 0) + k
        for c, k in other.types.items():
            self.types[c] = self.types.get(c, 0) + k
        for file, problems in other.bad.items():
            mine = self.bad.setdefault(file, {})
            for problem, (count, first, value, rank) in problems.items():
                mine.setdefault(problem, [0, first, value, rank])[0] += count

    def add_types(self, types):
        codes, counts = np.unique(types, return_counts=True)
        for c, k in zip(codes.tolist(), counts.tolist()):
            self.types[c] = self.types.get(c, 0) + k

    @property
    def kept(self):
        return self.entries - sum(self.dropped.values()) - sum(
            entry[0] for problems in self.bad.values() for entry in problems.values())

    def unknown_types(self) -> dict:
        return {c: k for c, k in sorted(self.types.items()) if c not in KNOWN_TYPES}

    def as_dict(self) -> dict:
        return {"entries": self.entries, "kept": self.kept, "dropped": dict(self.dropped),
                "type_counts": {str(c): k for c, k in sorted(self.types.items())},
                "unknown_types_as_not_recoed": {str(c): k for c, k in self.unknown_types().items()}}

    def summary(self) -> str:
        parts = [f"{self.entries:,} entries read, {self.kept:,} kept"]
        dropped = [f"{k:,} with {why}" for why, k in self.dropped.items() if k]
        if dropped:
            parts.append("dropped " + ", ".join(dropped))
        unknown = self.unknown_types()
        if unknown:
            parts.append("track types counted as not_recoed: "
                         + ", ".join(f"type {c}: {k:,}" for c, k in unknown.items()))
        return "; ".join(parts)


def _bad_values(chunk, counts, file, first_entry):
    """Rows with a non-finite value in any branch read, or truth columns that are not
    probabilities summing to 1: noted in counts (the caller raises once the file is read,
    with counts over the whole file) and returned as a mask."""
    invalid = np.zeros(len(chunk["mc_pz"]), dtype=bool)
    for rank, name in enumerate(REQUIRED + OPTIONAL):
        v = np.asarray(chunk[name]) if name in chunk else None
        if v is not None and v.dtype.kind == "f":
            if np.isfinite(v).all():  # the usual case: nothing to note or mask
                continue
            bad = ~np.isfinite(v)
            counts.note_bad(file, f"branch '{name}' has {{count}} non-finite values", bad, first_entry,
                            lambda i, v=v: v[i], rank)
            invalid |= bad
    if all(c in chunk for c in schema.TRUTH):
        truth = [np.asarray(chunk[c]) for c in schema.TRUTH]
        bad = _bad_truth(truth)
        bad &= ~invalid
        counts.note_bad(file, f"truth columns {schema.TRUTH} are not probabilities summing to 1 in "
                              "{count} rows", bad, first_entry,
                        lambda i: [float(np.float64(t[i])) for t in truth], len(REQUIRED + OPTIONAL))
        invalid |= bad
    return invalid


def _bad_truth(truth) -> np.ndarray:
    """Rows whose truth values (a list of columns) are not probabilities summing to 1.

    Column by column (an (n, 4) array's row sums and any(axis=1) cost 5x more), in
    float64, summed in column order as numpy's row sum does: the same rows as before."""
    with np.errstate(invalid="ignore"):
        total = np.add(truth[0], truth[1], dtype=np.float64)
        for t in truth[2:]:
            np.add(total, t, out=total, dtype=np.float64)
        total -= 1.0
        bad = np.abs(total, out=total) > TRUTH_SUM_TOLERANCE
        for t in truth:
            bad |= t < 0
            bad |= t > 1
    return bad


def check_truth(where, truth):
    """DataError unless the (n, 4) truth matrix holds finite probabilities summing to 1."""
    counts = Counts()
    _bad_values(dict(zip(schema.TRUTH, np.asarray(truth).T), mc_pz=np.ones(len(truth))),
                counts, where, 0)
    counts.raise_bad(where)


def species_flags(pid: np.ndarray, out=None) -> np.ndarray:
    """(3, n) float32 mc_is_e, mc_is_mu, mc_is_h from the pids."""
    pid = np.asarray(pid)
    # In the pid's own signed type of 32 or 64 bits (abs of its most negative value stays
    # negative, as no species code is): half the work of an int64 copy and np.isin.
    signed = pid.dtype.kind == "i" and pid.dtype.itemsize >= 4
    abs_id = np.abs(pid if signed else pid.astype(np.int64))
    out = np.empty((3, len(abs_id)), np.float32) if out is None else out
    out[0] = abs_id == 11
    out[1] = abs_id == 13
    hadron = abs_id == HADRONS[0]
    for code in HADRONS[1:]:
        hadron |= abs_id == code
    out[2] = hadron
    return out


def track_labels(types: np.ndarray) -> np.ndarray:
    """(4, n) float32 one-hot LABELS from the track types (anything but 3, 4, 5 is
    not_recoed)."""
    labels = np.zeros((len(schema.LABELS), len(types)), dtype=np.float32)
    for j, code in enumerate((3, 4, 5), start=1):
        labels[j] = types == code
    labels[0] = labels[1:].sum(axis=0) == 0
    return labels


def derive(chunk: dict, counts: Counts, file="<input>", first_entry=0) -> dict:
    """Features, labels and extras of one chunk of tuple branches, selected rows only.

    Returns {"features": (12, n) float32, "labels": (4, n) float32 (column-major: one
    row per column), "extra": {name: array}, "kept": boolean mask over the chunk's entries}."""
    n = len(chunk["mc_pz"])
    invalid = _bad_values(chunk, counts, file, first_entry)
    counts.entries += n

    # The notebook's selection (acceptance <= 1 keeps every row of a real tuple), then
    # what Lamarr never sends: the model is only ever called with pz > 0 and a charge.
    # Invalid rows go too: they are reported, with their count, once the file is read.
    keep = ~invalid
    with np.errstate(invalid="ignore"):
        over = np.asarray(chunk["acceptance"]) > 1
    counts.dropped["acceptance > 1"] += int((over & keep).sum())
    keep &= ~over
    for why, bad in (("mc_pz <= 0", np.asarray(chunk["mc_pz"]) <= 0),
                     ("mc_charge == 0", np.asarray(chunk["mc_charge"]) == 0)):
        bad &= keep
        counts.dropped[why] += int(bad.sum())
        keep &= ~bad
    rows = None if keep.all() else np.flatnonzero(keep)

    def col(name, dtype=np.float64):
        v = np.asarray(chunk[name])
        v = v if rows is None else v[rows]
        return v if dtype is None else v.astype(dtype, copy=False)

    def as_is(name):
        """A float branch as read (assigned to float32 features directly: the value a
        float64 copy would give, without making one); other kinds as float64."""
        return col(name, None if np.asarray(chunk[name]).dtype.kind == "f" else np.float64)

    f32 = np.float32
    pz = col("mc_pz")
    # Column-major (12, n): each feature is contiguous for the column-wise writers.
    features = np.empty((len(schema.FEATURES), len(pz)), dtype=f32)
    features[0] = as_is("mc_x")
    features[1] = as_is("mc_y")
    features[2] = as_is("mc_z")
    features[3] = (np.log(col("mc_p")) / np.log(10)).astype(f32)
    # Overwrites the tuple's own mc_tx / mc_ty, as the notebook does.
    features[4] = col("mc_px") / pz
    features[5] = col("mc_py") / pz
    features[6] = as_is("mc_eta")
    features[7] = as_is("mc_phi")
    species_flags(col("mcID", None), out=features[8:11])
    features[11] = as_is("mc_charge")
    bad = ~np.isfinite(features).all(axis=0)  # e.g. mc_p = 0, or px / pz overflowing
    if bad.any():
        j, i = int(np.argmax(~np.isfinite(features[:, bad][:, 0]))), int(np.argmax(bad))
        entry = first_entry + (i if rows is None else int(rows[i]))
        raise DataError(f"{file}: derived feature '{schema.FEATURES[j]}' is not finite in "
                        f"{int(bad.sum())} rows of entries {first_entry}-{first_entry + n - 1} (first "
                        f"at entry {entry}: mc_p={chunk['mc_p'][entry - first_entry]}, "
                        f"mc_px={chunk['mc_px'][entry - first_entry]}, mc_pz={chunk['mc_pz'][entry - first_entry]})")

    types = col("type", np.int32)
    counts.add_types(types)
    labels = track_labels(types)

    extra = {schema.PID: col("mcID", np.int32), "acceptance": col("acceptance", np.int32),
             "type": types}
    for c in schema.TRUTH:
        if c in chunk:
            extra[c] = col(c, f32)
    return {"features": features, "labels": labels, "extra": extra, "kept": keep}
