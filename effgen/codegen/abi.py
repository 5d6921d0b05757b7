"""The Lamarr ABI layer shared by every C backend.

A backend produces *core* C99 code: `static void CORE(float *out, const float *in)`
mapping the raw features to the class probabilities (preprocessing included), and
optionally `static void CORE_batch(float *out, const float *in, long n)`.
`render_abi` wraps it into the exported library interface:

    float *SYMBOL(float *out, const float *in);            Lamarr's entry point
    void SYMBOL_batch(float *out, const float *in, long n);
    int SYMBOL_track_type(const float *in, float r);        the draw Lamarr would make
    const char *SYMBOL_manifest(void);                      JSON description

and guarantees, whatever the backend: NaN input -> {1, 0, 0, 0}; outputs in [0, 1];
p0 + 0 + 0 + p1 + p2 accumulated in float never above 1 (Lamarr aborts otherwise).
"""

import json
import re
from pathlib import Path

import numpy as np

from effgen import __version__

# What each raw feature is (DOMAIN.md section 2), for the generated header.
FEATURE_DOCS = {
    "mc_x": "production-vertex x [mm]",
    "mc_y": "production-vertex y [mm]",
    "mc_z": "production-vertex z [mm]",
    "mc_log10_p": "log10 of the momentum magnitude [p in MeV/c]",
    "mc_tx": "px / pz",
    "mc_ty": "py / pz",
    "mc_eta": "pseudorapidity",
    "mc_phi": "azimuth atan2(py, px) [rad]",
    "mc_is_e": "1 if abs(pid) == 11 else 0",
    "mc_is_mu": "1 if abs(pid) == 13 else 0",
    "mc_is_h": "1 if abs(pid) in {211, 321, 2212} else 0",
    "mc_charge": "charge used for propagation (+1 / -1)",
}
OUTPUT_DOCS = {
    "not_recoed": "not reconstructed (track type 0)",
    "long": "reconstructed as long (track type 3)",
    "upstream": "reconstructed as upstream (track type 4)",
    "downstream": "reconstructed as downstream (track type 5)",
}

# The four exported names, given the symbol; nothing else may be exported.
EXPORT_SUFFIXES = ("", "_batch", "_track_type", "_manifest")

_SYMBOL_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def exported_names(symbol: str) -> list:
    return [symbol + s for s in EXPORT_SUFFIXES]


def check_symbol(symbol: str) -> str:
    if not _SYMBOL_RE.match(symbol or "") or symbol.startswith("effgen_abi"):
        raise ValueError(f"symbol {symbol!r} is not a valid C identifier for the exported function")
    return symbol


def templates_dir() -> Path:
    from effgen.config import shipped_dir

    return shipped_dir("templates", "abi.c.j2")


def template_env():
    import jinja2

    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir())),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def c_string_body(text: str) -> str:
    """Escape `text` for the inside of a C string literal (ASCII only; '?' escaped
    so no trigraph can form under -std=c99)."""
    out = []
    for ch in text:
        if ch in '\\"?':
            out.append("\\" + ch)
        elif 32 <= ord(ch) < 127:
            out.append(ch)
        else:
            raise ValueError(f"non-printable or non-ASCII character {ch!r} in manifest text")
    return "".join(out)


def render_abi(core_source: str, core_fn: str, *, symbol: str, n_inputs: int, input_names,
               output_names, manifest: dict, has_batch: bool = False, isa_fn: str = None,
               isa_variants=("portable",)) -> tuple:
    """Wrap backend core code into the exported Lamarr ABI; return (C source, header).

    `manifest` holds at least `backend` and `model_sha256`; input/output names and the
    effgen version are added here; `isa`, `cflags` and `compiler` are filled in by the
    C compiler. `isa_fn`, if given, names a static `int isa_fn(void)` of the core that
    returns the index in `isa_variants` of the code path in use at run time."""
    check_symbol(symbol)
    input_names, output_names = list(input_names), list(output_names)
    if len(input_names) != n_inputs:
        raise ValueError(f"{len(input_names)} input names for {n_inputs} inputs")
    if len(output_names) != 4:
        raise ValueError(f"the Lamarr efficiency ABI has 4 outputs, got {output_names}")
    info = dict(manifest)
    info.setdefault("backend", "unknown")
    info.setdefault("model_sha256", "unknown")
    info.update(symbol=symbol, effgen_version=__version__,
                inputs=input_names, outputs=output_names)
    for key in ("isa", "cflags", "compiler"):
        info.pop(key, None)
    head = json.dumps(info, ensure_ascii=True)
    assert head.endswith("}")
    env = template_env()
    env.filters["comment"] = lambda text: str(text).replace("*/", "* /")
    ctx = dict(
        symbol=symbol, backend=info["backend"], model_sha256=info["model_sha256"],
        effgen_version=__version__, n_inputs=n_inputs, n_outputs=len(output_names),
        core_source=core_source, core_fn=core_fn, has_batch=has_batch,
        isa_fn=isa_fn, isa_variants=[c_string_body(v) for v in isa_variants],
        manifest_head=c_string_body(head[:-1]),
        inputs=[(n, FEATURE_DOCS.get(n, "")) for n in input_names],
        outputs=[(n, OUTPUT_DOCS.get(n, "")) for n in output_names],
    )
    return tuple(_tidy(env.get_template(name).render(**ctx))
                 for name in ("abi.c.j2", "efficiency.h.j2"))


def _tidy(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.splitlines()) + "\n"


def python_track_type(probs, r) -> np.ndarray:
    """Reference of SQLamarr's random_category(p0, 0, 0, p1, p2) for rows of `probs`
    (n x >=3) and uniforms `r` (scalar or n): float32 accumulation in argument order,
    first index i with r < running sum, 5 if none. Returns int array of track types."""
    p = np.asarray(probs, dtype=np.float32)
    if p.ndim == 1:
        p = p[None, :]
    r = np.broadcast_to(np.asarray(r, dtype=np.float32), (p.shape[0],))
    zero = np.zeros(p.shape[0], dtype=np.float32)
    args = (p[:, 0], zero, zero, p[:, 1], p[:, 2])
    result = np.full(p.shape[0], 5, dtype=np.int64)
    undecided = np.ones(p.shape[0], dtype=bool)
    s = np.zeros(p.shape[0], dtype=np.float32)
    for i, a in enumerate(args):
        s = (s + a).astype(np.float32)
        hit = undecided & (r < s)
        result[hit] = i
        undecided &= ~hit
    return result
