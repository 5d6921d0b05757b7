"""`effgen parity`: the compiled efficiency function against TensorFlow.

Targets. The library Lamarr will load (`--library`, opened with cffi in ABI mode,
declarations taken from the generated header) and, from the generated C (`--source`),
cffi API-mode builds of the same code: `production` (-std=c99 -O3), `portable`
(the same plus -DEFFGEN_NO_DISPATCH: plain C99, no CPU dispatch) and `sanitize`
(-fsanitize=address,undefined, run with libasan preloaded). Every target runs in its own
subprocess (a crash is reported, not inherited; ASan needs its runtime first).

Reference. model.keras run by TensorFlow on the same raw rows passed through the pickled
preprocessing (float64 transform, float32 network input, as `effgen preprocess` does).

Checks, per target:
  values     per class max / mean |C - TF| through `efficiency` (one call per row, as
             SQLamarr calls it) and through `efficiency_batch`, worst rows listed;
             against the backend's stated tolerance (TOLERANCES) for the whole function,
             and for the network alone where the source exposes it (API builds).
  lamarr     outputs in [0, 1] and p0 + 0 + 0 + p1 + p2 (float) <= 1, else Lamarr aborts.
  draws      one seeded float32 uniform per row: C `efficiency_track_type` against
             random_category applied to TF's probabilities (abi.python_track_type).
             A disagreement is rounding only if r lies within the value tolerance
             (times the number of summed terms) of one of TF's cumulative boundaries;
             any other fails. C's draw against its own probabilities must agree always.
Draw distribution (primary target): `--draws` fresh draws from the C library over the
rows; class counts against expected counts (sums of TF probabilities), overall and per
momentum bin (edges 0.5, 3, 5, 10, 30, 100, 200 GeV/c plus under/overflow), Pearson
chi-square with sparse cells merged; fails at p < 1e-3 in any test. (Rows have
different probabilities, so the counts are Poisson-binomial: the test is conservative.)

Outputs: report.json, differences.png, summary.txt in --output-dir; exit status 0/1.
"""

import argparse
import contextlib
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from effgen import schema
from effgen.config import library_compile_flags, library_link_flags, shipped_dir
from effgen.errors import ParityError  # noqa: F401 (re-exported)
from effgen.provenance import sha256_of

HARNESS_DIR = shipped_dir("c_harness", "parity_helpers.c")
HELPERS_C = HARNESS_DIR / "parity_helpers.c"

DEFAULT_ROWS = 200_000
DEFAULT_DRAWS = 1_000_000
DEFAULT_SANITIZE_ROWS = 20_000  # ASan/UBSan find memory and UB errors per call, not per row count
P_EDGES_GEV = (0.5, 3.0, 5.0, 10.0, 30.0, 100.0, 200.0)
P_VALUE_MIN = 1e-3
MIN_EXPECTED = 5.0
N_WORST = 10

# Stated absolute tolerances on probabilities, per backend: the network alone (C
# network on the sklearn-preprocessed input) and the whole function (raw input).
# effgen: float32 network, preprocessing exact to float rounding; the project's
# requirement is 1e-5 on the whole function (what scikinC / keras2c / lwtnn check on a
# few inputs); measured worst on 200k validation rows of a full-size model: 1.5e-6.
# scikinc: same network accuracy, but scikinC's approximate QuantileTransformer
# (bisection + 4096-point normal table, ~2e-4 on transformed features, worst in the
# tails of the fitted quantiles) moves probabilities much more on a few rows: measured
# worst 6.3e-3 (mean 3e-7) on the same 200k rows, hence 1e-2.
TOLERANCES = {
    "effgen": {"network": 1e-5, "function": 1e-5},
    "scikinc": {"network": 1e-5, "function": 1e-2},
}

VARIANTS = {
    # The library's own flags (effgen.config), as make and bench build it, less -Werror:
    # parity reports on C that warns (tests feed it deliberately broken C), it does not refuse it.
    "production": {"cflags": [f for f in library_compile_flags() if f != "-Werror"],
                   "ldflags": [f for f in library_link_flags() if f != "-shared"]},
    "portable": {"cflags": ["-std=c99", "-O3", "-DEFFGEN_NO_DISPATCH"], "ldflags": []},
    "sanitize": {
        "cflags": ["-std=c99", "-O1", "-g", "-fsanitize=address,undefined",
                   "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"],
        "ldflags": ["-fsanitize=address,undefined"],
        "sanitizer": True,
    },
}

