"""The effgen C backend: a Chain (effgen.codegen.graph) plus a PreprocessingIR become one C99
file with the Lamarr ABI (effgen.codegen.abi).

Design for speed: weights are `static const float` arrays in the Keras (n_in, n_out)
row-major layout, so a dense layer is `acc[j] += x[i] * W[i][j]` over contiguous rows
of W, in column blocks whose accumulators stay in vector registers; sizes are
compile-time constants. The network is rendered once per code path (portable x86-64
and AVX2+FMA), picked at load time by an ifunc resolver inside the .so, so one
portable library uses AVX2/FMA where present (-DEFFGEN_NO_DISPATCH turns that off).
"""

from dataclasses import dataclass

import numpy as np

from effgen import schema
from effgen.codegen.abi import render_abi, template_env
from effgen.codegen.graph import Chain, Dense, Residual, Softmax
from effgen.codegen.preprocessing_ir import PreprocessingIR

TANH_IMPLS = ("fast", "libm")

# Code paths, each with its register geometry: `row_block` columns per block of the
# one-row kernel (8 vector accumulators), and the batch tile of `tile_rows` rows x
# `tile_block` columns (12-16 accumulators), so that each weight load serves a whole
# tile; blocks that divide the seed width (128) avoid a slow remainder block (AVX2:
# 3 x 32 ran 20% faster than 4 x 24 on the seed network). Measured on AMD EPYC (Zen 4).
# `madd` is the multiply-add (fmaf is one instruction where FMA is enabled).
VARIANTS = (
    {"name": "portable", "attr": "", "madd": "EFFGEN_MADD", "guard": "EFFGEN_PATH_PORTABLE",
     "row_block": 32, "tile_rows": 4, "tile_block": 12},
    {"name": "avx2", "attr": "EFFGEN_TARGET_AVX2 ", "madd": "fmaf", "guard": "EFFGEN_PATH_AVX2",
     "row_block": 64, "tile_rows": 3, "tile_block": 32},
    {"name": "avx512", "attr": "EFFGEN_TARGET_AVX512 ", "madd": "fmaf", "guard": "EFFGEN_PATH_AVX512",
     "row_block": 128, "tile_rows": 8, "tile_block": 32},
)
ISA_VARIANTS = ("baseline", "avx2+fma", "avx512f")


def c_float(v) -> str:
    """A float32 as a C literal that reads back to the same float."""
    v = np.float32(v)
    if not np.isfinite(v):
        raise ValueError(f"non-finite weight {v}")
    s = "%.9g" % float(v)
    if not any(ch in s for ch in ".en"):
        s += ".0"
    return s + "f"


def c_double(v) -> str:
    v = float(v)
    if not np.isfinite(v):
        raise ValueError(f"non-finite constant {v}")
    return repr(v)


def c_array(values, fmt, per_line=6, indent="    ") -> str:
    items = [fmt(v) for v in np.ravel(values)]
    lines = [", ".join(items[i:i + per_line]) for i in range(0, len(items), per_line)]
    return ",\n".join(indent + line for line in lines)


@dataclass
class _Layer:
    """One Dense or Residual op, ready for the templates."""
    index: int
    kind: str           # "dense" or "residual"
    n_in: int
    n_out: int
    activation: str
    weights: str
    bias: str


def blocks(n, width):
    """(start, width) column blocks covering n columns."""
    return [(s, min(width, n - s)) for s in range(0, n, width)]


def _layers(chain: Chain):
    layers = []
    for k, op in enumerate(chain.ops):
        if isinstance(op, Softmax):
            if k != len(chain.ops) - 1:
                raise ValueError(f"layer {op.name!r}: Softmax is only supported last")
            continue
        dense = op.dense if isinstance(op, Residual) else op
        if not isinstance(dense, Dense):
            raise ValueError(f"layer {getattr(op, 'name', op)!r}: unsupported op {type(op).__name__}")
        layers.append(_Layer(
            index=len(layers), kind="residual" if isinstance(op, Residual) else "dense",
            n_in=dense.n_in, n_out=dense.n_out, activation=dense.activation,
            weights=c_array(dense.kernel, c_float), bias=c_array(dense.bias, c_float)))
    return layers


