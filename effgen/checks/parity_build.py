"""Parity targets: the generated C built into cffi API-mode extensions (one per
variant of compiler flags, with the harness loops and, where the core has one, its
network-alone function), or the harness loops alone for a library opened with
dlopen. Each returns a worker spec (a JSON-able dict) for effgen.checks.parity_worker."""

import contextlib
import hashlib
import os
import re
import sys
from pathlib import Path

from effgen.config import library_compile_flags, library_link_flags, shipped_dir
from effgen.errors import ParityError

HARNESS_DIR = shipped_dir("c_harness", "parity_helpers.c")
HELPERS_C = HARNESS_DIR / "parity_helpers.c"

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
