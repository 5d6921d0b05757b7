"""`effgen synth`: a physics-inspired toy sample with known true class probabilities.

The real LHCb training sample is not public (DOMAIN.md section 7), so the project
draws its own, in the real tuple's schema (tree `TrackingTupler/sim`, DOMAIN.md section
9): generated particles (vertex, momentum, pid, charge, event identifiers), a geometric
`acceptance` flag and the LHCb track `type` drawn from the true probabilities of the four
classes (smooth functions of origin, momentum, direction, species and charge), which are
written too (`truth_*`). `preprocess` derives the 12 features and the labels from it as
the seed notebook does; `generate` gives that derived view directly.

Rows are produced in fixed blocks of BLOCK_ROWS, block i seeded with the i-th child of
SeedSequence(seed), so the output depends only on (n, seed), never on chunk_size.
"""

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from effgen import schema
from effgen.atomic import atomic_path
from effgen.data.derive import TREE, Counts, derive
from effgen.errors import ConfigError

BLOCK_ROWS = 1 << 16

# Species: (abs pid, fraction, flag column). Leptons follow the PDG sign convention
# (e- is +11), hadrons the opposite (pi+ is +211).
SPECIES_PID = np.array([211, 321, 2212, 11, 13])
SPECIES_FRACTION = np.array([0.70, 0.12, 0.08, 0.05, 0.05])
IS_LEPTON = np.array([False, False, False, True, True])
# Plateau reconstruction efficiency of a long track, per species (hadrons lose some to
# hadronic interactions, electrons to bremsstrahlung).
LONG_PLATEAU = np.array([0.955, 0.95, 0.945, 0.85, 0.985])

# Geometry (mm) and kinematics, DOMAIN.md section 7.
Z_VELO_END = 600.0       # last origin z that still leaves enough VELO hits
R_VELO_MAX = 40.0        # transverse origin radius beyond which VELO hits are lost
Z_UT = 2500.0
Z_MAGNET = 5250.0
Z_T = 8500.0
T_HALF_X, T_HALF_Y = 3000.0, 2500.0
PT_KICK_GEV = 1.2        # integrated dipole field expressed as a transverse kick
DISPLACED_FRACTION = 0.18

COLUMNS = schema.FEATURES + [schema.PID] + schema.LABELS + schema.TRUTH

# The tuple's identifiers: one run, events of PARTICLES_PER_EVENT particles.
RUN_NUMBER = 300000
PARTICLES_PER_EVENT = 200
SPECIES_MASS = np.array([139.570, 493.677, 938.272, 0.511, 105.658])  # MeV
# Branches written, in TrackingTupler/sim's names (DOMAIN.md section 9), and their types.
TUPLE_BRANCHES = {
    "runNumber": np.int32, "evtNumber": np.int64, "mc_key": np.int32, "mcID": np.int32,
    "mc_charge": np.int32, "type": np.int32, "reconstructed": np.int32, "acceptance": np.int32,
    **{name: np.float32 for name in ["mc_x", "mc_y", "mc_z", "mc_r", "mc_px", "mc_py", "mc_pz",
                                     "mc_p", "mc_pt", "mc_eta", "mc_phi", "mc_tx", "mc_ty",
                                     "mc_mass"]},
    **{name: np.float32 for name in schema.TRUTH},
}


def arrow_schema() -> pa.Schema:
    fields = [pa.field(c, pa.float32()) for c in schema.FEATURES]
    fields.append(pa.field(schema.PID, pa.int32()))
    fields += [pa.field(c, pa.float32()) for c in schema.LABELS + schema.TRUTH]
    return pa.schema(fields)


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _truncated(rng, draw, lo, hi, n):
    """Redraw out-of-range values (a handful of passes), clip the stragglers."""
    x = draw(n)
    for _ in range(8):
        bad = np.flatnonzero((x < lo) | (x > hi))
        if bad.size == 0:
            break
        x[bad] = draw(bad.size)
    return np.clip(x, lo, hi)