HELPER_CDEF = """
typedef float *(*effgen_parity_row_fn)(float *out, const float *in);
typedef int (*effgen_parity_track_fn)(const float *in, float r);
long effgen_parity_rows(effgen_parity_row_fn f, float *out, const float *in, long n,
                        int n_in, int n_out);
void effgen_parity_tracks(effgen_parity_track_fn f, int *types, const float *in,
                          long n_rows, int n_in, const long *rows, const float *r,
                          long n_draws);
"""




# ---- building ------------------------------------------------------------------------
_PROTOTYPE = re.compile(r"^[A-Za-z_][\w \t\*]*\b\w+\s*\([^;{}]*\)\s*;", re.M)
_DEFINE = re.compile(r"^#define\s+([A-Za-z_]\w*)\s+(-?\d+)\s*$", re.M)


def header_cdef(header_text: str) -> str:
    """cffi declarations from a generated header: its function prototypes and integer
    #defines (comments, include guards and extern "C" blocks dropped)."""
    text = re.sub(r"/\*.*?\*/", "", header_text, flags=re.S)
    text = re.sub(r"//[^\n]*", "", text)
    defines = [f"#define {m.group(1)} {m.group(2)}" for m in _DEFINE.finditer(text)]
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    protos = [" ".join(m.group(0).split()) for m in _PROTOTYPE.finditer(body)]
    if not protos:
        raise ParityError("no function prototypes found in the header")
    return "\n".join(defines + protos) + "\n"


def _module_name(prefix, *parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode())
        h.update(b"\0")
    return f"_effgen_parity_{prefix}_{h.hexdigest()[:12]}"


