"""The `scikinc` backend: the Lamarr production route, kept as the reference.

scikinC converts sklearn transformers, Pipelines and keras Sequential models into C,
but not Functional models. The seed network's residual blocks are therefore rewritten
as one custom keras layer, `ResidualDense` (y = x + act(x W + b)), for which a layer
converter is registered in `scikinC.layers` (where KerasSequentialConverter looks a
layer class name up). The preprocessing ColumnTransformer and that Sequential model
are converted together as one sklearn Pipeline, so preprocessing and network end up
in the same C function, as in production.

scikinC writes C++-flavoured source (`extern "C"`, one `#define FLOAT_T` and banner per
converter, a timestamp) and exports every helper. The output is post-processed into
plain C99: no `extern "C"`, FLOAT_T spelled `float`, every function `static`, helpers
that the pipeline never calls (the `_inverse` transforms) removed, banners dropped so
that the same model always gives the same bytes. The numerics are scikinC's own:
quantile transform by bisection + linear interpolation and a 4096-point normal table
(error against sklearn up to ~2e-4 on the transformed features), float dot products,
libm tanh, softmax in double.

Generators (f(out, in, rnd), DOMAIN.md section 8) are built the way LHCb deploys
resolution and covariance (lb-trksim-train, notebooks/gan_pipelines.c): scikinC converts
`<p>_tX` (the preprocessing), `<p>_dnn` (the network as a Sequential) and `<p>_tY` (the
output transform, whose converter also writes `<p>_tY_inverse`) separately, and a
hand-written wrapper runs tX into a buffer, appends the noise unscaled, runs the network
in place and applies `<p>_tY_inverse`. scikinC 0.2.9 has inverse converters for
QuantileTransformer (bisection on linspace(1e-7, 1 - 1e-7) and a 4096-point float
normal table), StandardScaler, Pipeline (all steps invertible) and, for LHCb's sake,
DecorrTransformer (found by class name: x @ eig.T in float), so every tY effgen
supports converts as is. A sigmoid classifier (acceptance) is the classifier route
above with a Dense(1, sigmoid) last: scikinC's sigmoid is 1 / (1 + exp(-x)) in double.
"""

import functools
import re

from effgen.codegen.backends import Backend, Core, Request, register
from effgen.codegen.graph import Dense, Residual, Softmax, UnsupportedModelError, read_chain
from effgen.codegen.postprocessing_ir import read_postprocessing
from effgen.provenance import preprocessing_width

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def _c_prefix(symbol: str) -> str:
    # Internal names must not clash with the ABI layer's exported <symbol>_* names.
    return f"scikinc_{symbol}"


def step_function(symbol: str, step: str) -> str:
    """C name of a pipeline step's function ('preprocessing' or 'network') in the core
    source, e.g. to test the network alone; the pipeline itself is step ''."""
    return _c_prefix(symbol) + (f"_{step}" if step else "")


def core_function(symbol: str) -> str:
    return f"{_c_prefix(symbol)}_core"


@functools.cache
def residual_dense_class():
    """The keras layer standing for Add()([x, Dense(x)]); built lazily (keras import)."""
    import keras

    class ResidualDense(keras.layers.Layer):
        """y = x + activation(x @ kernel + bias), with a square kernel."""

        def __init__(self, units, activation="linear", **kwargs):
            super().__init__(**kwargs)
            self.units = units
            self.activation = keras.activations.get(activation)

        def build(self, input_shape):
            if input_shape[-1] != self.units:
                raise ValueError(f"{self.name}: input width {input_shape[-1]} != units {self.units}")
            self.kernel = self.add_weight(shape=(self.units, self.units), name="kernel")
            self.bias = self.add_weight(shape=(self.units,), name="bias", initializer="zeros")

        def call(self, x):
            # Same operations, in the same order, as keras' Dense followed by Add.
            return x + self.activation(keras.ops.add(keras.ops.matmul(x, self.kernel), self.bias))

        def compute_output_shape(self, input_shape):
            return input_shape

    return ResidualDense


