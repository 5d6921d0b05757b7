"""The whole Lamarr tracking chain inside SQLamarr, with one tracking library.

PyLamarr's tracking wrappers (not installable here) run, per event store: the acceptance
and efficiency `Plugin`s on every selected particle (the efficiency query, DOMAIN.md
section 4); a TemporaryTable that keeps a particle when `random_category(1 - acc, acc)
== 1` and only then draws its track type with `random_category(not_recoed, 0, 0, long,
upstream)`; the propagation of the true track to its closest approach to the beam
(`z_closest_to_beam`); the resolution and covariance `GenerativePlugin`s (128 noise
values each) on the particles drawn as long, upstream or downstream; and the covariance
post-processing in SQL, sigma_i = sqrt(exp(log_cov_i_i)), cov_ij = corr_ij sigma_i
sigma_j. This module writes those queries itself (same tables, columns and steps; the
post-processing table also keeps `mcparticle_id`, which PyLamarr's drops).

The check is exact. SQLamarr's GenerativePlugin draws, per row, `n_random` floats from
a fresh `std::normal_distribution<float>` fed by the connection's ranlux48 (the same
generator `random_category` uses); re-seeding the connection replays the stream. So the
pipeline seeds the connection before each generator, and afterwards re-seeds it and runs
a probe GenerativePlugin (c_harness/lamarr_chain_echo.c) with the very same query,
which copies its inputs and noise to its outputs. Every stored value is then compared,
bit for bit, with the library called directly on those inputs and that noise; the
post-processing with the same double-precision arithmetic in Python (libm's exp, sqrt).
"""

import contextlib
import math
import os
import sqlite3
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from effgen import schema
from effgen.atomic import atomic_dir
from effgen.checks.draws import draw_distribution
from effgen.checks.lamarr import EFFICIENCY_QUERY, execute_on_fresh_db, pid_from_flags, write_hepmc2_files
from effgen.codegen.native import exported_symbols
from effgen.config import shipped_dir
from effgen.errors import LamarrError

N_RANDOM = 128
SYMBOLS = ("acceptance", "efficiency", "resolution", "covariance")

ACCEPTANCE_OUTPUTS = ["acceptance"]
EFFICIENCY_OUTPUTS = list(schema.OUTPUTS)
RESOLUTION_OUTPUTS = ["dx", "dy", "dz", "dtx", "dty", "dp", "chi2PerDoF", "nDoF_f", "ghostProb"]
_PAIRS = [(j, i) for i in range(1, 5) for j in range(i)]  # 0_1, 0_2, 1_2, 0_3, ...
COVARIANCE_OUTPUTS = ([f"log_cov_ClosestToBeam_{i}_{i}" for i in range(5)]
                      + [f"corr_ClosestToBeam_{j}_{i}" for j, i in _PAIRS])
# The post-processed covariance matrix, lower triangle by rows of the upper index.
COV_MATRIX = [f"cov{j}{i}" for i in range(5) for j in range(i + 1)]

RESOLUTION_FEATURES = ["ctb_x", "ctb_y", "ctb_z", "mc_tx", "mc_ty", "mc_log10_p",
                       "mc_is_e", "mc_is_mu", "mc_is_h", "is_long", "is_upstream", "is_downstream"]
COVARIANCE_FEATURES = (RESOLUTION_FEATURES[:6] + ["chi2PerDoF", "nDoF_f", "ghostProb"]
                       + RESOLUTION_FEATURES[6:])

# Table names as PyLamarr's wrappers name them.
T_ACC, T_EFF, T_TYPE = "tmp_acceptance_out", "tmp_efficiency_out", "tmp_particles_recoed_as"
T_CTB, T_RES, T_COV, T_MATRIX = ("tmp_closest_to_beam", "tmp_resolution_out",
                                 "tmp_covariance_out", "covariance")

# Kept only when drawn as accepted; the track type drawn only then (PyLamarr's order:
# SQLite evaluates the WHERE draw first, then the selected one, row by row).
ASSIGN_QUERY = f"""
SELECT
  eff.mcparticle_id,
  random_category(eff.not_recoed, 0, 0, eff.long, eff.upstream) AS track_type
FROM {T_EFF} AS eff
INNER JOIN {T_ACC} AS acc ON eff.mcparticle_id = acc.mcparticle_id
WHERE random_category(1 - acc.acceptance, acc.acceptance) == 1
"""

