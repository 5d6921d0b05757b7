"""The Lamarr ABI layer shared by every C backend.

A backend produces a `Core` (effgen.codegen.backends): static C99 code mapping the raw
features to the model's outputs (preprocessing included). `render_abi` wraps it into
the exported library interface of the model's kind (effgen.codegen.kinds); for the
efficiency kind:

    float *SYMBOL(float *out, const float *in);            Lamarr's entry point
    void SYMBOL_batch(float *out, const float *in, long n);
    int SYMBOL_track_type(const float *in, float r);        the draw Lamarr would make
    const char *SYMBOL_manifest(void);                      JSON description

and guarantees, whatever the backend: NaN input -> {1, 0, 0, 0}; outputs in [0, 1];
p0 + 0 + 0 + p1 + p2 accumulated in float never above 1 (Lamarr aborts otherwise).
The sigmoid kind exports SYMBOL, SYMBOL_batch, SYMBOL_draw (random_category(1 - p, p))
and SYMBOL_manifest (NaN input -> 0; output in [0, 1]); the generator kind
`float *SYMBOL(float *out, const float *in, const float *rnd)`, SYMBOL_batch(out, in,
rnd, n) and SYMBOL_manifest (NaN anywhere -> NaN outputs). Each kind's templates are
templates/abi/<kind>.{c,h}.j2.
The exported functions call each other only through static functions, so another
library defining the same names (RTLD_GLOBAL, LD_PRELOAD) cannot take their place.
"""

import json

from effgen import __version__
from effgen.codegen.backends import Core
from effgen.codegen.kinds import EFFICIENCY, ModelKind
from effgen.codegen.symbols import check_symbol
from effgen.config import shipped_dir

# Manifest keys the compiler fills in (the rest is known at export time).
BUILD_KEYS = ("isa", "cflags", "compiler")


def exported_names(symbol: str, kind: ModelKind = EFFICIENCY) -> list:
    """Every name the library exports, given the symbol; nothing else may be exported."""
    return kind.exported_names(symbol)


def templates_dir():
    return shipped_dir("templates", "abi/efficiency.c.j2")


def template_env():
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir())),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["comment"] = lambda text: str(text).replace("*/", "* /")
    return env


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


def library_manifest(core: Core, *, symbol: str, manifest: dict, kind: ModelKind = EFFICIENCY,
                     input_names=None, output_names=None) -> dict:
    """The manifest known at export time: `manifest` (at least backend and
    model_sha256) plus the core's info and function names, the kind, its inputs and
    outputs, the symbol and the effgen version. The library adds BUILD_KEYS."""
    info = {"backend": "unknown", "model_sha256": "unknown"}
    info.update(core.info)
    info.update(manifest)
    info.update(kind=kind.name, symbol=symbol, effgen_version=__version__,
                inputs=list(input_names or kind.inputs), outputs=list(output_names or kind.outputs),
                functions=core.functions(), isa_variants=list(core.isa_variants))
    if kind.name != EFFICIENCY.name:  # the efficiency manifest stays as it was
        info.update(family=kind.family, n_random=kind.noise_inputs,
                    signature="float *f(float *out, " + ", ".join(
                        f"const float *{p}" for p in kind.signature) + ")")
    for key in BUILD_KEYS:
        info.pop(key, None)
    return info


def render_abi(core: Core, *, symbol: str, manifest: dict, kind: ModelKind = EFFICIENCY,
               input_names=None, output_names=None) -> tuple:
    """Wrap a backend's core into the exported ABI of `kind`; return (C source, header).

    `input_names` / `output_names` default to the kind's (tests may rename them, not
    change their number). The source reads top-down: banner and contents, build
    guards, the core, the ABI functions, then the core's tables."""
    check_symbol(symbol)
    input_names = list(input_names or kind.inputs)
    output_names = list(output_names or kind.outputs)
    if len(input_names) != kind.n_inputs:
        raise ValueError(f"{len(input_names)} input names for the {kind.n_inputs} inputs "
                         f"of a {kind.name} model")
    if len(output_names) != kind.n_outputs:
        raise ValueError(f"the {kind.name} ABI has {kind.n_outputs} outputs, got {output_names}")
    info = library_manifest(core, symbol=symbol, manifest=manifest, kind=kind,
                            input_names=input_names, output_names=output_names)
    head = json.dumps(info, ensure_ascii=True)
    assert head.endswith("}")
    ctx = dict(
        symbol=symbol, kind=kind, backend=info["backend"], model_sha256=info["model_sha256"],
        effgen_version=__version__, n_inputs=kind.n_inputs, n_outputs=kind.n_outputs,
        n_random=kind.noise_inputs, postprocessing=info.get("postprocessing"),
        core=core, isa_variants=[c_string_body(v) for v in core.isa_variants],
        manifest_head=c_string_body(head[:-1]),
        inputs=[(n, kind.input_docs.get(n, "")) for n in input_names],
        outputs=[(n, kind.output_docs.get(n, "")) for n in output_names],
    )
    env = template_env()
    return tuple(_tidy(env.get_template(name).render(**ctx))
                 for name in (kind.source_template, kind.header_template))


def _tidy(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.splitlines()) + "\n"
