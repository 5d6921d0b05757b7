"""`effgen bench`: how fast the deployed function is, measured in one run.

Sections (select with --sections):
  codegen  seconds to export each backend's C (effgen, scikinc) and to compile it with
           the production flags, and the .so size.
  calls    microseconds per particle: both libraries through c_harness/timing.c (per
           call, as Lamarr calls them, and batched), TensorFlow `model.predict` on one
           batch, ONNX Runtime on the same Keras model (one batch, and batch 1 per call),
           and this machine's two floors, measured in the same rounds by
           c_harness/floors.c: streaming the packed weights from cache once (per call)
           and the network's multiply-adds at the FMA peak (batched). Each effgen row
           is also given as a ratio to its floor, to scikinC and to ONNX Runtime.
  lamarr   particles per second through SQLamarr's efficiency Plugin step with each
           library on the same synthetic events (and an "echo" library: the Plugin's
           own cost).
  reader   rows per second of the training-data reader vs the seed notebook's design
           (effgen.bench.data).
  preprocess  rows per second and peak memory of `effgen preprocess` from a ROOT tuple to
           shards vs the notebook's in-memory design (effgen.bench.data).
  chain    Lamarr's tracking chain: microseconds per call of each symbol of one tracking
           library (acceptance, efficiency, resolution, covariance) and per reconstructed
           track (the four calls), effgen's library against the scikinC route built from
           the same RANDOM-weight production-topology models (effgen.checks.
           production_models) in the same run, through c_harness/chain_timing.c.

The machine is shared and noisy, so every number is the median of `repeats` runs made
in this process (for the C timings, libraries and floors alike, each run is the fastest
of `windows` short windows, ~0.3-1 ms: nearly every long window is preempted, so a mean
over one would measure the load, not the code), the cases of a section interleaved round by round (a load spike hits
all cases alike), with the spread (min-max, quartiles in the JSON) and a ratio to the
section's baseline. The process and its children are pinned to one CPU; TensorFlow and
ONNX Runtime get one thread. Results go to <output-dir>/bench.md and bench.json.
"""

import contextlib
import json
import os
import platform
import shlex
import sqlite3
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from effgen import schema
from effgen.atomic import atomic_file, atomic_path
from effgen.config import shipped_dir
from effgen.errors import ConfigError
from effgen.provenance import vouched_default

SECTIONS = ("codegen", "calls", "lamarr", "reader", "preprocess", "chain")
BACKENDS = ("effgen", "scikinc")
HARNESS = shipped_dir("c_harness", "timing.c") / "timing.c"
FLOORS = shipped_dir("c_harness", "floors.c") / "floors.c"
FLOOR_STREAM = "floor: weights streamed from cache once"
FLOOR_FMA = "floor: multiply-adds at the FMA peak"


@dataclass(frozen=True)
class Sizes:
    repeats: int = 5
    build_repeats: int = 3        # export + compile take seconds each: fewer repeats
    reader_repeats: int = 3       # the original reader takes seconds per pass
    rows: int = 6_000             # particles per C-harness run and through Lamarr
    windows: int = 50             # C timings: each repeat's fastest of this many short windows
    tf_batch: int = 10_000
    ort_call_rows: int = 2_000    # Python-loop calls of ORT with batch 1
    reader_sample_rows: int = 1_000_000  # sample size; the reader reads its train split
    reader_batch: int = 100_000
    # Rows per pass of the slow original reader; a pass ends at the first batch that
    # reaches it, so below reader_batch it is one batch anyway.
    reader_original_rows: int = 100_000
    preprocess_rows: int = 2_000_000  # ROOT tuple -> shards, effgen vs the notebook's design
    preprocess_large_rows: int = 20_000_000  # effgen alone at this size too (0: not run)
    preprocess_repeats: int = 1
    width: int = 128              # synthetic model (seed architecture by default)
    blocks: int = 5
    fit_rows: int = 20_000        # synthetic rows the synthetic model's preprocessing sees
    chain_rows: int = 2_000       # particles per chain_timing run (scikinC: ~1 ms per track)
    chain_width: int = 0          # 0: the production topologies; else small models of each kind


DEFAULT = Sizes()
QUICK = Sizes(repeats=2, build_repeats=1, reader_repeats=2, rows=300, windows=5, tf_batch=500,
              ort_call_rows=100, reader_sample_rows=4_000, reader_batch=500, reader_original_rows=1_000,
              preprocess_rows=20_000, preprocess_large_rows=0,
              width=16, blocks=1, fit_rows=2_000, chain_rows=50, chain_width=8)


# ---- statistics and table rows -------------------------------------------------------
def summarize(values) -> dict:
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise ValueError("no measurements to summarize")
    q1, med, q3 = np.quantile(v, [0.25, 0.5, 0.75])
    return {"median": float(med), "min": float(v.min()), "max": float(v.max()),
            "q1": float(q1), "q3": float(q3), "runs": [float(x) for x in v]}


def row(name, unit, values, note="") -> dict:
    return {"name": name, "unit": unit, **summarize(values), "note": note}


def windowed_row(name, values, windows, note) -> dict:
    """A C timing's row: per repeat (fastest window, mean over windows); the statistics
    are of the fastest windows, the means kept beside them."""
    r = row(name, "us/particle", [best for best, _ in values],
            note + f"; per repeat the fastest of {windows} windows")
    r.update(windows=windows, window_means=[float(mean) for _, mean in values])
    return r


