"""Run a compiled efficiency library inside the real Lamarr runtime (SQLamarr).

Particles (rows of the 12 raw features, plus the PDG id) are written as HepMC2 ascii
events, loaded with SQLamarr's HepMC2DataLoader into an SQLite database FILE, turned
into MCParticles by PVFinder + MCParticleSelector, and fed to the library through a
`Plugin` with Lamarr's own efficiency query (DOMAIN.md section 4). A TemporaryTable
then draws the track type with `random_category(not_recoed, 0, 0, long, upstream)`,
exactly as Lamarr does. Every table we read back is made persistent, because the
Plugin's output table is TEMPORARY (visible only on the library's connection).

Each particle is its own HepMC event whose primary vertex is the particle's
production vertex, so the vertex and momentum features survive the trip unchanged
(up to the float32 rounding the loader applies to positions and momenta).

Optionally a second Plugin runs the same query through a tiny "echo" library
(c_harness/lamarr_echo.c) that copies its 12 inputs to 12 outputs: that gives the
exact float32 inputs the efficiency function received, in the order it received them.
"""

import concurrent.futures
import contextlib
import gc
import os
import sqlite3
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np

from effgen import schema
from effgen.atomic import atomic_dir
from effgen.checks.draws import draw_distribution
from effgen.codegen.native import exported_symbols
from effgen.codegen.symbols import check_symbol
from effgen.config import add_knob, default_paths, positive_int, shipped_dir
from effgen.errors import LamarrError

# Lamarr's efficiency query (PyLamarr's tracking-efficiency step; SQLamarr's example
# pipeline is the same with log10): column order is the input order of the C function;
# mcparticle_id is a reference column, copied to the output table, not passed to the
# model. log(x)/log(10.) rather than log10(x): when TensorFlow is imported first, its
# bundled SQLite (exported globally) serves SQLamarr's sqlite3_* calls, and it lacks
# SQLite's math functions; log() works on both.
EFFICIENCY_QUERY = """
SELECT
  mcparticle_id,
  ov.x AS mc_x,
  ov.y AS mc_y,
  ov.z AS mc_z,
  log(norm2(p.px, p.py, p.pz))/log(10.) AS mc_log10_p,
  p.px/p.pz AS mc_tx,
  p.py/p.pz AS mc_ty,
  pseudorapidity(p.px, p.py, p.pz) AS mc_eta,
  azimuthal(p.px, p.py, p.pz) AS mc_phi,
  abs(p.pid) == 11 AS mc_is_e,
  abs(p.pid) == 13 AS mc_is_mu,
  (
    abs(p.pid) == 211 OR abs(p.pid) == 321 OR abs(p.pid) == 2212
  ) AS mc_is_h,
  propagation_charge(p.pid) AS mc_charge
FROM MCParticles AS p
INNER JOIN MCVertices AS ov ON p.production_vertex = ov.mcvertex_id
WHERE
  p.pz > 1.
  AND
  propagation_charge(p.pid) <> 0.
"""

# Lamarr's assignment of the track type (index = LHCb track type, 5 = the remainder).
TRACK_TYPE_QUERY = """
SELECT
  eff.mcparticle_id,
  random_category(eff.not_recoed, 0, 0, eff.long, eff.upstream) AS track_type
FROM tmp_efficiency_out AS eff
"""

EFFICIENCY_TABLE = "tmp_efficiency_out"   # the Plugin's (temporary) output, as in Lamarr
TRACK_TABLE = "tmp_particles_recoed_as"   # made persistent, as in Lamarr
PERSISTENT_EFFICIENCY = "efficiency_out"
ECHO_TABLE = "tmp_echo_out"
PERSISTENT_ECHO = "efficiency_inputs"

# PDG masses [MeV] only feed the energy column, which no feature uses.
MASS = {11: 0.51099895, 13: 105.6583755, 211: 139.57039, 321: 493.677, 2212: 938.27208816}
BEAM_E = 6.8e6

HARNESS_DIR = shipped_dir("c_harness", "lamarr_echo.c")




def pid_from_flags(features) -> np.ndarray:
    """A PDG id consistent with the flag features and propagation charge (pions for
    hadrons; leptons follow the PDG sign: e- is +11 with charge -1)."""
    f = np.asarray(features, dtype=np.float32)
    idx = {n: i for i, n in enumerate(schema.FEATURES)}
    q = f[:, idx["mc_charge"]]
    if not np.all(np.isin(q, (-1.0, 1.0))):
        bad = np.flatnonzero(~np.isin(q, (-1.0, 1.0)))[0]
        raise ValueError(f"mc_charge must be +1 or -1 to build a PDG id; row {bad} has {q[bad]}")
    is_e, is_mu = f[:, idx["mc_is_e"]] == 1, f[:, idx["mc_is_mu"]] == 1
    pid = np.where(is_e, -11 * q, np.where(is_mu, -13 * q, 211 * q))
    return pid.astype(np.int64)


