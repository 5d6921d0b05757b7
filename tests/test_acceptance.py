"""The acceptance model: its production topology, its recipes (binary cross-entropy),
training on the efficiency shards' `acceptance` column, and the short check after it."""

import json
import subprocess
import sys

import keras
import numpy as np
import pyarrow.feather as feather
import pytest

from effgen.data.reader import DataError
from effgen.training import train as train_module
from effgen.training.acceptance import AcceptanceReader, binary_metrics, build_acceptance_model
from effgen.training.recipes import ACCEPTANCE_RECIPES, ACCEPTANCE_SEED


def test_production_topology_has_the_published_size_and_zero_residual_kernels():
    model = build_acceptance_model(seed=4)
    assert model.count_params() == 166_913  # DOMAIN.md section 8
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    adds = [layer for layer in model.layers if isinstance(layer, keras.layers.Add)]
    assert len(dense) == 12 and len(adds) == 10
    assert dense[0].kernel_regularizer is not None and dense[0].get_config()["activation"] == "tanh"
    for layer in dense[1:-1]:
        assert layer.get_config()["activation"] == "tanh"
        assert not np.any(layer.get_weights()[0])  # kernel zeros: each block starts as identity
    assert dense[-1].get_config()["activation"] == "sigmoid" and dense[-1].units == 1
    x = np.random.default_rng(0).normal(size=(64, 12)).astype(np.float32)
    p = model.predict(x, verbose=0)
    assert p.shape == (64, 1) and np.all((p > 0) & (p < 1))


def test_reader_takes_the_acceptance_column_as_the_label(tiny_dataset):
    reader = AcceptanceReader(tiny_dataset["train"])
    assert reader.labels == ["acceptance"] and "acceptance" not in reader.extra
    x, y = next(reader.iter_xy(reader.n_rows))
    assert x.shape == (reader.n_rows, 12) and y.shape == (reader.n_rows, 1)
    assert set(np.unique(y)) == {0.0, 1.0}
    assert reader.validate() == reader.n_rows


def test_reader_refuses_a_label_other_than_0_or_1(tiny_dataset, tmp_path):
    import shutil

    d = tmp_path / "train"
    shutil.copytree(tiny_dataset["train"], d)
    shard = sorted(d.glob("*.feather"))[1]
    table = feather.read_table(shard)
    acc = table.column("acceptance").to_numpy().copy()
    acc[7] = 2
    table = table.set_column(table.schema.get_field_index("acceptance"), "acceptance",
                             __import__("pyarrow").array(acc))
    feather.write_feather(table, shard)
    with pytest.raises(DataError, match=rf"{shard.name}.*'acceptance' is not 0/1.*row 7"):
        AcceptanceReader(d).validate()


def test_binary_metrics_prior_and_calibration():
    rng = np.random.default_rng(1)
    p = rng.uniform(0.05, 0.95, 200_000)
    y = (rng.random(p.size) < p).astype(np.float32)
    calibrated = binary_metrics(p, y)
    assert calibrated["log_loss"] < calibrated["prior_log_loss"]
    assert calibrated["max_calibration_gap"] < 0.01
    skewed = binary_metrics(np.clip(p + 0.2, 0, 1), y)
    assert skewed["max_calibration_gap"] > 0.1


def _spy_compile(monkeypatch):
    calls = []
    real_fit = keras.Model.fit

    def fit(model, x=None, **kwargs):
        calls.append({"loss": model.loss, "optimizer": type(model.optimizer).__name__,
                      "lr": float(model.optimizer.learning_rate.numpy()), "params": model.count_params()})
        return real_fit(model, x, **kwargs)

    monkeypatch.setattr(keras.Model, "fit", fit)
    return calls


def test_seed_recipe_is_binary_cross_entropy_smoothed_then_not(tiny_dataset, tmp_path, monkeypatch):
    calls = _spy_compile(monkeypatch)
    train_module.train(tiny_dataset["train"], tiny_dataset["validation"], tmp_path / "a.keras",
                       recipe="seed", target="acceptance", batch_size=512, max_epochs=1,
                       steps_per_epoch=2, width=16, blocks=2, verbose=0)
    assert [type(c["loss"]).__name__ for c in calls] == ["BinaryCrossentropy"] * 2
    assert [c["loss"].get_config()["label_smoothing"] for c in calls] == [0.01, 0.0]
    assert [c["optimizer"] for c in calls] == ["RMSprop", "RMSprop"]
    assert [c["lr"] for c in calls] == pytest.approx([p.learning_rate for p in ACCEPTANCE_SEED.phases])
    assert ACCEPTANCE_SEED.blocks == 10 and ACCEPTANCE_SEED.l2 == 1e-3


def test_default_recipe_learns_the_acceptance(tiny_dataset, tmp_path):
    out = tmp_path / "acceptance" / "model.keras"
    history = train_module.train(tiny_dataset["train"], tiny_dataset["validation"], out,
                                 target="acceptance", steps_per_epoch=40, max_epochs=4,
                                 width=32, blocks=2, test_dir=tiny_dataset["test"], verbose=0)
    assert ACCEPTANCE_RECIPES["default"].phases[0].loss == "binary"
    assert history["labels"] == ["acceptance"] and history["config"]["target"] == "acceptance"
    assert history["preprocessing_sha256"] == AcceptanceReader(tiny_dataset["train"]).preprocessing_sha256
    check = json.loads((out.parent / "acceptance.json").read_text())
    # Better than the prior on the test split, and roughly calibrated (tiny model, 160 steps).
    assert check["log_loss"] < 0.8 * check["prior_log_loss"], check
    assert check["max_calibration_gap"] < 0.15, check
    model = keras.models.load_model(out)
    assert model.output_shape == (None, 1)


def test_cli_target_acceptance_writes_its_own_model_dir(tiny_dataset, tmp_path):
    env = {**__import__("os").environ, "EFFGEN_WORKDIR": str(tmp_path / "w")}
    proc = subprocess.run(
        [sys.executable, "-m", "effgen", "train", "--target", "acceptance",
         "--train-data", str(tiny_dataset["train"]), "--validation-data", str(tiny_dataset["validation"]),
         "--steps-per-epoch", "2", "--max-epochs", "1", "--width", "8", "--blocks", "1"],
        capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "w" / "acceptance" / "model.keras").is_file()
    assert not (tmp_path / "w" / "model" / "model.keras").exists()