def add_ratios(rows, baseline_name, higher_is_better):
    """ratio = how many times better than the baseline row (speed-up): baseline/value
    for costs, value/baseline for throughputs."""
    base = next(r for r in rows if r["name"] == baseline_name)["median"]
    for r in rows:
        r["ratio"] = r["median"] / base if higher_is_better else base / r["median"]
    return rows


# ---- environment ---------------------------------------------------------------------
def pin_to_one_cpu(cpu=None):
    """Pin this process (and so the children it starts) to one CPU; return (cpu,
    previous affinity) or (None, None) where the OS does not allow it."""
    if not hasattr(os, "sched_setaffinity"):
        return None, None
    previous = os.sched_getaffinity(0)
    cpu = max(previous) if cpu is None else int(cpu)
    if cpu not in previous:
        raise ConfigError(f"CPU {cpu} is not among the allowed CPUs {sorted(previous)}")
    os.sched_setaffinity(0, {cpu})
    return cpu, previous


def configure_tensorflow() -> str:
    """One intra-op and one inter-op thread; must run before TensorFlow's runtime starts."""
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
        return "1 intra-op / 1 inter-op thread"
    except RuntimeError as err:  # the runtime was started earlier in this process
        return f"threads NOT limited ({err})"


def load_sqlamarr_before_tensorflow():
    """SQLamarr's bundled SQLite must be loaded before TensorFlow: with TensorFlow
    loaded first, the Plugin's query fails with "no such function: log10" (another
    SQLite build wins the symbol lookup)."""
    if "SQLamarr" not in sys.modules and "tensorflow" in sys.modules:
        raise RuntimeError("the lamarr section needs SQLamarr imported before TensorFlow; "
                           "run it in a fresh process (effgen bench --sections lamarr)")
    import SQLamarr  # noqa: F401


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        gcc = subprocess.run(["gcc", "-dumpfullversion"], capture_output=True, text=True).stdout.strip()
    except FileNotFoundError:
        gcc = "not found"
    return {"cpu_model": cpu, "cpus": os.cpu_count(), "gcc": gcc, "python": platform.python_version()}


# ---- model and inputs ----------------------------------------------------------------
def raw_features(n, seed) -> np.ndarray:
    """n rows of raw features (schema.FEATURES order, float32) from the synthetic toy."""
    import pyarrow as pa

    from effgen.data import synth

    table = pa.Table.from_batches(list(synth.generate(n, seed)), schema=synth.arrow_schema())
    return np.column_stack([table.column(c).to_numpy() for c in schema.FEATURES]).astype(np.float32)


def synthetic_model(out_dir, sizes: Sizes, seed) -> tuple:
    """Random-weight model of the seed architecture and a preprocessing fitted on a
    synthetic sample, saved as model.keras / tX.pkl under out_dir."""
    from effgen.data.preprocess import fit_preprocessing, save_preprocessing
    from effgen.training.network import build_model

    out_dir = Path(out_dir)
    model = build_model(width=sizes.width, n_blocks=sizes.blocks, seed=seed)
    fit_rows = sizes.fit_rows
    ct = fit_preprocessing(raw_features(fit_rows, seed), seed)
    model_path, pre_path = out_dir / "model.keras", out_dir / "tX.pkl"
    with atomic_path(model_path) as tmp:
        model.save(tmp)
    save_preprocessing(ct, pre_path)
    desc = (f"seed architecture (width {sizes.width}, {sizes.blocks} residual blocks, "
            f"{model.count_params():,} parameters) with RANDOM weights (seed {seed}) and a "
            f"preprocessing fitted on {fit_rows:,} synthetic rows; not a trained model")
    return model_path, pre_path, desc


# ---- code generation and compile -----------------------------------------------------
def export_source(backend, model_path, pre_path, out_dir, symbol) -> Path:
    """<out_dir>/<symbol>.c for `backend`, through effgen.codegen.export."""
    from effgen.codegen.export import export

    c_path = Path(export(model_path, pre_path, out_dir, backend=backend, symbol=symbol)["source"])
    if not c_path.is_file():
        raise RuntimeError(f"export --backend {backend} wrote no {c_path}")
    return c_path


def build_backend(backend, model_path, pre_path, out_dir, symbol, repeats) -> dict:
    """Export and compile `repeats` times; the last library is kept for timing."""
    from effgen.codegen.native import check_library, compile_shared

    out_dir = Path(out_dir) / backend
    export_s, compile_s, cpu_s = [], [], []
    for _ in range(repeats):
        c0, t0 = _cpu_seconds(), time.perf_counter()
        c_path = export_source(backend, model_path, pre_path, out_dir, symbol)
        export_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        so = compile_shared(c_path, out_dir / f"{symbol}.so")
        compile_s.append(time.perf_counter() - t0)
        cpu_s.append(_cpu_seconds() - c0)
    check_library(so, symbol)
    return {"so": so, "export_s": export_s, "compile_s": compile_s, "cpu_s": cpu_s,
            "so_bytes": so.stat().st_size, "c_bytes": c_path.stat().st_size}


