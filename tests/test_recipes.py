"""Recipes: `--recipe seed` is the seed notebook's recipe, checked on what training builds
and compiles (not on the recipe table's own numbers); the learning-rate schedule; the
default recipe learns."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from effgen.training import train as train_module
from effgen.training.recipes import DEFAULT, RECIPES, Phase, get_recipe

# The seed notebook's values, as its cells state them (efficiency-training-notebook, cells
# 5, 10 and 12): dense_config, the two compile() calls, the two EarlyStopping callbacks,
# the environment defaults and fit()'s steps_per_epoch / validation_data.
NOTEBOOK = {
    "units": 128, "activation": "tanh", "kernel_initializer": "HeNormal", "l2": 1e-3,
    "residual_blocks": 5, "n_outputs": 4, "output_activation": "linear",
    "phases": [
        {"optimizer": "RMSprop", "learning_rate": 10e-3, "label_smoothing": 0.01, "patience": 3,
         "time_limit_s": 60},
        {"optimizer": "RMSprop", "learning_rate": 1e-3, "label_smoothing": 0.0, "patience": 5,
         "time_limit_s": 600},
    ],
    "steps_per_epoch": 50, "batch_size": 100_000, "max_epochs": 100,
}


def _spy_fit(monkeypatch):
    """Record, for every Model.fit call, the model's compiled state and fit's arguments."""
    calls = []
    real_fit = keras.Model.fit

    def fit(model, x=None, **kwargs):
        calls.append({"model": model, "optimizer": model.optimizer, "loss": model.loss,
                      "lr": float(model.optimizer.learning_rate.numpy()), **kwargs, "x": x})
        return real_fit(model, x, **kwargs)

    monkeypatch.setattr(keras.Model, "fit", fit)
    return calls


def test_seed_recipe_is_the_notebook_recipe(tiny_dataset, tmp_path, monkeypatch):
    calls = _spy_fit(monkeypatch)
    batch = 512  # the tiny sample holds fewer rows than the notebook's 100k batch
    train_module.train(tiny_dataset["train"], tiny_dataset["validation"], tmp_path / "m.keras",
                       recipe="seed", batch_size=batch, max_epochs=1, verbose=0)
    assert len(calls) == len(NOTEBOOK["phases"])

    # The network (the first call's model is the one built fresh).
    model = calls[0]["model"]
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    hidden, output = dense[:-1], dense[-1]
    assert len(hidden) == 1 + NOTEBOOK["residual_blocks"]
    assert sum(isinstance(layer, keras.layers.Add) for layer in model.layers) == NOTEBOOK["residual_blocks"]
    for layer in hidden:
        assert layer.units == NOTEBOOK["units"]
        assert layer.activation.__name__ == NOTEBOOK["activation"]
        assert type(layer.kernel_initializer).__name__ == NOTEBOOK["kernel_initializer"]
        assert isinstance(layer.kernel_regularizer, keras.regularizers.L2)
        assert layer.kernel_regularizer.l2 == pytest.approx(NOTEBOOK["l2"])
    assert output.units == NOTEBOOK["n_outputs"]
    assert output.activation.__name__ == NOTEBOOK["output_activation"]
    assert type(output.kernel_initializer).__name__ == NOTEBOOK["kernel_initializer"]
    assert output.kernel_regularizer is None  # the notebook regularizes dense_config layers only
    assert isinstance(model.layers[-1], keras.layers.Softmax)
    # Residual wiring: each Add sums its block's input with that input's Dense.
    for add in (layer for layer in model.layers if isinstance(layer, keras.layers.Add)):
        a, b = (t._keras_history[0] for t in add.input)
        assert isinstance(b, keras.layers.Dense) and b.input is a.output

    # Each phase's optimizer, loss, callbacks and fit arguments.
    for call, want in zip(calls, NOTEBOOK["phases"]):
        assert type(call["optimizer"]).__name__ == want["optimizer"]
        assert call["lr"] == pytest.approx(want["learning_rate"])
        assert isinstance(call["loss"], keras.losses.CategoricalCrossentropy)
        assert call["loss"].get_config()["label_smoothing"] == pytest.approx(want["label_smoothing"])
        assert call["steps_per_epoch"] == NOTEBOOK["steps_per_epoch"]
        early = [c for c in call["callbacks"] if isinstance(c, keras.callbacks.EarlyStopping)]
        assert len(early) == 1 and early[0].monitor == "val_loss" and early[0].patience == want["patience"]
        timers = [c for c in call["callbacks"] if type(c).__name__ == "TimeLimitCallback"]
        assert len(timers) == 1 and timers[0].limit_s == want["time_limit_s"]
        # No schedule touches the notebook's constant rates.
        assert not [c for c in call["callbacks"] if type(c).__name__ == "ScheduleCallback"]
        # Validation on one batch of the validation set.
        (x_val, _), = list(call["validation_data"])
        assert x_val.shape[0] == batch
        x_train, _ = next(iter(call["x"]))
        assert x_train.shape[0] == batch

    # The values the tiny run had to override are the notebook's in the recipe itself.
    seed = get_recipe("seed")
    assert (seed.batch_size, seed.max_epochs) == (NOTEBOOK["batch_size"], NOTEBOOK["max_epochs"])


def test_cli_recipe_choice_and_the_notebook_environment(tiny_dataset, tmp_path):
    out = tmp_path / "model.keras"
    cmd = [sys.executable, "-m", "effgen", "train", "--recipe", "seed",
           "--train-data", str(tiny_dataset["train"]), "--validation-data", str(tiny_dataset["validation"]),
           "--output", str(out), "--width", "8", "--blocks", "1", "--steps-per-epoch", "2"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "BATCH_SIZE": "256", "MAX_EPOCHS": "1",
           "PRE_TRAINING_TIME_LIMIT_SECONDS": "77", "TRAIN_BACKEND": "", "KERAS_BACKEND": "jax"}
    root = Path(__file__).resolve().parents[1]
    subprocess.run(cmd, check=True, env=env, cwd=root, capture_output=True)
    history = json.loads((tmp_path / "history.json").read_text())
    assert history["recipe"]["name"] == "seed"
    # A fresh process with no TRAIN_BACKEND: the seed trains on TensorFlow, as the notebook.
    assert history["config"]["backend"] == history["recipe"]["backend"] == "tensorflow"
    assert history["config"]["batch_size"] == 256
    assert [p["limit_s"] for p in history["phases"]] == [77, NOTEBOOK["phases"][1]["time_limit_s"]]
    assert [p["optimizer"] for p in history["phases"]] == ["rmsprop", "rmsprop"]

    bad = subprocess.run(cmd[:4] + ["--recipe", "nonsense"], env=env, cwd=root, capture_output=True, text=True)
    assert bad.returncode != 0 and "nonsense" in bad.stderr and "default" in bad.stderr


def test_default_recipe_is_the_cli_default_and_differs_from_the_seed():
    from argparse import ArgumentParser

    from effgen.config import resolve_lazy

    parser = ArgumentParser()
    train_module.register(parser.add_subparsers())
    args = parser.parse_args(["train"])
    resolve_lazy(args)  # what effgen.cli.main does: table defaults through the environment
    assert args.recipe == "default" and RECIPES[args.recipe] is DEFAULT
    assert set(RECIPES) == {"default", "seed"}


def test_cosine_schedule_warms_up_decays_to_its_floor_and_clamps():
    phase = Phase("p", "adam", 2e-3, 0.0, None, 10, schedule="cosine", warmup_fraction=0.1,
                  final_lr_fraction=0.01)
    assert phase.learning_rate_at(0.0) == 0.0
    assert phase.learning_rate_at(0.05) == pytest.approx(1e-3)
    assert phase.learning_rate_at(0.1) == pytest.approx(2e-3)
    assert phase.learning_rate_at(0.55) == pytest.approx(2e-3 * (0.01 + 0.99 * 0.5))
    assert phase.learning_rate_at(1.0) == pytest.approx(2e-5)
    assert phase.learning_rate_at(7.0) == pytest.approx(2e-5)
    rates = [phase.learning_rate_at(t) for t in np.linspace(0.1, 1, 50)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))
    constant = Phase("c", "rmsprop", 1e-3, 0.0, 5, 10)
    assert {constant.learning_rate_at(t) for t in (0, 0.5, 1)} == {1e-3}
    with pytest.raises(ValueError, match="optimizer"):
        Phase("x", "sgd", 1e-3, 0.0, 5, 10)


def test_schedule_follows_the_clock_when_the_clock_is_ahead():
    phase = Phase("p", "adam", 1.0, 0.0, None, 10, schedule="cosine")
    clock = iter([0.0, 0.0, 5.0])
    cb = train_module.ScheduleCallback(phase, total_steps=1000, steps_done=100, limit_s=10, already_s=0,
                                       clock=lambda: next(clock))
    cb.on_train_begin()
    assert cb.progress() == pytest.approx(0.1) and not cb.by_time   # steps lead
    assert cb.progress() == pytest.approx(0.5) and cb.by_time       # the clock leads


def test_schedule_ends_the_epoch_once_the_clock_has_run_out():
    phase = Phase("p", "adam", 1.0, 0.0, None, 10, schedule="cosine")
    now = [0.0]
    cb = train_module.ScheduleCallback(phase, total_steps=1000, steps_done=0, limit_s=10, already_s=0,
                                       clock=lambda: now[0])
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
    cb.set_model(model)
    model.stop_training = False
    cb.on_train_begin()
    now[0] = 9.0
    cb.on_train_batch_end(0)
    assert not model.stop_training
    now[0] = 10.5
    cb.on_train_batch_end(1)
    assert model.stop_training and cb.steps == 2


def test_default_recipe_learns_a_tiny_sample(tiny_dataset, tmp_path):
    from effgen.data.reader import FeatherReader
    from effgen.training.validate import log_loss

    out = tmp_path / "model.keras"
    history = train_module.train(tiny_dataset["train"], tiny_dataset["validation"], out,
                                 recipe="default", batch_size=256, steps_per_epoch=25, max_epochs=4,
                                 width=16, blocks=1, verbose=0)
    assert history["recipe"]["name"] == "default"
    (phase,) = history["phases"]
    assert phase["optimizer"] == DEFAULT.phases[0].optimizer and phase["stop_reason"] == "max_epochs"
    rates = [e["learning_rate"] for e in phase["epochs"]]
    assert rates[-1] < max(rates)  # the schedule decays
    assert history["config"]["data"] == "memory"
    assert history["config"]["validation_rows_used"] == min(DEFAULT.validation_rows,
                                                           tiny_dataset["rows"]["validation"])

    test = FeatherReader(tiny_dataset["test"])
    frame = test.as_pandas(columns=test.features + test.labels)
    x, y = frame[test.features].to_numpy("float32"), frame[test.labels].to_numpy("float32")
    pred = keras.models.load_model(out).predict(x, verbose=0)
    prior = np.broadcast_to(y.mean(axis=0), y.shape)
    assert log_loss(pred, y.argmax(1)) < log_loss(prior, y.argmax(1)) - 0.02
    assert math.isclose(float(pred.sum(axis=1).mean()), 1.0, abs_tol=1e-5)