# The true track's point of closest approach to the beam line (SQLamarr's function).
CLOSEST_TO_BEAM_QUERY = """
WITH line AS (
  SELECT
    p.mcparticle_id,
    z_closest_to_beam(ov.x, ov.y, ov.z, p.px/p.pz, p.py/p.pz) AS z,
    ov.x AS x0, ov.y AS y0, ov.z AS z0,
    p.px/p.pz AS tx, p.py/p.pz AS ty
  FROM MCParticles AS p
  INNER JOIN MCVertices AS ov ON p.production_vertex = ov.mcvertex_id
)
SELECT mcparticle_id, x0 + (z - z0)*tx AS x, y0 + (z - z0)*ty AS y, z AS z FROM line
"""

# log(x)/log(10.) as in effgen.checks.lamarr (TensorFlow's bundled SQLite lacks log10).
_FLAGS = """
  abs(p.pid) == 11 AS mc_is_e,
  abs(p.pid) == 13 AS mc_is_mu,
  (abs(p.pid) == 211 OR abs(p.pid) == 321 OR abs(p.pid) == 2212) AS mc_is_h,
  (tt.track_type == 3) AS is_long,
  (tt.track_type == 4) AS is_upstream,
  (tt.track_type == 5) AS is_downstream"""
_TRACK = """
  ctb.x AS ctb_x, ctb.y AS ctb_y, ctb.z AS ctb_z,
  p.px/p.pz AS mc_tx, p.py/p.pz AS mc_ty,
  log(norm2(p.px, p.py, p.pz))/log(10.) AS mc_log10_p,"""

RESOLUTION_QUERY = f"""
SELECT
  p.mcparticle_id,{_TRACK}{_FLAGS}
FROM MCParticles AS p
INNER JOIN {T_TYPE} AS tt ON p.mcparticle_id = tt.mcparticle_id
INNER JOIN {T_CTB} AS ctb ON p.mcparticle_id = ctb.mcparticle_id
WHERE tt.track_type IN (3, 4, 5)
"""

COVARIANCE_QUERY = f"""
SELECT
  p.mcparticle_id,{_TRACK}
  res.chi2PerDoF AS chi2PerDoF, res.nDoF_f AS nDoF_f, res.ghostProb AS ghostProb,{_FLAGS}
FROM MCParticles AS p
INNER JOIN {T_TYPE} AS tt ON p.mcparticle_id = tt.mcparticle_id
INNER JOIN {T_RES} AS res ON p.mcparticle_id = res.mcparticle_id
INNER JOIN {T_CTB} AS ctb ON p.mcparticle_id = ctb.mcparticle_id
WHERE tt.track_type IN (3, 4, 5)
"""


def _matrix_query():
    sig = ",\n    ".join(f"sqrt(exp(log_cov_ClosestToBeam_{i}_{i})) AS sig{i}" for i in range(5))
    cor = ",\n    ".join(f"corr_ClosestToBeam_{j}_{i} AS cor{j}{i}" for j, i in _PAIRS)
    cells = []
    for i in range(5):
        for j in range(i + 1):
            cells.append(f"sig{i} * sig{i}" if i == j else f"cor{j}{i} * sig{j} * sig{i}")
    return (f"WITH s AS (\n  SELECT mcparticle_id,\n    {sig},\n    {cor}\n  FROM {T_COV}\n)\n"
            f"SELECT mcparticle_id, {', '.join(cells)} FROM s")


MATRIX_QUERY = _matrix_query()

HARNESS_DIR = shipped_dir("c_harness", "lamarr_chain_echo.c")

# Persistent copies read back (the Plugins' own tables are TEMPORARY: visible only on
# the library's connection). name -> (source table, columns).
_PERSIST = {
    "acceptance_out": (T_ACC, ACCEPTANCE_OUTPUTS),
    "efficiency_out": (T_EFF, EFFICIENCY_OUTPUTS),
    "resolution_out": (T_RES, RESOLUTION_OUTPUTS),
    "covariance_out": (T_COV, COVARIANCE_OUTPUTS),
}
_PROBE_FEATURES = [f"in_{i}" for i in range(12)]
_PROBE_RES = [f"in_{i}" for i in range(12)] + [f"rnd_{k}" for k in range(N_RANDOM)]
_PROBE_COV = [f"in_{i}" for i in range(15)] + [f"rnd_{k}" for k in range(N_RANDOM)]


