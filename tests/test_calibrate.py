"""Calibration-in-the-large (effgen/training/calibrate.py): the refit output bias makes
the mean prediction equal the label fractions on the rows it was fitted on, lowers
their log-loss, and leaves the topology and the hidden layers alone."""

import keras
import numpy as np
import pytest

from effgen.training import train as train_module
from effgen.training.calibrate import calibrate_model, fit_output, softmax
from effgen.training.network import build_model
from effgen.training.recipes import DEFAULT, SEED, Recipe


def _skewed_sample(n=20_000, seed=0):
    """Logits of a model whose output bias is off: labels drawn from softmax(z + shift)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 4)) * 1.5
    true = softmax(1.3 * z + np.array([0.0, 0.4, -0.3, 0.2]))
    labels = np.eye(4)[[rng.choice(4, p=p) for p in true]]
    return z, labels


def _log_loss(prob, labels):
    return float(-np.mean(np.log(prob[np.arange(len(labels)), labels.argmax(1)])))


@pytest.mark.parametrize("scale", [False, True])
def test_fit_output_matches_the_label_fractions_and_lowers_the_log_loss(scale):
    z, labels = _skewed_sample()
    before = softmax(z)
    assert np.max(np.abs(before.mean(0) - labels.mean(0))) > 0.02  # really off to begin with
    fit = fit_output(z, labels, scale=scale)
    after = softmax(fit.scale * z + fit.shift)
    np.testing.assert_allclose(after.mean(0), labels.mean(0), atol=1e-9)
    assert _log_loss(after, labels) < _log_loss(before, labels)
    assert fit.log_loss_after == pytest.approx(_log_loss(after, labels), rel=1e-9)
    assert fit.shift[0] == 0.0
    if scale:
        assert fit.scale > 1.1  # the sample's logits are 1.3x too flat
        assert _log_loss(after, labels) < _log_loss(
            softmax(z + fit_output(z, labels).shift), labels)
    else:
        assert fit.scale == 1.0


def test_fit_output_refuses_a_class_that_never_occurs():
    z, labels = _skewed_sample(2_000)
    labels[:, 2] = 0
    labels[:, 0] = 1 - labels[:, 1] - labels[:, 3]
    with pytest.raises(ValueError, match=r"classes \[2\] never occur"):
        fit_output(z, labels)


@pytest.mark.parametrize("method", ["bias", "scale_bias"])
def test_calibrate_model_folds_the_fit_into_the_output_layer(method):
    # A random-weight network and labels it does not predict.
    model = build_model(12, 4, width=16, n_blocks=2, l2=0.0, seed=1)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(5_000, 12)).astype(np.float32)
    labels = np.eye(4, dtype=np.float32)[rng.choice(4, size=5_000, p=[0.55, 0.25, 0.15, 0.05])]
    layers_before = [type(layer).__name__ for layer in model.layers]
    hidden_before = [w.copy() for layer in model.layers[:-2] for w in layer.get_weights()]
    assert np.max(np.abs(model.predict(x, verbose=0).mean(0) - labels.mean(0))) > 0.05

    done = calibrate_model(model, x, labels, method)

    pred = model.predict(x, verbose=0)
    np.testing.assert_allclose(pred.mean(0), labels.mean(0), atol=2e-5)
    np.testing.assert_allclose(done["mean_prediction_minus_label_after"], 0, atol=1e-9)
    assert done["method"] == method and done["rows"] == 5_000
    assert done["log_loss_after"] < done["log_loss_before"]
    assert [type(layer).__name__ for layer in model.layers] == layers_before
    hidden_after = [w for layer in model.layers[:-2] for w in layer.get_weights()]
    assert all(np.array_equal(a, b) for a, b in zip(hidden_before, hidden_after))
    assert (done["scale"] == 1.0) == (method == "bias")
    assert calibrate_model(model, x, labels, "none") is None


def test_calibrate_model_refuses_a_model_without_a_linear_output_dense():
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(4, activation="softmax")(inputs))
    with pytest.raises(ValueError, match="Dense"):
        calibrate_model(model, np.zeros((4, 3), np.float32), np.eye(4), "bias")


def test_recipes_name_a_known_calibration():
    assert SEED.calibration == "none"  # the notebook has none
    assert DEFAULT.calibration != "none"
    with pytest.raises(ValueError, match="calibration"):
        Recipe("x", "", 0.0, 8, 1, 1, None, calibration="platt")


def test_trained_default_model_predicts_the_validation_label_fractions(tiny_dataset, tmp_path):
    from effgen.data.reader import FeatherReader

    out = tmp_path / "model.keras"
    history = train_module.train(tiny_dataset["train"], tiny_dataset["validation"], out,
                                 recipe="default", batch_size=256, steps_per_epoch=10, max_epochs=2,
                                 width=16, blocks=1, verbose=0)
    cal = history["calibration"]
    val = FeatherReader(tiny_dataset["validation"])
    assert cal["method"] == DEFAULT.calibration
    assert cal["rows"] == min(DEFAULT.calibration_rows, val.n_rows)
    x, y = next(val.iter_xy(cal["rows"]))
    pred = keras.models.load_model(out).predict(x, verbose=0)  # the saved model is the calibrated one
    np.testing.assert_allclose(pred.mean(0), y.mean(0), atol=2e-5)
