"""Build a generated C file into a shared library and check what the library exposes."""

import os
import shlex
import subprocess
from pathlib import Path

from effgen.codegen.abi import exported_names
from effgen.codegen.kinds import EFFICIENCY
from effgen.config import library_cflags
from effgen.errors import CompileError  # noqa: F401 (re-exported)

# Portable by default: no -ffast-math (it made production objects import glibc's
# __exp_finite family), no -march=native (the .so dispatches to AVX2/FMA itself).
# The values live in effgen.config's table (LIB_CFLAGS, LIB_LDFLAGS), shared with make.
DEFAULT_CFLAGS = tuple(library_cflags())




def cflags_macro(cflags) -> str:
    """-DEFFGEN_CFLAGS="..." recording the build flags in the manifest (JSON-safe)."""
    text = " ".join(cflags).replace("\\", "/").replace('"', "'")
    return f'-DEFFGEN_CFLAGS="{text}"'


def compile_shared(c_path, so_path, *, cflags=DEFAULT_CFLAGS, cc="gcc", extra=()) -> Path:
    """Compile `c_path` into `so_path` (written under a temporary name, then renamed)."""
    c_path, so_path = Path(c_path), Path(so_path)
    if not c_path.is_file():
        raise FileNotFoundError(f"C source {c_path} does not exist")
    so_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = so_path.with_name(f".{so_path.name}.{os.getpid()}.tmp")
    cflags = list(cflags)
    if "-shared" not in cflags:
        cflags.append("-shared")
    cmd = [cc, *cflags, *extra, cflags_macro(cflags + list(extra)), "-o", str(tmp), str(c_path), "-lm"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError as err:
        raise CompileError(f"C compiler {cc!r} not found: {err}") from err
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise CompileError(
            f"compiling {c_path} failed (exit {proc.returncode}):\n  {shlex.join(cmd)}\n"
            f"{proc.stderr.strip()}")
    os.replace(tmp, so_path)
    return so_path


def _nm(so_path, flag):
    so_path = Path(so_path)
    if not so_path.is_file():
        raise FileNotFoundError(f"shared library {so_path} does not exist")
    proc = subprocess.run(["nm", "-D", flag, str(so_path)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise CompileError(f"{so_path}: not a readable shared library "
                           f"(nm: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode})")
    rows = []
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2:
            rows.append((parts[-2], parts[-1]))
    return rows


def exported_symbols(so_path) -> list:
    """Names of the functions and data the library defines for the dynamic linker
    (code or data, including ifunc), sorted."""
    return sorted(name for kind, name in _nm(so_path, "--defined-only") if kind in "TtDdBbRrVWi")


def undefined_symbols(so_path) -> list:
    """Names the library imports (e.g. expf, nextafterf), versions stripped, sorted."""
    return sorted({name.split("@")[0] for _, name in _nm(so_path, "--undefined-only")})


def check_library(so_path, symbol) -> None:
    """Raise if the library exports anything but the four ABI functions, or imports
    glibc's removed __*_finite functions (what -ffast-math builds used to pull in)."""
    exported = exported_symbols(so_path)
    expected = sorted(exported_names(symbol))
    if exported != expected:
        raise RuntimeError(f"{so_path} exports {exported}, expected exactly {expected}")
    finite = [n for n in undefined_symbols(so_path) if n.startswith("__") and n.endswith("_finite")]
    if finite:
        raise RuntimeError(f"{so_path} imports {finite} (built with -ffast-math?); "
                           f"they are gone from recent glibc")


class Library:
    """A built model library opened with ctypes, with numpy-friendly calls."""

    def __init__(self, so_path, symbol="efficiency", n_inputs=EFFICIENCY.n_inputs,
                 n_outputs=EFFICIENCY.n_outputs):
        import ctypes

        self.path, self.symbol = Path(so_path).resolve(), symbol
        self.n_inputs, self.n_outputs = n_inputs, n_outputs
        self._lib = ctypes.CDLL(str(self.path))
        fptr = ctypes.POINTER(ctypes.c_float)
        self._row = getattr(self._lib, symbol)
        self._row.argtypes, self._row.restype = [fptr, fptr], fptr
        self._batch = getattr(self._lib, symbol + "_batch")
        self._batch.argtypes, self._batch.restype = [fptr, fptr, ctypes.c_long], None
        self._track = getattr(self._lib, symbol + "_track_type")
        self._track.argtypes, self._track.restype = [fptr, ctypes.c_float], ctypes.c_int
        self._manifest = getattr(self._lib, symbol + "_manifest")
        self._manifest.argtypes, self._manifest.restype = [], ctypes.c_char_p
        self._fptr = fptr

    def _rows(self, x):
        import numpy as np

        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.n_inputs:
            raise ValueError(f"expected rows of {self.n_inputs} features, got shape {x.shape}")
        return x

    def manifest(self) -> dict:
        import json

        return json.loads(self._manifest().decode("ascii"))

    def batch(self, x):
        """SYMBOL_batch over all rows."""
        import numpy as np

        x = self._rows(x)
        out = np.empty((x.shape[0], self.n_outputs), dtype=np.float32)
        self._batch(out.ctypes.data_as(self._fptr), x.ctypes.data_as(self._fptr), x.shape[0])
        return out

    def per_call(self, x):
        """SYMBOL once per row, as Lamarr calls it."""
        import numpy as np

        x = self._rows(x)
        out = np.empty((x.shape[0], self.n_outputs), dtype=np.float32)
        for i in range(x.shape[0]):
            ret = self._row(out[i].ctypes.data_as(self._fptr), x[i].ctypes.data_as(self._fptr))
            assert ret is not None
        return out

    def track_type(self, x, r):
        import numpy as np

        x = self._rows(x)
        r = np.broadcast_to(np.asarray(r, dtype=np.float32), (x.shape[0],))
        return np.array([self._track(x[i].ctypes.data_as(self._fptr), float(r[i]))
                         for i in range(x.shape[0])], dtype=np.int64)
