"""The effgen C backend: a Chain (effgen.codegen.graph) plus a PreprocessingIR become one C99
file with the Lamarr ABI (effgen.codegen.abi).

Design for speed: weights are `static const float` arrays packed in panels of 16
output columns in the order the kernels read them (pack_kernel), so each layer is one
sequential stream; a dense layer is `acc[j] = madd(x[i], W[i][j], acc[j])` for i in
order, with a panel group's accumulators in vector registers (one row) or a tile of
rows x columns (batches). One generic kernel per code path (sizes as arguments) keeps
gcc's work small. The network is rendered once per code path (portable x86-64, AVX2+FMA,
AVX-512F), picked at load time by an ifunc resolver inside the .so, so one portable
library uses AVX2/FMA where present (-DEFFGEN_NO_DISPATCH turns that off).
"""

import re
from dataclasses import dataclass, replace

import numpy as np

from effgen import schema
from effgen.codegen.abi import render_abi, template_env
from effgen.codegen.backends import Backend, Core, Request, register
from effgen.codegen.graph import Chain, Dense, Residual, Softmax
from effgen.codegen.postprocessing_ir import BOUNDS_THRESHOLD, PostprocessingIR, read_postprocessing
from effgen.codegen.preprocessing_ir import Output, PreprocessingIR, read_preprocessing

TANH_IMPLS = ("fast", "libm")

# Code paths, in the order of the dispatch index (the templates generate the
# preprocessor selection, the CPU test and the dispatch tables from this list).
#   isa            the manifest's name for the path
#   cpu            __builtin_cpu_supports features the path needs (dispatch)
#   target_macro   attribute macro on the path's functions; dispatch_target is its
#                  target("...") when dispatching, native_target when the baseline
#                  target already has the ISA (native_if, a preprocessor test)
#   lanes, vec, pfx  floats per vector register, its type and intrinsics prefix (the
#                  portable path is plain C: lanes 1)
# and the register geometry, in panels of PANEL (16) output columns: the one-row kernel
# keeps `row_panels` panels' accumulators (8 vector registers), the batch tile is
# `tile_rows` rows x `tile_panels` panels (12-16 accumulators), so that each weight
# load serves a whole tile; a batch goes through the layers in blocks of up to
# `block_tiles` tiles, panels outside and tiles inside, so that a panel's weights come
# from the level-2 cache once per block and from the level-1 cache for its other tiles
# (AVX2: 4 tiles of 6 rows, 12 KiB of activations per buffer beside an 8 KiB panel).
# The dense kernels are generic (one per code path, sizes as arguments) so gcc compiles
# them once, not once per layer. Measured on AMD EPYC (Zen 3): the AVX2 6 x 16 tile runs
# at about 96% of the FMA peak of c_harness/floors.c.
PANEL = 16
VARIANTS = (
    {"name": "portable", "isa": "baseline", "cpu": (), "target_macro": None,
     "native_if": None, "lanes": 1, "row_panels": 2, "tile_rows": 4, "tile_panels": 1, "block_tiles": 4},
    {"name": "avx2", "isa": "avx2+fma", "cpu": ("avx2", "fma"), "target_macro": "EFFGEN_TARGET_AVX2",
     "dispatch_target": "avx2,fma", "native_target": "",
     "native_if": "defined(__AVX2__) && defined(__FMA__)",
     "lanes": 8, "vec": "__m256", "pfx": "_mm256", "row_panels": 4, "tile_rows": 6, "tile_panels": 1, "block_tiles": 4},
    {"name": "avx512", "isa": "avx512f", "cpu": ("avx512f", "avx2", "fma"),
     "target_macro": "EFFGEN_TARGET_AVX512",
     "dispatch_target": "avx512f,avx2,fma,prefer-vector-width=512",
     "native_target": '__attribute__((target("prefer-vector-width=512")))',
     "native_if": "defined(__AVX512F__) && defined(__FMA__) && defined(__GNUC__) && !defined(__clang__)",
     "lanes": 16, "vec": "__m512", "pfx": "_mm512", "row_panels": 8, "tile_rows": 8, "tile_panels": 2,
     "block_tiles": 2},
)
ISA_VARIANTS = tuple(v["isa"] for v in VARIANTS)

