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
"""

import functools
import re

from effgen.codegen.backends import Backend, Core, Request, register
from effgen.codegen.graph import Dense, Residual, Softmax, UnsupportedModelError, read_chain

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
    from effgen.provenance import preprocessing_width

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


def to_c99(source, root, core_fn):
    """Rewrite scikinC's output into C99 with only static functions reachable from
    `root`, plus `static void core_fn(float *out, const float *in)` calling it."""
    source = _BANNER.sub("", source)
    source = re.sub(r"^\s*#define FLOAT_T float\s*$", "", source, flags=re.M)
    source = re.sub(r"^\s*#include <math.h>\s*$", "", source, flags=re.M)
    source = re.sub(r'extern\s+"C"\s*', "", source)
    source = re.sub(r"\bFLOAT_T\b", "float", source)

    spans = _functions(source)
    if root not in spans:
        raise RuntimeError(f"scikinC output has no function {root!r}; found {sorted(spans)}")
    reachable, todo = set(), [root]
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
    return (
        "/* Generated by effgen's scikinc backend from scikinC's conversion of the\n"
        " * preprocessing + network pipeline. Do not edit. */\n"
        "#include <math.h>\n\n"
        + out
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


def _generate(request: Request) -> Core:
    try:
        import scikinC  # noqa: F401
    except ImportError as err:
        from effgen.errors import ExportError

        raise ExportError(f"the scikinc backend is not available ({err})") from err
    return generate_core(request.model, request.preprocessing, symbol=request.symbol)


BACKEND = register(Backend(
    name="scikinc", generate=_generate,
    description="scikinC's conversion (the Lamarr production route), as the reference"))
