"""The recipe's throughput and averaging switches: an exponential moving average of the
weights (EMA) is what gets validated, checkpointed, selected and returned, and survives a
resume; steps_per_execution and jit_compile reach Keras, and the schedule and the history
still count every step. tests/test_training_jax.py reruns the EMA tests on Keras' JAX
backend (KERAS_BACKEND=jax).

Models are tiny random-start networks (width 8, 1 block); epochs are 5 batches of 256 rows."""

from dataclasses import replace

import keras
import numpy as np
import pytest
import tensorflow as tf
from support import crashing_batches, learnable_sample, repeated_batches

from effgen.training import train as train_module
from effgen.training.network import build_model
from effgen.training.recipes import DEFAULT, Phase
from effgen.training.train import RunDir, run_phases, swap_ema

BATCH, STEPS = 256, 5


def _ema_recipe(momentum=0.8, **changes):
    phase = replace(DEFAULT.phases[0], ema_momentum=momentum, time_limit_s=3600)
    # One step per call, so the probe sees every step.
    return replace(DEFAULT, phases=(phase,), steps_per_epoch=STEPS, **{"steps_per_execution": 1, **changes})


def _run_dir(path):
    run = RunDir(path, {"test": 1}, DEFAULT.phases)
    run.path.mkdir(parents=True, exist_ok=True)
    return run


class Probe(keras.callbacks.Callback):
    """Appended last: what the model and its optimizer hold after each batch, at the start
    of training, and what the other callbacks saw at each epoch's end."""

    def __init__(self):
        super().__init__()
        self.after_batch, self.at_epoch_end, self.at_start = [], [], None

    def _state(self):
        averages = getattr(self.model.optimizer, "_model_variables_moving_average", None)  # built?
        return (self.model.get_weights(), averages and [np.array(v.numpy()) for v in averages])

    def on_train_begin(self, logs=None):
        self.at_start = self._state()

    def on_train_batch_end(self, batch, logs=None):
        self.after_batch.append(self._state())

    def on_epoch_end(self, epoch, logs=None):
        self.at_epoch_end.append(self.model.get_weights())


def _probe_fit(monkeypatch):
    probes, calls = [], []
    real_fit = keras.Model.fit

    def fit(model, x=None, **kwargs):
        probes.append(Probe())
        calls.append(model)
        kwargs["callbacks"] = list(kwargs["callbacks"]) + [probes[-1]]
        return real_fit(model, x, **kwargs)

    monkeypatch.setattr(keras.Model, "fit", fit)
    return probes, calls


def _same(a, b):
    return all(np.array_equal(u, v) for u, v in zip(a, b, strict=True))


def test_ema_weights_are_validated_checkpointed_and_returned(tmp_path, monkeypatch):
    probes, _ = _probe_fit(monkeypatch)
    x, y = learnable_sample()
    val_x, val_y = x[:1000], y[:1000]
    run = _run_dir(tmp_path / "run")
    recipe = _ema_recipe(max_epochs=3)
    model = run_phases(lambda: build_model(width=8, n_blocks=1, l2=0.0, seed=0),
                       lambda i, e: repeated_batches(x, y, BATCH), tf.data.Dataset.from_tensors((val_x, val_y)),
                       run, recipe=recipe, verbose=0)
    (probe,) = probes
    ph = run.state["phases"][recipe.phases[0].name]
    for epoch, seen in enumerate(probe.at_epoch_end):
        raw, average = probe.after_batch[(epoch + 1) * STEPS - 1]
        # Early stopping and the checkpoints saw the average, not the weights trained.
        assert _same(seen, average) and not _same(seen, raw)
        # The recorded val_loss is the average's.
        held = build_model(width=8, n_blocks=1, l2=0.0, seed=0)
        held.set_weights(average)
        held.compile(loss="categorical_crossentropy")
        val_loss = held.evaluate(val_x, val_y, batch_size=1000, verbose=0)
        assert val_loss == pytest.approx(ph["epochs"][epoch]["val_loss"], rel=1e-5)
    best = probe.at_epoch_end[ph["best_epoch"] - 1]
    assert _same(model.get_weights(), best)
    assert _same(run.load_model(recipe.phases[0], "best").get_weights(), best)
    assert _same(run.load_model(recipe.phases[0], "last").get_weights(), probe.at_epoch_end[-1])


