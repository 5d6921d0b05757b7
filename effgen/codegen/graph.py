"""Read a trained Keras model into a flat chain of operations that code generators
can print.

The graph is walked structurally, from the model output back to its input, through
each tensor's producing layer or operation (never by layer names). What effgen deploys
is a chain:

    Input -> [Dense | Residual | Dropout]* -> Softmax?
    Concatenate([Input features, Input noise]) -> [Dense | Residual | Dropout]*   (generators)

where Residual is `Add()([x, Dense(x)])` (the seed's skip connection) or, the same
thing in Keras 3, the operation `x = x + Dense(x)` that `model.layers` does not list
(LHCb's resolution and covariance write it so). Any other layer or wiring raises
UnsupportedModelError naming the layer and its class, so that an unknown graph is
refused instead of miscompiled.
"""

from dataclasses import dataclass, field
from typing import List

import numpy as np

from effgen.errors import UnsupportedModelError  # noqa: F401 (re-exported)

ACTIVATIONS = ("linear", "tanh", "sigmoid", "relu", "elu")
COMPUTE_DTYPES = ("float32", "float64")  # float64 layers: the float32 C stays within 1e-5




@dataclass
class Dense:
    """y = act(x @ kernel + bias); kernel has shape (n_in, n_out)."""
    kernel: np.ndarray
    bias: np.ndarray
    activation: str
    name: str

    @property
    def n_in(self):
        return self.kernel.shape[0]

    @property
    def n_out(self):
        return self.kernel.shape[1]


@dataclass
class Residual:
    """y = x + act(x @ kernel + bias): Add()([x, Dense(x)]) with a square kernel."""
    dense: Dense
    name: str

    @property
    def n_in(self):
        return self.dense.n_in

    @property
    def n_out(self):
        return self.dense.n_out


@dataclass
class Softmax:
    n: int
    name: str

    @property
    def n_in(self):
        return self.n

    @property
    def n_out(self):
        return self.n


@dataclass
class Chain:
    """`n_inputs` values enter the first op; for a generator they are the features
    followed by `n_random` noise values (Concatenate([features, noise]))."""
    n_inputs: int
    ops: List[object] = field(default_factory=list)
    n_random: int = 0

    @property
    def n_features(self):
        return self.n_inputs - self.n_random

    @property
    def n_outputs(self):
        return self.ops[-1].n_out if self.ops else self.n_inputs

    @property
    def ends_with_softmax(self):
        return bool(self.ops) and isinstance(self.ops[-1], Softmax)

    def describe(self) -> str:
        parts = [f"Input({self.n_inputs})" if not self.n_random else
                 f"Concatenate(features {self.n_features}, noise {self.n_random})"]
        for op in self.ops:
            if isinstance(op, Dense):
                parts.append(f"Dense({op.n_out}, {op.activation})")
            elif isinstance(op, Residual):
                parts.append(f"Residual({op.n_out}, {op.dense.activation})")
            else:
                parts.append("Softmax")
        return " -> ".join(parts)


def _where(layer) -> str:
    return f"layer {layer.name!r} ({type(layer).__name__})"


def _producer(tensor):
    """The layer that produced `tensor` and the input tensors of that call."""
    layer, node_index, _ = tensor._keras_history
    node = layer._inbound_nodes[node_index]
    return layer, list(node.input_tensors)


def _check_dtype(layer):
    """The C code computes in float32: a layer computing in float16/bfloat16 (a mixed
    precision policy) gives TensorFlow other values, so it is refused."""
    policy = getattr(layer, "dtype_policy", None)
    dtype = str(getattr(policy, "compute_dtype", None) or "float32")
    if dtype not in COMPUTE_DTYPES:
        raise UnsupportedModelError(
            f"{_where(layer)}: computes in {dtype}; effgen computes in float32 and would not "
            f"match (use a float32 dtype policy)")


def _float32(x) -> np.ndarray:
    """A keras Variable or eager tensor as float32 numpy (.numpy(): keras'
    convert_to_numpy raises a numpy DeprecationWarning on Variables)."""
    return np.asarray(x.numpy() if hasattr(x, "numpy") else x, dtype=np.float32)


