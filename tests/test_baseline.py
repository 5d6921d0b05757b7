"""The gradient-boosted baseline (issue 14): fits the training rows, gives probabilities
in label order, learns, and refuses what it cannot line up with the labels."""

import numpy as np
import pytest

from effgen.training import baseline
from effgen.training.baseline import MAX_LEAF_NODES, fit_baseline, load_training_rows
from effgen.training.validate import log_loss


def test_baseline_fits_the_training_split_and_beats_the_prior(tiny_dataset):
    x, y = load_training_rows(tiny_dataset["train"])
    assert len(x) == tiny_dataset["rows"]["train"] and x.shape[1] == 12 and y.shape[1] == 4
    fitted = fit_baseline(x, y, seed=0, max_iter=40, threads=1)
    info = fitted.describe()
    assert info["threads"] == 1
    assert info["train_rows"] == len(x) and info["max_leaf_nodes"] == MAX_LEAF_NODES == 63
    assert info["early_stopping"] and 1 <= info["n_iter"] <= 40 and info["fit_s"] > 0
    assert fitted.model.get_params()["early_stopping"] is True

    xt, yt = load_training_rows(tiny_dataset["test"])
    p = fitted.predict_proba(xt)
    assert p.shape == yt.shape
    np.testing.assert_allclose(p.sum(axis=1), 1, atol=1e-9)
    prior = np.broadcast_to(y.mean(axis=0), yt.shape)
    assert log_loss(p, yt.argmax(1)) < log_loss(prior, yt.argmax(1)) - 0.05
    # Columns are in label order: each class's mean prediction tracks its frequency.
    np.testing.assert_allclose(p.mean(axis=0), yt.mean(axis=0), atol=0.03)


def test_baseline_refuses_rows_missing_a_class_and_bad_shapes():
    x = np.random.default_rng(0).normal(size=(200, 3))
    y = np.eye(4)[np.arange(200) % 3]  # class 3 never occurs
    with pytest.raises(ValueError, match=r"classes \[3\] never occur"):
        fit_baseline(x, y)
    with pytest.raises(ValueError, match="same number of rows"):
        fit_baseline(x[:10], np.eye(4)[np.arange(11) % 4])


def test_one_openmp_thread_only_on_a_machine_busier_than_its_cores(monkeypatch):
    cores = baseline.os.cpu_count()
    monkeypatch.setattr(baseline.os, "getloadavg", lambda: (cores + 0.5, 0.0, 0.0))
    assert baseline.openmp_threads() == 1
    monkeypatch.setattr(baseline.os, "getloadavg", lambda: (cores - 0.5, 0.0, 0.0))
    assert baseline.openmp_threads() is None