def build_echo_library(output_so, cc="gcc", n_random=N_RANDOM) -> Path:
    src = HARNESS_DIR / "lamarr_chain_echo.c"
    output_so = Path(output_so)
    output_so.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_so.with_name(f".{output_so.name}.{os.getpid()}.tmp")
    cmd = [cc, "-std=c99", "-O2", "-fPIC", "-shared", "-Wall", "-Werror",
           f"-DN_RANDOM={int(n_random)}", "-o", str(tmp), str(src)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise LamarrError(f"compiling {src} failed ({' '.join(cmd)}):\n{res.stderr}")
    os.replace(tmp, output_so)
    return output_so


def check_library_symbols(library, symbols=SYMBOLS):
    """SQLamarr aborts the process (C++ terminate) on a missing symbol: refuse first."""
    library = Path(library)
    if not library.is_file():
        raise LamarrError(f"tracking library {library} does not exist")
    exported = set(exported_symbols(library))
    missing = [s for s in symbols if s not in exported]
    if missing:
        raise LamarrError(f"tracking library {library} does not export {', '.join(missing)} "
                          f"(the chain needs {', '.join(symbols)})")


def _pipeline(db, library, echo, seeds, n_random):
    """SQLamarr algorithms of the chain, then the probes, in execution order. Callables
    run between the C++ steps (SQLamarr's Pipeline allows Python steps): they re-seed
    the connection's generator."""
    import SQLamarr

    lib = str(library)

    def reseed(seed):
        return lambda: db.seed(int(seed))

    def persist(name, table, cols):
        return SQLamarr.TemporaryTable(db, name, ["mcparticle_id"] + cols,
                                       f"SELECT mcparticle_id, {', '.join(cols)} FROM {table}", True)

    algs = [
        SQLamarr.PVFinder(db),
        SQLamarr.MCParticleSelector(db),
        SQLamarr.Plugin(db, lib, "acceptance", EFFICIENCY_QUERY, T_ACC, ACCEPTANCE_OUTPUTS,
                        ["mcparticle_id"]),
        SQLamarr.Plugin(db, lib, "efficiency", EFFICIENCY_QUERY, T_EFF, EFFICIENCY_OUTPUTS,
                        ["mcparticle_id"]),
        SQLamarr.TemporaryTable(db, T_TYPE, ["mcparticle_id", "track_type"], ASSIGN_QUERY, True),
        SQLamarr.TemporaryTable(db, T_CTB, ["mcparticle_id", "x", "y", "z"], CLOSEST_TO_BEAM_QUERY, True),
        reseed(seeds["resolution"]),
        SQLamarr.GenerativePlugin(db, lib, "resolution", RESOLUTION_QUERY, T_RES, RESOLUTION_OUTPUTS,
                                  n_random, ["mcparticle_id"]),
        reseed(seeds["covariance"]),
        SQLamarr.GenerativePlugin(db, lib, "covariance", COVARIANCE_QUERY, T_COV, COVARIANCE_OUTPUTS,
                                  n_random, ["mcparticle_id"]),
        SQLamarr.TemporaryTable(db, T_MATRIX, ["mcparticle_id"] + COV_MATRIX, MATRIX_QUERY, True),
    ]
    algs += [persist(name, table, cols) for name, (table, cols) in _PERSIST.items()]
    # The probes: the same queries, the generators' noise replayed by the same seeds.
    e = str(echo)
    algs += [
        SQLamarr.Plugin(db, e, "echo_features", EFFICIENCY_QUERY, "tmp_probe_features",
                        _PROBE_FEATURES, ["mcparticle_id"]),
        reseed(seeds["resolution"]),
        SQLamarr.GenerativePlugin(db, e, "echo_resolution", RESOLUTION_QUERY, "tmp_probe_resolution",
                                  _PROBE_RES, n_random, ["mcparticle_id"]),
        reseed(seeds["covariance"]),
        SQLamarr.GenerativePlugin(db, e, "echo_covariance", COVARIANCE_QUERY, "tmp_probe_covariance",
                                  _PROBE_COV, n_random, ["mcparticle_id"]),
        persist("probe_features", "tmp_probe_features", _PROBE_FEATURES),
        persist("probe_resolution", "tmp_probe_resolution", _PROBE_RES),
        persist("probe_covariance", "tmp_probe_covariance", _PROBE_COV),
    ]
    return algs


def run_chain(library, features, db_path, *, pid=None, seed=0, n_random=N_RANDOM,
              events_per_file=5000, work_dir=None) -> dict:
    """Run the tracking chain on `features` (n x 12 raw, schema.FEATURES order; pid
    from the flags unless given) with the tracking library; return {table: DataFrame}
    read back from the database file, every table keyed by `row` (the index in
    `features`) and `mcparticle_id`: particles, acceptance_out, efficiency_out,
    tmp_particles_recoed_as, resolution_out, covariance_out, covariance, and the probes
    (probe_features, probe_resolution, probe_covariance)."""
    library = Path(library).resolve()
    check_library_symbols(library)
    db_path = Path(db_path)
    db_path.parent.mkdir(parents=True, exist_ok=True)
    f = np.asarray(features, dtype=np.float32)
    pid = pid_from_flags(f) if pid is None else np.asarray(pid, dtype=np.int64)
    seeds = {"chain": int(seed), "resolution": int(seed) + 1, "covariance": int(seed) + 2}
    with contextlib.ExitStack() as stack:
        if work_dir is None:
            work_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="chain-")))
        work_dir = Path(work_dir)
        echo = build_echo_library(work_dir / "lamarr_chain_echo.so", n_random=n_random)
        with atomic_dir(work_dir / "hepmc", force=True) as tmp:
            write_hepmc2_files(tmp, f, pid, events_per_file)
        files = sorted((work_dir / "hepmc").glob("events_*.mc2"))
        _execute(library, echo, files, db_path, seeds, n_random)
    return read_chain(db_path)