@functools.cache
def register_layer_converters():
    """Make scikinC's KerasSequentialConverter accept ResidualDense layers."""
    import scikinC.layers
    from scikinC._tools import array2c

    class ResidualDenseConverter(scikinC.layers.Dense):
        """scikinC's Dense converter plus the skip connection: ret[i] += input[i]."""

        def definition(self):
            kernel, bias = self.layer.get_weights()
            n_in, n_out = kernel.shape
            return """
        extern "C"
        FLOAT_T* %(layername)s (FLOAT_T* ret, const FLOAT_T* input)
        {
            int i, j;
            const FLOAT_T kernel[%(nY)d][%(nX)d] = %(kernel_values)s;
            const FLOAT_T bias[%(nY)d] = %(bias_values)s;

            for (i=0; i < %(nY)d; ++i)
            {
              ret[i] = bias[i];
              const FLOAT_T *row = kernel[i];
              for (j=0; j<%(nX)d; ++j)
                ret[i] += input[j] * row[j];

              %(activate)s
              ret[i] = input[i] + ret[i];
            }

            return ret;
        }
        """ % dict(
                layername=self.name,
                nX=n_in,
                nY=n_out,
                kernel_values=array2c(kernel.T),
                bias_values=array2c(bias),
                activate=self.activate("ret[i]"),
            )

    scikinC.layers.ResidualDense = ResidualDenseConverter
    return ResidualDenseConverter


def to_sequential(chain):
    """The chain as a keras Sequential model (Dense, ResidualDense, Softmax layers)
    carrying the same weights, which is what scikinC can convert."""
    import keras

    if not chain.ops or isinstance(chain.ops[0], Softmax):
        # KerasSequentialConverter reads the input width from the first layer's kernel.
        raise UnsupportedModelError(
            f"scikinc backend: the network must start with a Dense layer, got {chain.describe()}")
    layers, weights = [], []
    for i, op in enumerate(chain.ops):
        if isinstance(op, Dense):
            layers.append(keras.layers.Dense(op.n_out, activation=op.activation, name=f"dense_{i}"))
            weights.append([op.kernel, op.bias])
        elif isinstance(op, Residual):
            cls = residual_dense_class()
            layers.append(cls(op.n_out, activation=op.dense.activation, name=f"residual_{i}"))
            weights.append([op.dense.kernel, op.dense.bias])
        else:
            layers.append(keras.layers.Softmax(name=f"softmax_{i}"))
            weights.append([])
    model = keras.Sequential([keras.Input((chain.n_inputs,))] + layers, name="network")
    for layer, w in zip(layers, weights):
        if w:
            layer.set_weights(w)
    return model


def scikinc_source(model, preprocessing, *, symbol="efficiency"):
    """scikinC's own output for Pipeline([preprocessing, network]), untouched."""
    import scikinC
    from sklearn.pipeline import Pipeline

    if not _IDENTIFIER.match(symbol):
        raise ValueError(f"symbol {symbol!r} is not a C identifier")
    chain = read_chain(model)
    # what the network receives is the preprocessing's output (a ColumnTransformer may
    # drop raw columns), not its input
    n_out = preprocessing_width(preprocessing)
    if n_out != chain.n_inputs:
        raise ValueError(
            f"preprocessing {type(preprocessing).__name__} outputs {n_out} features but model "
            f"{model.name!r} takes {chain.n_inputs}")
    register_layer_converters()
    # sklearn validates steps only in fit(), so a keras model can be the last step;
    # PipelineConverter only reads `.steps`.
    pipeline = Pipeline([("preprocessing", preprocessing), ("network", to_sequential(chain))])
    return scikinC.convert({step_function(symbol, ""): pipeline})


_BANNER = re.compile(r"^/\*{20,}/\n(?:/\*.*\*/\n)*?/\*{20,}/\n", re.M)
_DEFINITION = re.compile(r"^[ \t]*float\s*\*?\s*([A-Za-z_]\w*)\s*\([^)]*\)\s*\{", re.M)


def _functions(source):
    """{name: (start, end)} of every top-level function definition."""
    spans = {}
    for match in _DEFINITION.finditer(source):
        depth, pos = 0, match.end() - 1
        while True:
            ch = source[pos]
            depth += (ch == "{") - (ch == "}")
            pos += 1
            if depth == 0:
                break
        spans[match.group(1)] = (match.start(), pos)
    return spans