def kinematics(features, pid=None) -> dict:
    """Production vertex, momentum, energy and mass per particle, from the raw
    features: pz = p / sqrt(1 + tx^2 + ty^2), px = tx pz, py = ty pz (forward tracks)."""
    f = np.asarray(features, dtype=np.float32)
    if f.ndim != 2 or f.shape[1] != len(schema.FEATURES):
        raise ValueError(f"features must be (n, {len(schema.FEATURES)}) in schema.FEATURES order, got {f.shape}")
    idx = {n: i for i, n in enumerate(schema.FEATURES)}
    pid = pid_from_flags(f) if pid is None else np.asarray(pid, dtype=np.int64)
    if pid.shape != (f.shape[0],):
        raise ValueError(f"pid must have one entry per row ({f.shape[0]}), got shape {pid.shape}")
    p = 10.0 ** f[:, idx["mc_log10_p"]].astype(np.float64)
    tx = f[:, idx["mc_tx"]].astype(np.float64)
    ty = f[:, idx["mc_ty"]].astype(np.float64)
    pz = p / np.sqrt(1.0 + tx * tx + ty * ty)
    mass = np.array([MASS.get(abs(int(k)), 139.57039) for k in pid])
    return dict(
        x=f[:, idx["mc_x"]], y=f[:, idx["mc_y"]], z=f[:, idx["mc_z"]],
        px=tx * pz, py=ty * pz, pz=pz, e=np.sqrt(p * p + mass * mass), m=mass, pid=pid,
    )


def write_hepmc2(path, features, pid=None, first_event: int = 0) -> Path:
    """Write one HepMC2 (IO_GenEvent ascii) event per particle, event number =
    first_event + row: two beam protons into the primary vertex at the particle's
    production vertex, and the particle (status 1) out of it. Written atomically."""
    from effgen.atomic import atomic_file

    k = kinematics(features, pid)
    lines = ["HepMC::Version 2.06.09", "HepMC::IO_GenEvent-START_EVENT_LISTING"]
    beam = "P {b} 2212 0 0 {pz:.1f} {e:.1f} 938.27208816 4 0 0 -1 0"
    for i in range(len(k["pid"])):
        # Single spaces only: the reader tokenises on ' '. One weight keeps it quiet.
        lines.append(f"E {first_event + i} -1 -1 -1 -1 0 -1 1 1 2 0 1 1")
        lines.append("U MEV MM")
        lines.append(f"V -1 0 {k['x'][i]:.9g} {k['y'][i]:.9g} {k['z'][i]:.9g} 0 2 1 0")
        lines.append(beam.format(b=1, pz=BEAM_E, e=BEAM_E))
        lines.append(beam.format(b=2, pz=-BEAM_E, e=BEAM_E))
        lines.append(
            f"P 3 {k['pid'][i]} {k['px'][i]:.17g} {k['py'][i]:.17g} {k['pz'][i]:.17g} "
            f"{k['e'][i]:.17g} {k['m'][i]:.17g} 1 0 0 0 0"
        )
    lines.append("HepMC::IO_GenEvent-END_EVENT_LISTING")
    lines.append("")
    with atomic_file(path, "w") as f:
        f.write("\n".join(lines))
    return Path(path)


def write_hepmc2_files(directory, features, pid=None, events_per_file: int = 5000) -> list:
    """Split the particles over HepMC2 files of `events_per_file` events each."""
    directory = Path(directory)
    f = np.asarray(features, dtype=np.float32)
    pid_all = pid_from_flags(f) if pid is None else np.asarray(pid, dtype=np.int64)
    paths = []
    for start in range(0, len(f), events_per_file):
        stop = min(start + events_per_file, len(f))
        paths.append(write_hepmc2(directory / f"events_{start:09d}.mc2", f[start:stop],
                                  pid_all[start:stop], first_event=start))
    return paths