def _execute(library, echo, files, db_path, seeds, n_random):
    execute_on_fresh_db(files, db_path, seeds["chain"],
                        lambda db: _pipeline(db, library, echo, seeds, n_random),
                        f"SQLamarr tracking chain on {db_path} with {library}")


def read_chain(db_path) -> dict:
    import pandas as pd

    tables = {}
    with contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as con:
        particles = pd.read_sql_query(
            "SELECT ev.collision AS row, p.mcparticle_id, p.pid FROM MCParticles AS p "
            "INNER JOIN GenEvents AS ev ON p.genevent_id = ev.genevent_id", con)
        names = list(_PERSIST) + [T_TYPE, T_MATRIX, "probe_features", "probe_resolution",
                                  "probe_covariance"]
        for name in names:
            frame = pd.read_sql_query(f"SELECT * FROM {name}", con)
            frame = particles[["row", "mcparticle_id"]].merge(frame, on="mcparticle_id",
                                                              validate="one_to_one")
            tables[name] = frame.sort_values("row", kind="stable").reset_index(drop=True)
    tables["particles"] = particles.sort_values("row", kind="stable").reset_index(drop=True)
    return tables


# ---- the exact check -----------------------------------------------------------------

def _caller(library, symbol, generator):
    import ctypes

    fn = getattr(ctypes.CDLL(str(library)), symbol)
    fptr = ctypes.POINTER(ctypes.c_float)
    fn.argtypes = [fptr, fptr, fptr] if generator else [fptr, fptr]
    fn.restype = fptr
    return fn, fptr


def direct_calls(library, symbol, inputs, n_outputs, noise=None) -> np.ndarray:
    """`symbol` called once per row as SQLamarr calls it: f(out, in) or, with noise,
    f(out, in, rnd)."""
    fn, fptr = _caller(library, symbol, noise is not None)
    x = np.ascontiguousarray(inputs, dtype=np.float32)
    rnd = None if noise is None else np.ascontiguousarray(noise, dtype=np.float32)
    out = np.zeros((len(x), n_outputs), dtype=np.float32)
    for i in range(len(x)):
        args = [out[i].ctypes.data_as(fptr), x[i].ctypes.data_as(fptr)]
        if rnd is not None:
            args.append(rnd[i].ctypes.data_as(fptr))
        fn(*args)
    return out