_BUFFERS = re.compile(r"^[ \t]*float bufin\[\d+\], bufout\[\d+\];[ \t]*\n", re.M)


def _drop_unused_buffers(function):
    """scikinC's ColumnTransformer declares bufin/bufout even when every column is
    passed through; unused, they fail -Wall -Werror builds."""
    if function.count("bufin") == 1 and function.count("bufout") == 1:
        return _BUFFERS.sub("", function)
    return function


def _c99_functions(source, roots):
    """scikinC's output rewritten into C99 static functions, keeping only those
    reachable from `roots` (in source order)."""
    source = _BANNER.sub("", source)
    source = re.sub(r"^\s*#define FLOAT_T float\s*$", "", source, flags=re.M)
    source = re.sub(r"^\s*#include <math.h>\s*$", "", source, flags=re.M)
    source = re.sub(r'extern\s+"C"\s*', "", source)
    source = re.sub(r"\bFLOAT_T\b", "float", source)

    spans = _functions(source)
    missing = [r for r in roots if r not in spans]
    if missing:
        raise RuntimeError(f"scikinC output has no function {missing[0]!r}; found {sorted(spans)}")
    reachable, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        if name in reachable:
            continue
        reachable.add(name)
        start, end = spans[name]
        body = source[start:end]
        todo += [f for f in spans if f != name and re.search(rf"\b{f}\b", body)]
    # scikinC defines every function before its first use, so source order works.
    kept = [_drop_unused_buffers(source[s:e].strip())
            for name, (s, e) in sorted(spans.items(), key=lambda kv: kv[1]) if name in reachable]
    out = "\n\n".join("static " + text for text in kept)
    if re.search(r"\bFLOAT_T\b|\bextern\b|#define", out):
        raise RuntimeError("scikinC output kept an extern/FLOAT_T/#define after rewriting")
    return out


def to_c99(source, root, core_fn):
    """Rewrite scikinC's output into C99 with only static functions reachable from
    `root`, plus `static void core_fn(float *out, const float *in)` calling it."""
    return (
        "/* Generated by effgen's scikinc backend from scikinC's conversion of the\n"
        " * preprocessing + network pipeline. Do not edit. */\n"
        "#include <math.h>\n\n"
        + _c99_functions(source, [root])
        + f"\n\nstatic void {core_fn}(float *out, const float *in)\n"
        f"{{\n    {root}(out, in);\n}}\n"
    )


def generate_core(model, preprocessing, *, symbol="efficiency") -> Core:
    """C99 core for raw features -> probabilities through scikinC: entry point
    `static void <core_fn>(float *out, const float *in)`, the network alone as the
    pipeline's 'network' step. Every function in the source is static: exporting
    symbols is the ABI layer's job.

    Raises UnsupportedModelError (naming the layer) for graphs effgen cannot deploy."""
    core_fn = core_function(symbol)
    source = to_c99(scikinc_source(model, preprocessing, symbol=symbol),
                    root=step_function(symbol, ""), core_fn=core_fn)
    network = step_function(symbol, "network")
    return Core(source=source, row_fn=core_fn,
                network_fn=network if re.search(rf"\b{network}\s*\(", source) else None,
                contents=("scikinC's functions (preprocessing, network layers), then the core",))


def generator_function(symbol: str, part: str) -> str:
    """C name of a generator's scikinC function: part 'tX', 'dnn' or 'tY_inverse'."""
    return f"{_c_prefix(symbol)}_{part}"


def scikinc_generator_source(chain, preprocessing, postprocessing, *, symbol):
    """scikinC's own output for a generator's three parts, as LHCb converts them:
    {<p>_tX: tX, <p>_dnn: the network as a Sequential, <p>_tY: tY} (tY may be None)."""
    import scikinC

    register_layer_converters()
    parts = {generator_function(symbol, "tX"): preprocessing,
             generator_function(symbol, "dnn"): to_sequential(chain)}
    if postprocessing is not None:
        parts[generator_function(symbol, "tY")] = postprocessing
    return scikinC.convert(parts)


