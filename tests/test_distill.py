"""Distillation (effgen/training/distill.py, `effgen train --teachers`): the student's
training labels are the mean of its teachers' probabilities; validation and calibration
keep the true labels; teachers that do not fit the data are refused by name, before any
training; the run's fingerprint (what --resume compares) names the teachers' sha256."""

import json

import keras
import numpy as np
import pytest

from effgen.cli import main
from effgen.data.reader import FeatherReader
from effgen.provenance import sha256_of
from effgen.training import train as train_module
from effgen.training.distill import mean_probabilities

SMALL = dict(recipe="default", batch_size=256, steps_per_epoch=5, max_epochs=1, width=16, blocks=1,
             verbose=0)


@pytest.fixture(scope="module")
def teachers(tiny_dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    paths = []
    for seed in (1, 2):
        path = root / f"t{seed}" / "model.keras"
        train_module.train(tiny_dataset["train"], tiny_dataset["validation"], path, seed=seed, **SMALL)
        paths.append(path)
    return paths


def _capture_labels(monkeypatch):
    seen = {}
    real = train_module.memory_batches

    def spy(features, labels, *args, **kwargs):
        seen["features"], seen["labels"] = features, labels
        return real(features, labels, *args, **kwargs)
    monkeypatch.setattr(train_module, "memory_batches", spy)
    return seen


def test_the_student_trains_on_the_mean_of_its_teachers_probabilities(tiny_dataset, teachers, tmp_path,
                                                                      monkeypatch):
    seen = _capture_labels(monkeypatch)
    real_run_phases = train_module.run_phases

    def run_phases(build, make_train_data, validation_data, *args, **kwargs):
        seen["validation"] = validation_data
        return real_run_phases(build, make_train_data, validation_data, *args, **kwargs)
    monkeypatch.setattr(train_module, "run_phases", run_phases)
    out = tmp_path / "student.keras"
    history = train_module.train(tiny_dataset["train"], tiny_dataset["validation"], out, seed=3,
                                 teachers=teachers, **SMALL)
    reader = FeatherReader(tiny_dataset["train"])
    x, y = next(reader.iter_xy(reader.n_rows))
    np.testing.assert_array_equal(seen["features"], x)
    # Each teacher's own predictions, by Keras' predict, averaged here.
    expected = np.mean([keras.models.load_model(t).predict(x, verbose=0) for t in teachers], axis=0)
    np.testing.assert_allclose(seen["labels"], expected, rtol=0, atol=1e-6)
    assert not np.array_equal(seen["labels"], y)  # soft labels, not the one-hot ones
    np.testing.assert_allclose(seen["labels"].sum(axis=1), 1.0, atol=1e-5)
    recorded = history["config"]["teachers"]
    assert [r["path"] for r in recorded] == [str(t) for t in teachers]
    assert all(len(r["sha256"]) == 64 for r in recorded)
    # Validation (the best-epoch choice) sees the validation split's true labels...
    val = FeatherReader(tiny_dataset["validation"])
    validation = seen["validation"]
    _, y_seen = validation if isinstance(validation, tuple) else next(iter(validation))
    _, y_val = next(val.iter_xy(len(y_seen)))
    np.testing.assert_array_equal(np.asarray(y_seen), y_val)
    # ... and calibration fits their fractions.
    xv, yv = next(val.iter_xy(history["calibration"]["rows"]))
    pred = keras.models.load_model(out).predict(xv, verbose=0)
    np.testing.assert_allclose(pred.mean(0), yv.mean(0), atol=2e-5)


def test_mean_probabilities_in_batches_is_the_mean_of_whole_predictions(teachers):
    models = [keras.models.load_model(t) for t in teachers]
    x = np.random.default_rng(0).normal(size=(1000, 12)).astype(np.float32)
    whole = np.mean([m.predict(x, verbose=0) for m in models], axis=0)
    np.testing.assert_allclose(mean_probabilities(models, x, batch_size=300), whole, rtol=0, atol=1e-6)


def test_a_teacher_of_another_shape_is_refused_by_name(tiny_dataset, tmp_path, capsys):
    wrong = tmp_path / "wide.keras"
    inputs = keras.Input((12,))
    keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(inputs)).save(wrong)
    with pytest.raises(ValueError, match=r"teacher .*wide\.keras maps \(12,\) inputs to \(3,\) outputs"):
        train_module.train(tiny_dataset["train"], tiny_dataset["validation"], tmp_path / "s.keras",
                           teachers=[wrong], **SMALL)
    missing = tmp_path / "nowhere.keras"
    assert main(["train", "--train-data", str(tiny_dataset["train"]), "--validation-data",
                 str(tiny_dataset["validation"]), "--output", str(tmp_path / "s.keras"),
                 "--teachers", str(missing)]) == 1
    assert f"teacher {missing} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "s.keras").exists()


def test_a_teacher_of_another_preprocessing_is_refused(tiny_dataset, teachers, tmp_path):
    history_path = teachers[0].with_name("history.json")
    original = history_path.read_text()
    try:
        history = json.loads(original)
        history["preprocessing_sha256"] = "0" * 64
        history_path.write_text(json.dumps(history))
        with pytest.raises(ValueError, match="teacher .* another preprocessing"):
            train_module.train(tiny_dataset["train"], tiny_dataset["validation"], tmp_path / "s.keras",
                               teachers=teachers, **SMALL)
    finally:
        history_path.write_text(original)


def test_a_streaming_recipe_cannot_distill(tiny_dataset, teachers, tmp_path):
    with pytest.raises(ValueError, match="recipe seed streams"):
        train_module.train(tiny_dataset["train"], tiny_dataset["validation"], tmp_path / "s.keras",
                           recipe="seed", teachers=teachers, verbose=0)


def test_the_runs_fingerprint_names_its_teachers(tiny_dataset, teachers, tmp_path, monkeypatch):
    # The fingerprint is what --resume compares (RunDir.try_resume): another teacher file
    # makes another run, which starts afresh instead of resuming the old one's epochs.
    seen = []
    real = train_module.RunDir

    class Recording(real):
        def __init__(self, path, fingerprint, phases):
            seen.append(fingerprint)
            super().__init__(path, fingerprint, phases)
    monkeypatch.setattr(train_module, "RunDir", Recording)
    for chosen in ([teachers[0]], [teachers[1]]):
        train_module.train(tiny_dataset["train"], tiny_dataset["validation"], tmp_path / "s.keras",
                           seed=3, teachers=chosen, **SMALL)
    assert [fp["teachers"] for fp in seen] == [[sha256_of(teachers[0])], [sha256_of(teachers[1])]]
    assert sha256_of(teachers[0]) != sha256_of(teachers[1])