def _dense(layer) -> Dense:
    config = layer.get_config()
    activation = config.get("activation", "linear")
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise UnsupportedModelError(
            f"{_where(layer)}: activation {activation!r} is not supported "
            f"(supported: {', '.join(ACTIVATIONS)}; use a separate Softmax layer for softmax)")
    if getattr(layer, "quantization_mode", None):
        raise UnsupportedModelError(
            f"{_where(layer)}: {layer.quantization_mode}-quantized weights are not supported")
    # `layer.kernel` is what the layer multiplies by: LoRA factors, if any, merged in.
    kernel = _float32(layer.kernel)
    if kernel.ndim != 2:
        raise UnsupportedModelError(f"{_where(layer)}: kernel of rank {kernel.ndim}, expected 2")
    bias = _float32(layer.bias) if layer.use_bias else np.zeros(kernel.shape[1], dtype=np.float32)
    return Dense(kernel=kernel, bias=bias, activation=activation, name=layer.name)


def _skip_dropout(tensor):
    """Dropout is the identity at inference: follow it back to its input."""
    while True:
        layer, inputs = _producer(tensor)
        if type(layer).__name__ != "Dropout":
            return tensor
        _check_dtype(layer)
        tensor = inputs[0]


def _residual(layer, inputs):
    """Match Add()([x, Dense(x)]) in either operand order; return (Residual, x)."""
    if len(inputs) != 2:
        raise UnsupportedModelError(
            f"{_where(layer)}: Add of {len(inputs)} tensors; only Add()([x, Dense(x)]) is supported")
    for skip, branch in (inputs, inputs[::-1]):
        branch_layer, branch_inputs = _producer(_skip_dropout(branch))
        if type(branch_layer).__name__ != "Dense" or len(branch_inputs) != 1:
            continue
        if _skip_dropout(branch_inputs[0]) is _skip_dropout(skip):
            _check_dtype(branch_layer)
            dense = _dense(branch_layer)
            if dense.n_in != dense.n_out:
                raise UnsupportedModelError(
                    f"{_where(layer)}: adds a Dense of shape {dense.kernel.shape} to its "
                    f"input; the residual needs a square kernel")
            return Residual(dense=dense, name=layer.name), skip
    raise UnsupportedModelError(
        f"{_where(layer)}: operands are not a tensor and a Dense of that same tensor")


def _input_width(tensor, model):
    shape = tuple(tensor.shape)
    if len(shape) != 2 or shape[1] is None:
        raise UnsupportedModelError(f"model input {_tensor_name(tensor)!r} shape {shape}: "
                                    f"expected (None, n)")
    dtype = str(tensor.dtype)
    if dtype not in COMPUTE_DTYPES:
        # the rows would be cast to it before the first layer
        raise UnsupportedModelError(f"model {model.name!r} takes {dtype} input "
                                    f"{_tensor_name(tensor)!r}; effgen takes float32")
    return int(shape[1])


def _tensor_name(tensor) -> str:
    return getattr(_producer(tensor)[0], "name", "?")


def features_and_noise(model, n_features=None):
    """(features, noise) input tensors of a two-input generator: the input `n_features`
    wide when exactly one is (the width of tX's output), else the model's first input."""
    inputs = list(model.inputs)
    widths = [int(t.shape[-1]) if t.shape[-1] is not None else -1 for t in inputs]
    if n_features is not None and widths.count(n_features) == 1:
        k = widths.index(n_features)
    else:
        k = 0
    return inputs[k], inputs[1 - k]


def _concatenate(layer, inputs, features, noise):
    """Check that Concatenate joins the features then the noise, both model inputs."""
    axis = layer.get_config().get("axis", -1)
    if axis not in (-1, 1):
        raise UnsupportedModelError(f"{_where(layer)}: concatenates along axis {axis}; "
                                    f"effgen needs axis -1 (features then noise)")
    ids = [_producer(t)[0] for t in inputs]
    want = [_producer(features)[0], _producer(noise)[0]]
    if len(ids) == 2 and ids == want[::-1]:
        raise UnsupportedModelError(
            f"{_where(layer)}: joins the noise {want[1].name!r} before the features "
            f"{want[0].name!r}; effgen needs Concatenate([features, noise]) (SQLamarr's "
            f"f(out, in, rnd) feeds tX(in) then rnd)")
    if ids != want:
        raise UnsupportedModelError(
            f"{_where(layer)}: joins {[getattr(i, 'name', '?') for i in ids]}; effgen needs "
            f"Concatenate([{want[0].name!r}, {want[1].name!r}]) of the two model inputs")


