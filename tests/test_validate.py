"""Validation: the metrics on constructed inputs, then the full report on a tiny model."""

import base64
import json
import re

import numpy as np
import pytest

from effgen import schema
from effgen.training.validate import (
    _stacked_histograms,
    calibration,
    compute_metrics,
    log_loss,
    species_masks,
    validate,
)


def _draw(prob, rng):
    """One-hot labels drawn from per-row probabilities."""
    cls = (rng.random(len(prob))[:, None] > np.cumsum(prob, axis=1)[:, :-1]).sum(axis=1)
    return np.eye(prob.shape[1], dtype=np.float32)[cls]


def _truth(n, rng):
    logits = rng.normal(size=(n, 4)) * 1.5
    return np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)


def test_log_loss_is_the_mean_negative_log_of_the_label_probability():
    prob = np.array([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]])
    assert log_loss(prob, np.array([0, 1])) == pytest.approx(-(np.log(0.5) + np.log(0.8)) / 2)
    # A zero probability on the label is floored, not infinite.
    assert np.isfinite(log_loss(np.array([[1.0, 0.0]]), np.array([1])))


def test_stacked_histograms_equal_matplotlibs_stacked_hist():
    """The momentum-bin stacks are summed with numpy and drawn as stairs; the heights must
    be those of matplotlib's own stacked, weighted histogram."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rng = np.random.default_rng(3)
    values = rng.normal(size=20_000)
    weights = rng.dirichlet(np.ones(4), size=20_000)
    bins = np.linspace(-3, 3, 31)
    fig, ax = plt.subplots()
    expected, _, _ = ax.hist([values] * 4, bins=bins, weights=list(weights.T), stacked=True)
    plt.close(fig)
    np.testing.assert_allclose(_stacked_histograms(values, weights, bins), np.asarray(expected),
                               rtol=1e-12, atol=1e-9)


def test_calibration_separates_calibrated_from_distorted_predictions():
    rng = np.random.default_rng(0)
    p = rng.random(200_000)
    outcome = (rng.random(p.size) < p).astype(float)
    good = calibration(p, outcome)
    bad = calibration(p ** 2, outcome)  # systematically too low
    assert good["ece"] < 0.01
    assert bad["ece"] > 0.1
    assert good["count"].sum() == p.size
    # Against the probabilities themselves the gap is only the binning width effect.
    assert calibration(p, p)["ece"] < 1e-9


def test_metrics_of_the_truth_and_of_the_prior():
    rng = np.random.default_rng(1)
    n = 50_000
    truth = _truth(n, rng)
    labels = _draw(truth, rng)
    flags = {"mc_is_e": rng.random(n) < 0.1}
    flags["mc_is_mu"] = ~flags["mc_is_e"] & (rng.random(n) < 0.1)
    flags["mc_is_h"] = ~(flags["mc_is_e"] | flags["mc_is_mu"])
    masks = species_masks({k: v.astype(np.float32) for k, v in flags.items()})

    exact = compute_metrics(truth.astype(np.float32), labels, truth, masks)
    assert exact["log_loss"]["model_minus_truth"] == pytest.approx(0, abs=1e-6)
    assert exact["kl_truth_to_model"] == pytest.approx(0, abs=1e-6)
    assert exact["log_loss"]["truth"] < exact["log_loss"]["prior"]
    for row in exact["per_class"].values():
        assert row["mean_abs_diff_vs_truth"] < 1e-6
        assert row["calibration_error_vs_labels"] < 0.02

    prior = np.broadcast_to(labels.mean(axis=0), labels.shape)
    flat = compute_metrics(prior, labels, truth, masks)
    assert flat["log_loss"]["model"] == pytest.approx(flat["log_loss"]["prior"], rel=1e-6)
    assert flat["log_loss"]["model_minus_truth"] > 0.05
    assert flat["kl_truth_to_model"] > 0.05

    for name, mask in masks.items():
        sp = exact["per_species"][name]
        assert sp["n"] == int(mask.sum())
        np.testing.assert_allclose(sp["label_counts"], labels[mask].sum(axis=0))
        np.testing.assert_allclose(sp["predicted_sums"], truth[mask].sum(axis=0), rtol=1e-5)
    assert sum(sp["n"] for sp in exact["per_species"].values()) == n


def test_metrics_count_rows_that_would_abort_a_lamarr_step():
    labels = np.eye(4, dtype=np.float32)[[0, 1, 2, 3]]
    pred = np.array([[0.5, 0.3, 0.2, 0.0],      # first three sum to exactly 1: allowed
                     [0.6, 0.3, 0.2, 0.0],      # 1.1: would abort
                     [0.25, 0.25, 0.25, 0.25],
                     [0.1, 0.1, 0.1, 0.7]], dtype=np.float32)
    m = compute_metrics(pred, labels, None, {})
    assert m["rows_first3_sum_above_1_float32"] == 1
    assert "truth" not in m["log_loss"] and "kl_truth_to_model" not in m
    assert m["probability_sum_max_abs_error"] == pytest.approx(0.1, abs=1e-6)


@pytest.fixture(scope="module")
def trained(tiny_dataset, tmp_path_factory):
    from effgen.training.train import train

    out = tmp_path_factory.mktemp("validate_model") / "model.keras"
    train(tiny_dataset["train"], tiny_dataset["validation"], out, recipe="seed", batch_size=512,
          steps_per_epoch=10, max_epochs=100, pre_limit_s=3, ft_limit_s=4, width=16, blocks=1,
          seed=0, verbose=0)
    return out


def test_validate_writes_a_self_contained_report(trained, tiny_dataset, tmp_path):
    out_dir = tmp_path / "validation"
    metrics = validate(trained, tiny_dataset["validation"], out_dir, max_rows=1500,
                       preprocessing_path=tiny_dataset["preprocessing"])
    assert metrics["n_rows"] == 1500
    assert json.loads((out_dir / "metrics.json").read_text()) == json.loads(json.dumps(metrics))

    pngs = sorted(p.name for p in out_dir.glob("*.png"))
    assert pngs == sorted(metrics["plots"]) and len(pngs) == 6
    html = (out_dir / "report.html").read_text()
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(uris) == len(pngs)
    assert sorted(base64.b64decode(u) for u in uris) == \
        sorted((out_dir / name).read_bytes() for name in pngs)
    assert not re.search(r'src="(?!data:)', html)  # nothing refers to outside files
    for name in schema.LABELS:
        assert name in html
    assert "max |tX(raw)" in html

    ll = metrics["log_loss"]
    assert all(np.isfinite(v) for v in ll.values())
    # Trained for seconds: clearly better than the constant prior, not better than the truth
    # beyond sampling noise.
    assert ll["truth"] < ll["model"] < ll["prior"]
    assert metrics["kl_truth_to_model"] > 0
    for row in metrics["per_class"].values():
        assert 0 <= row["mean_abs_diff_vs_truth"] < 0.5
        assert 0 <= row["calibration_error_vs_truth"] < 0.5
    assert sum(sp["n"] for sp in metrics["per_species"].values()) == 1500
    assert metrics["probability_sum_max_abs_error"] < 1e-5
    # The shards' features are tX(raw): the pickled preprocessing reproduces them.
    assert metrics["preprocessing_max_abs_diff"] < 1e-4


def test_validate_names_a_missing_model_or_preprocessing(trained, tiny_dataset, tmp_path):
    from effgen.data.preprocess import PreprocessingError

    with pytest.raises(FileNotFoundError, match="nope.keras"):
        validate(tmp_path / "nope.keras", tiny_dataset["validation"], tmp_path / "v")
    with pytest.raises(PreprocessingError, match="nope.pkl"):
        validate(trained, tiny_dataset["validation"], tmp_path / "v", max_rows=100,
                 preprocessing_path=tmp_path / "nope.pkl")
    assert not (tmp_path / "v" / "report.html").exists()


def _copy_split(src, dst, edit=None):
    """A copy of a shard directory, `edit(table) -> table` applied to its first shard."""
    import shutil

    import pyarrow.feather as feather

    shutil.copytree(src, dst)
    first = sorted(dst.glob("part-*.feather"))[0]
    if edit is not None:
        feather.write_feather(edit(feather.read_table(first)), first, compression="uncompressed")
    return dst


def _set(table, column, rows, value):
    import pyarrow as pa

    values = table.column(column).to_numpy().copy()
    values[rows] = value
    return table.set_column(table.schema.get_field_index(column), column, pa.array(values))


@pytest.mark.parametrize("column, value, message", [
    ("mc_eta", np.nan, r"column 'mc_eta' has 2 non-finite values \(first at row 7"),
    ("raw_mc_z", np.inf, r"column 'raw_mc_z' has 2 non-finite values \(first at row 7"),
    ("recoed_as_long", 2.0, r"label column 'recoed_as_long' is not one-hot 0/1: 2 values \(first at row 7"),
    ("truth_long", np.nan, r"branch 'truth_long' has 2 non-finite values"),
])
def test_validate_refuses_bad_data_before_loading_the_model(trained, tiny_dataset, tmp_path, column,
                                                            value, message):
    from effgen.errors import DataError

    data = _copy_split(tiny_dataset["validation"], tmp_path / "v",
                       lambda t: _set(t, column, [7, 9], value))
    with pytest.raises(DataError, match=message):
        validate(trained, data, tmp_path / "out", max_rows=1500)
    assert not (tmp_path / "out").exists()


def test_validate_without_truth_says_so_and_writes_strict_json(trained, tiny_dataset, tmp_path):
    """Shards without truth columns (the real sample): the label-based report, and a plain
    statement, in metrics.json and report.html, that truth scores need truth columns."""
    import subprocess
    import sys

    from effgen.training.validate import NO_TRUTH

    data = _copy_split(tiny_dataset["validation"], tmp_path / "v")
    defs = json.loads((data / "definitions.json").read_text())
    defs["extra"] = [c for c in defs["extra"] if c not in schema.TRUTH]
    (data / "definitions.json").write_text(json.dumps(defs))
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-m", "effgen", "validate", "--model", str(trained),
                          "--data", str(data), "--output-dir", str(out), "--max-rows", "1500",
                          "--preprocessing", str(tiny_dataset["preprocessing"])],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "truth n/a (no truth columns)" in res.stdout and "need truth columns" in res.stdout
    text = (out / "metrics.json").read_text()
    metrics = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON: {c}"))
    assert metrics["truth_scores"] == NO_TRUTH
    assert "truth" not in metrics["log_loss"] and "kl_truth_to_model" not in metrics
    for row in metrics["per_class"].values():
        assert set(row) == {"label_fraction", "mean_prediction", "calibration_error_vs_labels"}
    for entry in metrics["per_species"].values():
        assert "truth_sums" not in entry and len(entry["predicted_sums"]) == 4
    assert metrics["log_loss"]["model"] < metrics["log_loss"]["prior"]
    html = (out / "report.html").read_text()
    assert "Truth scores: not available" in html and "need them" in html
    assert len(re.findall(r'src="data:image/png;base64,', html)) == 6


def test_metrics_json_is_strict(tmp_path):
    from effgen.training.validate import strict_json

    value = {"a": float("nan"), "b": [1.0, float("inf"), np.float32(2.5)], "c": np.int64(3),
             "d": {"e": -np.inf}}
    assert json.dumps(strict_json(value), allow_nan=False) == \
        '{"a": null, "b": [1.0, null, 2.5], "c": 3, "d": {"e": null}}'


# ---- fidelity: the network beside the gradient-boosted baseline (issue 14) -------------

def test_fidelity_metrics_score_against_the_truth_and_the_targets():
    from effgen.training.validate import FIDELITY_TARGETS, fidelity_metrics

    rng = np.random.default_rng(5)
    truth = _truth(100_000, rng)
    labels = _draw(truth, rng)
    exact = fidelity_metrics(truth, labels, truth)
    assert exact["log_loss_gap_pct"] == 0 and all(exact["meets"].values())
    shifted = np.clip(truth + np.array([0.02, -0.02, 0, 0]), 1e-6, 1)
    off = fidelity_metrics(shifted, labels, truth)
    first = off["per_class"][schema.LABELS[0]]
    assert first["mean_offset_vs_truth"] == pytest.approx(np.mean(shifted[:, 0]) - np.mean(truth[:, 0]))
    assert first["mean_abs_diff_vs_truth"] == pytest.approx(np.mean(np.abs(shifted[:, 0] - truth[:, 0])))
    assert first["mean_abs_diff_vs_truth"] > FIDELITY_TARGETS["mean_abs_diff_vs_truth"]
    assert not off["meets"]["mean_abs_diff_vs_truth"] and not off["meets"]["abs_mean_offset_vs_truth"]
    assert off["log_loss_gap_pct"] > 0


def test_validate_fits_the_baseline_and_shows_it_beside_the_network(trained, tiny_dataset, tmp_path):
    out_dir = tmp_path / "validation"
    metrics = validate(trained, tiny_dataset["test"], out_dir, max_rows=3000,
                       baseline_train_dir=tiny_dataset["train"])
    b = metrics["baseline"]
    assert b["fit"]["train_rows"] == tiny_dataset["rows"]["train"]
    assert b["fit"]["model"] == "HistGradientBoostingClassifier"
    # The network's side is the same score as the main metrics.
    for name in schema.LABELS:
        assert b["network"]["per_class"][name]["mean_abs_diff_vs_truth"] == pytest.approx(
            metrics["per_class"][name]["mean_abs_diff_vs_truth"])
    assert b["network"]["log_loss"] == pytest.approx(metrics["log_loss"]["model"])
    assert b["baseline"]["log_loss"] < metrics["log_loss"]["prior"]
    assert set(b["network_better"]) == set(schema.LABELS) | {"log_loss"}
    assert "calibration_vs_baseline.png" in metrics["plots"]
    assert (out_dir / "calibration_vs_baseline.png").stat().st_size > 1000
    html = (out_dir / "report.html").read_text()
    assert "gradient-boosted baseline" in html and "HistGradientBoostingClassifier" in html
    assert json.loads((out_dir / "metrics.json").read_text())["baseline"]["fit"]["n_iter"] == b["fit"]["n_iter"]


def test_validate_without_truth_columns_skips_the_baseline(trained, tiny_dataset, tmp_path):
    import shutil

    import pyarrow.feather as feather

    data = tmp_path / "no_truth"
    shutil.copytree(tiny_dataset["test"], data)
    for shard in data.glob("*.feather"):
        table = feather.read_table(shard)
        feather.write_feather(table.drop_columns(list(schema.TRUTH)), shard)
    defs = json.loads((data / "definitions.json").read_text())
    defs["extra"] = [c for c in defs["extra"] if c not in schema.TRUTH]
    (data / "definitions.json").write_text(json.dumps(defs))
    metrics = validate(trained, data, tmp_path / "v", max_rows=1000, baseline_train_dir=tiny_dataset["train"])
    assert "baseline" not in metrics
    assert "gradient-boosted" not in (tmp_path / "v" / "report.html").read_text()


def test_validate_scores_the_baseline_file_as_if_it_fitted_it_and_refuses_other_rows(
        trained, tiny_dataset, tmp_path, capsys):
    """`effgen baseline` (run beside the training in the main job) writes what validate
    would have fitted; validate scores it for exactly those rows, no others."""
    from effgen import cli
    from effgen.errors import DataError

    npz = tmp_path / "baseline" / "predictions.npz"
    assert cli.main(["baseline", "--train-data", str(tiny_dataset["train"]), "--data",
                     str(tiny_dataset["test"]), "--max-rows", "3000", "--output", str(npz),
                     "--threads", "1"]) == 0
    assert "probabilities for 3,000 rows" in capsys.readouterr().out
    from_file = validate(trained, tiny_dataset["test"], tmp_path / "a", max_rows=3000,
                         baseline_predictions=npz)["baseline"]
    fitted = validate(trained, tiny_dataset["test"], tmp_path / "b", max_rows=3000,
                      baseline_train_dir=tiny_dataset["train"])["baseline"]
    assert from_file["fit"]["threads"] == 1 and from_file["fit"]["max_rows"] == 3000
    assert from_file["fit"]["n_iter"] == fitted["fit"]["n_iter"]
    for name in schema.LABELS:
        assert from_file["baseline"]["per_class"][name]["mean_abs_diff_vs_truth"] == pytest.approx(
            fitted["baseline"]["per_class"][name]["mean_abs_diff_vs_truth"], rel=1e-9)
    assert from_file["baseline"]["log_loss"] == pytest.approx(fitted["baseline"]["log_loss"], rel=1e-9)
    assert (tmp_path / "a" / "calibration_vs_baseline.png").exists()

    with pytest.raises(DataError, match="other rows than the 2,000"):
        validate(trained, tiny_dataset["test"], tmp_path / "c", max_rows=2000, baseline_predictions=npz)
    with pytest.raises(DataError, match="other rows"):
        validate(trained, tiny_dataset["validation"], tmp_path / "d", max_rows=3000,
                 baseline_predictions=npz)
    with pytest.raises(ValueError, match="not both"):
        validate(trained, tiny_dataset["test"], tmp_path / "e", max_rows=3000,
                 baseline_predictions=npz, baseline_train_dir=tiny_dataset["train"])
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()
