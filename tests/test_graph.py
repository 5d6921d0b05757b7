"""The Keras graph walker: accepts the seed topology, refuses everything else by name."""

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from effgen.codegen.graph import Dense, Residual, Softmax, UnsupportedModelError, evaluate, read_chain


def _seed_like(width=16, blocks=2, swap_operands=False, dropout=False):
    inp = keras.layers.Input((12,))
    x = keras.layers.Dense(width, activation="tanh")(inp)
    for _ in range(blocks):
        r = keras.layers.Dense(width, activation="tanh")(x)
        x = keras.layers.Add()([r, x] if swap_operands else [x, r])
    if dropout:
        x = keras.layers.Dropout(0.2)(x)
    x = keras.layers.Dense(4)(x)
    return keras.Model(inp, keras.layers.Softmax()(x))


@pytest.mark.parametrize("swap_operands", [False, True])
@pytest.mark.parametrize("dropout", [False, True])
def test_seed_topology_reads_as_chain_and_evaluates_like_keras(swap_operands, dropout):
    model = _seed_like(swap_operands=swap_operands, dropout=dropout)
    chain = read_chain(model)
    kinds = [type(op) for op in chain.ops]
    assert kinds == [Dense, Residual, Residual, Dense, Softmax]
    x = np.random.default_rng(1).normal(size=(2000, 12)).astype(np.float32)
    np.testing.assert_allclose(evaluate(chain, x), model.predict(x, verbose=0), atol=1e-6)


def test_weights_are_copied_in_keras_layout():
    model = _seed_like(blocks=1)
    chain = read_chain(model)
    kernel, bias = model.layers[1].get_weights()
    np.testing.assert_array_equal(chain.ops[0].kernel, kernel)
    np.testing.assert_array_equal(chain.ops[0].bias, bias)


def _refused(model, match):
    with pytest.raises(UnsupportedModelError, match=match):
        read_chain(model)


def test_add_of_two_branches_is_refused_naming_the_layer():
    inp = keras.layers.Input((12,))
    a, b = keras.layers.Dense(12)(inp), keras.layers.Dense(12)(inp)
    _refused(keras.Model(inp, keras.layers.Add(name="merge")([a, b])), "'merge' \\(Add\\)")


def test_unknown_layer_is_refused_naming_its_class():
    inp = keras.layers.Input((12,))
    x = keras.layers.BatchNormalization(name="bn")(keras.layers.Dense(8)(inp))
    _refused(keras.Model(inp, x), "'bn' \\(BatchNormalization\\)")


def test_softmax_activation_string_is_refused():
    inp = keras.layers.Input((12,))
    x = keras.layers.Dense(4, activation="softmax", name="out")(inp)
    _refused(keras.Model(inp, x), "'out' \\(Dense\\).*softmax")


def test_three_operand_add_is_refused():
    inp = keras.layers.Input((12,))
    x = keras.layers.Dense(8)(inp)
    r1, r2 = keras.layers.Dense(8)(x), keras.layers.Dense(8)(x)
    _refused(keras.Model(inp, keras.layers.Add(name="add3")([x, r1, r2])), "'add3'.*3 tensors")


def test_softmax_in_the_middle_is_refused():
    inp = keras.layers.Input((12,))
    x = keras.layers.Softmax(name="mid")(keras.layers.Dense(8)(inp))
    _refused(keras.Model(inp, keras.layers.Dense(4)(x)), "'mid'.*last layer")


@pytest.mark.parametrize("layers", [[], [keras.Input((12,))], [keras.layers.Dense(4)]])
def test_unbuilt_or_empty_sequential_is_refused_by_name(layers):
    _refused(keras.Sequential(layers, name="empty_seq"), "'empty_seq' has no graph to read")