def _cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and its finished children (gcc): on
    a loaded machine the wall-clock build time mostly measures the other processes."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def codegen_rows(builds) -> list:
    from effgen.codegen.native import DEFAULT_CFLAGS

    flags = " ".join(DEFAULT_CFLAGS)
    rows = []
    for step, unit in (("export", "s"), ("compile", "s"), ("export + compile", "s"), (".so size", "KiB")):
        for backend in BACKENDS:
            b = builds[backend]
            values = {"export": b["export_s"], "compile": b["compile_s"],
                      "export + compile": [e + c for e, c in zip(b["export_s"], b["compile_s"])],
                      ".so size": [b["so_bytes"] / 1024]}[step]
            note = {"export": f"load model + generate {b['c_bytes'] / 1024:.0f} KiB of C",
                    "compile": f"gcc {flags}",
                    "export + compile": f"the build, model to .so; CPU time (user + system, gcc "
                                        f"included): median {float(np.median(b['cpu_s'])):.2f} s",
                    ".so size": ""}[step]
            rows.append(row(f"{backend}: {step}", unit, values, note))
    for r in rows:  # each row against the scikinc row of the same step
        base = next(x for x in rows if x["name"] == "scikinc: " + r["name"].split(": ", 1)[1])
        r["ratio"] = r["median"] / base["median"]
    return rows


# ---- per-particle timings ------------------------------------------------------------
def build_harness(out_dir, cc="gcc") -> Path:
    exe = Path(out_dir) / "timing"
    exe.parent.mkdir(parents=True, exist_ok=True)
    tmp = exe.with_name(f".timing.{os.getpid()}.tmp")
    cmd = [cc, "-std=c99", "-O2", "-Wall", "-Werror", "-o", str(tmp), str(HARNESS), "-ldl"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"compiling {HARNESS} failed:\n  {shlex.join(cmd)}\n{proc.stderr}")
    os.replace(tmp, exe)
    return exe


def harness_case(exe, so, symbol, inputs_path, n_rows, mode, windows=1):
    """A callable running the C driver once (one warm-up pass, one timed pass in
    `windows` windows); it returns (fastest window, mean over windows), us/particle."""
    return _timed_command([str(exe), str(so), symbol, str(inputs_path), str(n_rows),
                           str(len(schema.FEATURES)), str(len(schema.OUTPUTS)), "1", mode, str(windows)],
                          fields=2)