def build_echo_library(output_so, cc: str = "gcc") -> Path:
    """Compile c_harness/lamarr_echo.c (12 inputs copied to 12 outputs) for the probe."""
    src = HARNESS_DIR / "lamarr_echo.c"
    output_so = Path(output_so)
    output_so.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_so.with_name(f".{output_so.name}.{os.getpid()}.tmp")
    cmd = [cc, "-std=c99", "-O2", "-fPIC", "-shared", "-Wall", "-Werror", "-o", str(tmp), str(src)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise LamarrError(f"compiling {src} failed ({' '.join(cmd)}):\n{res.stderr}")
    os.replace(tmp, output_so)
    return output_so


def _pipeline(db, library_path, symbol, echo_path):
    """SQLamarr algorithms of one Lamarr efficiency step, in execution order."""
    import SQLamarr

    outputs = list(schema.OUTPUTS)
    algs = [
        SQLamarr.PVFinder(db),
        SQLamarr.MCParticleSelector(db),
        SQLamarr.Plugin(db, str(library_path), symbol, EFFICIENCY_QUERY, EFFICIENCY_TABLE,
                        outputs, ["mcparticle_id"]),
        SQLamarr.TemporaryTable(db, TRACK_TABLE, ["mcparticle_id", "track_type"],
                                TRACK_TYPE_QUERY, True),
        SQLamarr.TemporaryTable(db, PERSISTENT_EFFICIENCY, ["mcparticle_id"] + outputs,
                                f"SELECT mcparticle_id, {', '.join(outputs)} FROM {EFFICIENCY_TABLE}",
                                True),
    ]
    if echo_path is not None:
        cols = [f"in_{i}" for i in range(len(schema.FEATURES))]
        algs += [
            SQLamarr.Plugin(db, str(echo_path), "echo", EFFICIENCY_QUERY, ECHO_TABLE,
                            cols, ["mcparticle_id"]),
            SQLamarr.TemporaryTable(db, PERSISTENT_ECHO, ["mcparticle_id"] + cols,
                                    f"SELECT mcparticle_id, {', '.join(cols)} FROM {ECHO_TABLE}",
                                    True),
        ]
    return algs


_SQLAMARR_SETUP = threading.Lock()


def execute_on_fresh_db(hepmc_paths, db_path, seed, make_pipeline, what):
    """Load the HepMC files into a fresh SQLamarr database file (one connection, seeded)
    and execute the algorithms `make_pipeline(db)` returns; `what` names the run in the
    error if SQLamarr aborts."""
    import SQLamarr

    db_path = Path(db_path)
    for stale in (db_path, db_path.with_name(db_path.name + "-journal")):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
    # libSQLamarr splits its ';'-separated name lists (and may tokenise more) with
    # strtok, whose state is global: set-up in two threads at once corrupted a Plugin's
    # column names (seen: "no such column: eff.upstream"). Only the execution, what
    # Lamarr runs per thread, goes concurrently.
    with _SQLAMARR_SETUP:
        db = SQLamarr.SQLite3DB(str(db_path)).seed(int(seed))
        loader = SQLamarr.HepMC2DataLoader(db)
        for run, path in enumerate(hepmc_paths):
            loader.load(str(path), 0, run)
        algs = make_pipeline(db)
    failure = None
    try:
        SQLamarr.Pipeline(algs).execute()
    except Exception as err:  # SQLamarr raises SQLiteError / RuntimeError / Exception
        failure = f"{type(err).__name__}: {err}"
    # The algorithms' statements must be finalized before the connection closes:
    # SQLamarr throws (and the process aborts) if it closes with statements alive.
    # Hence no exception (whose traceback would keep them) crosses this point, and
    # nothing outside this function holds the database or the algorithms.
    del algs, loader
    gc.collect()
    del db
    if failure is not None:
        raise LamarrError(f"{what} aborted ({failure}); SQLamarr printed the SQL error on stderr")


def _run_one(library_path, symbol, hepmc_paths, db_path, seed, echo_path):
    """Load files into a fresh database file and run the step on it (one connection)."""
    execute_on_fresh_db(hepmc_paths, db_path, seed,
                        lambda db: _pipeline(db, library_path, symbol, echo_path),
                        f"SQLamarr pipeline on {db_path} with {library_path}:{symbol}")
    return _read_results(db_path, echo_path is not None)


def _read_results(db_path, with_echo):
    import pandas as pd

    # Tables are read whole and merged in pandas: the persistent copies carry no index
    # and SQLite would join them by nested scans.
    outputs = ", ".join(schema.OUTPUTS)
    with contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as con:
        particles = pd.read_sql_query(
            "SELECT ev.collision AS row, p.mcparticle_id, p.pid FROM MCParticles AS p "
            "INNER JOIN GenEvents AS ev ON p.genevent_id = ev.genevent_id", con)
        eff = pd.read_sql_query(f"SELECT mcparticle_id, {outputs} FROM {PERSISTENT_EFFICIENCY}", con)
        tracks = pd.read_sql_query(f"SELECT mcparticle_id, track_type FROM {TRACK_TABLE}", con)
        echo = None
        if with_echo:
            cols = ", ".join(f"in_{i}" for i in range(len(schema.FEATURES)))
            echo = pd.read_sql_query(f"SELECT mcparticle_id, {cols} FROM {PERSISTENT_ECHO}", con)
            echo.columns = ["mcparticle_id"] + list(schema.FEATURES)
    frame = particles.merge(eff, on="mcparticle_id", validate="one_to_one")
    frame = frame.merge(tracks, on="mcparticle_id", how="left", validate="one_to_one")
    if echo is not None:
        frame = frame.merge(echo, on="mcparticle_id", how="left", validate="one_to_one")
    frame.attrs["n_mcparticles"] = len(particles)
    return frame


def run_lamarr_efficiency(library_path, features, db_path, *, pid=None, symbol="efficiency",
                          seed=0, threads=1, events_per_file=5000, probe_inputs=True,
                          work_dir=None):
    """Run Lamarr's efficiency step on `features` (n x 12 raw, schema.FEATURES order)
    with the library at `library_path`; return a pandas DataFrame, one line per
    selected particle, sorted by `row` (the index in `features`):
    row, mcparticle_id, pid, not_recoed, long, upstream, downstream (float32 values
    as the library returned them, stored as REAL), track_type (0, 3, 4, 5), and with
    `probe_inputs` the 12 features exactly as the library received them (float32).

    `threads` > 1 splits the particles over that many database files
    (<db_path stem>.<i>.db), each with its own connection and seed + i, executed
    concurrently (SQLamarr releases the GIL), as Lamarr runs one connection per thread.
    HepMC files go to `work_dir` (a temporary directory by default)."""
    library_path = Path(library_path).resolve()
    if not library_path.is_file():
        raise FileNotFoundError(f"efficiency library {library_path} does not exist")
    db_path = Path(db_path)
    db_path.parent.mkdir(parents=True, exist_ok=True)
    f = np.asarray(features, dtype=np.float32)
    threads = max(1, min(int(threads), max(1, len(f))))

    with contextlib.ExitStack() as stack:
        if work_dir is None:
            work_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lamarr-")))
        work_dir = Path(work_dir)
        echo = build_echo_library(work_dir / "lamarr_echo.so") if probe_inputs else None
        pid_all = pid_from_flags(f) if pid is None else np.asarray(pid, dtype=np.int64)
        with atomic_dir(work_dir / "hepmc", force=True) as tmp:
            write_hepmc2_files(tmp, f, pid_all, events_per_file)
        files = sorted((work_dir / "hepmc").glob("events_*.mc2"))
        if threads == 1:
            jobs = [(files, db_path)]
        else:
            groups = np.array_split(np.arange(len(files)), threads)
            jobs = [([files[j] for j in g], db_path.with_name(f"{db_path.stem}.{i}{db_path.suffix}"))
                    for i, g in enumerate(groups) if len(g)]
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(jobs)) as pool:
            futures = [pool.submit(_run_one, library_path, symbol, paths, path, int(seed) + i, echo)
                       for i, (paths, path) in enumerate(jobs)]
            parts = [fut.result() for fut in futures]

    import pandas as pd

    frame = pd.concat(parts, ignore_index=True).sort_values("row", kind="stable").reset_index(drop=True)
    frame.attrs["n_mcparticles"] = sum(p.attrs["n_mcparticles"] for p in parts)
    frame.attrs["databases"] = [str(path) for _, path in jobs]
    for c in schema.OUTPUTS + (list(schema.FEATURES) if probe_inputs else []):
        frame[c] = frame[c].astype(np.float32)  # exact: they were float32 stored as REAL
    return frame


