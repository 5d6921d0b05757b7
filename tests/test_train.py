"""Training: the seed's two phases, their stopping rules, and resuming after a crash.

Models are tiny (width 8, 1 block) and epochs are 5 batches of 256 rows."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from support import crashing_batches, learnable_sample, repeated_batches

from effgen.training.network import build_model
from effgen.training.train import PHASES, RunDir, TimeLimitCallback, checkpoint_dir, run_phases, train

BATCH, STEPS = 256, 5


def _run_dir(tmp_path, fingerprint=None):
    run = RunDir(tmp_path / "model.checkpoints", fingerprint or {"test": 1})
    run.path.mkdir(parents=True, exist_ok=True)
    return run


def _build():
    return build_model(width=8, n_blocks=1, seed=0)


def _fit(run, make_data, val, *, max_epochs, limits):
    return run_phases(_build, make_data, val, run, steps_per_epoch=STEPS,
                      max_epochs=max_epochs, limits=limits, verbose=0)


def test_time_limit_callback_stops_and_prints(capsys):
    x, y = learnable_sample(1024)
    model = _build()
    model.compile(loss="categorical_crossentropy", optimizer="rmsprop")
    stop = TimeLimitCallback(0)
    hist = model.fit(x, y, epochs=6, batch_size=BATCH, callbacks=[stop], verbose=0)
    assert len(hist.history["loss"]) == 1
    assert stop.fired
    assert "Training stopped after" in capsys.readouterr().out

    keep = TimeLimitCallback(3600)
    hist = model.fit(x, y, epochs=3, batch_size=BATCH, callbacks=[keep], verbose=0)
    assert len(hist.history["loss"]) == 3
    assert not keep.fired
    assert "Training stopped" not in capsys.readouterr().out


def test_both_phases_run_with_the_seed_recipe_and_end_on_best_weights(tmp_path):
    x, y = learnable_sample()
    val = tf.data.Dataset.from_tensors((x[:1000], y[:1000]))
    seen_phases = []

    def make_data(phase_index, epochs_done):
        seen_phases.append((phase_index, epochs_done))
        return repeated_batches(x, y, BATCH, seed=phase_index)

    run = _run_dir(tmp_path)
    model = _fit(run, make_data, val, max_epochs=3, limits=(3600, 3600))
    assert seen_phases == [(0, 0), (1, 0)]
    state = json.loads(run.state_path.read_text())
    for phase in PHASES:
        ph = state["phases"][phase.name]
        assert ph["done"] and ph["stop_reason"] == "max_epochs"
        assert [e["epoch"] for e in ph["epochs"]] == [1, 2, 3]
        assert all(np.isfinite([e["loss"], e["val_loss"]]).all() for e in ph["epochs"])
        val_losses = [e["val_loss"] for e in ph["epochs"]]
        assert ph["best_val_loss"] == min(val_losses)
        assert ph["best_epoch"] == 1 + int(np.argmin(val_losses))
    # Phase 2 compiled without label smoothing at the lower rate.
    assert model.optimizer.learning_rate.numpy() == pytest.approx(PHASES[1].learning_rate)
    assert model.loss.get_config()["label_smoothing"] == 0
    best = run.load_model(PHASES[1], "best")
    for a, b in zip(model.get_weights(), best.get_weights()):
        np.testing.assert_array_equal(a, b)
    # A saved and reloaded model predicts exactly what the trained one does.
    model.save(tmp_path / "saved.keras")
    reloaded = keras.models.load_model(tmp_path / "saved.keras")
    np.testing.assert_array_equal(reloaded.predict(x[:500], verbose=0), model.predict(x[:500], verbose=0))
    # Learning happened: phase 2's best is below the first epoch of phase 1.
    assert state["phases"]["finetuning"]["best_val_loss"] < \
        state["phases"]["pretraining"]["epochs"][0]["val_loss"]


def test_early_stopping_uses_each_phase_patience_and_restores_the_best(tmp_path):
    # Training pushes towards class 1 while validation is all class 0, so the
    # validation loss rises after the first epoch of each phase.
    x, _ = learnable_sample(2048)
    y_train = np.tile(np.eye(4, dtype="float32")[1], (len(x), 1))
    y_val = np.tile(np.eye(4, dtype="float32")[0], (512, 1))
    val = tf.data.Dataset.from_tensors((x[:512], y_val))
    run = _run_dir(tmp_path)
    model = _fit(run, lambda i, e: repeated_batches(x, y_train, BATCH), val, max_epochs=50, limits=(3600, 3600))
    phases = run.state["phases"]
    for phase in PHASES:
        ph = phases[phase.name]
        assert ph["stop_reason"] == "early_stopping"
        assert ph["best_epoch"] == 1
        assert len(ph["epochs"]) == 1 + phase.patience
    val_loss = model.evaluate(x[:512], y_val, batch_size=512, verbose=0)
    assert val_loss == pytest.approx(phases["finetuning"]["best_val_loss"], rel=1e-5)


def test_time_limit_stops_each_phase(tmp_path, capsys):
    x, y = learnable_sample()
    val = tf.data.Dataset.from_tensors((x[:500], y[:500]))
    run = _run_dir(tmp_path)
    _fit(run, lambda i, e: repeated_batches(x, y, BATCH), val, max_epochs=50, limits=(0, 0))
    for phase in PHASES:
        ph = run.state["phases"][phase.name]
        assert ph["stop_reason"] == "time_limit"
        assert len(ph["epochs"]) == 1
    assert capsys.readouterr().out.count("Training stopped after") == 2


def test_resume_after_a_crash_skips_the_finished_phase_and_continues(tmp_path, capsys):
    x, y = learnable_sample()
    val = tf.data.Dataset.from_tensors((x[:1000], y[:1000]))

    def crash_in_phase_2(phase_index, epochs_done):
        return repeated_batches(x, y, BATCH) if phase_index == 0 else crashing_batches(x, y, BATCH, 2 * STEPS + 2)

    run = _run_dir(tmp_path)
    with pytest.raises(Exception, match="shard vanished"):
        _fit(run, crash_in_phase_2, val, max_epochs=3, limits=(3600, 3600))
    before = json.loads(run.state_path.read_text())
    assert before["phases"]["pretraining"]["done"]
    assert not before["phases"]["finetuning"]["done"]
    assert len(before["phases"]["finetuning"]["epochs"]) == 2
    capsys.readouterr()

    resumed = RunDir(run.path, {"test": 1})
    assert resumed.try_resume() is None
    calls = []

    def healthy(phase_index, epochs_done):
        calls.append((phase_index, epochs_done))
        return repeated_batches(x, y, BATCH)

    model = _fit(resumed, healthy, val, max_epochs=6, limits=(3600, 3600))
    out = capsys.readouterr().out
    assert calls == [(1, 2)]  # phase 1 not re-run
    assert "pretraining: already finished" in out
    after = resumed.state["phases"]
    assert after["pretraining"] == before["phases"]["pretraining"]
    ft = after["finetuning"]
    assert ft["done"] and ft["resumed_at_epochs"] == [2]
    assert [e["epoch"] for e in ft["epochs"]] == [1, 2, 3, 4, 5, 6]
    assert ft["epochs"][:2] == before["phases"]["finetuning"]["epochs"]
    # The time limit counts the time spent before the crash.
    assert ft["epochs"][2]["elapsed_s"] > before["phases"]["finetuning"]["elapsed_s"]
    # The optimizer state came back with the checkpoint: its step count spans the crash.
    assert int(model.optimizer.iterations) == 6 * STEPS
    best = resumed.load_model(PHASES[1], "best")
    for a, b in zip(model.get_weights(), best.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_resume_refuses_a_different_run(tmp_path):
    run = _run_dir(tmp_path, {"config": {"width": 8}})
    run.write_state()
    assert RunDir(run.path, {"config": {"width": 8}}).try_resume() is None
    why = RunDir(run.path, {"config": {"width": 16}}).try_resume()
    assert "different run" in why and "config" in why
    assert "no previous run" in RunDir(tmp_path / "elsewhere", {}).try_resume()


# ---- through FeatherReader, the function API and the CLI -----------------------------

# The seed recipe: these tests exercise its two phases through the function API.
TINY = dict(recipe="seed", batch_size=BATCH, steps_per_epoch=STEPS, width=8, blocks=1)


def test_train_writes_model_history_and_plot(tiny_dataset, tmp_path):
    out = tmp_path / "model" / "model.keras"
    history = train(tiny_dataset["train"], tiny_dataset["validation"], out, max_epochs=3,
                    pre_limit_s=3600, ft_limit_s=3600, seed=1, verbose=0, **TINY)
    assert out.is_file() and (out.parent / "loss.png").stat().st_size > 1000
    assert not checkpoint_dir(out).exists()  # the run directory goes once the model is out
    on_disk = json.loads((out.parent / "history.json").read_text())
    assert on_disk == json.loads(json.dumps(history))
    assert [p["name"] for p in on_disk["phases"]] == [p.name for p in PHASES]
    assert [p["limit_s"] for p in on_disk["phases"]] == [3600, 3600]
    for phase in on_disk["phases"]:
        assert [e["epoch"] for e in phase["epochs"]] == [1, 2, 3]
        assert all(e["wall_s"] > 0 and np.isfinite(e["val_loss"]) for e in phase["epochs"])
    assert on_disk["n_params"] == 12 * 8 + 8 + (8 * 8 + 8) + 8 * 4 + 4
    assert on_disk["model_sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert on_disk["preprocessing_sha256"] == \
        hashlib.sha256(tiny_dataset["preprocessing"].read_bytes()).hexdigest()

    # The saved model is phase 2's best: it reproduces that epoch's validation loss
    # on the same validation batch (the first BATCH rows).
    from effgen.data.reader import FeatherReader
    val = FeatherReader(tiny_dataset["validation"]).as_pandas(max_rows=BATCH)
    x = val[FeatherReader(tiny_dataset["validation"]).features].to_numpy("float32")
    y = val[FeatherReader(tiny_dataset["validation"]).labels].to_numpy("float32")
    model = keras.models.load_model(out)
    assert model.evaluate(x, y, batch_size=BATCH, verbose=0) == pytest.approx(
        history["phases"][1]["best_val_loss"], rel=1e-5)
    np.testing.assert_array_equal(model.predict(x, verbose=0),
                                  keras.models.load_model(out).predict(x, verbose=0))


def test_train_rejects_bad_arguments(tiny_dataset, tmp_path):
    with pytest.raises(ValueError, match=r"\.keras"):
        train(tiny_dataset["train"], tiny_dataset["validation"], tmp_path / "m.h5",
              max_epochs=1, pre_limit_s=1, ft_limit_s=1, **TINY)
    with pytest.raises(ValueError, match="fewer than one batch"):
        train(tiny_dataset["train"], tiny_dataset["validation"], tmp_path / "m.keras",
              max_epochs=1, pre_limit_s=1, ft_limit_s=1,
              **{**TINY, "batch_size": 10**7})


def test_train_refuses_a_shard_with_nan_before_training(tiny_dataset, tmp_path):
    import shutil

    import pyarrow as pa
    import pyarrow.feather as feather

    val = tmp_path / "validation"
    shutil.copytree(tiny_dataset["validation"], val)
    shard = sorted(val.glob("*.feather"))[-1]
    table = feather.read_table(shard)
    j = table.schema.get_field_index("mc_eta")
    eta = table.column(j).to_numpy().copy()
    eta[5] = np.nan
    feather.write_feather(table.set_column(j, "mc_eta", pa.array(eta)), shard)
    out = tmp_path / "m.keras"
    with pytest.raises(ValueError, match=rf"{shard.name}: column 'mc_eta' has 1 non-finite.*row 5"):
        train(tiny_dataset["train"], val, out, max_epochs=1, pre_limit_s=1, ft_limit_s=1, **TINY)
    assert not out.exists() and not checkpoint_dir(out).exists()


def test_train_refuses_splits_made_by_different_preprocessings(tiny_dataset, tmp_path):
    import shutil

    val = tmp_path / "validation"
    shutil.copytree(tiny_dataset["validation"], val)
    defs = json.loads((val / "definitions.json").read_text())
    defs["preprocessing_sha256"] = "0" * 64
    (val / "definitions.json").write_text(json.dumps(defs))
    with pytest.raises(ValueError, match="different preprocessings.*0000000000"):
        train(tiny_dataset["train"], val, tmp_path / "m.keras", max_epochs=1, pre_limit_s=1,
              ft_limit_s=1, **TINY)


def _state(path):
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def test_cli_killed_mid_finetuning_resumes_without_rerunning_pretraining(tiny_dataset, tmp_path):
    out = tmp_path / "model.keras"
    state_path = checkpoint_dir(out) / "state.json"
    steps = 60  # epochs long enough that phase 2 cannot finish before the kill
    cmd = [sys.executable, "-m", "effgen", "train", "--recipe", "seed",
           "--train-data", str(tiny_dataset["train"]),
           "--validation-data", str(tiny_dataset["validation"]), "--output", str(out),
           "--batch-size", str(BATCH), "--steps-per-epoch", str(steps), "--width", "8",
           "--blocks", "1", "--max-epochs", "100", "--pre-limit", "1", "--ft-limit", "600",
           "--seed", "0"]  # train()'s default, for the resume below
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            cwd=Path(__file__).resolve().parents[1])
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            st = _state(state_path)
            if st and st["phases"]["pretraining"]["done"] and st["phases"]["finetuning"]["epochs"]:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "training ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    killed = _state(state_path)
    assert killed["phases"]["pretraining"]["done"]
    done_ft = len(killed["phases"]["finetuning"]["epochs"])
    assert done_ft >= 1 and not killed["phases"]["finetuning"]["done"]
    assert not out.exists()

    # A limit just above the time already spent allows exactly one more epoch.
    ft_limit = killed["phases"]["finetuning"]["elapsed_s"] + 1e-3
    history = train(tiny_dataset["train"], tiny_dataset["validation"], out, max_epochs=100,
                    pre_limit_s=1, ft_limit_s=ft_limit, resume=True, verbose=0,
                    **{**TINY, "steps_per_epoch": steps})
    pre, ft = history["phases"]
    assert pre["epochs"] == killed["phases"]["pretraining"]["epochs"]
    assert pre["resumed_at_epochs"] == []
    assert ft["resumed_at_epochs"] == [done_ft]
    assert ft["epochs"][:done_ft] == killed["phases"]["finetuning"]["epochs"]
    assert len(ft["epochs"]) == done_ft + 1
    assert ft["epochs"][-1]["epoch"] == done_ft + 1
    assert ft["stop_reason"] == "time_limit"
    assert out.is_file() and not checkpoint_dir(out).exists()


def test_resume_of_another_configuration_starts_afresh(tiny_dataset, tmp_path, capsys):
    out = tmp_path / "model.keras"
    run = RunDir(checkpoint_dir(out), {"config": {"width": 999}})
    run.path.mkdir(parents=True)
    run.state["phases"]["pretraining"]["done"] = True
    run.write_state()
    history = train(tiny_dataset["train"], tiny_dataset["validation"], out, max_epochs=1,
                    pre_limit_s=60, ft_limit_s=60, resume=True, verbose=0, **TINY)
    assert "starting afresh" in capsys.readouterr().err
    assert [len(p["epochs"]) for p in history["phases"]] == [1, 1]