def _timed_command(cmd, fields=1):
    """A callable running a C driver once; the driver prints its timing first on stdout
    (with fields=2: a tuple of the first two numbers)."""
    def once():
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{shlex.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
        words = proc.stdout.split()
        return float(words[0]) if fields == 1 else tuple(float(w) for w in words[:fields])
    return once


def build_floors(out_dir, cc="gcc") -> Path:
    """c_harness/floors.c compiled with the library's compile flags."""
    from effgen.config import library_compile_flags

    exe = Path(out_dir) / "floors"
    exe.parent.mkdir(parents=True, exist_ok=True)
    tmp = exe.with_name(f".floors.{os.getpid()}.tmp")
    cmd = [cc, *library_compile_flags(), "-o", str(tmp), str(FLOORS)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"compiling {FLOORS} failed:\n  {shlex.join(cmd)}\n{proc.stderr}")
    os.replace(tmp, exe)
    return exe


def floor_cases(exe, cost, passes, windows=1) -> tuple:
    """Two callables for interleaved(): the first runs c_harness/floors once (`passes`
    weight streams and as many particles' multiply-adds, in `windows` windows, as
    timing.c times the libraries) and returns the stream's (fastest window, mean) in us
    per pass; the second returns the FMA's per particle from that same run."""
    cmd = [str(exe), str(cost["weight_bytes"]), str(cost["macs"]), str(passes), "1", str(windows)]
    last = {}

    def stream():
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{shlex.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
        stream_us, fma_us, isa, stream_mean, fma_mean = proc.stdout.split()[:5]
        last.update(fma=(float(fma_us), float(fma_mean)), isa=isa)
        return float(stream_us), float(stream_mean)

    def fma():
        return last.pop("fma")
    return stream, fma, last


def add_floor_ratios(rows):
    """Each effgen row's time over its floor, over scikinC's and over ONNX Runtime's in
    the same mode (per call: batch-1 calls; batched: network-only batch); below 1 is
    faster than the other. Stored as row["vs"]."""
    med = {r["name"]: r["median"] for r in rows}
    pairs = {"per call": (FLOOR_STREAM, "scikinc C library, per call", "ONNX Runtime, batch 1 per call"),
             "batched": (FLOOR_FMA, "scikinc C library, batched", "ONNX Runtime, batched")}
    for r in rows:
        if not r["name"].startswith("effgen C library, "):
            continue
        floor, sk, ort = pairs[r["name"].removeprefix("effgen C library, ")]
        r["vs"] = {key: r["median"] / med[other] for key, other in
                   (("floor", floor), ("scikinc", sk), ("onnxruntime", ort)) if other in med}
    return rows


def tf_cases(model, ct, x_raw):
    """model.predict on one batch: network only (inputs preprocessed beforehand), and
    with the sklearn preprocessing of the raw rows included."""
    x_pre = ct.transform(x_raw.astype(np.float64)).astype(np.float32)
    n = len(x_raw)

    def timed(fn):
        def once():
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e6 / n
        return once

    net = timed(lambda: model.predict(x_pre, batch_size=n, verbose=0))
    full = timed(lambda: model.predict(ct.transform(x_raw.astype(np.float64)).astype(np.float32),
                                       batch_size=n, verbose=0))
    net(), full()  # warm-up: tracing of the predict function
    return net, full, x_pre


def onnx_session(model):
    """The Keras model converted by tf2onnx and opened by ONNX Runtime on one thread;
    returns (session, how it was converted)."""
    import onnxruntime as ort
    import tensorflow as tf
    import tf2onnx

    spec = (tf.TensorSpec((None, model.inputs[0].shape[-1]), tf.float32, name="x"),)
    try:
        proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec)
        how = "tf2onnx.convert.from_keras"
    except Exception as err:  # Keras 3 models are not always accepted: trace a function
        fn = tf.function(lambda x: model(x, training=False), input_signature=spec)
        proto, _ = tf2onnx.convert.from_function(fn, input_signature=spec)
        how = f"tf2onnx.convert.from_function (from_keras failed: {type(err).__name__})"
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return session, how


def ort_cases(session, x_pre, call_rows):
    name = session.get_inputs()[0].name
    calls = x_pre[:call_rows]

    def batch():
        t0 = time.perf_counter()
        session.run(None, {name: x_pre})
        return (time.perf_counter() - t0) * 1e6 / len(x_pre)

    def per_call():
        t0 = time.perf_counter()
        for i in range(len(calls)):
            session.run(None, {name: calls[i:i + 1]})
        return (time.perf_counter() - t0) * 1e6 / len(calls)

    batch(), per_call()
    return batch, per_call


def interleaved(cases: dict, repeats, label) -> dict:
    """Run every case once per round, `repeats` rounds; {name: [values]}."""
    values = {name: [] for name in cases}
    for r in range(repeats):
        print(f"[bench] {label}: round {r + 1}/{repeats}", flush=True)
        for name, once in cases.items():
            values[name].append(once())
    return values


def calls_section(builds, model_path, pre_path, out_dir, sizes: Sizes, seed, symbol) -> tuple:
    import keras

    from effgen.codegen.backends.effgen_c import network_cost
    from effgen.codegen.graph import read_chain
    from effgen.provenance import load_preprocessing

    out_dir = Path(out_dir)
    x = raw_features(max(sizes.rows, sizes.tf_batch), seed + 1)
    inputs = out_dir / "inputs.f32"
    with atomic_file(inputs) as f:
        f.write(x[:sizes.rows].tobytes())
    exe = build_harness(out_dir)
    cases, notes = {}, {}
    for backend in ("scikinc", "effgen"):
        for mode, label in (("call", "per call"), ("batch", "batched")):
            name = f"{backend} C library, {label}"
            cases[name] = harness_case(exe, builds[backend]["so"], symbol, inputs, sizes.rows, mode,
                                       sizes.windows)
            notes[name] = (f"c_harness/timing.c, {sizes.rows:,} particles in {sizes.windows} windows, "
                           + ("one call per particle" if mode == "call" else f"one {symbol}_batch call each"))

    model = keras.models.load_model(model_path, compile=False)
    ct = load_preprocessing(pre_path, model_path=model_path)
    cost = network_cost(read_chain(model))
    stream, fma, floor_info = floor_cases(build_floors(out_dir), cost, sizes.rows, sizes.windows)
    cases[FLOOR_STREAM] = stream
    notes[FLOOR_STREAM] = (f"per-call floor: c_harness/floors.c reads the {cost['weight_bytes']:,} bytes of "
                           f"packed weights and biases once per pass, {sizes.rows:,} passes")
    cases[FLOOR_FMA] = fma
    notes[FLOOR_FMA] = (f"batched floor: the network's {cost['macs']:,} multiply-adds as independent "
                        f"vector FMA chains (c_harness/floors.c, same run as the row above)")
    net, full, x_pre = tf_cases(model, ct, x[:sizes.tf_batch])
    b = f"batch of {sizes.tf_batch:,}"
    cases["TensorFlow predict, network only"] = net
    notes["TensorFlow predict, network only"] = f"model.predict on a {b}, preprocessing EXCLUDED"
    cases["TensorFlow predict, with preprocessing"] = full
    notes["TensorFlow predict, with preprocessing"] = f"sklearn transform + model.predict, {b}"
    failures = {}
    try:
        session, how = onnx_session(model)
        ort_batch, ort_call = ort_cases(session, x_pre, min(sizes.ort_call_rows, len(x_pre)))
        cases["ONNX Runtime, batched"] = ort_batch
        notes["ONNX Runtime, batched"] = f"{how}; one run on a {b}, preprocessing excluded"
        cases["ONNX Runtime, batch 1 per call"] = ort_call
        notes["ONNX Runtime, batch 1 per call"] = (
            f"Python loop of session.run over {min(sizes.ort_call_rows, len(x_pre)):,} rows, "
            "preprocessing excluded")
    except Exception as err:  # reported in the table, not hidden
        failures["ONNX Runtime"] = f"conversion or session failed: {type(err).__name__}: {err}"
    values = interleaved(cases, sizes.repeats, "calls")
    for name in (FLOOR_STREAM, FLOOR_FMA):
        notes[name] += f"; code path {floor_info.get('isa', '?')}"
    rows = [windowed_row(name, v, sizes.windows, notes[name]) if isinstance(v[0], tuple)
            else row(name, "us/particle", v, notes[name] + "; one timed run per repeat")
            for name, v in values.items()]
    rows = add_ratios(rows, "scikinc C library, per call", higher_is_better=False)
    return add_floor_ratios(rows), failures


# ---- Lamarr --------------------------------------------------------------------------
class PluginRun:
    """One library's Plugin step on its own database file, loaded once and executed
    again each round (the Plugin replaces its output table)."""

    def __init__(self, db_path, hepmc_files, library, symbol, outputs, seed):
        import SQLamarr

        from effgen.checks import lamarr

        self.db_path = Path(db_path)
        with contextlib.suppress(FileNotFoundError):
            self.db_path.unlink()
        self.db = SQLamarr.SQLite3DB(str(self.db_path)).seed(int(seed))
        loader = SQLamarr.HepMC2DataLoader(self.db)
        for run, path in enumerate(hepmc_files):
            loader.load(str(path), 0, run)
        del loader
        SQLamarr.Pipeline([SQLamarr.PVFinder(self.db), SQLamarr.MCParticleSelector(self.db)]).execute()
        self.plugin = SQLamarr.Plugin(self.db, str(library), symbol, lamarr.EFFICIENCY_QUERY,
                                      lamarr.EFFICIENCY_TABLE, list(outputs), ["mcparticle_id"])
        self.pipeline = SQLamarr.Pipeline([self.plugin])
        self.count = SQLamarr.Pipeline([SQLamarr.TemporaryTable(
            self.db, "bench_count", ["n"], f"SELECT count(*) AS n FROM {lamarr.EFFICIENCY_TABLE}", True)])

    def seconds(self):
        t0 = time.perf_counter()
        self.pipeline.execute()
        return time.perf_counter() - t0

    def release(self):
        """Finalize the SQLamarr objects before the database (closes the connection)."""
        for name in ("count", "pipeline", "plugin", "db"):
            if hasattr(self, name):
                delattr(self, name)

    def close(self) -> int:
        """Number of rows the last execution produced (checked against the selection)."""
        self.count.execute()
        self.release()
        with contextlib.closing(sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True)) as con:
            return int(con.execute("SELECT n FROM bench_count").fetchone()[0])