def test_resume_with_ema_continues_from_the_trained_weights_and_their_average(tmp_path, monkeypatch):
    probes, _ = _probe_fit(monkeypatch)
    x, y = learnable_sample()
    val = tf.data.Dataset.from_tensors((x[:1000], y[:1000]))
    path = tmp_path / "run"
    recipe = _ema_recipe(max_epochs=3)

    def build():
        return build_model(width=8, n_blocks=1, l2=0.0, seed=0)

    with pytest.raises(Exception, match="shard vanished"):
        run_phases(build, lambda i, e: crashing_batches(x, y, BATCH, STEPS + 2), val, _run_dir(path),
                   recipe=recipe, verbose=0)
    raw, average = probes[0].after_batch[STEPS - 1]  # the end of epoch 1, before any swap

    resumed = RunDir(path, {"test": 1}, recipe.phases)
    assert resumed.try_resume() is None
    model = run_phases(build, lambda i, e: repeated_batches(x, y, BATCH), val, resumed, recipe=recipe, verbose=0)
    weights, averages = probes[1].at_start
    assert _same(weights, raw) and _same(averages, average)
    assert resumed.state["phases"][recipe.phases[0].name]["resumed_at_epochs"] == [1]
    assert int(model.optimizer.iterations) == 3 * STEPS


def test_swap_ema_refuses_an_optimizer_without_an_average():
    model = build_model(width=8, n_blocks=1, seed=0)
    model.compile(loss="categorical_crossentropy", optimizer="adam")
    with pytest.raises(Exception, match="moving average"):
        swap_ema(model)


def test_phase_refuses_a_momentum_outside_0_1():
    with pytest.raises(ValueError, match="ema_momentum"):
        Phase("p", "adam", 1e-3, 0.0, None, 10, ema_momentum=1.0)


def test_steps_per_execution_and_jit_reach_keras_and_every_step_is_counted(tiny_dataset, tmp_path,
                                                                           monkeypatch):
    _, calls = _probe_fit(monkeypatch)
    recipe = _ema_recipe(momentum=0.0, max_epochs=2, steps_per_execution=5, jit_compile=True,
                         batch_size=BATCH)
    history = train_module.train(tiny_dataset["train"], tiny_dataset["validation"],
                                 tmp_path / "m.keras", recipe=recipe, width=8, blocks=1, verbose=0)
    (model,) = calls
    assert model.steps_per_execution == 5 and model.jit_compile is True
    (phase,) = history["phases"]
    assert [e["steps"] for e in phase["epochs"]] == [STEPS, STEPS]
    assert history["recipe"]["steps_per_execution"] == 5
    # Epochs stay whole: the steps per call are lowered to divide them.
    assert train_module.steps_per_execution(replace(recipe, steps_per_execution=10)) == 5
    assert train_module.steps_per_execution(replace(recipe, steps_per_epoch=1000,
                                                    steps_per_execution=10)) == 10


def test_schedule_counts_the_steps_of_multi_step_executions():
    phase = Phase("p", "adam", 1.0, 0.0, None, 10, schedule="cosine")
    cb = train_module.ScheduleCallback(phase, total_steps=100, steps_done=0, limit_s=1e9, already_s=0)
    cb.on_train_begin()
    for epoch in range(2):
        cb.on_epoch_begin(epoch)
        for last in (9, 19):  # two executions of 10 steps each
            cb.on_train_batch_end(last)
    assert cb.steps == 40
    assert cb.progress() == pytest.approx(0.4)


def test_ema_momentum_warms_up_and_a_short_run_ends_on_its_late_weights(tmp_path, monkeypatch):
    assert train_module.ema_momentum_at(0.999, 0) == pytest.approx(0.1)
    assert train_module.ema_momentum_at(0.999, 90) == pytest.approx(0.91)
    assert train_module.ema_momentum_at(0.999, 10**6) == 0.999
    probes, _ = _probe_fit(monkeypatch)
    x, y = learnable_sample()
    run = _run_dir(tmp_path / "run")
    recipe = _ema_recipe(momentum=0.999, max_epochs=2)
    run_phases(lambda: build_model(width=8, n_blocks=1, l2=0.0, seed=0), lambda i, e: repeated_batches(x, y, BATCH),
               tf.data.Dataset.from_tensors((x[:1000], y[:1000])), run, recipe=recipe, verbose=0)
    (probe,) = probes
    # Replay the warm-up on the raw weights the probe saw: the average follows it (a fixed
    # 0.999 would have kept the first step's weights almost unchanged).
    expect = probe.after_batch[0][0]
    for step in range(1, 2 * STEPS):
        m = train_module.ema_momentum_at(0.999, step)
        expect = [m * a + (1 - m) * w for a, w in zip(expect, probe.after_batch[step][0])]
    for a, b in zip(probe.after_batch[-1][1], expect):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_keras_runs_on_the_backend_asked_for():
    # tests/test_training_jax.py reruns this file's EMA and resume tests with
    # KERAS_BACKEND=jax: this makes sure they really ran there.
    import os
    assert keras.backend.backend() == os.environ.get("KERAS_BACKEND", "tensorflow")