def read_chain(model, n_outputs=None, n_features=None) -> Chain:
    """Walk `model` from its single output back to its input(s): one input, or two
    (features and noise) joined by Concatenate for a generator. With `n_outputs`, also
    refuse a model giving another number of outputs; `n_features` (tX's output width)
    tells the features input from the noise input."""
    try:
        _ = model.inputs, model.outputs
    except AttributeError as err:  # an empty or never-built Sequential
        raise UnsupportedModelError(f"model {model.name!r} has no graph to read ({err}); "
                                    f"give it an Input and at least one layer") from err
    if len(model.inputs) not in (1, 2) or len(model.outputs) != 1:
        raise UnsupportedModelError(
            f"model {model.name!r} has {len(model.inputs)} inputs and {len(model.outputs)} "
            f"outputs; effgen deploys one output from one input (a classifier) or two "
            f"(a generator: features and noise joined by Concatenate)")
    widths = [_input_width(t, model) for t in model.inputs]
    features = noise = None
    if len(model.inputs) == 2:
        features, noise = features_and_noise(model, n_features)

    ops = []
    tensor = model.outputs[0]
    concatenated = False
    while True:
        layer, inputs = _producer(tensor)
        kind = type(layer).__name__
        if kind == "InputLayer":
            if noise is not None:
                raise UnsupportedModelError(
                    f"model {model.name!r}: input {layer.name!r} reaches the output without "
                    f"the Concatenate([features, noise]) a generator needs")
            break
        _check_dtype(layer)
        if kind == "Dropout":
            tensor = inputs[0]
            continue
        if kind == "Concatenate" and noise is not None:
            _concatenate(layer, inputs, features, noise)
            concatenated = True
            break
        if kind == "Dense":
            ops.append(_dense(layer))
            tensor = inputs[0]
        elif kind == "Add":
            residual, tensor = _residual(layer, inputs)
            ops.append(residual)
        elif kind == "Softmax":
            if ops:
                raise UnsupportedModelError(f"{_where(layer)}: Softmax is only supported as the last layer")
            axis = layer.get_config().get("axis", -1)
            if axis not in (-1, 1, [-1], [1], (-1,), (1,)):
                raise UnsupportedModelError(f"{_where(layer)}: softmax over axis {axis}")
            ops.append(Softmax(n=int(tensor.shape[-1]), name=layer.name))
            tensor = inputs[0]
        else:
            raise UnsupportedModelError(f"{_where(layer)} is not supported by effgen")
        if len(inputs) != 1 and kind != "Add":
            raise UnsupportedModelError(f"{_where(layer)} has {len(inputs)} inputs")

    if concatenated:
        n_random = int(noise.shape[-1])
        chain = Chain(n_inputs=int(features.shape[-1]) + n_random, ops=ops[::-1], n_random=n_random)
    else:
        chain = Chain(n_inputs=widths[0], ops=ops[::-1])
    _check_shapes(chain)
    if n_outputs is not None and chain.n_outputs != n_outputs:
        last, _ = _producer(model.outputs[0])
        raise UnsupportedModelError(
            f"{_where(last)}: the model has {chain.n_outputs} outputs; {n_outputs} are needed")
    return chain


def _check_shapes(chain: Chain):
    width = chain.n_inputs
    for op in chain.ops:
        if op.n_in != width:
            raise UnsupportedModelError(
                f"layer {op.name!r}: expects {op.n_in} inputs but receives {width}")
        width = op.n_out


def load_chain(path) -> Chain:
    """Load a `.keras` file and read its chain; errors name the file."""
    import keras

    try:
        model = keras.models.load_model(path, compile=False)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"cannot load Keras model {path}: {err}") from err
    try:
        return read_chain(model)
    except UnsupportedModelError as err:
        raise UnsupportedModelError(f"{path}: {err}") from err


def _activate(z, activation):
    if activation == "tanh":
        return np.tanh(z)
    if activation == "sigmoid":
        return 1.0 / (1.0 + np.exp(-z))
    if activation == "relu":
        return np.maximum(z, 0.0)
    if activation == "elu":
        return np.where(z > 0, z, np.expm1(np.minimum(z, 0.0)))
    return z


def evaluate(chain: Chain, x: np.ndarray, dtype=np.float64) -> np.ndarray:
    """Reference evaluation of the chain in numpy (float64 by default), used to
    separate code-generation errors from framework rounding in tests."""
    h = np.asarray(x, dtype=dtype)
    for op in chain.ops:
        if isinstance(op, Dense):
            h = _activate(h @ op.kernel.astype(dtype) + op.bias.astype(dtype), op.activation)
        elif isinstance(op, Residual):
            d = op.dense
            h = h + _activate(h @ d.kernel.astype(dtype) + d.bias.astype(dtype), d.activation)
        else:
            z = h - h.max(axis=1, keepdims=True)
            e = np.exp(z)
            h = e / e.sum(axis=1, keepdims=True)
    return h