def _check_generator(chain, preprocessing, postprocessing, n_random, symbol):
    if not _IDENTIFIER.match(symbol):
        raise ValueError(f"symbol {symbol!r} is not a C identifier")
    if not 0 < n_random < chain.n_inputs:
        raise ValueError(f"a generator needs 0 < n_random < {chain.n_inputs} network inputs, "
                         f"got n_random = {n_random}")
    n_features = preprocessing_width(preprocessing)
    if n_features + n_random != chain.n_inputs:
        raise ValueError(f"preprocessing outputs {n_features} features and the noise is "
                         f"{n_random} wide, but the network takes {chain.n_inputs} inputs")
    if postprocessing is not None:
        # the same refusals (by step) and width check as effgen's own backend
        read_postprocessing(postprocessing, chain.n_outputs)
    return n_features


def generate_generator_core(chain, preprocessing, postprocessing=None, *, symbol, n_random=None) -> Core:
    """C99 core of a generator through scikinC, LHCb's production route:
    `static void <core_fn>(float *out, const float *in, const float *rnd)` = tX(in), the
    noise appended unscaled, the network, then tY's inverse (none: the network's outputs
    as they are). `n_random` defaults to `chain.n_random`. The network alone is
    `<p>_dnn(out, z)` with z = [tX(in), rnd] (Core.network_fn)."""
    n_random = int(getattr(chain, "n_random", 0) if n_random is None else n_random)
    n_features = _check_generator(chain, preprocessing, postprocessing, n_random, symbol)
    tx, dnn = generator_function(symbol, "tX"), generator_function(symbol, "dnn")
    roots = [tx, dnn] + ([generator_function(symbol, "tY_inverse")] if postprocessing is not None else [])
    functions = _c99_functions(
        scikinc_generator_source(chain, preprocessing, postprocessing, symbol=symbol), roots)
    n_out, core_fn = chain.n_outputs, core_function(symbol)
    if postprocessing is not None:
        finish = f"    {roots[2]}(out, buf);\n"
    else:
        finish = f"    for (i = 0; i < {n_out}; ++i)\n        out[i] = buf[i];\n"
    wrapper = (
        f"\n\n/* LHCb's hand-written wrapper (lb-trksim-train, notebooks/gan_pipelines.c):\n"
        f" * tX into a buffer, the {n_random} noise values appended unscaled, the network in\n"
        f" * place, then the inverse of the output transform. */\n"
        f"static void {core_fn}(float *out, const float *in, const float *rnd)\n{{\n"
        f"    float buf[{max(chain.n_inputs, n_out)}];\n    int i;\n"
        f"    {tx}(buf, in);\n"
        f"    for (i = 0; i < {n_random}; ++i)\n        buf[{n_features} + i] = rnd[i];\n"
        f"    {dnn}(buf, buf);\n" + finish + "}\n")
    source = ("/* Generated by effgen's scikinc backend from scikinC's conversion of the\n"
              " * generator's preprocessing, network and output transform. Do not edit. */\n"
              "#include <math.h>\n\n" + functions + wrapper)
    return Core(source=source, row_fn=core_fn, network_fn=dnn,
                contents=("scikinC's functions (tX, network layers, tY's inverse), then "
                          "LHCb's wrapper as the core",),
                info={"postprocessing": None if postprocessing is None
                      else type(postprocessing).__name__})


def _generate(request: Request) -> Core:
    try:
        import scikinC  # noqa: F401
    except ImportError as err:
        from effgen.errors import ExportError

        raise ExportError(f"the scikinc backend is not available ({err})") from err
    if getattr(request.kind, "family", "classifier") == "generator":
        return generate_generator_core(request.chain, request.preprocessing,
                                       getattr(request, "postprocessing", None),
                                       symbol=request.symbol)
    return generate_core(request.model, request.preprocessing, symbol=request.symbol)


BACKEND = register(Backend(
    name="scikinc", generate=_generate, kinds=("efficiency", "sigmoid", "generator"),
    description="scikinC's conversion (the Lamarr production route), as the reference"))