def selected(features) -> np.ndarray:
    """Lamarr's selection (pz > 1 and non-zero charge), from the raw features."""
    k = kinematics(features)
    q = np.asarray(features, dtype=np.float32)[:, schema.FEATURES.index("mc_charge")]
    return (k["pz"] > 1.0) & (q != 0)


def register(subparsers):
    p = subparsers.add_parser(
        "lamarr", help="run a compiled efficiency library inside SQLamarr on sample particles",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--library", required=True, help="compiled efficiency library (.so)")
    add_knob(p, "--symbol", "SYMBOL")
    p.add_argument("--sample", help="feather file with raw features and mc_pid (default: the synth sample)")
    p.add_argument("--rows", type=positive_int("--rows"), default=20000,
                   help="first ROWS particles of the sample")
    p.add_argument("--db", help="database file to write (default: <workdir>/lamarr/lamarr.db)")
    p.add_argument("--force", action="store_true", help="replace an existing --db file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int("--threads"), default=1)
    p.add_argument("--chain", action="store_true",
                   help="run the whole tracking chain (acceptance, efficiency, resolution, "
                        "covariance and its post-processing) with --library exporting all four "
                        "symbols (e.g. build/lamarr/tracking.so), checked exactly against direct "
                        "calls (effgen/checks/chain.py); one connection")
    p.set_defaults(func=_main)


def _check_before_running(library, symbol, sample, db, threads, force):
    """Everything that can be known wrong before a database is touched: SQLamarr aborts
    the process (C++ terminate) on a symbol the library lacks, after replacing the file."""
    check_symbol(symbol)
    library = Path(library)
    if not library.is_file():
        raise LamarrError(f"library {library} does not exist (run `make lamarr-lib`)")
    exported = exported_symbols(library)
    if symbol not in exported:
        raise LamarrError(f"library {library} does not export {symbol!r} "
                          f"(it exports {', '.join(exported) or 'nothing'}): check --symbol")
    if not sample.is_file():
        raise LamarrError(f"sample {sample} does not exist (run `effgen synth` or give --sample)")
    if not force:
        names = [db] if threads == 1 else [db.with_name(f"{db.stem}.{i}{db.suffix}")
                                           for i in range(threads)]
        existing = [str(p) for p in names if p.exists()]
        if existing:
            raise LamarrError(f"{', '.join(existing)} exists: pass --force to replace it")


def _main(args):
    import pyarrow.feather as feather

    paths = default_paths()
    sample = Path(args.sample or paths["sample"])
    db = Path(args.db or paths["lamarr"] / ("chain.db" if args.chain else "lamarr.db"))
    if args.chain:
        # Imported here: effgen.checks.chain builds on this module's queries and HepMC writer.
        from effgen.checks import chain
        return chain.cli_main(args, sample, db, force=args.force or args.db is None)
    # effgen's own default database is replaced freely; a file the user named is not.
    _check_before_running(args.library, args.symbol, sample, db, args.threads,
                          args.force or args.db is None)
    import pyarrow as pa

    try:
        table = feather.read_table(sample, columns=list(schema.FEATURES) + [schema.PID])
    except (pa.ArrowException, KeyError) as err:
        raise LamarrError(f"{sample}: not a readable feather sample with the raw features "
                          f"and {schema.PID} ({err})") from err
    table = table.slice(0, args.rows)
    feats = np.column_stack([table.column(c).to_numpy() for c in schema.FEATURES]).astype(np.float32)
    pid = table.column(schema.PID).to_numpy()
    frame = run_lamarr_efficiency(args.library, feats, db, pid=pid, symbol=args.symbol,
                                  seed=args.seed, threads=args.threads)
    counts = frame["track_type"].value_counts().sort_index()
    print(f"lamarr: {len(frame)} of {len(feats)} particles through {args.library}:{args.symbol}; "
          f"databases {frame.attrs['databases']}")
    print("track types: " + ", ".join(f"{int(k)}: {int(v)}" for k, v in counts.items()))
    return check_against_library(frame, args.library, args.symbol)


def check_against_library(frame, library, symbol="efficiency") -> int:
    """What Lamarr stored against the library called directly on the inputs SQLamarr
    passed (must be identical), and Lamarr's draws against those probabilities
    (parity's goodness-of-fit test). Prints a summary; returns 0 if both hold."""
    from effgen.codegen.native import Library

    feats = frame[schema.FEATURES].to_numpy()
    stored = frame[schema.OUTPUTS].to_numpy()
    direct = Library(library, symbol).per_call(feats)
    mismatched = int((direct != stored).any(axis=1).sum())
    dist = draw_distribution(frame["track_type"].to_numpy(), direct,
                             feats[:, schema.FEATURES.index("mc_log10_p")])
    pv = ", ".join(f"{b['bin']}: {b['p_value']:.3g}" for b in dist["per_bin"] if b["p_value"] is not None)
    print(f"stored vs direct call: {mismatched} rows differ; draws vs probabilities: overall "
          f"p = {dist['overall']['p_value']:.3g}; per bin {pv}")
    ok = mismatched == 0 and dist["passed"]
    print("lamarr: " + ("OK" if ok else "FAILED"))
    return 0 if ok else 1