# Functions every code path defines and the dispatcher exposes under effgen_<name>.
_DISPATCHED = (
    {"name": "forward", "type": "effgen_row_fn", "params": "float *out, const float *in",
     "args": "out, in", "unused": ""},
    {"name": "forward_batch", "type": "effgen_batch_fn",
     "params": "float *out, const float *in, long n", "args": "out, in, n", "unused": ""},
    {"name": "network", "type": "effgen_row_fn", "params": "float *out, const float *z",
     "args": "out, z", "unused": "EFFGEN_UNUSED "},
)


def _template_variants(vector_preprocess=False):
    """VARIANTS for the templates; `vector_preprocess`: the AVX paths call
    effgen_preprocess_vec (quantile columns present), else effgen_preprocess."""
    out = []
    for v in VARIANTS:
        v = dict(v, guard=f"EFFGEN_PATH_{v['name'].upper()}")
        v["attr"] = v["target_macro"] + " " if v["target_macro"] else ""
        v["preprocess"] = ("effgen_preprocess_vec" if vector_preprocess and v["lanes"] > 1
                           else "effgen_preprocess")
        out.append(v)
    return out


def c_float(v) -> str:
    """A float32 as a C literal that reads back to the same float."""
    v = np.float32(v)
    if not np.isfinite(v):
        raise ValueError(f"non-finite weight {v}")
    return _c_float_text(float(v))


def _c_float_text(v: float) -> str:
    s = "%.9g" % v
    if not any(ch in s for ch in ".en"):
        s += ".0"
    return s + "f"


def c_floats(values) -> list:
    """c_float of every value, checked at once (the weight tables: ~85k values)."""
    v = np.ravel(np.asarray(values, dtype=np.float32))
    if not np.isfinite(v).all():
        raise ValueError(f"non-finite weight {v[~np.isfinite(v)][0]}")
    return [_c_float_text(x) for x in v.tolist()]


def c_double(v) -> str:
    v = float(v)
    if not np.isfinite(v):
        raise ValueError(f"non-finite constant {v}")
    return repr(v)


def c_array(values, fmt, per_line=6, indent="    ") -> str:
    items = c_floats(values) if fmt is c_float else [fmt(v) for v in np.ravel(values)]
    lines = [", ".join(items[i:i + per_line]) for i in range(0, len(items), per_line)]
    return ",\n".join(indent + line for line in lines)


@dataclass
class _Layer:
    """One Dense or Residual op, ready for the templates."""
    index: int
    kind: str           # "dense" or "residual"
    title: str          # the Keras layer(s), for comments
    sym: str            # C prefix of its functions and tables, from the Keras name
    n_in: int
    n_out: int
    n_panels: int       # ceil(n_out / PANEL)
    activation: str
    weights: str        # packed (pack_kernel)
    bias: str           # zero-padded to n_panels * PANEL


