"""Training on Keras' JAX backend (the default recipe's) with numpy feeds: the model a JAX
process trains loads under TensorFlow (export, parity and describe stay there) and predicts
the same; the EMA and resume tests pass on JAX; the backend is chosen before Keras is
imported, and a process that already has Keras refuses another backend; the numpy feeds
give the TensorFlow feeds' batches.

This test process runs Keras on TensorFlow: the JAX runs happen in fresh interpreters."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest

from effgen.data.reader import FeatherReader
from effgen.errors import TrainingError
from effgen.training import backend as backends
from effgen.training.feed import memory_batches, stream_batches
from effgen.training.train import train

ROOT = Path(__file__).resolve().parents[1]


def _python(code, **env):
    """Run `code` in a fresh interpreter from the repository root; its stdout."""
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, text=True,
                         capture_output=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **env})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout


def test_a_model_trained_on_jax_loads_under_tensorflow_and_predicts_the_same(tiny_dataset, tmp_path):
    # Many rows: the tiny test split plus wide random ones (saturating the tanh layers too).
    test = FeatherReader(tiny_dataset["test"])
    x_test, _ = next(test.iter_xy(test.n_rows))
    rows = np.concatenate([x_test, 3 * np.random.default_rng(0).normal(size=(50_000, 12))]).astype("float32")
    np.save(tmp_path / "rows.npy", rows)
    out = tmp_path / "model" / "model.keras"
    # The CLI in a fresh process, no backend asked for: the default recipe's (JAX), set
    # before Keras is imported; then the JAX process's own predictions of the saved model.
    _python(f"""
        import sys
        from effgen.cli import main
        assert "keras" not in sys.modules
        rc = main(["train", "--train-data", "{tiny_dataset['train']}",
                   "--validation-data", "{tiny_dataset['validation']}", "--output", "{out}",
                   "--width", "16", "--blocks", "2", "--batch-size", "256", "--steps-per-epoch", "20",
                   "--max-epochs", "2", "--seed", "1"])
        assert rc == 0
        import keras, numpy as np
        assert keras.backend.backend() == "jax"
        model = keras.models.load_model("{out}")
        np.save("{tmp_path / 'jax.npy'}", model.predict(np.load("{tmp_path / 'rows.npy'}"),
                                                       batch_size=8192, verbose=0))
        """, TRAIN_BACKEND="")
    history = json.loads((out.parent / "history.json").read_text())
    assert history["config"]["backend"] == "jax" and history["recipe"]["backend"] == "jax"
    assert history["config"]["data"] == "memory" and history["calibration"]["method"] == "scale_bias"
    assert [e["steps"] for e in history["phases"][0]["epochs"]] == [20, 20]

    model = keras.models.load_model(out)  # TensorFlow, in this process
    assert keras.backend.backend() == "tensorflow"
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    assert [d.units for d in dense] == [16, 16, 16, 4]
    assert [d.activation.__name__ for d in dense] == ["tanh", "tanh", "tanh", "linear"]
    assert sum(isinstance(layer, keras.layers.Add) for layer in model.layers) == 2
    assert isinstance(model.layers[-1], keras.layers.Softmax)
    ours = model.predict(rows, batch_size=8192, verbose=0)
    theirs = np.load(tmp_path / "jax.npy")
    assert ours.shape == theirs.shape == (len(rows), 4)
    # Same weights, two float32 backends (XLA vs Eigen): rounding differences only.
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=2e-6)
    assert not np.allclose(ours, ours.mean(axis=0), atol=1e-3)  # it is not a constant model


def test_ema_and_resume_tests_pass_on_jax():
    # The EMA tests (validation, checkpoints and selection on the average; the in-step
    # warm-up; resume with the average swapped back) rerun with Keras on JAX.
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_training_ema.py",
         "-k", "backend or ema_weights_are_validated or resume_with_ema or warms_up"],
        cwd=ROOT, text=True, capture_output=True,
        env={**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert run.returncode == 0, run.stdout[-3000:]
    assert "4 passed" in run.stdout, run.stdout[-3000:]


def test_a_process_with_keras_refuses_another_backend(tiny_dataset, tmp_path):
    assert backends.active_backend() == "tensorflow"
    assert backends.activate(None, preferred="jax") == "tensorflow"  # not asked: the active one
    assert backends.activate("tensorflow") == "tensorflow"
    with pytest.raises(TrainingError, match="cannot train on the jax backend.*already imported Keras "
                                            "with the tensorflow backend.*TRAIN_BACKEND=jax"):
        train(tiny_dataset["train"], tiny_dataset["validation"], tmp_path / "m.keras", backend="jax")
    assert not (tmp_path / "m.checkpoints").exists()
    with pytest.raises(TrainingError, match="'torch' is not one of jax, tensorflow"):
        backends.activate("torch")


def test_cli_backend_knob_chooses_the_backend_before_keras_is_imported():
    out = _python("""
        import os, sys
        from effgen.training.backend import activate
        print(activate(os.environ["TRAIN_BACKEND"], preferred="jax"))
        import keras
        print(keras.backend.backend())
        """, TRAIN_BACKEND="tensorflow", KERAS_BACKEND="jax")
    assert out.split() == ["tensorflow", "tensorflow"]


def _take(stream, n):
    it = iter(stream)
    return [tuple(np.asarray(a) for a in next(it)) for _ in range(n)]


def test_numpy_stream_gives_the_tensorflow_stream_batches_with_bounded_memory(tiny_dataset):
    reader = FeatherReader(tiny_dataset["train"])
    batch = 1000
    per_pass = reader.n_rows // batch
    n = 2 * per_pass + 3  # into the third pass
    ours = _take(stream_batches(reader, batch, 7, "jax"), n)
    theirs = _take(stream_batches(reader, batch, 7, "tensorflow"), n)
    for (xa, ya), (xb, yb) in zip(ours, theirs, strict=True):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    # Each pass holds every row at most once, in a new order; the next pass starts afresh.
    first = np.concatenate([x for x, _ in ours[:per_pass]])
    second = np.concatenate([x for x, _ in ours[per_pass:2 * per_pass]])
    assert len(np.unique(first, axis=0)) == len(first) == per_pass * batch
    assert not np.array_equal(first, second)
    # The shuffle buffer bounds what is held: with a buffer of one shard, batches come
    # from one shard's rows (plus a carry-over) at a time.
    small = list(reader.iter_batches(batch, shuffle=True, seed=7, shuffle_buffer=1))
    assert len(small) == per_pass
    assert not np.array_equal(np.concatenate([x for x, _ in small]), first)


def test_numpy_memory_feed_gives_the_tensorflow_feed_batches(tiny_dataset):
    x, y = next(FeatherReader(tiny_dataset["train"]).iter_xy(10_000))
    n = 2 * (len(x) // 512) + 2
    ours = _take(memory_batches(x, y, 512, 3, "jax"), n)
    theirs = _take(memory_batches(x, y, 512, 3, "tensorflow"), n)
    for (xa, ya), (xb, yb) in zip(ours, theirs, strict=True):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    assert all(a.shape == (512, 12) and b.shape == (512, 4) for a, b in ours)