def _kinematics(rng, n):
    species = rng.choice(len(SPECIES_PID), size=n, p=SPECIES_FRACTION)
    charge = rng.integers(0, 2, size=n) * 2 - 1

    # log10(p/MeV): split normal peaked at 3.7, longer tail to high momentum.
    def draw_logp(k):
        z = rng.standard_normal(k)
        return 3.7 + np.where(z < 0, 0.35, 0.5) * z

    log10_p = _truncated(rng, draw_logp, 2.5, 6.0, n)
    eta = _truncated(rng, lambda k: rng.normal(3.4, 0.8, k), 1.5, 6.0, n)
    phi = rng.uniform(-math.pi, math.pi, n)
    sinh_eta = np.sinh(eta)
    tx = np.cos(phi) / sinh_eta
    ty = np.sin(phi) / sinh_eta

    # Primary vertex, then a flight length along z for the displaced fraction:
    # short decays (40 %, mostly inside the VELO), the rest flat out to ~2.5 m.
    x = rng.normal(0.0, 0.03, n)
    y = rng.normal(0.0, 0.03, n)
    z = rng.normal(0.0, 45.0, n)
    displaced = rng.random(n) < DISPLACED_FRACTION
    short = rng.random(n) < 0.4
    flight = np.where(short, rng.exponential(200.0, n), rng.uniform(0.0, 2500.0, n))
    flight = np.where(displaced, flight, 0.0)
    x += tx * flight
    y += ty * flight
    z += flight
    return dict(species=species, charge=charge, log10_p=log10_p, eta=eta, phi=phi,
                tx=tx, ty=ty, x=x, y=y, z=z)


def _class_model(k):
    """(acceptance probability, (n, 3) reconstruction probabilities of long, upstream,
    downstream GIVEN acceptance). Everything is a product of logistic turn-ons, so the
    truth is smooth. By construction long + upstream <= in_velo and downstream <=
    (1 - in_velo), hence the three sum to at most 1."""
    p_gev = 10.0 ** (k["log10_p"] - 3.0)
    eta_acc = _sigmoid((k["eta"] - 2.0) / 0.08) * _sigmoid((5.0 - k["eta"]) / 0.08)

    velo_z = _sigmoid((Z_VELO_END - k["z"]) / 60.0)
    r = np.hypot(k["x"], k["y"])
    in_velo = velo_z * _sigmoid((R_VELO_MAX - r) / 8.0)
    before_ut = _sigmoid((Z_UT - 200.0 - k["z"]) / 60.0)

    # Extrapolate to the T stations: straight line plus a magnet kick in x whose sign
    # follows the charge, so charge and direction both matter.
    lever = Z_T - k["z"]
    kick = k["charge"] * PT_KICK_GEV / p_gev * (Z_T - Z_MAGNET)
    x_t = k["x"] + k["tx"] * lever + kick
    y_t = k["y"] + k["ty"] * lever
    t_acc = _sigmoid((T_HALF_X - np.abs(x_t)) / 150.0) * _sigmoid((T_HALF_Y - np.abs(y_t)) / 150.0)

    species = k["species"]
    plateau = LONG_PLATEAU[species]
    is_e = species == 3

    cond = np.empty((len(p_gev), 3))
    # Long: VELO segment, reaches the T stations, pattern recognition turn-on ~2.5 GeV.
    reach_t = t_acc * _sigmoid((k["log10_p"] - 3.4) / 0.1)
    cond[:, 0] = in_velo * plateau * reach_t
    # Upstream: VELO + UT but not the T stations (swept out), above a minimal momentum.
    up_eff = np.where(is_e, 0.35, 0.5)
    cond[:, 1] = in_velo * up_eff * (1.0 - reach_t) * _sigmoid((k["log10_p"] - 2.85) / 0.08)
    # Downstream: origin after the VELO, before the UT, a few GeV to reach the T stations.
    down_eff = 0.85 * plateau
    cond[:, 2] = ((1.0 - velo_z) * before_ut * down_eff * t_acc
                  * _sigmoid((k["log10_p"] - 3.5) / 0.1))
    return eta_acc, cond


def true_probabilities(k) -> np.ndarray:
    """(n, 4) float64 class probabilities in LABELS order, from the generated kinematics:
    P(accepted) x P(class | accepted); not_recoed takes the remainder."""
    return _truth(*_class_model(k))


def _truth(eta_acc, cond):
    probs = np.empty((len(eta_acc), 4))
    probs[:, 1:] = eta_acc[:, None] * cond
    probs[:, 0] = np.clip(1.0 - probs[:, 1:].sum(axis=1), 0.0, 1.0)
    return probs