def pack_kernel(kernel) -> np.ndarray:
    """The (n_in, n_out) Keras kernel in the order the dense kernels read it: panels of
    PANEL output columns (the last one zero-padded), each panel's n_in rows contiguous;
    shape (n_panels, n_in, PANEL)."""
    kernel = np.asarray(kernel, dtype=np.float32)
    n_in, n_out = kernel.shape
    n_panels = -(-n_out // PANEL)
    padded = np.zeros((n_in, n_panels * PANEL), dtype=np.float32)
    padded[:, :n_out] = kernel
    return np.ascontiguousarray(padded.reshape(n_in, n_panels, PANEL).transpose(1, 0, 2))


def pad_bias(bias) -> np.ndarray:
    bias = np.asarray(bias, dtype=np.float32)
    out = np.zeros(-(-len(bias) // PANEL) * PANEL, dtype=np.float32)
    out[:len(bias)] = bias
    return out


def network_cost(chain: Chain) -> dict:
    """What one particle's network costs: `macs` multiply-adds (the Keras kernels'
    sizes) and `weight_bytes`, the packed weight and bias tables the kernels stream."""
    macs = weight_bytes = 0
    for op in chain.ops:
        dense = op.dense if isinstance(op, Residual) else op
        if isinstance(dense, Dense):
            macs += dense.n_in * dense.n_out
            weight_bytes += 4 * (pack_kernel(dense.kernel).size + pad_bias(dense.bias).size)
    return {"macs": macs, "weight_bytes": weight_bytes}


def blocks(n, width):
    """(start, width) column blocks covering n columns."""
    return [(s, min(width, n - s)) for s in range(0, n, width)]


def plus(*terms) -> str:
    """C sum of the terms, leaving out literal zeros: plus(0, "j") == "j"."""
    kept = [str(t) for t in terms if str(t) != "0"]
    return " + ".join(kept) or "0"


def _layer_symbol(name, index, taken):
    """effgen_layer_<Keras name> as a C identifier, unique among every name the layer's
    functions and tables use (else the layer index is appended)."""
    base = re.sub(r"[^A-Za-z0-9]+", "_", str(name)).strip("_")[:48] or "layer"
    suffixes = ["_w", "_b"] + [f"{tile}_{v['name']}" for v in VARIANTS for tile in ("", "_tile")]
    sym = f"effgen_layer_{base}"
    while any(sym + s in taken for s in suffixes):
        sym = f"effgen_layer_{base}_{index}"
        base = f"{base}_{index}"
    taken.update(sym + s for s in suffixes)
    return sym


def _layers(chain: Chain):
    layers, taken = [], set()
    for k, op in enumerate(chain.ops):
        if isinstance(op, Softmax):
            if k != len(chain.ops) - 1:
                raise ValueError(f"layer {op.name!r}: Softmax is only supported last")
            continue
        dense = op.dense if isinstance(op, Residual) else op
        if not isinstance(dense, Dense):
            raise ValueError(f"layer {getattr(op, 'name', op)!r}: unsupported op {type(op).__name__}")
        residual = isinstance(op, Residual)
        title = (f"Layer {dense.name} + {op.name} (residual)" if residual
                 else f"Layer {dense.name} (dense)")
        layers.append(_Layer(
            index=len(layers), kind="residual" if residual else "dense", title=title,
            sym=_layer_symbol(dense.name, len(layers), taken),
            n_in=dense.n_in, n_out=dense.n_out, n_panels=-(-dense.n_out // PANEL),
            activation=dense.activation,
            weights=c_array(pack_kernel(dense.kernel), c_float, per_line=PANEL // 2),
            bias=c_array(pad_bias(dense.bias), c_float, per_line=PANEL // 2)))
    return layers


def search_knots(quantiles) -> np.ndarray:
    """The knots as floats for the knot search: each the smallest float >= the double
    knot, so that for every float x (inputs are float), qf <= x exactly when q <= x: the
    search finds the same knot with half the cache footprint. Non-finite where a knot
    lies beyond the float range (the search then stays in double)."""
    q = np.asarray(quantiles, dtype=np.float64)
    with np.errstate(over="ignore"):
        qf = q.astype(np.float32)
    below = qf.astype(np.float64) < q
    qf[below] = np.nextafter(qf[below], np.float32(np.inf))
    return qf


def interp_slopes(quantiles, references) -> np.ndarray:
    """Per knot j, the slope np.interp uses between knots j and j + 1 (float64, the same
    operations: (r[j + 1] - r[j]) / (q[j + 1] - q[j])), 0 where the interval is empty
    (repeated knots; never interpolated in) and for the last knot."""
    q = np.asarray(quantiles, dtype=np.float64)
    r = np.asarray(references, dtype=np.float64)
    dq = q[1:] - q[:-1]
    out = np.zeros(len(q))
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        out[:-1] = np.where(dq > 0, (r[1:] - r[:-1]) / np.where(dq > 0, dq, 1.0), 0.0)
    return out


def _c_slope(v) -> str:
    """A slope as a C double; an interval too narrow for a finite slope keeps the
    infinity the division would give."""
    v = float(v)
    return c_double(v) if np.isfinite(v) else ("HUGE_VAL" if v > 0 else "-HUGE_VAL")


def _preprocessing_context(ir: PreprocessingIR):
    tables, references, outputs = [], [], []
    for o in ir.outputs:
        if o.kind != "quantile":
            outputs.append({"kind": o.kind, "input_index": o.input_index, "z": len(outputs)})
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
        up = search_knots(col.quantiles)
        tables.append({"column": col, "n": n, "n_repeated": int((first != np.arange(n)).sum()),
                       "quantiles": c_array(col.quantiles, c_double, per_line=4),
                       "slopes": c_array(interp_slopes(col.quantiles, col.references), _c_slope,
                                         per_line=4),
                       "search": c_array(up, c_float, per_line=6) if np.isfinite(up).all() else None,
                       "knots_f": up, "search_n": n,
                       "first_equal": c_array(first, str, per_line=12),
                       "index_type": "short" if n < 32768 else "int"})
        outputs.append({"kind": "quantile", "input_index": o.input_index, "table": len(tables) - 1,
                        "ref": ref, "n": n, "z": len(outputs)})
    index_type = "int" if any(t["index_type"] == "int" for t in tables) else "short"
    for t in tables:
        t["index_type"] = index_type
    # quantile columns with the same number of knots are searched in lockstep
    sizes = sorted({o["n"] for o in outputs if o["kind"] == "quantile"})
    groups = [{"n": n, "cols": [o for o in outputs if o["kind"] == "quantile" and o["n"] == n]}
              for n in sizes]
    for g in groups:  # float knots (half the cache lines) where every column has them
        g["float"] = all(tables[o["table"]]["search"] is not None for o in g["cols"])
        _pivot_search(g, tables)
    # lanes of the vector norm.ppf (effgen_preprocess_vec): quantile columns in search order
    lane = 0
    for g in groups:
        for o in g["cols"]:
            o["lane"], lane = lane, lane + 1
    return {"tables": tables, "references": references, "index_type": index_type, "qt_groups": groups,
            "ir": ir, "outputs": outputs, "f32": ir.sklearn_dtype == "float32",
            "n_quantile": lane, "n_quantile_lanes": -(-lane // 4) * 4, "pivot_block": PIVOT_BLOCK}


# The AVX paths' two-level knot search (effgen_preprocess_vec): blocks of PIVOT_BLOCK float
# knots (one compare of 4 vectors of 8), found by counting the block pivots (every
# PIVOT_BLOCK-th knot, 8 columns per vector) <= x; for groups of float knots with at most
# PIVOT_MAX pivots (n <= 2080), else the bisection. PIVOT_BLOCK <= 32: one bit per knot
# of a block in an unsigned mask.
PIVOT_BLOCK = 32
PIVOT_MAX = 64


def _pivot_search(group, tables):
    """Mark `group` for the two-level search where it applies: its float knot tables padded
    to whole blocks with NaN (never <= x), and per chunk of 8 columns the pivots, lane by
    lane (NaN in unused lanes)."""
    n_blocks = -(-group["n"] // PIVOT_BLOCK)
    group["pivot"] = group["float"] and n_blocks - 1 <= PIVOT_MAX
    if not group["pivot"]:
        return
    group["n_pivots"] = n_blocks - 1
    group["chunks"] = []
    for first in range(0, len(group["cols"]), 8):
        cols = group["cols"][first:first + 8]
        piv = np.full((n_blocks - 1, 8), np.nan, dtype=np.float32)
        for lane, o in enumerate(cols):
            t = tables[o["table"]]
            piv[:, lane] = t["knots_f"][PIVOT_BLOCK::PIVOT_BLOCK]
        rows = ["{" + ", ".join(c_float(v) if np.isfinite(v) else "NAN" for v in r) + "}" for r in piv]
        group["chunks"].append({"first": first, "cols": cols, "pivots": ",\n".join("            " + r for r in rows)})
    for o in group["cols"]:
        t = tables[o["table"]]
        pad = n_blocks * PIVOT_BLOCK - t["n"]
        t["search_n"] = n_blocks * PIVOT_BLOCK
        if pad:
            t["search"] += ",\n    " + ", ".join(["NAN"] * pad)


def generate_preprocessing(ir: PreprocessingIR, input_names=None) -> str:
    """C code defining `static void effgen_preprocess(float *z, const float *in)` with
    its quantile tables (declarations, code, then definitions), compilable alone
    after the ABI's includes."""
    ctx = _preprocessing_context(ir)
    env = _env()
    decls = env.from_string(
        "{% for t in preprocessing.tables %}static const double effgen_qt{{ loop.index0 }}_q[{{ t.n }}];\n"
        "{% if t.search %}static const float effgen_qt{{ loop.index0 }}_qf[{{ t.search_n }}];\n{% endif %}"
        "static const double effgen_qt{{ loop.index0 }}_slope[{{ t.n }}];\n"
        "static const {{ preprocessing.index_type }} effgen_qt{{ loop.index0 }}_first[{{ t.n }}];\n"
        "{% endfor %}{% for r in preprocessing.references %}"
        "static const double effgen_qt_ref{{ loop.index0 }}[{{ r.n }}];\n{% endfor %}")
    kw = dict(input_names=input_names, preprocessing=ctx, layers=[], **ctx)
    return "\n".join(env.get_template(name).render(**kw) if name else decls.render(**kw)
                     for name in (None, "effgen/quantile.c.j2", "effgen/tables.c.j2"))


def generate_activations(tanh="fast") -> str:
    """C code of the static activation functions (needs EFFGEN_INLINE defined)."""
    if tanh not in TANH_IMPLS:
        raise ValueError(f"tanh implementation {tanh!r}: expected one of {TANH_IMPLS}")
    return _env().get_template("effgen/activations.c.j2").render(tanh=tanh)


def _tanh_coefficients(tanh):
    """[("p", [c4, .., c0]), ("q", [...])]: the scalar fast tanh's constants as C literals,
    read from its template (one source) for the vector tanh of the AVX code paths."""
    text = generate_activations("fast")
    out = []
    for name in ("p", "q"):
        line = re.search(rf"^\s*{name} = (.*);$", text, re.M).group(1)
        out.append((name, re.findall(r"\d[\d.]*(?:e[-+]?\d+)?f", line)))
    return out


def _env():
    env = template_env()
    env.globals.update(blocks=blocks, plus=plus)
    return env


def generate_core(chain: Chain, ir: PreprocessingIR, *, input_names=None, tanh="fast",
                  n_outputs=len(schema.OUTPUTS)) -> Core:
    """The backend's core: preprocessing and network for every code path, dispatch,
    and the weight and quantile tables (placed last by the ABI layer)."""
    if tanh not in TANH_IMPLS:
        raise ValueError(f"tanh implementation {tanh!r}: expected one of {TANH_IMPLS}")
    if chain.n_inputs != ir.n_outputs:
        raise ValueError(f"the network takes {chain.n_inputs} inputs but the preprocessing "
                         f"produces {ir.n_outputs}")
    if chain.n_outputs != n_outputs:
        raise ValueError(f"the network has {chain.n_outputs} outputs; the ABI needs {n_outputs}")
    layers = _layers(chain)
    widths = [chain.n_inputs] + [layer.n_out for layer in layers]
    pre = _preprocessing_context(ir)
    ctx = dict(pre, preprocessing=pre, input_names=input_names, layers=layers,
               n_inputs=ir.n_inputs, n_features=chain.n_inputs, n_outputs=n_outputs,
               softmax=chain.ends_with_softmax, max_width=max(widths),
               stride=-(-max(widths) // PANEL) * PANEL, panel=PANEL,
               # a residual layer of a partial panel adds x's scratch columns: keep them zero
               padded=any(layer.kind == "residual" and layer.n_out % PANEL for layer in layers),
               activations=sorted({"tanh", "linear"} | {layer.activation for layer in layers}),
               tanh_coefficients=_tanh_coefficients(tanh),
               variants=_template_variants(vector_preprocess=bool(pre["tables"])),
               dispatched=_DISPATCHED, tanh=tanh,
               describe=chain.describe())
    env = _env()
    source = env.get_template("effgen/core.c.j2").render(**ctx)
    tables = env.get_template("effgen/tables.c.j2").render(**ctx)
    n_paths = len(VARIANTS)
    contents = (["2.1 macros and code paths", "2.2 table declarations",
                 "2.3 preprocessing: QuantileTransformer maths, effgen_preprocess",
                 "2.4 activations" + (", softmax" if chain.ends_with_softmax else "")]
                + [f"2.{5 + k} code path {v['name']}: layers "
                   + ", ".join(layer.sym.removeprefix("effgen_layer_") for layer in layers)
                   + ", the network, forward passes" for k, v in enumerate(VARIANTS)]
                + [f"2.{5 + n_paths} dispatch: effgen_forward, effgen_forward_batch, effgen_network"])
    return Core(source=source, row_fn="effgen_forward", batch_fn="effgen_forward_batch",
                network_fn="effgen_network", isa_fn="effgen_isa", isa_variants=ISA_VARIANTS,
                tables=tables, contents=tuple(contents),
                info={"network": chain.describe(), "tanh": tanh,
                      "preprocessing_dtype": ir.sklearn_dtype})


def _generate(request: Request) -> Core:
    options = request.options
    ir = read_preprocessing(request.preprocessing, options.get("sklearn_dtype", "float64"))
    if request.kind.family == "generator":
        return generate_generator_core(request.chain, ir, postprocessing=request.postprocessing,
                                       input_names=list(request.kind.inputs),
                                       output_names=list(request.kind.outputs),
                                       tanh=options.get("tanh", "fast"))
    return generate_core(request.chain, ir, input_names=list(request.kind.inputs),
                         tanh=options.get("tanh", "fast"), n_outputs=request.kind.n_outputs)


BACKEND = register(Backend(
    name="effgen", generate=_generate, kinds=("efficiency", "sigmoid", "generator"),
    description="effgen's own C: exact QuantileTransformer, blocked dense kernels, "
                "fast tanh, AVX2/AVX-512 dispatch"))


# ---- generators: f(out, in, rnd) ---------------------------------------------------------

def _with_noise(ir: PreprocessingIR, n_random: int) -> PreprocessingIR:
    """The preprocessing of the joined row [in, rnd]: tX's outputs, then the noise
    passed through unscaled (the model's Concatenate([features, noise]))."""
    noise = [Output("passthrough", ir.n_inputs + k) for k in range(n_random)]
    return replace(ir, n_inputs=ir.n_inputs + n_random, outputs=list(ir.outputs) + noise)


def _generator_postprocessing(postprocessing, n_outputs, output_names=None) -> tuple:
    """(code, tables, function, description) of the in-place inverse of the fitted output
    transform tY (generate_postprocessing, below); tY None: an identity function."""
    if postprocessing is None:
        code = (f"\n/* No output transform: the network's {n_outputs} outputs are the physical values. */\n"
                "static void effgen_post_postprocess(float *y)\n{\n    (void)y;\n}\n")
        return code, "", "effgen_post_postprocess", None
    ir = read_postprocessing(postprocessing, n_outputs)
    post = generate_postprocessing(ir, prefix="effgen_post", output_names=output_names)
    return "\n" + post.source, post.tables, post.function, post.description


def generate_generator_core(chain: Chain, ir: PreprocessingIR, *, postprocessing=None,
                            input_names=None, output_names=None, tanh="fast") -> Core:
    """A generator's core: effgen's preprocessing and network (generate_core) over the
    joined row [in, rnd], then tY's inverse; row_fn(out, in, rnd), batch_fn(out, in,
    rnd, n) and network_fn(out, z) with z = [tX(in), rnd]."""
    if not chain.n_random:
        raise ValueError("generate_generator_core: the chain has no noise input")
    if chain.n_features != ir.n_outputs:
        raise ValueError(f"the network takes {chain.n_features} features but the preprocessing "
                         f"produces {ir.n_outputs}")
    names = list(input_names or [f"in{i}" for i in range(ir.n_inputs)])
    names += [f"rnd[{k}]" for k in range(chain.n_random)]
    base = generate_core(chain, _with_noise(ir, chain.n_random), input_names=names, tanh=tanh,
                         n_outputs=chain.n_outputs)
    post_code, post_tables, post_fn, post_description = _generator_postprocessing(
        postprocessing, chain.n_outputs, output_names)
    section = len(base.contents) + 1
    wrapper = _env().get_template("effgen/generator.c.j2").render(
        section=section, n_inputs=ir.n_inputs, n_random=chain.n_random,
        n_outputs=chain.n_outputs, forward=base.row_fn, forward_batch=base.batch_fn,
        postprocess=post_fn)
    info = dict(base.info, postprocessing=post_description)
    return replace(base, source=base.source + post_code + wrapper, row_fn="effgen_generate",
                   batch_fn="effgen_generate_batch",
                   tables=base.tables + ("\n" + post_tables if post_tables else ""),
                   contents=base.contents + (f"2.{section} generator: tY inverse "
                                             f"({post_fn}), effgen_generate, "
                                             f"effgen_generate_batch",), info=info)


def generate(chain: Chain, ir: PreprocessingIR, *, symbol="efficiency", manifest=None,
             input_names=None, output_names=None, tanh="fast"):
    """Full library source and header for `chain` with preprocessing `ir`."""
    input_names = list(input_names or schema.FEATURES)
    output_names = list(output_names or schema.OUTPUTS)
    if len(input_names) != ir.n_inputs:
        raise ValueError(f"{len(input_names)} input names for a preprocessing of {ir.n_inputs} inputs")
    core = generate_core(chain, ir, input_names=input_names, tanh=tanh)
    return render_abi(core, symbol=symbol, manifest={"backend": "effgen", **(manifest or {})},
                      input_names=input_names, output_names=output_names)


# ---- postprocessing: the inverse of the output transform tY -------------------------

@dataclass(frozen=True)
class PostprocessingCode:
    """C for the inverse of tY (see generate_postprocessing).

    `source`: tentative declarations of the tables, the helpers and
        `static void <function>(float *y)`; needs <math.h> (erf, erfc, fabs).
    `tables`: the tables' definitions, to go after `source` (e.g. in Core.tables, which
        the ABI layer puts at the end of the file).
    `function`: the name of the in-place function; `n_features`: the length of y."""
    source: str
    tables: str
    function: str
    n_features: int
    description: str

    @property
    def text(self) -> str:
        """source then tables: compilable alone after #include <math.h>."""
        return self.source + "\n" + self.tables


def _postprocessing_steps(ir, prefix):
    steps = []
    for k, s in enumerate(ir.steps):
        step = {"kind": s.kind, "sym": f"{prefix}_s{k}", "n_features": s.n_features,
                "title": "", "label": s.label, "scale": None, "mean": None}
        if s.kind == "quantile":
            step.update(title=f"{s.label}: norm.cdf, then np.interp onto quantiles_",
                        n_quantiles=len(s.references),
                        quantiles=c_array(s.quantiles.T, c_double, per_line=4),
                        references=c_array(s.references, c_double, per_line=4))
        elif s.kind == "scale":
            parts = (["* scale_"] if s.scale is not None else []) + \
                    (["+ mean_"] if s.mean is not None else [])
            step.update(title=f"{s.label}: x {' then '.join(parts) or 'unchanged'}",
                        scale=None if s.scale is None else c_array(s.scale, c_double, per_line=4),
                        mean=None if s.mean is None else c_array(s.mean, c_double, per_line=4))
        else:
            step.update(title=f"{s.label}: x @ eig.T",
                        matrix=c_array(s.matrix, c_double, per_line=4))
        steps.append(step)
    return steps


def generate_postprocessing(ir: PostprocessingIR, *, prefix="effgen_post", output_names=None) -> PostprocessingCode:
    """C for the inverse of an output transform: the interface the generator kinds use.

    `ir` is a PostprocessingIR (effgen.codegen.postprocessing_ir.read_postprocessing /
    read_postprocessing_file, which also check tY's width against the model). Returns
    a PostprocessingCode whose `source` defines

        static void <prefix>_postprocess(float *y)

    turning the network's `ir.n_features` linear outputs into physical units in place
    (tY.inverse_transform as scikit-learn runs it on float64; computed in double,
    rounded to float once). Every name it defines starts with `prefix`, so several
    models' postprocessing can share one file with distinct prefixes. `tables`
    defines the data `source` declares; put it after `source` (Core.tables).
    `output_names` (optional) only annotate the comments."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", prefix):
        raise ValueError(f"prefix {prefix!r} is not a C identifier")
    if output_names is not None and len(output_names) != ir.n_features:
        raise ValueError(f"{len(output_names)} output names for a tY of {ir.n_features} columns")
    steps = _postprocessing_steps(ir, prefix)
    fn = f"{prefix}_postprocess"
    ctx = dict(ir=ir, steps=steps, prefix=prefix, fn=fn, output_names=output_names,
               bounds=c_double(BOUNDS_THRESHOLD),
               has_quantile=any(s["kind"] == "quantile" for s in steps),
               has_matrix=any(s["kind"] == "matrix" for s in steps))
    template = _env().get_template("effgen/postprocessing.c.j2")
    return PostprocessingCode(source=template.render(part="code", **ctx),
                              tables=template.render(part="tables", **ctx),
                              function=fn, n_features=ir.n_features, description=ir.description)
