"""The parity worker: calls one target (an API-mode build or a dlopen'ed library) on
the rows in a fresh process, so that a crash or a sanitizer report is reported, not
inherited, and an ASan build gets its runtime preloaded. Never imports TensorFlow.

    python -m effgen.checks.parity_worker --worker JOB.json
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from effgen.checks.parity_build import header_cdef
from effgen.errors import ParityError


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
    n_out = int(spec["n_outputs"])

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
    cmd = [sys.executable, "-m", "effgen.checks.parity_worker", "--worker", str(job_file)]
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m effgen.checks.parity_worker")
    parser.add_argument("--worker", nargs=1, required=True, help=argparse.SUPPRESS)
    return _worker_main(parser.parse_args(argv).worker)


if __name__ == "__main__":
    sys.exit(main())
