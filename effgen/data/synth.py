"""`effgen synth`: a physics-inspired toy sample with known true class probabilities.

The real LHCb training sample is not public (DOMAIN.md section 7), so the project
draws its own: particles with the 12 raw features of DOMAIN.md section 2, the true
probabilities of the four classes (smooth functions of origin, momentum, direction,
species and charge) and one-hot labels drawn from those probabilities.

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


def true_probabilities(k) -> np.ndarray:
    """(n, 4) float64 class probabilities in LABELS order, from the generated kinematics.

    Everything is a product of logistic turn-ons, so the truth is smooth. By
    construction long + upstream <= in_velo and downstream <= (1 - in_velo), hence
    every row sums to at most 1 before not_recoed takes the remainder."""
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

    # Long: VELO segment, reaches the T stations, pattern recognition turn-on ~2.5 GeV.
    reach_t = t_acc * _sigmoid((k["log10_p"] - 3.4) / 0.1)
    long_ = eta_acc * in_velo * plateau * reach_t
    # Upstream: VELO + UT but not the T stations (swept out), above a minimal momentum.
    up_eff = np.where(is_e, 0.35, 0.5)
    upstream = eta_acc * in_velo * up_eff * (1.0 - reach_t) * _sigmoid((k["log10_p"] - 2.85) / 0.08)
    # Downstream: origin after the VELO, before the UT, a few GeV to reach the T stations.
    down_eff = 0.85 * plateau
    downstream = (eta_acc * (1.0 - velo_z) * before_ut * down_eff * t_acc
                  * _sigmoid((k["log10_p"] - 3.5) / 0.1))

    probs = np.empty((len(p_gev), 4))
    probs[:, 1] = long_
    probs[:, 2] = upstream
    probs[:, 3] = downstream
    probs[:, 0] = np.clip(1.0 - probs[:, 1:].sum(axis=1), 0.0, 1.0)
    return probs


def _block(n, seed_seq) -> dict:
    """One block of n rows as a dict of numpy columns (COLUMNS order)."""
    rng = np.random.default_rng(seed_seq)
    k = _kinematics(rng, n)
    probs = true_probabilities(k)
    # Labels from the float64 truth: the first class whose cumulative sum exceeds u.
    u = rng.random(n)
    cls = (u[:, None] >= np.cumsum(probs, axis=1)[:, :3]).sum(axis=1)

    species = k["species"]
    pid_sign = np.where(IS_LEPTON[species], -k["charge"], k["charge"])
    f32 = np.float32
    out = {
        "mc_x": k["x"].astype(f32),
        "mc_y": k["y"].astype(f32),
        "mc_z": k["z"].astype(f32),
        "mc_log10_p": k["log10_p"].astype(f32),
        "mc_tx": k["tx"].astype(f32),
        "mc_ty": k["ty"].astype(f32),
        "mc_eta": k["eta"].astype(f32),
        "mc_phi": k["phi"].astype(f32),
        "mc_is_e": (species == 3).astype(f32),
        "mc_is_mu": (species == 4).astype(f32),
        "mc_is_h": (species <= 2).astype(f32),
        "mc_charge": k["charge"].astype(f32),
        schema.PID: (SPECIES_PID[species] * pid_sign).astype(np.int32),
    }
    onehot = np.zeros((n, 4), dtype=f32)
    onehot[np.arange(n), cls] = 1.0
    truth = probs.astype(f32)
    for j, name in enumerate(schema.LABELS):
        out[name] = onehot[:, j]
    for j, name in enumerate(schema.TRUTH):
        out[name] = np.ascontiguousarray(truth[:, j])
    return out


def _blocks(n, seed):
    root = np.random.SeedSequence(seed)
    n_blocks = -(-n // BLOCK_ROWS)
    for i, child in enumerate(root.spawn(n_blocks)):
        yield _block(min(BLOCK_ROWS, n - i * BLOCK_ROWS), child)


def generate(n: int, seed: int, chunk_size: int = 1 << 18):
    """Yield pyarrow.RecordBatches of at most chunk_size rows, n rows in total.

    The rows depend only on (n, seed): chunk_size only decides how they are cut."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    sch = arrow_schema()
    pending, pending_rows = [], 0
    for block in _blocks(n, seed):
        pending.append(block)
        pending_rows += len(block[schema.PID])
        while pending_rows >= chunk_size:
            yield _take_rows(pending, chunk_size, sch)
            pending_rows -= chunk_size
    if pending_rows:
        yield _take_rows(pending, pending_rows, sch)


def _take_rows(pending, rows, sch):
    """Pop the first `rows` rows from the list of pending blocks into a RecordBatch."""
    parts, need = [], rows
    while need:
        block = pending[0]
        size = len(block[schema.PID])
        if size <= need:
            parts.append(pending.pop(0))
            need -= size
        else:
            parts.append({c: v[:need] for c, v in block.items()})
            pending[0] = {c: v[need:] for c, v in block.items()}
            need = 0
    arrays = [pa.array(np.concatenate([p[c] for p in parts])) for c in COLUMNS]
    return pa.RecordBatch.from_arrays(arrays, schema=sch)


def write_sample(path, n: int, seed: int, chunk_size: int = 1 << 18, progress: bool = True):
    """Write n rows to ONE uncompressed feather (Arrow IPC) file at `path`, atomically.

    Uncompressed so that readers can memory-map it."""
    from tqdm import tqdm

    path = Path(path)
    with atomic_path(path) as tmp, tqdm(total=n, unit="row", unit_scale=True,
                                        desc=f"synth {path.name}", disable=not progress) as bar:
        with pa.OSFile(str(tmp), "wb") as sink, ipc.new_file(sink, arrow_schema()) as writer:
            for batch in generate(n, seed, chunk_size):
                writer.write_batch(batch)
                bar.update(batch.num_rows)
    return path


def register(subparsers):
    from effgen.config import add_knob, default_paths

    p = subparsers.add_parser("synth", help="draw the synthetic sample with known truth")
    add_knob(p, "--n", "N_PARTICLES")
    add_knob(p, "--seed", "SEED")
    p.add_argument("--output", type=Path, default=default_paths()["sample"])
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