@contextlib.contextmanager
def _captured_fds(path):
    """Send file descriptors 1 and 2 (the compiler's output, not only Python's) to path."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(path, "wb") as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def _compile_module(ffi, name, build_dir) -> dict:
    build_dir = Path(build_dir) / name
    build_dir.mkdir(parents=True, exist_ok=True)
    if not list(build_dir.glob(f"{name}.*.so")):
        log = build_dir / "build.log"
        try:
            with _captured_fds(log):
                ffi.compile(tmpdir=str(build_dir), verbose=True)
        except Exception as err:
            raise ParityError(f"building {name} in {build_dir} failed: {err}\n"
                              f"{log.read_text(errors='replace')[-4000:]}") from err
    return {"module_dir": str(build_dir), "module_name": name}


def build_api_variant(source, header, build_dir, variant: str, *, symbol="efficiency",
                      network_fn=None) -> dict:
    """Compile the generated C (`source`) with the harness loops into a cffi API-mode
    extension, with the variant's flags. `network_fn` names the core's static
    network-alone function (out, preprocessed in), exposed as effgen_parity_network.
    Returns a worker spec."""
    import cffi

    source, header = Path(source).resolve(), Path(header).resolve()
    spec = VARIANTS[variant]
    decls = header_cdef(header.read_text())
    # The header first: the compiler then also checks it against the definitions.
    code = [f'#include "{header}"', f'#include "{source}"', f'#include "{HELPERS_C}"']
    cdef = decls + HELPER_CDEF
    if network_fn:
        code.append("static float *effgen_parity_network(float *out, const float *in)\n"
                    f"{{ (void){network_fn}(out, in); return out; }}")
        cdef += "float *effgen_parity_network(float *out, const float *in);\n"
    code = "\n".join(code) + "\n"
    name = _module_name(variant, source.read_bytes(), HELPERS_C.read_bytes(), code, cdef,
                        spec["cflags"], spec["ldflags"], sys.version)
    ffi = cffi.FFI()
    ffi.cdef(cdef)
    cflags = spec["cflags"] + [f'-DEFFGEN_CFLAGS="{" ".join(spec["cflags"])}"']
    ffi.set_source(name, code, extra_compile_args=cflags,
                   extra_link_args=spec["ldflags"], libraries=["m"])
    out = _compile_module(ffi, name, build_dir)
    out.update(kind="api", variant=variant, symbol=symbol, cflags=spec["cflags"],
               network=bool(network_fn), sanitizer=bool(spec.get("sanitizer")))
    return out


def build_helpers(build_dir) -> dict:
    """The harness loops alone (for a library opened with dlopen)."""
    import cffi

    code = f'#include "{HELPERS_C}"\n'
    name = _module_name("helpers", HELPERS_C.read_bytes(), HELPER_CDEF, sys.version)
    ffi = cffi.FFI()
    ffi.cdef(HELPER_CDEF)
    ffi.set_source(name, code, extra_compile_args=["-std=c99", "-O2"])
    return _compile_module(ffi, name, build_dir)


def abi_spec(library, header, helpers, *, symbol="efficiency") -> dict:
    return dict(helpers, kind="abi", variant="abi", library=str(Path(library).resolve()),
                header=str(Path(header).resolve()), symbol=symbol, network=False,
                sanitizer=False)


# ---- the worker (runs in a subprocess, never imports TensorFlow) ---------------------
def _import_module(module_dir, module_name):
    import importlib

    sys.path.insert(0, module_dir)
    try:
        return importlib.import_module(module_name)
    finally:
        sys.path.remove(module_dir)


def evaluate(spec: dict, inputs, uniforms, draw_uniforms=None, network_inputs=None) -> dict:
    """Call one target on `inputs` (n x 12 float32): per-row and batch probabilities,
    track types with `uniforms` (one per row), draws with `draw_uniforms` (draw d uses
    row d % n), the network alone on `network_inputs` (API builds) and the manifest."""
    symbol = spec["symbol"]
    x = np.ascontiguousarray(inputs, dtype=np.float32)
    n, n_in = x.shape
    if spec["kind"] == "api":
        mod = _import_module(spec["module_dir"], spec["module_name"])
        ffi, lib = mod.ffi, mod.lib
        hffi, hlib = ffi, lib
        row_fn = ffi.addressof(lib, symbol)
        track_fn = ffi.addressof(lib, symbol + "_track_type")
        batch, manifest = getattr(lib, symbol + "_batch"), getattr(lib, symbol + "_manifest")
    else:
        import cffi

        ffi = cffi.FFI()
        ffi.cdef(header_cdef(Path(spec["header"]).read_text()))
        lib = ffi.dlopen(spec["library"])
        helpers = _import_module(spec["module_dir"], spec["module_name"])
        hffi, hlib = helpers.ffi, helpers.lib

        def cast(fn, ctype):
            return hffi.cast(ctype, int(ffi.cast("uintptr_t", fn)))

        row_fn = cast(getattr(lib, symbol), "effgen_parity_row_fn")
        track_fn = cast(getattr(lib, symbol + "_track_type"), "effgen_parity_track_fn")
        batch, manifest = getattr(lib, symbol + "_batch"), getattr(lib, symbol + "_manifest")
    n_out = len(schema.OUTPUTS)

    def fptr(a, f=hffi, t="float *"):
        return f.cast(t, a.ctypes.data)

    result = {"manifest": ffi.string(manifest()).decode("ascii")}
    per_row = np.full((n, n_out), np.nan, dtype=np.float32)
    bad = hlib.effgen_parity_rows(row_fn, fptr(per_row), fptr(x), n, n_in, n_out)
    result["bad_return_row"] = int(bad)
    result["per_row"] = per_row
    batched = np.full((n, n_out), np.nan, dtype=np.float32)
    batch(ffi.cast("float *", batched.ctypes.data), ffi.cast("float *", x.ctypes.data), n)
    result["batch"] = batched
    r = np.ascontiguousarray(uniforms, dtype=np.float32)
    types = np.empty(n, dtype=np.int32)
    hlib.effgen_parity_tracks(track_fn, fptr(types, t="int *"), fptr(x), n, n_in, hffi.NULL,
                              fptr(r), n)
    result["track_same"] = types
    if draw_uniforms is not None:
        u = np.ascontiguousarray(draw_uniforms, dtype=np.float32)
        draws = np.empty(len(u), dtype=np.int32)
        hlib.effgen_parity_tracks(track_fn, fptr(draws, t="int *"), fptr(x), n, n_in,
                                  hffi.NULL, fptr(u), len(u))
        result["draws"] = draws.astype(np.int8)
    if network_inputs is not None and spec.get("network"):
        z = np.ascontiguousarray(network_inputs, dtype=np.float32)
        net = np.full((len(z), n_out), np.nan, dtype=np.float32)
        hlib.effgen_parity_rows(ffi.addressof(lib, "effgen_parity_network"), fptr(net), fptr(z),
                                len(z), z.shape[1], n_out)
        result["network"] = net
    return result


def _worker_main(argv):
    spec = json.loads(Path(argv[0]).read_text())
    data = np.load(spec["inputs_npz"])
    out = evaluate(spec, data["inputs"], data["uniforms"],
                   data["draw_uniforms"] if "draw_uniforms" in data else None,
                   data["network_inputs"] if "network_inputs" in data else None)
    manifest = out.pop("manifest")
    np.savez(spec["output_npz"], manifest=np.array(manifest), **out)
    return 0


def sanitizer_env() -> dict:
    """Environment for a process loading an ASan/UBSan-built extension into Python."""
    lib = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True,
                         text=True).stdout.strip()
    if not lib or not Path(lib).exists():
        raise ParityError("libasan.so not found (gcc -print-file-name=libasan.so); "
                          "install the compiler's sanitizer runtime or drop the sanitize variant")
    env = dict(os.environ)
    env["LD_PRELOAD"] = lib
    env["ASAN_OPTIONS"] = "detect_leaks=0:abort_on_error=0:exitcode=99"
    env["UBSAN_OPTIONS"] = "halt_on_error=1:print_stacktrace=1:exitcode=98"
    return env


def run_worker(spec, work_dir, inputs, uniforms, draw_uniforms=None, network_inputs=None,
               timeout=None) -> dict:
    """Run `evaluate` for one target in a fresh Python process; a crash or sanitizer
    report raises ParityError with the process's output."""
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    tag = spec["variant"]
    arrays = {"inputs": np.asarray(inputs, np.float32), "uniforms": np.asarray(uniforms, np.float32)}
    if draw_uniforms is not None:
        arrays["draw_uniforms"] = np.asarray(draw_uniforms, np.float32)
    if network_inputs is not None:
        arrays["network_inputs"] = np.asarray(network_inputs, np.float32)
    job = dict(spec, inputs_npz=str(work_dir / f"{tag}.in.npz"),
               output_npz=str(work_dir / f"{tag}.out.npz"))
    np.savez(job["inputs_npz"], **arrays)
    Path(job["output_npz"]).unlink(missing_ok=True)
    job_file = work_dir / f"{tag}.json"
    job_file.write_text(json.dumps(job))
    env = sanitizer_env() if spec.get("sanitizer") else dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                         env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [sys.executable, "-m", "effgen.checks.parity", "--worker", str(job_file)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0 or not Path(job["output_npz"]).exists():
        raise ParityError(f"target {tag} exited with status {proc.returncode}:\n"
                          f"{(proc.stderr or proc.stdout)[-6000:]}")
    with np.load(job["output_npz"]) as res:
        out = {k: res[k] for k in res.files}
    out["manifest"] = json.loads(str(out["manifest"]))
    out["elapsed_s"] = elapsed
    out["stderr_tail"] = proc.stderr[-2000:]
    return out


# ---- the reference -------------------------------------------------------------------
def load_rows(data_dir, n_rows) -> np.ndarray:
    """The first n_rows raw feature rows (raw_<feature> columns) of a data directory."""
    from effgen.data.reader import FeatherReader

    reader = FeatherReader(data_dir)
    cols = [f"raw_{c}" for c in schema.FEATURES]
    missing = [c for c in cols if c not in reader.columns]
    if missing:
        raise ParityError(f"{data_dir}: no raw feature columns {missing} (written by effgen preprocess)")
    frame = reader.as_pandas(columns=cols, max_rows=n_rows)
    return frame.to_numpy(dtype=np.float32)


def tf_reference(model_path, preprocessing, raw, batch_size=65536):
    """(probabilities, preprocessed input), both float32, from TensorFlow."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    model = keras.models.load_model(str(model_path), compile=False)
    pre = preprocessing.transform(np.asarray(raw, dtype=np.float64)).astype(np.float32)
    probs = model.predict(pre, batch_size=batch_size, verbose=0).astype(np.float32)
    return probs, pre


# ---- comparisons ---------------------------------------------------------------------
def value_stats(c, ref, raw=None, n_worst=N_WORST) -> dict:
    """Per class max / mean |c - ref|, NaN counts and the worst rows."""
    c, ref = np.asarray(c, np.float64), np.asarray(ref, np.float64)
    d = np.abs(c - ref)
    nan = ~np.isfinite(d)
    d_f = np.where(nan, np.inf, d)
    per_class = {name: {"max": float(d_f[:, k].max()),
                        "mean": float(np.mean(d[~nan[:, k], k])) if (~nan[:, k]).any() else None}
                 for k, name in enumerate(schema.OUTPUTS)}
    row_max = d_f.max(axis=1)
    worst = np.argsort(-row_max, kind="stable")[:n_worst]
    rows = []
    for i in worst:
        entry = {"row": int(i), "max_abs_diff": float(row_max[i]),
                 "c": [float(v) for v in c[i]], "reference": [float(v) for v in ref[i]]}
        if raw is not None:
            entry["raw"] = dict(zip(schema.FEATURES, (float(v) for v in raw[i])))
        rows.append(entry)
    return {"max": float(row_max.max()) if len(row_max) else 0.0,
            "mean": float(np.mean(d[~nan])) if (~nan).any() else None,
            "nan_rows": int(nan.any(axis=1).sum()), "per_class": per_class, "worst_rows": rows}


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


def cumulative_boundaries(p) -> np.ndarray:
    """random_category's running sums after not_recoed, long and upstream (float32)."""
    p = np.asarray(p, np.float32)
    c0 = p[:, 0]
    c1 = (c0 + p[:, 1]).astype(np.float32)
    c2 = (c1 + p[:, 2]).astype(np.float32)
    return np.stack([c0, c1, c2], axis=1)


def draw_agreement(c_types, ref_probs, c_probs, r, tol, max_listed=10_000) -> dict:
    """C track types against random_category on TF's probabilities with the same
    uniforms; every disagreement listed (up to max_listed, a guard against a broken
    library filling the report) and classified."""
    from effgen.codegen.abi import python_track_type

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


# ---- the whole check -----------------------------------------------------------------
def backend_of(manifest) -> str:
    backend = manifest.get("backend", "effgen")
    return backend if backend in TOLERANCES else "effgen"


def network_function(backend, symbol):
    """Name of the generated core's static network-alone function (output, preprocessed
    input), as the backend's module tells it; None if it does not."""
    import importlib

    try:
        if backend == "scikinc":
            return importlib.import_module("effgen.codegen.backends.scikinc").step_function(symbol, "network")
        return importlib.import_module("effgen.codegen.backends.effgen_c").network_function(symbol)
    except (ImportError, AttributeError):
        return None


def provenance_failures(name, manifest, hashes) -> list:
    """The library must say it was built from the model and preprocessing compared."""
    return [f"{name}: the library's manifest has {key} {manifest.get(key, 'missing')!r}, "
            f"the file compared against has {value} (stale library or wrong --model/--preprocessing?)"
            for key, value in hashes.items() if manifest.get(key) != value]


def check_target(name, res, tf_probs, raw, uniforms, tol, pre=None) -> dict:
    """All per-target checks on one worker result."""
    failures = []
    values = {"per_row": value_stats(res["per_row"], tf_probs, raw),
              "batch": value_stats(res["batch"], tf_probs, raw)}
    rb = np.abs(res["per_row"].astype(np.float64) - res["batch"])
    values["row_vs_batch_max"] = float(np.nanmax(rb)) if rb.size else 0.0
    values["row_equals_batch_bitwise"] = bool(np.array_equal(res["per_row"], res["batch"], equal_nan=True))
    for how in ("per_row", "batch"):
        v = values[how]
        if v["nan_rows"] or v["max"] > tol["function"]:
            failures.append(f"{name}: {how} max |C - TF| = {v['max']:.3g} "
                            f"(tolerance {tol['function']:g}, NaN rows {v['nan_rows']})")
    if "network" in res:
        values["network"] = value_stats(res["network"], tf_probs, pre)
        if values["network"]["nan_rows"] or values["network"]["max"] > tol["network"]:
            failures.append(f"{name}: network alone max |C - TF| = {values['network']['max']:.3g} "
                            f"(tolerance {tol['network']:g})")
    if res.get("bad_return_row", -1) >= 0:
        failures.append(f"{name}: efficiency() did not return its out pointer (row {res['bad_return_row']})")
    safety = {how: lamarr_safety(res[how]) for how in ("per_row", "batch")}
    for how, s in safety.items():
        bad = s["nan_values"] + s["negative_values"] + s["above_one_values"] + s["lamarr_sum_above_one"]
        if bad:
            failures.append(f"{name}: {how} outputs Lamarr would reject or mis-draw: {s}")
    draws = draw_agreement(res["track_same"], tf_probs, res["per_row"], uniforms, tol["function"])
    if draws["unexplained"]:
        failures.append(f"{name}: {draws['unexplained']} track-type disagreements with TF not "
                        f"explained by rounding at a cumulative boundary")
    if draws["self_disagreements"]:
        failures.append(f"{name}: efficiency_track_type disagrees with random_category on the "
                        f"library's own probabilities in {draws['self_disagreements']} rows")
    return {"values": values, "lamarr_safety": safety, "draws_identical_uniforms": draws,
            "elapsed_s": res.get("elapsed_s"), "manifest": res.get("manifest"),
            "failures": failures, "passed": not failures}


def header_backend(header) -> str:
    """The backend named in a generated header's banner ("(backend: NAME)")."""
    m = re.search(r"\(backend: (\w+)\)", Path(header).read_text())
    return m.group(1) if m else "effgen"


def run_parity(*, model_path, preprocessing_path, raw=None, data_dir=None, library=None,
               source=None, header=None, symbol="efficiency", rows=DEFAULT_ROWS,
               draws=DEFAULT_DRAWS, variants=("production", "portable", "sanitize"),
               sanitize_rows=DEFAULT_SANITIZE_ROWS, output_dir="build/parity", seed=12345,
               worker_timeout=3600, progress=True) -> dict:
    """Run every check; write report.json, differences.png and summary.txt into
    output_dir and return the report (report['passed'] is the verdict).

    Rows: `raw` (n x 12 float32) or the first `rows` of `data_dir`'s raw_<feature>
    columns. Targets: `library` (ABI mode) and `variants` API builds of `source`.
    The first target gives the `draws` for the distribution test."""
    import sysconfig

    from effgen.atomic import atomic_file
    from effgen.provenance import load_preprocessing

    t_start = time.perf_counter()
    output_dir = Path(output_dir)
    work = output_dir / "work"
    work.mkdir(parents=True, exist_ok=True)
    say = print if progress else (lambda *a, **k: None)

    if library is None and source is None:
        raise ParityError("nothing to check: give a library (.so) and/or its generated source (.c)")
    if source is not None:
        source = Path(source)
        header = Path(header) if header else source.with_suffix(".h")
    elif library is not None and header is None:
        header = Path(library).with_suffix(".h")
    if header is None or not Path(header).is_file():
        raise ParityError(f"generated header {header} not found (needed for the declarations)")
    for v in variants:
        if v not in VARIANTS:
            raise ParityError(f"unknown variant {v!r}; choose from {sorted(VARIANTS)}")
    if raw is None:
        if data_dir is None:
            raise ParityError("no rows: give data_dir (a validation directory) or raw")
        raw = load_rows(data_dir, rows)
    raw = np.ascontiguousarray(raw[:rows], dtype=np.float32)
    n = len(raw)
    if n == 0:
        raise ParityError("no rows to check")

    say(f"parity: TensorFlow reference on {n} rows")
    tf_probs, pre = tf_reference(model_path, load_preprocessing(preprocessing_path, model_path=model_path), raw)

    rng = np.random.default_rng(np.random.SeedSequence(seed))
    uniforms = rng.random(n, dtype=np.float32)
    draw_uniforms = rng.random(int(draws), dtype=np.float32) if draws else None

    targets = []
    if library is not None:
        targets.append(abi_spec(library, header, build_helpers(work / "build"), symbol=symbol))
    backend = header_backend(header)
    net_fn = network_function(backend, symbol) if source is not None else None
    if net_fn and not re.search(rf"\b{re.escape(net_fn)}\s*\(", source.read_text()):
        net_fn = None
    build_failures = {}
    if source is not None:
        for v in variants:
            say(f"parity: building {v} ({' '.join(VARIANTS[v]['cflags'])})")
            try:
                targets.append(build_api_variant(source, header, work / "build", v,
                                                 symbol=symbol, network_fn=net_fn))
            except ParityError as err:
                build_failures[v] = f"{v}: does not build: {err}"
    if not targets and not build_failures:
        raise ParityError("no target to run (a source with an empty variant list)")
    report = {"model": str(model_path), "preprocessing": str(preprocessing_path),
              "data": str(data_dir) if data_dir else None,
              "library": str(library) if library else None,
              "source": str(source) if source else None, "symbol": symbol, "rows": n,
              "seed": seed, "backend": backend, "network_function": net_fn,
              "targets": {}, "failures": [],
              # cffi builds add Python's own flags before each variant's flags.
              "python_cflags": sysconfig.get_config_var("CFLAGS")}
    for v, msg in build_failures.items():
        report["targets"][v] = {"passed": False, "failures": [msg]}
        report["failures"].append(msg[:3000])
    hashes = {"model_sha256": sha256_of(model_path), "preprocessing_sha256": sha256_of(preprocessing_path)}
    report.update(hashes)
    primary = targets[0]["variant"] if targets else None
    results = {}
    for spec in targets:
        name = spec["variant"]
        m = n if not spec.get("sanitizer") else min(n, sanitize_rows)
        with_draws = name == primary and draw_uniforms is not None
        say(f"parity: running {name} on {m} rows" + (f" + {len(draw_uniforms)} draws" if with_draws else ""))
        try:
            res = run_worker(spec, work, raw[:m], uniforms[:m], draw_uniforms if with_draws else None,
                             pre[:m] if spec.get("network") else None, timeout=worker_timeout)
        except (ParityError, subprocess.TimeoutExpired) as err:
            report["targets"][name] = {"passed": False, "failures": [f"{name}: {err}"]}
            report["failures"].append(f"{name}: crashed or sanitizer report: {str(err)[:2000]}")
            continue
        tol = TOLERANCES[backend_of(res["manifest"])]
        chk = check_target(name, res, tf_probs[:m], raw[:m], uniforms[:m], tol, pre[:m])
        chk["failures"] += provenance_failures(name, res["manifest"], hashes)
        chk["passed"] = not chk["failures"]
        chk.update(rows=m, backend=backend_of(res["manifest"]), tolerances=tol,
                   build={k: spec[k] for k in ("kind", "cflags") if k in spec})
        report["targets"][name] = chk
        report["failures"] += chk["failures"]
        results[name] = res
        if "draws" in res:
            dist = draw_distribution(res["draws"], tf_probs[:m], raw[:m, schema.FEATURES.index("mc_log10_p")])
            dist["target"] = name
            report["draw_distribution"] = dist
            if not dist["passed"]:
                report["failures"].append(
                    f"draw distribution ({name}): p < {P_VALUE_MIN:g} in {dist['failing_tests']}"
                    + (f"; {dist['other_types']} draws outside 0/3/4/5" if dist["other_types"] else ""))
    if draws and "draw_distribution" not in report:
        report["failures"].append(f"draw distribution: the primary target {primary} gave no draws")
    if source is not None and not net_fn:
        report["failures"].append(f"network alone: no network function of the {backend} backend "
                                  f"in {source}")
    report["passed"] = not report["failures"]
    report["runtime_s"] = time.perf_counter() - t_start

    with atomic_file(output_dir / "report.json", "w") as f:
        json.dump(report, f, indent=2)
    plot_differences(results, tf_probs, output_dir / "differences.png")
    with atomic_file(output_dir / "summary.txt", "w") as f:
        f.write(summary(report) + "\n")
    return report


def plot_differences(results, tf_probs, path):
    """Histograms of C - TF per class, one panel per target (per-row calls)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from effgen.atomic import atomic_path

    names = list(results)
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(4.5 * max(1, len(names)), 3.6),
                             squeeze=False)
    for ax, name in zip(axes[0], names):
        c = results[name]["per_row"].astype(np.float64)
        d = c - tf_probs[: len(c)]
        lim = max(float(np.nanmax(np.abs(d))), 1e-9)
        bins = np.linspace(-lim, lim, 81)
        for k, cls in enumerate(schema.OUTPUTS):
            ax.hist(d[:, k], bins=bins, histtype="step", label=cls, log=True)
        ax.set_title(f"{name}: C - TF ({len(c)} rows)")
        ax.set_xlabel("probability difference")
        ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 2))
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def summary(report) -> str:
    lines = [f"effgen parity: {'PASSED' if report['passed'] else 'FAILED'}  "
             f"({report['rows']} rows, backend {report.get('backend')}, {report['runtime_s']:.1f} s)"]
    for name, t in report["targets"].items():
        if "values" not in t:
            lines.append(f"  {name:<11} CRASHED or did not build (see report.json)")
            continue
        v, d = t["values"], t["draws_identical_uniforms"]
        net = v.get("network", {}).get("max")
        lines.append(
            f"  {name:<11} max|C-TF| row {v['per_row']['max']:.2e} batch {v['batch']['max']:.2e}"
            + (f" network {net:.2e}" if net is not None else "")
            + f" (tol {t['tolerances']['function']:g}); draws {d['disagreements']} differ"
            f" ({d['rounding']} rounding, {d['unexplained']} not); {t['rows']} rows"
            f" {'ok' if t['passed'] else 'FAIL'}")
    dist = report.get("draw_distribution")
    if dist:
        pv = [f"{b['bin']}: {b['p_value']:.3g}" for b in dist["per_bin"] if b["p_value"] is not None]
        lines.append(f"  draws ({dist['target']}, {dist['n_draws']}): overall p = "
                     f"{dist['overall']['p_value']:.3g}; per bin " + ", ".join(pv))
    for f in report["failures"][:12]:
        lines.append(f"  FAIL {f[:300]}")
    return "\n".join(lines)


# ---- CLI -----------------------------------------------------------------------------
def register(subparsers):
    from effgen.config import default_paths

    paths = default_paths()
    p = subparsers.add_parser("parity", help="check the compiled library against TensorFlow",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--library", default=str(paths["lamarr"] / "efficiency.so"),
                   help="the .so Lamarr loads (ABI mode)")
    p.add_argument("--source", help="generated C to build variants from (default: LIBRARY with .c, if present)")
    p.add_argument("--header", help="generated header (default: SOURCE or LIBRARY with .h)")
    p.add_argument("--symbol", default="efficiency")
    p.add_argument("--model", default=str(paths["model"]))
    p.add_argument("--preprocessing", default=str(paths["preprocessing"]))
    p.add_argument("--data", default=str(paths["validation"]), help="validation data directory")
    p.add_argument("--rows", type=int, default=DEFAULT_ROWS)
    p.add_argument("--draws", type=int, default=DEFAULT_DRAWS)
    p.add_argument("--sanitize-rows", type=int, default=DEFAULT_SANITIZE_ROWS)
    p.add_argument("--output-dir", default=str(paths["parity"]))
    p.add_argument("--variants", default="production,portable,sanitize",
                   help="comma-separated API-mode builds of SOURCE (empty for none)")
    p.add_argument("--seed", type=int, default=12345)
    p.set_defaults(func=_main)


def _main(args) -> int:
    library = Path(args.library) if args.library else None
    source = Path(args.source) if args.source else None
    if library is not None and not library.is_file():
        print(f"effgen parity: library {library} does not exist (make lamarr-lib)", file=sys.stderr)
        return 1
    if source is None and library is not None and library.with_suffix(".c").is_file():
        source = library.with_suffix(".c")
    variants = [v for v in args.variants.split(",") if v]
    try:
        report = run_parity(model_path=args.model, preprocessing_path=args.preprocessing,
                            data_dir=args.data, library=library, source=source,
                            header=args.header, symbol=args.symbol, rows=args.rows,
                            draws=args.draws, variants=variants if source else (),
                            sanitize_rows=args.sanitize_rows, output_dir=args.output_dir,
                            seed=args.seed)
    except ParityError as err:
        print(f"effgen parity: {err}", file=sys.stderr)
        return 1
    print(summary(report))
    print(f"report: {Path(args.output_dir) / 'report.json'}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m effgen.checks.parity")
    parser.add_argument("--worker", nargs=1, required=True, help=argparse.SUPPRESS)
    sys.exit(_worker_main(parser.parse_args().worker))