def _tuple_block(n, seed_seq, first_row) -> dict:
    """One block of n particles as TrackingTupler/sim branches (TUPLE_BRANCHES order).

    The geometric `acceptance` flag is drawn first, then the track type given acceptance,
    so a reconstructed particle is always accepted and the marginal class probabilities
    are exactly the truth columns."""
    rng = np.random.default_rng(seed_seq)
    k = _kinematics(rng, n)
    eta_acc, cond = _class_model(k)
    accepted = rng.random(n) < eta_acc
    u = rng.random(n)
    reco = (u[:, None] >= np.cumsum(cond, axis=1)).sum(axis=1)  # 0, 1, 2 or 3 = none
    cls = np.where(accepted & (reco < 3), reco + 1, 0)
    # Not reconstructed as long/upstream/downstream: mostly no track, some VELO-only or
    # T-only tracks, which the notebook counts as not reconstructed.
    other = rng.random(n)
    not_reco_type = np.where(other < 0.05, 1, np.where(other < 0.07, 6, 0))
    track_type = np.where(cls == 0, not_reco_type, np.array(schema.TRACK_TYPES)[cls])

    truth = _truth(eta_acc, cond)

    species = k["species"]
    pid_sign = np.where(IS_LEPTON[species], -k["charge"], k["charge"])
    p = 10.0 ** k["log10_p"]
    pt = p / np.cosh(k["eta"])
    px, py, pz = pt * np.cos(k["phi"]), pt * np.sin(k["phi"]), p * np.tanh(k["eta"])
    rows = first_row + np.arange(n, dtype=np.int64)
    f32, i32 = np.float32, np.int32
    out = {
        "runNumber": np.full(n, RUN_NUMBER, dtype=i32),
        "evtNumber": (rows // PARTICLES_PER_EVENT + 1).astype(np.int64),
        "mc_key": (rows % PARTICLES_PER_EVENT).astype(i32),
        "mcID": (SPECIES_PID[species] * pid_sign).astype(i32),
        "mc_charge": k["charge"].astype(i32),
        "type": track_type.astype(i32),
        "reconstructed": (track_type != 0).astype(i32),
        "acceptance": accepted.astype(i32),
        "mc_x": k["x"].astype(f32), "mc_y": k["y"].astype(f32), "mc_z": k["z"].astype(f32),
        "mc_r": np.hypot(k["x"], k["y"]).astype(f32),
        "mc_px": px.astype(f32), "mc_py": py.astype(f32), "mc_pz": pz.astype(f32),
        "mc_p": p.astype(f32), "mc_pt": pt.astype(f32),
        "mc_eta": k["eta"].astype(f32), "mc_phi": k["phi"].astype(f32),
        "mc_tx": k["tx"].astype(f32), "mc_ty": k["ty"].astype(f32),
        "mc_mass": SPECIES_MASS[species].astype(f32),
    }
    t32 = truth.astype(f32)
    for j, name in enumerate(schema.TRUTH):
        out[name] = np.ascontiguousarray(t32[:, j])
    return out


def features_view(tup: dict) -> dict:
    """The derived columns (FEATURES, pid, LABELS, TRUTH) of a block of tuple branches,
    through the same derivation preprocess applies."""
    counts = Counts()
    d = derive(tup, counts, "synth")
    counts.raise_bad("synth")
    if not d["kept"].all():  # pragma: no cover - synth never makes pz <= 0 or charge 0
        raise AssertionError("synth produced rows the derivation drops")
    out = dict(zip(schema.FEATURES, d["features"]))
    out[schema.PID] = d["extra"][schema.PID]
    out.update(zip(schema.LABELS, d["labels"]))
    for name in schema.TRUTH:
        out[name] = d["extra"][name]
    return out


def _blocks(n, seed):
    """Tuple blocks of BLOCK_ROWS rows (the last one shorter), block i seeded by the i-th
    child of SeedSequence(seed)."""
    root = np.random.SeedSequence(seed)
    n_blocks = -(-n // BLOCK_ROWS)
    for i, child in enumerate(root.spawn(n_blocks)):
        yield _tuple_block(min(BLOCK_ROWS, n - i * BLOCK_ROWS), child, i * BLOCK_ROWS)


def _rechunk(blocks, chunk_size):
    """Re-cut dicts of equal-length arrays into dicts of chunk_size rows (last shorter)."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    pending, pending_rows = [], 0
    for block in blocks:
        pending.append(block)
        pending_rows += len(next(iter(block.values())))
        while pending_rows >= chunk_size:
            yield _take_rows(pending, chunk_size)
            pending_rows -= chunk_size
    if pending_rows:
        yield _take_rows(pending, pending_rows)


def _take_rows(pending, rows):
    """Pop the first `rows` rows from the list of pending blocks."""
    parts, need = [], rows
    while need:
        block = pending[0]
        size = len(next(iter(block.values())))
        if size <= need:
            parts.append(pending.pop(0))
            need -= size
        else:
            parts.append({c: v[:need] for c, v in block.items()})
            pending[0] = {c: v[need:] for c, v in block.items()}
            need = 0
    if len(parts) == 1:
        return parts[0]
    return {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}


def generate_tuple(n: int, seed: int, chunk_size: int = 1 << 18):
    """Yield dicts {branch: numpy array} of the tuple (TUPLE_BRANCHES), at most
    chunk_size rows each, n rows in total; the rows depend only on (n, seed)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    yield from _rechunk(_blocks(n, seed), chunk_size)


def generate(n: int, seed: int, chunk_size: int = 1 << 18):
    """Yield pyarrow.RecordBatches of the derived columns (COLUMNS: features, pid, labels,
    truth) of at most chunk_size rows, n rows in total, as preprocess derives them from
    the tuple. The rows depend only on (n, seed): chunk_size only decides how they are cut."""
    sch = arrow_schema()
    for chunk in generate_tuple(n, seed, chunk_size):
        view = features_view(chunk)
        yield pa.RecordBatch.from_arrays([pa.array(view[c]) for c in COLUMNS], schema=sch)


def tuple_schema() -> pa.Schema:
    return pa.schema([pa.field(name, pa.from_numpy_dtype(dtype)) for name, dtype in TUPLE_BRANCHES.items()])


def _root_writer(path, compression=None):
    """(write(chunk), close()) appending chunks to TREE in a new ROOT file, uncompressed by
    default (written and read at memory speed; uproot reads compressed tuples too), or
    with an uproot compression such as uproot.ZLIB(1), uproot's own default."""
    import uproot

    f = uproot.recreate(path, compression=compression)
    f.mktree(TREE, dict(TUPLE_BRANCHES))
    tree = f[TREE]
    return tree.extend, f.close


def _arrow_writer(path, parquet):
    import pyarrow.parquet as pq

    sch = tuple_schema()
    sink = pa.OSFile(str(path), "wb")
    writer = pq.ParquetWriter(sink, sch, compression="none") if parquet else ipc.new_file(sink, sch)

    def write(chunk):
        writer.write_batch(pa.RecordBatch.from_arrays([pa.array(chunk[c]) for c in sch.names], schema=sch))

    def close():
        writer.close()
        sink.close()
    return write, close


FORMATS = {".root": "root", ".feather": "feather", ".arrow": "feather", ".parquet": "parquet"}


def write_sample(path, n: int, seed: int, chunk_size: int = 1 << 18, progress: bool = True,
                 root_compression=None):
    """Write n particles in the tuple's schema to ONE file at `path`, atomically: a ROOT
    file with tree TrackingTupler/sim (`.root`; uncompressed unless `root_compression`, an
    uproot compression, is given), or an uncompressed feather (`.feather`, `.arrow`) or
    parquet (`.parquet`) file with the same columns."""
    from tqdm import tqdm

    path = Path(path)
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise ConfigError(f"{path}: unknown sample format (use one of {sorted(FORMATS)})")
    with atomic_path(path) as tmp, tqdm(total=n, unit="row", unit_scale=True,
                                        desc=f"synth {path.name}", disable=not progress) as bar:
        write, close = _root_writer(tmp, root_compression) if kind == "root" else _arrow_writer(tmp, kind == "parquet")
        try:
            for chunk in generate_tuple(n, seed, chunk_size):
                write(chunk)
                bar.update(len(chunk["mc_pz"]))
        finally:
            close()
    return path


def register(subparsers):
    from effgen.config import add_knob, default_paths

    p = subparsers.add_parser("synth", help="draw the synthetic sample (the LHCb tuple's schema) with known truth")
    add_knob(p, "--n", "N_PARTICLES")
    add_knob(p, "--seed", "SEED")
    p.add_argument("--output", type=Path, default=default_paths()["sample"],
                   help=f"a .root file (tree {TREE}), or .feather / .parquet (default %(default)s)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.set_defaults(func=_main)


def _main(args):
    if args.output.exists() and not args.force:
        raise ConfigError(f"{args.output} exists (use --force to overwrite it)")
    if args.n <= 0:
        raise ConfigError(f"--n must be positive, got {args.n}")
    write_sample(args.output, args.n, args.seed)
    print(f"effgen synth: wrote {args.n} rows to {args.output}")
    return 0