def lamarr_section(builds, out_dir, sizes: Sizes, seed, symbol) -> list:
    from effgen.checks import lamarr

    out_dir = Path(out_dir)
    x = raw_features(sizes.rows, seed + 2)
    n_sel = int(lamarr.selected(x).sum())
    with contextlib.ExitStack() as stack:
        hepmc = lamarr.write_hepmc2_files(out_dir / "hepmc", x)
        echo = lamarr.build_echo_library(out_dir / "lamarr_echo.so")
        libs = {f"{b} library": (builds[b]["so"], symbol, schema.OUTPUTS) for b in ("scikinc", "effgen")}
        libs["echo library (Plugin overhead)"] = (echo, "echo", [f"in_{i}" for i in range(12)])
        runs = {}
        for i, (name, (so, sym, outputs)) in enumerate(libs.items()):
            runs[name] = PluginRun(out_dir / f"lamarr-{i}.db", hepmc, so, sym, outputs, seed)
        stack.callback(lambda: [r.release() for r in runs.values()])
        for r in runs.values():  # warm-up: page cache, dlopen, statement preparation
            r.seconds()
        values = interleaved({n: (lambda r=r: n_sel / r.seconds()) for n, r in runs.items()},
                             sizes.repeats, "lamarr")
        counts = {}
        for n, r in runs.items():
            counts[n] = r.close()
    for name, c in counts.items():
        if c != n_sel:
            raise RuntimeError(f"Lamarr Plugin with the {name} produced {c} rows, expected {n_sel}")
    notes = {n: f"{n_sel:,} selected particles, SQLamarr Plugin with Lamarr's efficiency query"
             for n in runs}
    notes["echo library (Plugin overhead)"] = "copies 12 inputs to 12 outputs: query + insert cost alone"
    rows = [row(n, "particles/s", v, notes[n]) for n, v in values.items()]
    return add_ratios(rows, "scikinc library", higher_is_better=True)


# ---- reader --------------------------------------------------------------------------
def reader_section(out_dir, sizes: Sizes, seed) -> list:
    from effgen.bench import data as bench_data

    train = bench_data.ensure_dataset(Path(out_dir), sizes.reader_sample_rows, seed)
    results = bench_data.bench_reader(train, batch_size=sizes.reader_batch, repeats=sizes.reader_repeats,
                                      original_max_rows=sizes.reader_original_rows)
    rows = [row(r["reader"], "rows/s", r["runs_rows_per_s"],
                f"{r['rows']:,} rows per pass, batch {r['batch_size']:,}") for r in results]
    return add_ratios(rows, results[-1]["reader"], higher_is_better=True)


# ---- preprocess ----------------------------------------------------------------------
def preprocess_section(out_dir, sizes: Sizes, seed) -> list:
    """Rows/s and peak RSS of `effgen preprocess` against the notebook's in-memory design,
    each ratio against the notebook row of the same unit."""
    from effgen.bench import data as bench_data

    results = bench_data.bench_preprocess(Path(out_dir), sizes.preprocess_rows, sizes.preprocess_repeats, seed)
    if sizes.preprocess_large_rows:
        # The notebook's design would hold the whole tuple in memory: effgen alone.
        results[:0] = bench_data.bench_preprocess(Path(out_dir), sizes.preprocess_large_rows,
                                                  sizes.preprocess_repeats, seed, baseline=False)
    speed = [row(f"{r['case']}, {r['rows']:,} rows", "rows/s", r["rows_per_s"]) for r in results]
    memory = [row(f"{r['case']}, {r['rows']:,} rows: peak RSS", "MB", r["peak_rss_mb"]) for r in results]
    return (add_ratios(speed, speed[-1]["name"], higher_is_better=True)
            + add_ratios(memory, memory[-1]["name"], higher_is_better=False))


# ---- the tracking chain --------------------------------------------------------------
CHAIN_SYMBOLS = ("acceptance", "efficiency", "resolution", "covariance")
CHAIN_HARNESS = shipped_dir("c_harness", "chain_timing.c") / "chain_timing.c"


def chain_models(out_dir, seed, width=0) -> dict:
    """The four RANDOM-weight production-topology models with fitted tX/tY, one folder
    each ({symbol: folder}), as `make lamarr-lib RESOLUTION=... COVARIANCE=...` takes them.
    `width` > 0: models of the same kinds and forms but that narrow, one residual block
    (quick runs)."""
    from effgen.checks import production_models

    dirs = {name: production_models.write_model_dir(name, Path(out_dir) / name, seed=seed)
            for name in CHAIN_SYMBOLS}
    if width:
        for name, d in dirs.items():
            production_models.build_model(name, seed, width=width, n_blocks=1).save(d / "model.keras")
    return dirs