def _preprocessing_context(ir: PreprocessingIR):
    tables, references, outputs = [], [], []
    for o in ir.outputs:
        if o.kind != "quantile":
            outputs.append({"kind": o.kind, "input_index": o.input_index})
            continue
        col = o.quantile
        n = len(col.quantiles)
        ref = next((i for i, r in enumerate(references)
                    if np.array_equal(r["array"], col.references)), None)
        if ref is None:
            ref = len(references)
            references.append({"array": col.references, "n": n,
                               "text": c_array(col.references, c_double, per_line=4)})
        first = col.first_equal
        tables.append({"column": col, "n": n, "n_repeated": int((first != np.arange(n)).sum()),
                       "quantiles": c_array(col.quantiles, c_double, per_line=4),
                       "first_equal": c_array(first, str, per_line=12),
                       "index_type": "short" if n < 32768 else "int"})
        outputs.append({"kind": "quantile", "input_index": o.input_index, "table": len(tables) - 1,
                        "ref": ref, "n": n})
    index_type = "int" if any(t["index_type"] == "int" for t in tables) else "short"
    for t in tables:
        t["index_type"] = index_type
    return {"tables": tables, "references": references, "index_type": index_type,
            "ir": ir, "outputs": outputs, "f32": ir.sklearn_dtype == "float32"}


def network_function(symbol="efficiency") -> str:
    """Name of the core's static `void f(float *out, const float *z)` evaluating the
    network alone on preprocessed features (used by the parity harness)."""
    return "effgen_network"


def generate_preprocessing(ir: PreprocessingIR, input_names=None) -> str:
    """C code defining `static void effgen_preprocess(float *z, const float *in)`."""
    return template_env().get_template("quantile.c.j2").render(
        input_names=input_names, **_preprocessing_context(ir))


def generate_activations(tanh="fast") -> str:
    """C code of the static activation functions (needs EFFGEN_INLINE defined)."""
    if tanh not in TANH_IMPLS:
        raise ValueError(f"tanh implementation {tanh!r}: expected one of {TANH_IMPLS}")
    return template_env().get_template("activations.c.j2").render(tanh=tanh)


def generate_core(chain: Chain, ir: PreprocessingIR, *, input_names=None, tanh="fast"):
    """The backend's core C code: returns (source, core_fn, has_batch, isa_fn)."""
    if tanh not in TANH_IMPLS:
        raise ValueError(f"tanh implementation {tanh!r}: expected one of {TANH_IMPLS}")
    if chain.n_inputs != ir.n_outputs:
        raise ValueError(f"the network takes {chain.n_inputs} inputs but the preprocessing "
                         f"produces {ir.n_outputs}")
    if chain.n_outputs != 4:
        raise ValueError(f"the network has {chain.n_outputs} outputs; the efficiency ABI needs 4")
    layers = _layers(chain)
    widths = [chain.n_inputs] + [layer.n_out for layer in layers]
    source = template_env().get_template("network.c.j2").render(
        preprocessing=generate_preprocessing(ir, input_names), layers=layers, n_inputs=ir.n_inputs,
        n_features=chain.n_inputs, n_outputs=4, softmax=chain.ends_with_softmax,
        max_width=max(widths), variants=VARIANTS, tanh=tanh, describe=chain.describe(),
        blocks=blocks, isa_variants=ISA_VARIANTS)
    return source, "effgen_forward", True, "effgen_isa"


def generate(chain: Chain, ir: PreprocessingIR, *, symbol="efficiency", manifest=None,
             input_names=None, output_names=None, tanh="fast"):
    """Full library source and header for `chain` with preprocessing `ir`."""
    input_names = list(input_names or schema.FEATURES)
    output_names = list(output_names or schema.OUTPUTS)
    if len(input_names) != ir.n_inputs:
        raise ValueError(f"{len(input_names)} input names for a preprocessing of {ir.n_inputs} inputs")
    core, core_fn, has_batch, isa_fn = generate_core(chain, ir, input_names=input_names, tanh=tanh)
    info = {"backend": "effgen", "network": chain.describe(), "tanh": tanh,
            "preprocessing_dtype": ir.sklearn_dtype}
    info.update(manifest or {})
    return render_abi(core, core_fn, symbol=symbol, n_inputs=ir.n_inputs,
                      input_names=input_names, output_names=output_names, manifest=info,
                      has_batch=has_batch, isa_fn=isa_fn, isa_variants=ISA_VARIANTS)