def covariance_matrix(cov_out) -> np.ndarray:
    """The SQL post-processing in Python doubles with libm's exp and sqrt (as SQLite's
    math functions), same operation order: cells in COV_MATRIX order."""
    v = np.asarray(cov_out, dtype=np.float64)
    sig = np.array([[math.sqrt(math.exp(x)) for x in row[:5]] for row in v])
    corr = {pair: v[:, 5 + k] for k, pair in enumerate(_PAIRS)}
    cells = []
    for i in range(5):
        for j in range(i + 1):
            cells.append(sig[:, i] * sig[:, i] if i == j else corr[(j, i)] * sig[:, j] * sig[:, i])
    return np.stack(cells, axis=1)


def check_chain(tables, library, n_random=N_RANDOM) -> dict:
    """Every stored value finite and equal to the library called directly on the inputs
    (and noise) SQLamarr passed. Returns {check: number of rows that differ (or
    non-finite values)} plus counts; all-zero mismatches mean the chain is exact."""
    def values(name, cols):
        return tables[name][cols].to_numpy()

    report = {"particles": len(tables["particles"]), "selected": len(tables["acceptance_out"]),
              "accepted": len(tables[T_TYPE]),
              "reconstructed": int(tables[T_TYPE]["track_type"].isin([3, 4, 5]).sum())}
    feats = values("probe_features", _PROBE_FEATURES).astype(np.float32)
    res_probe = values("probe_resolution", _PROBE_RES).astype(np.float32)
    cov_probe = values("probe_covariance", _PROBE_COV).astype(np.float32)
    # The probes ran on the same rows as the models they stand beside.
    for name, probe in (("acceptance_out", "probe_features"), ("efficiency_out", "probe_features"),
                        ("resolution_out", "probe_resolution"), ("covariance_out", "probe_covariance")):
        if not np.array_equal(tables[name]["row"].to_numpy(), tables[probe]["row"].to_numpy()):
            raise LamarrError(f"{name} and {probe} hold different particles")
    checks = {
        "acceptance": (direct_calls(library, "acceptance", feats, 1), values("acceptance_out", ACCEPTANCE_OUTPUTS)),
        "efficiency": (direct_calls(library, "efficiency", feats, 4), values("efficiency_out", EFFICIENCY_OUTPUTS)),
        "resolution": (direct_calls(library, "resolution", res_probe[:, :12], 9, res_probe[:, 12:]),
                       values("resolution_out", RESOLUTION_OUTPUTS)),
        "covariance": (direct_calls(library, "covariance", cov_probe[:, :15], 15, cov_probe[:, 15:]),
                       values("covariance_out", COVARIANCE_OUTPUTS)),
    }
    stored_matrix = values(T_MATRIX, COV_MATRIX)
    for name, (direct, stored) in checks.items():
        report[f"{name}_rows"] = len(stored)
        report[f"{name}_mismatched_rows"] = int((direct.astype(np.float64) != stored).any(axis=1).sum())
        report[f"{name}_non_finite"] = int((~np.isfinite(stored)).sum())
    report["covariance_matrix_rows"] = len(stored_matrix)
    report["covariance_matrix_mismatched_rows"] = int(
        (covariance_matrix(values("covariance_out", COVARIANCE_OUTPUTS)) != stored_matrix).any(axis=1).sum())
    report["covariance_matrix_non_finite"] = int((~np.isfinite(stored_matrix)).sum())
    # The covariance's 3 inputs from resolution are the stored resolution outputs.
    res_cols = tables["resolution_out"][["chi2PerDoF", "nDoF_f", "ghostProb"]].to_numpy()
    report["covariance_inputs_from_resolution_mismatched_rows"] = int(
        (cov_probe[:, 6:9].astype(np.float64) != res_cols).any(axis=1).sum())
    # Lamarr's draws: acceptance ~ Bernoulli(acc); track types of the accepted particles
    # ~ the efficiency probabilities (parity's goodness-of-fit test).
    acc = tables["acceptance_out"]["acceptance"].to_numpy(np.float64)
    expected, var = acc.sum(), (acc * (1 - acc)).sum()
    report["accepted_expected"] = float(expected)
    report["accepted_z"] = float((report["accepted"] - expected) / math.sqrt(max(var, 1e-12)))
    kept = tables["efficiency_out"].merge(tables[T_TYPE], on=["row", "mcparticle_id"])
    kept = kept.merge(tables["probe_features"], on=["row", "mcparticle_id"])
    dist = draw_distribution(kept["track_type"].to_numpy(), kept[EFFICIENCY_OUTPUTS].to_numpy(),
                             kept[_PROBE_FEATURES[schema.FEATURES.index("mc_log10_p")]].to_numpy())
    report["track_type_p_value"] = dist["overall"]["p_value"]
    report["draws_passed"] = bool(dist["passed"]) and abs(report["accepted_z"]) < 5
    # The noise is N(0, 1): a coarse sanity check that the probe saw real draws.
    noise = res_probe[:, 12:]
    report["noise_mean"] = float(noise.mean()) if noise.size else float("nan")
    report["noise_std"] = float(noise.std()) if noise.size else float("nan")
    report["ok"] = report["draws_passed"] and all(
        v == 0 for k, v in report.items() if k.endswith(("_mismatched_rows", "_non_finite")))
    return report