def chain_spec(model_dirs, path) -> Path:
    # Absolute paths: a spec's relative paths are read relative to the spec file.
    lines = []
    for symbol, d in model_dirs.items():
        d = Path(d).resolve()
        lines += ["[[model]]", f"symbol = {json.dumps(symbol)}",
                  f"model = {json.dumps(str(d / 'model.keras'))}",
                  f"preprocessing = {json.dumps(str(d / 'tX.pkl'))}"]
        if (d / "tY.pkl").is_file():
            lines.append(f"postprocessing = {json.dumps(str(d / 'tY.pkl'))}")
    with atomic_file(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return Path(path)


def build_chain_library(backend, spec, out_dir) -> dict:
    """tracking.so of `backend` from the spec (effgen export --spec --compile)."""
    from effgen.codegen.spec import export_spec

    t0 = time.perf_counter()
    result = export_spec(spec, Path(out_dir) / backend, backend=backend, compile=True)
    return {"so": Path(result["library"]), "build_s": time.perf_counter() - t0}


def chain_inputs(out_dir, rows, seed) -> list:
    """features.f32 (efficiency/acceptance inputs), resolution.f32 (resolution inputs; the
    covariance's are made from them and the resolution's outputs), noise.f32 (2 x 128
    N(0, 1) per row), in the production models' plausible ranges."""
    from effgen.checks import production_models

    rng = np.random.default_rng(seed)
    arrays = {"features": production_models.features("efficiency", rows, seed),
              "resolution": production_models.features("resolution", rows, seed + 1),
              "noise": rng.standard_normal((rows, 2 * production_models.N_RANDOM)).astype(np.float32)}
    paths = []
    for name, a in arrays.items():
        path = Path(out_dir) / f"{name}.f32"
        with atomic_file(path) as f:
            f.write(np.ascontiguousarray(a, dtype=np.float32).tobytes())
        paths.append(path)
    return paths


def chain_harness_case(exe, so, mode, rows, inputs):
    return _timed_command([str(exe), str(so), mode, str(rows), "1", *map(str, inputs)])


def chain_section(out_dir, sizes: Sizes, seed) -> tuple:
    """Per-call cost of each symbol and per-track cost of the chain, effgen's tracking.so
    against the scikinC route's, built from the same models in this run; each row's ratio
    is against the scikinC row of the same case (the speed-up)."""
    out_dir = Path(out_dir)
    model_dirs = chain_models(out_dir / "models", seed, sizes.chain_width)
    spec = chain_spec(model_dirs, out_dir / "tracking.toml")
    exe = out_dir / "chain_timing"
    tmp = exe.with_name(f".chain_timing.{os.getpid()}.tmp")
    cmd = ["gcc", "-std=c99", "-O2", "-Wall", "-Werror", "-o", str(tmp), str(CHAIN_HARNESS), "-ldl"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"compiling {CHAIN_HARNESS} failed:\n  {shlex.join(cmd)}\n{proc.stderr}")
    os.replace(tmp, exe)
    inputs = chain_inputs(out_dir, sizes.chain_rows, seed)
    libs, failures = {}, {}
    for backend in BACKENDS:
        print(f"[bench] chain: export --spec --compile {backend}", flush=True)
        try:
            libs[backend] = build_chain_library(backend, spec, out_dir / "libs")
        except Exception as err:  # reported in the table, not hidden
            failures[f"chain ({backend})"] = f"building tracking.so failed: {type(err).__name__}: {err}"
    cases, notes = {}, {}
    for mode in CHAIN_SYMBOLS + ("chain",):
        for backend, lib in libs.items():
            what = "per reconstructed track" if mode == "chain" else "per call"
            name = f"{backend}: {mode} {what}"
            cases[name] = chain_harness_case(exe, lib["so"], mode, sizes.chain_rows, inputs)
            notes[name] = (f"c_harness/chain_timing.c, {sizes.chain_rows:,} rows, one call per row"
                           if mode != "chain" else
                           "acceptance + efficiency + resolution + covariance, one call each per "
                           "track, each model over all rows in turn (as SQLamarr's steps run)")
    values = interleaved(cases, sizes.repeats, "chain")
    rows = [row(name, "us", v, notes[name]) for name, v in values.items()]
    for r in rows:  # the speed-up over the scikinC route on the same case
        base = next((x for x in rows if x["name"] == "scikinc: " + r["name"].split(": ", 1)[1]), None)
        r["ratio"] = base["median"] / r["median"] if base else float("nan")
    builds = [row(f"{backend}: tracking.so build", "s", [lib["build_s"]],
                  "export --spec --compile of the four models (one build)") for backend, lib in libs.items()]
    for r in builds:
        base = libs.get("scikinc")
        r["ratio"] = base["build_s"] / r["median"] if base else float("nan")
    return rows + builds, failures


# ---- the run -------------------------------------------------------------------------
SECTION_TITLES = {
    "codegen": ("Code generation and compile", "effgen / scikinc (same step)"),
    "calls": ("Microseconds per particle", "speed-up over the scikinc library per call (higher is faster)"),
    "lamarr": ("Lamarr: SQLamarr efficiency Plugin step", "speed-up over the scikinc library (higher is faster)"),
    "reader": ("Training-data reader", "speed-up over the original design (higher is faster)"),
    "preprocess": ("Preprocessing, ROOT tuple to shards (fresh process each)",
                   "times better than the notebook's in-memory design (speed, or memory)"),
    "chain": ("Lamarr tracking chain: one tracking.so per backend, RANDOM-weight models (see above)",
              "speed-up over the scikinC route on the same case (higher is faster)"),
}


def run_bench(*, output_dir, sections=SECTIONS, sizes: Sizes = DEFAULT, model_path=None,
              preprocessing_path=None, seed=1, symbol="efficiency", cpu=None) -> dict:
    """Run the selected sections; return the report (see write_report)."""
    output_dir = Path(output_dir)
    bad = [s for s in sections if s not in SECTIONS]
    if bad or not sections:
        raise ValueError(f"unknown sections {bad}; choose from {', '.join(SECTIONS)}")
    started = time.time()
    pinned, previous = pin_to_one_cpu(cpu)
    load_start = os.getloadavg()
    try:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        if "lamarr" in sections:
            load_sqlamarr_before_tensorflow()
        tf_threads = (configure_tensorflow() if set(sections) & {"codegen", "calls", "lamarr", "chain"}
                      else "unused")
        report = {"meta": {}, "sections": {}, "failures": {}}
        need_libs = [s for s in sections if s in ("codegen", "calls", "lamarr")]
        if need_libs:
            work = output_dir / "work"
            if model_path is None:
                print("[bench] model: synthetic (no trained model given)", flush=True)
                model_path, preprocessing_path, model_desc = synthetic_model(work / "model", sizes, seed)
            else:
                model_desc = f"trained {model_path} + {preprocessing_path}"
            report["meta"]["model"] = model_desc
            builds = {}
            for b in BACKENDS:
                print(f"[bench] codegen: export + compile {b} x{sizes.build_repeats}", flush=True)
                builds[b] = build_backend(b, model_path, preprocessing_path, work / "libs", symbol,
                                          sizes.build_repeats)
            if "codegen" in sections:
                report["sections"]["codegen"] = codegen_rows(builds)
            if "calls" in sections:
                print("[bench] calls: per-particle timings", flush=True)
                rows, failures = calls_section(builds, model_path, preprocessing_path, work / "calls",
                                               sizes, seed, symbol)
                report["sections"]["calls"] = rows
                report["failures"].update(failures)
            if "lamarr" in sections:
                print("[bench] lamarr: SQLamarr Plugin step", flush=True)
                report["sections"]["lamarr"] = lamarr_section(builds, work / "lamarr", sizes, seed, symbol)
        if "reader" in sections:
            print("[bench] reader: FeatherReader vs the original design", flush=True)
            report["sections"]["reader"] = reader_section(output_dir / "data", sizes, seed)
        if "preprocess" in sections:
            print("[bench] preprocess: streaming preprocess vs the notebook's in-memory design", flush=True)
            # Preprocessing uses every core (dask): its runs are not pinned to one.
            if previous is not None:
                os.sched_setaffinity(0, previous)
            try:
                report["sections"]["preprocess"] = preprocess_section(output_dir / "preprocess", sizes, seed)
            finally:
                if previous is not None:
                    os.sched_setaffinity(0, {pinned})
        if "chain" in sections:
            print("[bench] chain: tracking.so per call and per track, effgen vs scikinC", flush=True)
            rows, failures = chain_section(output_dir / "work" / "chain", sizes, seed)
            report["sections"]["chain"] = rows
            report["failures"].update(failures)
            report["meta"]["chain_models"] = (
                "RANDOM weights in the production topologies of DOMAIN.md section 8 "
                "(effgen.checks.production_models), fitted tX/tY" if not sizes.chain_width else
                f"RANDOM weights, small models of the four kinds (width {sizes.chain_width}, one "
                "residual block) with the production stand-ins' tX/tY: numbers meaningless")
    finally:
        if previous is not None:
            os.sched_setaffinity(0, previous)
    report["meta"].update(
        machine_info(), pinned_cpu=pinned, allowed_cpus=sorted(previous) if previous else None,
        tensorflow=tf_threads, onnxruntime="1 intra-op / 1 inter-op thread",
        load_average_start=list(load_start), load_average_end=list(os.getloadavg()),
        sizes=asdict(sizes), seed=seed, seconds=time.time() - started,
        date=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    return report


def _fmt(value, unit):
    if unit == "particles/s" or unit == "rows/s":
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"


def render_markdown(report) -> str:
    m = report["meta"]
    lines = ["# effgen bench", ""]
    if "model" in m:
        lines.append(f"- Model: {m['model']}")
    if "chain_models" in m:
        lines.append(f"- Tracking chain models: {m['chain_models']}")
    lines += [
        f"- Machine: {m['cpu_model']}, {m['cpus']} CPUs; pinned to CPU {m['pinned_cpu']} "
        f"(allowed {m['allowed_cpus']}); gcc {m['gcc']}; Python {m['python']}",
        f"- TensorFlow: {m['tensorflow']}; ONNX Runtime: {m['onnxruntime']}",
        f"- Load average (1/5/15 min) at start {', '.join(f'{v:.2f}' for v in m['load_average_start'])}, "
        f"at end {', '.join(f'{v:.2f}' for v in m['load_average_end'])}: the machine is shared, so "
        f"read the ratios (measured in the same run, cases interleaved) rather than absolute values",
        f"- Every value: median of {m['sizes']['repeats']} repeats ({m['sizes']['build_repeats']} for "
        f"export/compile, {m['sizes']['reader_repeats']} for the reader); spread = min-max "
        f"(quartiles in bench.json); run took {m['seconds']:.0f} s, {m['date']}",
        f"- C timings (the libraries in `calls` and both floors, alike): each repeat is the fastest of "
        f"{m['sizes'].get('windows', 1)} short windows (its mean over all windows in bench.json, "
        f"`window_means`), since on a shared machine nearly every long window is preempted; "
        f"TensorFlow, ONNX Runtime and the other sections: one timed run per repeat",
        "",
    ]
    for key, rows in report["sections"].items():
        title, ratio = SECTION_TITLES[key]
        lines += [f"## {title}", "", f"ratio: {ratio}", "",
                  "| case | median | min - max | unit | ratio | notes |",
                  "|---|---:|---:|---|---:|---|"]
        for r in rows:
            lines.append(f"| {r['name']} | {_fmt(r['median'], r['unit'])} | {_fmt(r['min'], r['unit'])} - "
                         f"{_fmt(r['max'], r['unit'])} | {r['unit']} | {r['ratio']:.2f} | {r['note']} |")
        lines.append("")
        lines += _floor_lines(rows)
    for name, why in report["failures"].items():
        lines.append(f"- NOT MEASURED: {name}: {why}")
    return "\n".join(lines).rstrip() + "\n"


def _floor_lines(rows) -> list:
    """The effgen rows against their floor, scikinC and ONNX Runtime (time ratios)."""
    rows = [r for r in rows if "vs" in r]
    if not rows:
        return []
    names = {"floor": "/ its floor", "scikinc": "/ scikinC, same mode", "onnxruntime": "/ ONNX Runtime, same mode"}
    lines = ["effgen's time over: its floor (per call: the weight stream; batched: the FMA peak), "
             "scikinC's and ONNX Runtime's in the same mode (per call: batch 1; batched: one batch, "
             "network only). Below 1 is faster.", "",
             "| case | " + " | ".join(names.values()) + " |", "|---|" + "---:|" * len(names)]
    for r in rows:
        lines.append(f"| {r['name']} | " + " | ".join(
            f"{r['vs'][k]:.2f}" if k in r["vs"] else "n/a" for k in names) + " |")
    return lines + [""]


def write_report(report, output_dir) -> tuple:
    output_dir = Path(output_dir)
    md = render_markdown(report)
    with atomic_file(output_dir / "bench.json", "w") as f:
        json.dump(report, f, indent=2, default=str)
    with atomic_file(output_dir / "bench.md", "w") as f:
        f.write(md)
    return output_dir / "bench.md", output_dir / "bench.json", md


# ---- CLI -----------------------------------------------------------------------------
def register(subparsers):
    from effgen.config import default_paths

    p = subparsers.add_parser("bench", help="benchmark code generation, the C libraries, TF/ORT, "
                              "Lamarr and the reader in one run", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test, numbers meaningless)")
    p.add_argument("--repeats", type=int, help=f"repeats per case (default {DEFAULT.repeats})")
    p.add_argument("--rows", type=int, help=f"particles per C-harness run and through Lamarr "
                   f"(default {DEFAULT.rows:,})")
    p.add_argument("--output-dir", type=Path, default=default_paths()["bench"])
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--model", type=Path, help="model.keras (default: the trained model if present)")
    p.add_argument("--preprocessing", type=Path, help="tX.pkl (default: beside the trained model)")
    p.add_argument("--synthetic-model", action="store_true",
                   help="use the seed architecture with random weights even if a trained model exists")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--cpu", type=int, help="CPU to pin to (default: the highest allowed)")
    p.set_defaults(func=_main)


def _main(args) -> int:
    from effgen.config import default_paths

    sizes = QUICK if args.quick else DEFAULT
    if args.repeats is not None:
        if args.repeats < 1:
            raise ConfigError(f"--repeats must be >= 1, got {args.repeats}")
        sizes = replace(sizes, repeats=args.repeats, build_repeats=min(sizes.build_repeats, args.repeats),
                        reader_repeats=min(sizes.reader_repeats, args.repeats))
    if args.rows is not None:
        if args.rows < 1:
            raise ConfigError(f"--rows must be >= 1, got {args.rows}")
        sizes = replace(sizes, rows=args.rows)
    model, pre = args.model, args.preprocessing
    if args.synthetic_model:
        if model or pre:
            raise ConfigError("--synthetic-model excludes --model/--preprocessing")
    elif model or pre:
        model = model or default_paths()["model"]
        if not model.is_file():
            raise ConfigError(f"{model} does not exist")
        # A tX.pkl nobody named is used only if the model's history.json records it.
        pre = pre or vouched_default(model.with_name("tX.pkl"), model)
        if pre is None:
            raise ConfigError(f"name the model's preprocessing with --preprocessing (no tX.pkl "
                              f"beside {model} that its history.json records)")
        if not pre.is_file():
            raise ConfigError(f"{pre} does not exist")
    else:
        paths = default_paths()
        if paths["model"].is_file() and vouched_default(paths["preprocessing"], paths["model"]):
            model, pre = paths["model"], paths["preprocessing"]
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown or not sections:
        raise ConfigError(f"--sections {args.sections!r}: choose from {','.join(SECTIONS)}")
    report = run_bench(output_dir=args.output_dir, sections=sections, sizes=sizes,
                       model_path=model, preprocessing_path=pre, seed=args.seed, cpu=args.cpu)
    md_path, json_path, md = write_report(report, args.output_dir)
    print(md)
    print(f"[bench] wrote {md_path} and {json_path}", flush=True)
    return 0
