import keras
import numpy as np
import pytest

from effgen.training.network import build_model


def expected_params(n_features, n_classes, width, n_blocks):
    first = n_features * width + width
    block = width * width + width
    last = width * n_classes + n_classes
    return first + n_blocks * block + last


def test_default_matches_seed_parameter_count():
    model = build_model()
    assert model.count_params() == expected_params(12, 4, 128, 5)
    # The number printed by the seed notebook's model.summary().
    assert model.count_params() == 84_740


@pytest.mark.parametrize("n_features,n_classes,width,n_blocks", [(12, 4, 8, 1), (3, 2, 5, 0), (7, 5, 16, 3)])
def test_parameter_count_formula(n_features, n_classes, width, n_blocks):
    model = build_model(n_features, n_classes, width, n_blocks)
    assert model.count_params() == expected_params(n_features, n_classes, width, n_blocks)


def test_layer_structure_is_the_seed_recipe():
    model = build_model(width=8, n_blocks=2, l2=2e-3)
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds == ["InputLayer", "Dense", "Dense", "Add", "Dense", "Add", "Dense", "Softmax"]
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    for layer in dense[:-1]:
        assert layer.units == 8
        assert layer.activation.__name__ == "tanh"
        assert type(layer.kernel_initializer).__name__ == "HeNormal"
        assert layer.kernel_regularizer.get_config()["l2"] == pytest.approx(2e-3)
    assert dense[-1].activation.__name__ == "linear"
    assert type(dense[-1].kernel_initializer).__name__ == "HeNormal"
    assert dense[-1].kernel_regularizer is None
    # Each Add sums the running x with a Dense applied to that same x.
    for add in [layer for layer in model.layers if isinstance(layer, keras.layers.Add)]:
        inbound = add._inbound_nodes[0].input_tensors
        producers = [t._keras_history.operation for t in inbound]
        assert isinstance(producers[1], keras.layers.Dense)
        assert producers[1]._inbound_nodes[0].input_tensors[0] is inbound[0]


def test_outputs_are_probabilities_and_seed_is_reproducible():
    x = np.random.default_rng(0).normal(size=(64, 12)).astype("float32")
    a = build_model(width=8, n_blocks=2, seed=3)
    b = build_model(width=8, n_blocks=2, seed=3)
    c = build_model(width=8, n_blocks=2, seed=4)
    pa = a.predict(x, verbose=0)
    assert pa.shape == (64, 4)
    assert np.all(pa >= 0)
    np.testing.assert_allclose(pa.sum(axis=1), 1, rtol=1e-5)
    np.testing.assert_array_equal(pa, b.predict(x, verbose=0))
    assert not np.allclose(pa, c.predict(x, verbose=0))
    # Residual layers of equal shape must not start from identical kernels.
    kernels = [layer.get_weights()[0] for layer in a.layers[2:-2] if isinstance(layer, keras.layers.Dense)]
    assert not np.allclose(kernels[0], kernels[1])


def test_rejects_bad_sizes():
    with pytest.raises(ValueError, match="n_classes"):
        build_model(n_classes=1)