# ---- `effgen lamarr --chain` -------------------------------------------------------------

def read_particles(sample, rows):
    """(features, pid) of the first `rows` particles of a feather file (raw features and
    mc_pid) or of an LHCb-schema ROOT tuple (TrackingTupler/sim, derived as preprocess
    does: rows Lamarr never sends dropped)."""
    sample = Path(sample)
    if sample.suffix == ".root":
        import uproot

        from effgen.data.derive import REQUIRED, TREE, Counts, derive

        try:
            with uproot.open(sample) as f:
                tup = f[TREE].arrays(REQUIRED, library="np", entry_stop=rows)
        except Exception as err:  # uproot raises many kinds; one line names the file
            raise LamarrError(f"{sample}: cannot read {TREE} ({type(err).__name__}: {err})") from err
        counts = Counts()
        d = derive(tup, counts, str(sample))
        counts.raise_bad(str(sample))
        return np.ascontiguousarray(np.asarray(d["features"]).T, dtype=np.float32), \
            np.asarray(d["extra"][schema.PID], dtype=np.int64)
    import pyarrow as pa
    import pyarrow.feather as feather

    try:
        table = feather.read_table(sample, columns=list(schema.FEATURES) + [schema.PID])
    except (pa.ArrowException, KeyError) as err:
        raise LamarrError(f"{sample}: not a readable feather sample with the raw features "
                          f"and {schema.PID}, nor a .root tuple ({err})") from err
    table = table.slice(0, rows)
    feats = np.column_stack([table.column(c).to_numpy() for c in schema.FEATURES]).astype(np.float32)
    return feats, table.column(schema.PID).to_numpy().astype(np.int64)


def cli_main(args, sample, db, force) -> int:
    if args.threads != 1:
        raise LamarrError(f"--chain runs on one connection; got --threads {args.threads}")
    check_library_symbols(args.library)
    if not Path(sample).is_file():
        raise LamarrError(f"sample {sample} does not exist (run `effgen synth` or give --sample)")
    if db.exists() and not force:
        raise LamarrError(f"{db} exists: pass --force to replace it")
    feats, pid = read_particles(sample, args.rows)
    tables = run_chain(args.library, feats, db, pid=pid, seed=args.seed)
    report = check_chain(tables, Path(args.library).resolve())
    print_report(report, args.library, db)
    return 0 if report["ok"] else 1


def print_report(report, library, db):
    print(f"lamarr chain: {report['particles']} particles, {report['selected']} selected, "
          f"{report['accepted']} accepted, {report['reconstructed']} reconstructed through "
          f"{library}; database {db}")
    for name in ("acceptance", "efficiency", "resolution", "covariance", "covariance_matrix"):
        print(f"  {name:18s} {report[f'{name}_rows']:7d} rows stored, "
              f"{report[f'{name}_mismatched_rows']} differ from a direct call, "
              f"{report[f'{name}_non_finite']} non-finite values")
    print(f"  covariance inputs taken from resolution: "
          f"{report['covariance_inputs_from_resolution_mismatched_rows']} rows differ; noise seen by "
          f"resolution: mean {report['noise_mean']:.4f}, std {report['noise_std']:.4f}")
    print(f"  draws: {report['accepted']} accepted for {report['accepted_expected']:.1f} expected "
          f"(z = {report['accepted_z']:.2f}); track types vs efficiency p = "
          f"{report['track_type_p_value']:.3g}")
    print("lamarr chain: " + ("OK" if report["ok"] else "FAILED"))
