"""C backends: each turns a model and its preprocessing into a `Core` of static C code
that export always wraps with the shared ABI layer (effgen.codegen.abi).

A backend is one module in this package that calls `register(Backend(...))` when
imported; `get(name)` and `names()` import every module here once, so a new backend
is one new file.
"""

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Callable, Optional

from effgen.codegen.kinds import EFFICIENCY, ModelKind


@dataclass(frozen=True)
class Core:
    """A backend's C99 code, every function static. Signatures, classifier kinds
    (efficiency, sigmoid):

        void row_fn(float *out, const float *in)             raw features -> outputs
        void batch_fn(float *out, const float *in, long n)   n rows (None: row by row)
        void network_fn(float *out, const float *z)          network alone, preprocessed z
        int isa_fn(void)                                     index in isa_variants in use

    and generator kind (noise `rnd`, n_random values a row, enters the network raw;
    outputs in physical units, tY's inverse applied):

        void row_fn(float *out, const float *in, const float *rnd)
        void batch_fn(float *out, const float *in, const float *rnd, long n)
        void network_fn(float *out, const float *z)          z = [tX(in), rnd]

    `tables`, if any, is C defining data (weights, quantiles) that `source` declares
    with tentative `static const` definitions: the ABI layer puts it at the very end.
    `contents` lists the sections of `source` for the file's table of contents;
    `info` adds backend entries to the manifest (e.g. the network, the tanh used)."""
    source: str
    row_fn: str
    network_fn: Optional[str] = None
    batch_fn: Optional[str] = None
    isa_fn: Optional[str] = None
    isa_variants: tuple = ("portable",)
    tables: str = ""
    contents: tuple = ()
    info: dict = field(default_factory=dict)

    def functions(self) -> dict:
        """The core's function names, as the manifest records them."""
        return {"row": self.row_fn, "batch": self.batch_fn, "network": self.network_fn,
                "isa": self.isa_fn}


@dataclass(frozen=True)
class Request:
    """What export hands a backend: the Keras model, its chain (effgen.codegen.graph),
    the fitted preprocessing (a ColumnTransformer), the exported symbol, the kind (with
    its names and noise width), backend options (`sklearn_dtype`, `tanh`; a backend
    ignores what it does not use) and, for a generator, the fitted output transform
    tY whose inverse turns the network's outputs into physical units (None: identity)."""
    model: object
    chain: object
    preprocessing: object
    symbol: str
    kind: ModelKind = EFFICIENCY
    options: dict = field(default_factory=dict)
    postprocessing: object = None


@dataclass(frozen=True)
class Backend:
    name: str
    description: str
    generate: Callable  # (Request) -> Core
    kinds: tuple = ("efficiency",)


_REGISTRY = {}
_loaded = False


def register(backend: Backend) -> Backend:
    if backend.name in _REGISTRY and _REGISTRY[backend.name] is not backend:
        raise ValueError(f"backend {backend.name!r} registered twice")
    _REGISTRY[backend.name] = backend
    return backend


def _load_all():
    global _loaded
    if not _loaded:
        for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
            importlib.import_module(f"{__name__}.{info.name}")
        _loaded = True


def names() -> tuple:
    _load_all()
    return tuple(sorted(_REGISTRY, key=lambda n: (n != "effgen", n)))


def get(name: str) -> Backend:
    _load_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"backend {name!r}: expected one of {names()}") from None
