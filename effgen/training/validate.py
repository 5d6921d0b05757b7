"""`effgen validate`: the seed notebook's sanity checks, the production validation, and
a score against the true probabilities the synthetic sample was drawn from.

Writes PNG plots, one self-contained report.html (plots embedded) and metrics.json
into the output directory, each file atomically."""

import base64
import json
import math
from pathlib import Path

import numpy as np

from effgen import schema
from effgen.atomic import atomic_file
from effgen.data.derive import check_truth
from effgen.data.reader import check_finite, check_one_hot
from effgen.errors import DataError, EffgenError
from effgen.training.baseline import SCORED_ROWS, fit_and_predict, read_predictions

MOMENTUM_EDGES_GEV = [0.5, 3, 5, 10, 30, 100, 200]
SPECIES = {"e": "mc_is_e", "mu": "mc_is_mu", "hadron": "mc_is_h"}
CALIBRATION_BINS = 20
EPS = 1e-12
NO_TRUTH = ("not available: the data has no truth columns "
            f"({', '.join(schema.TRUTH)}); the scores against the true probabilities (truth "
            "log-loss, KL divergence, per-class differences and calibration against the truth) "
            "need them. Every score here is against the sampled labels.")
CLASS_COLORS = ["#bbbbbb", "#4c72b0", "#dd8452", "#55a868"]


# ---- metrics (plain numpy) ---------------------------------------------------------------

def log_loss(prob, label_index):
    """Mean -log of the probability given to the label's class (floored at 1e-12)."""
    p = prob[np.arange(len(prob)), label_index]
    return float(-np.mean(np.log(np.maximum(p, EPS))))


def calibration(pred, target, n_bins=CALIBRATION_BINS):
    """Equal-width bins of predicted probability: per bin the row count, the mean
    prediction and the mean target; plus the count-weighted mean |gap| (ECE)."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.digitize(pred, edges) - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_pred = np.bincount(idx, weights=pred, minlength=n_bins) / count
        mean_target = np.bincount(idx, weights=target, minlength=n_bins) / count
    filled = count > 0
    ece = float(np.sum(count[filled] * np.abs(mean_pred[filled] - mean_target[filled])) / count.sum())
    return {"count": count, "mean_pred": mean_pred, "mean_target": mean_target, "ece": ece}


def species_masks(raw_flags):
    """Boolean masks for e, mu, hadron from the raw mc_is_* columns."""
    return {name: np.asarray(raw_flags[column]) > 0.5 for name, column in SPECIES.items()}


def compute_metrics(pred, labels, truth, masks):
    """Everything that goes into metrics.json. `truth` may be None (real data)."""
    n, n_classes = labels.shape
    label_index = labels.argmax(axis=1)
    prior = labels.mean(axis=0)
    m = {
        "n_rows": int(n),
        "classes": list(schema.LABELS),
        "log_loss": {
            "model": log_loss(pred, label_index),
            "prior": log_loss(np.broadcast_to(prior, pred.shape), label_index),
        },
        "probability_sum_max_abs_error": float(np.max(np.abs(pred.sum(axis=1, dtype=np.float64) - 1))),
        # Lamarr draws with random_category(p0, 0, 0, p1, p2) summed in float: a sum of
        # the first three outputs above 1 aborts the SQL step.
        "rows_first3_sum_above_1_float32": int(np.count_nonzero(
            (pred[:, 0].astype(np.float32) + pred[:, 1] + pred[:, 2]) > np.float32(1))),
        "per_class": {},
        "per_species": {},
    }
    m["truth_scores"] = "available" if truth is not None else NO_TRUTH
    if truth is not None:
        m["log_loss"]["truth"] = log_loss(truth, label_index)
        m["log_loss"]["model_minus_truth"] = m["log_loss"]["model"] - m["log_loss"]["truth"]
        kl = np.sum(np.where(truth > 0, truth * (np.log(np.maximum(truth, EPS))
                                                  - np.log(np.maximum(pred, EPS))), 0), axis=1)
        m["kl_truth_to_model"] = float(np.mean(kl))
    for c, name in enumerate(schema.LABELS):
        row = {
            "label_fraction": float(labels[:, c].mean()),
            "mean_prediction": float(pred[:, c].mean()),
            "calibration_error_vs_labels": calibration(pred[:, c], labels[:, c])["ece"],
        }
        if truth is not None:
            diff = np.abs(pred[:, c].astype(np.float64) - truth[:, c])
            row.update({
                "mean_truth": float(truth[:, c].mean()),
                "mean_abs_diff_vs_truth": float(diff.mean()),
                "p99_abs_diff_vs_truth": float(np.quantile(diff, 0.99)),
                "calibration_error_vs_truth": calibration(pred[:, c], truth[:, c])["ece"],
            })
        m["per_class"][name] = row
    for sp, mask in masks.items():
        entry = {"n": int(mask.sum()),
                 "label_counts": labels[mask].sum(axis=0, dtype=np.float64).tolist(),
                 "predicted_sums": pred[mask].sum(axis=0, dtype=np.float64).tolist()}
        if truth is not None:
            entry["truth_sums"] = truth[mask].sum(axis=0, dtype=np.float64).tolist()
        m["per_species"][sp] = entry
    return m


# ---- plots -----------------------------------------------------------------------------

def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path):
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=90)
    _pyplot().close(fig)
    return path


def plot_class_histograms(pred, labels, path):
    """The notebook's first check: per class, labels vs predictions in 10 bins."""
    plt = _pyplot()
    n_classes = labels.shape[1]
    fig, axes = plt.subplots(1, n_classes, figsize=(4.2 * n_classes, 3.2))
    bins = np.linspace(0, 1, 11)
    for c, ax in enumerate(axes):
        ax.hist(labels[:, c], bins=bins, label="labels", color="#9ecae1")
        ax.hist(pred[:, c], bins=bins, histtype="step", linewidth=2, label="prediction", color="k")
        ax.set_title(schema.LABELS[c].replace("_", " ").capitalize())
        ax.set_xlabel("label / predicted probability")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_momentum_spectrum(log10_p, pred, labels, truth, path):
    """The notebook's second check: true long tracks vs all weighted by P(long)."""
    plt = _pyplot()
    c = schema.LABELS.index("recoed_as_long")
    bins = np.linspace(2.4, 6.1, 75)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.hist(log10_p, bins=bins, histtype="step", color="grey", label="in acceptance")
    ax.hist(log10_p[labels[:, c] > 0.5], bins=bins, color="#8e8", label="long tracks (labels)")
    if truth is not None:
        ax.hist(log10_p, bins=bins, weights=truth[:, c], histtype="step", ls="--", color="k",
                label="long tracks (true probability)")
    ax.hist(log10_p, bins=bins, weights=pred[:, c], histtype="step", linewidth=2, color="tab:red",
            label="long tracks (model)")
    ax.set_xlabel(r"$\log_{10}(p\ /\ \mathrm{MeV}/c)$")
    ax.set_ylabel("particles")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_per_species(metrics, path):
    """Summed predicted probabilities vs label counts per class, one panel per species."""
    plt = _pyplot()
    species = metrics["per_species"]
    fig, axes = plt.subplots(1, len(species), figsize=(5 * len(species), 3.6))
    x = np.arange(len(schema.LABELS))
    for ax, (sp, entry) in zip(np.atleast_1d(axes), species.items()):
        series = [("labels", entry["label_counts"], "#9ecae1"),
                  ("model", entry["predicted_sums"], "tab:red")]
        if "truth_sums" in entry:
            series.append(("truth", entry["truth_sums"], "k"))
        w = 0.8 / len(series)
        for i, (name, values, color) in enumerate(series):
            ax.bar(x + (i - (len(series) - 1) / 2) * w, values, w, label=name, color=color,
                   alpha=0.85)
        ax.set_xticks(x, [o.replace("_", " ") for o in schema.OUTPUTS], fontsize=8)
        ax.set_yscale("log")
        ax.set_title(f"{sp} (n = {entry['n']:,})")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def _stacked_histograms(values, weights, bins) -> np.ndarray:
    """Cumulative per-class weighted histograms: row c is the sum of classes 0..c."""
    return np.cumsum([np.histogram(values, bins=bins, weights=weights[:, c])[0]
                      for c in range(weights.shape[1])], axis=0)


def plot_binned_stacks(var, var_label, var_bins, p_gev, pred, labels, path, log_y=False):
    """Per momentum bin: the variable's histogram stacked by class, labels (filled)
    against the model's summed probabilities (stacked steps)."""
    plt = _pyplot()
    edges = MOMENTUM_EDGES_GEV
    n_bins = len(edges) - 1
    fig, axes = plt.subplots(2, math.ceil(n_bins / 2), figsize=(15, 7.5))
    for k, ax in enumerate(axes.flat[:n_bins]):
        sel = (p_gev >= edges[k]) & (p_gev < edges[k + 1])
        # Histograms summed here and drawn as stairs: matplotlib's stacked hist draws one
        # patch per bin and class, which took ~15 s of the main job's validate stage.
        filled = _stacked_histograms(var[sel], labels[sel], var_bins)
        steps = _stacked_histograms(var[sel], pred[sel], var_bins)
        below = np.zeros(len(var_bins) - 1)
        for c, name in enumerate(schema.OUTPUTS):
            ax.stairs(filled[c], var_bins, baseline=below, fill=True, color=CLASS_COLORS[c],
                      label=f"{name} (labels)")
            below = filled[c]
        for c in range(len(steps)):
            ax.stairs(steps[c], var_bins, color="k", linewidth=1.2,
                      label="model (stacked)" if c == 0 else "_nolegend_")
        ax.set_title(f"{edges[k]} < p < {edges[k + 1]} GeV/c  (n = {int(sel.sum()):,})", fontsize=9)
        ax.set_xlabel(var_label)
        if log_y:
            ax.set_yscale("log")
    for ax in axes.flat[n_bins:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def _calibration_figure(series, n_classes, ylabel, path):
    """One panel per class; in each, one curve per (label, pred, target, style) of
    `series`: mean target against mean predicted probability, per bin of the prediction."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, n_classes, figsize=(4.2 * n_classes, 3.8))
    for c, ax in enumerate(axes):
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8)
        for label, pred, target, style in series:
            cal = calibration(pred[:, c], target[:, c])
            ok = cal["count"] > 0
            ax.plot(cal["mean_pred"][ok], cal["mean_target"][ok], style, ms=3, label=label)
        ax.set_title(schema.LABELS[c].replace("_", " "))
        ax.set_xlabel("predicted probability")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_calibration(pred, labels, truth, path):
    series = [("observed frequency", pred, labels, "o-")]
    if truth is not None:
        series.append(("mean true probability", pred, truth, "s--"))
    return _calibration_figure(series, labels.shape[1], "frequency / truth", path)


# ---- fidelity: the network beside a gradient-boosted baseline (issue 14) ---------------
# Scored against the truth_* columns only; without them (real data) the section is skipped.

FIDELITY_TARGETS = {"mean_abs_diff_vs_truth": 0.01, "abs_mean_offset_vs_truth": 0.003,
                    "log_loss_gap_pct": 1.0}


def fidelity_metrics(pred, labels, truth):
    """Per class mean |p - truth| and mean(p) - mean(truth); the log-loss gap to the
    truth-optimal log-loss in percent; whether each target of issue 14 is met."""
    pred = np.asarray(pred, dtype=np.float64)
    label_index = labels.argmax(axis=1)
    model_ll, truth_ll = log_loss(pred, label_index), log_loss(truth, label_index)
    out = {"per_class": {}, "log_loss": model_ll, "log_loss_truth": truth_ll,
           "log_loss_gap_pct": 100.0 * (model_ll - truth_ll) / truth_ll}
    for c, name in enumerate(schema.LABELS):
        out["per_class"][name] = {
            "mean_abs_diff_vs_truth": float(np.mean(np.abs(pred[:, c] - truth[:, c]))),
            "mean_offset_vs_truth": float(pred[:, c].mean() - truth[:, c].mean()),
            "calibration_error_vs_truth": calibration(pred[:, c], truth[:, c])["ece"],
        }
    rows = out["per_class"].values()
    out["meets"] = {
        "mean_abs_diff_vs_truth": all(r["mean_abs_diff_vs_truth"] <= FIDELITY_TARGETS["mean_abs_diff_vs_truth"]
                                      for r in rows),
        "abs_mean_offset_vs_truth": all(abs(r["mean_offset_vs_truth"]) <= FIDELITY_TARGETS["abs_mean_offset_vs_truth"]
                                        for r in rows),
        "log_loss_gap_pct": out["log_loss_gap_pct"] <= FIDELITY_TARGETS["log_loss_gap_pct"],
    }
    return out


def baseline_comparison(network, baseline, fit_info):
    """metrics.json's "baseline" entry: both models' fidelity, the baseline's fit, and
    whether the network is better per class and in log-loss."""
    better = {name: network["per_class"][name]["mean_abs_diff_vs_truth"]
              < baseline["per_class"][name]["mean_abs_diff_vs_truth"] for name in schema.LABELS}
    better["log_loss"] = network["log_loss"] < baseline["log_loss"]
    return {"targets": FIDELITY_TARGETS, "network": network, "baseline": baseline, "fit": fit_info,
            "network_better": better,
            "network_meets_all": all(network["meets"].values()) and all(better.values())}


def plot_fidelity_calibration(pred, baseline_pred, truth, path):
    """Per class: mean true probability against predicted probability, network and baseline."""
    series = [("network", pred, truth, "o-"), ("gradient-boosted baseline", baseline_pred, truth, "s--")]
    return _calibration_figure(series, truth.shape[1], "mean true probability", path)


BASELINE_TEMPLATE = """<h2>Fidelity: network vs gradient-boosted baseline (against the true probabilities)</h2>
<p>Baseline: scikit-learn HistGradientBoostingClassifier ({{ b.fit.max_leaf_nodes }} leaves, early stopping,
{{ b.fit.n_iter }} iterations) fitted in {{ fmt(b.fit.fit_s) }} s on the {{ "{:,}".format(b.fit.train_rows) }} training rows
the network was trained on, scored on the same rows as the network.
Targets: mean |p &minus; truth| &le; {{ b.targets.mean_abs_diff_vs_truth }} and |mean p &minus; mean truth| &le;
{{ b.targets.abs_mean_offset_vs_truth }} per class, log-loss within {{ b.targets.log_loss_gap_pct }} % of the truth-optimal,
and better than the baseline. Network meets all: <b>{{ "yes" if b.network_meets_all else "no" }}</b>.</p>
<table><tr><th rowspan="2">class</th><th colspan="2">mean |p &minus; truth|</th><th colspan="2">mean p &minus; mean truth</th><th colspan="2">calibration error vs truth</th></tr>
<tr><th>network</th><th>baseline</th><th>network</th><th>baseline</th><th>network</th><th>baseline</th></tr>
{% for name in b.network.per_class %}{% set n = b.network.per_class[name] %}{% set g = b.baseline.per_class[name] %}
<tr><th>{{ name }}</th><td>{{ fmt(n.mean_abs_diff_vs_truth) }}</td><td>{{ fmt(g.mean_abs_diff_vs_truth) }}</td>
<td>{{ fmt(n.mean_offset_vs_truth) }}</td><td>{{ fmt(g.mean_offset_vs_truth) }}</td>
<td>{{ fmt(n.calibration_error_vs_truth) }}</td><td>{{ fmt(g.calibration_error_vs_truth) }}</td></tr>
{% endfor %}</table>
<table><tr><th></th><th>log-loss</th><th>truth-optimal</th><th>gap to truth-optimal</th></tr>
<tr><th>network</th><td>{{ fmt(b.network.log_loss) }}</td><td>{{ fmt(b.network.log_loss_truth) }}</td><td>{{ "%.3f" % b.network.log_loss_gap_pct }} %</td></tr>
<tr><th>baseline</th><td>{{ fmt(b.baseline.log_loss) }}</td><td>{{ fmt(b.baseline.log_loss_truth) }}</td><td>{{ "%.3f" % b.baseline.log_loss_gap_pct }} %</td></tr></table>
"""


def render_baseline_html(metrics):
    import jinja2

    if "baseline" not in metrics:
        return ""
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    return env.from_string(BASELINE_TEMPLATE).render(b=metrics["baseline"], fmt=_fmt)


# ---- the report ------------------------------------------------------------------------

REPORT_TEMPLATE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>effgen validation</title>
<style>body{font-family:sans-serif;max-width:1200px;margin:auto}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#eee}img{max-width:100%}.note{background:#fff3cd;padding:6px}</style></head><body>
<h1>Tracking-efficiency model: validation</h1>
<p>Model <code>{{ model }}</code>, data <code>{{ data }}</code>, {{ "{:,}".format(m.n_rows) }} rows.</p>
{% if m.truth_scores != "available" %}<p class="note"><strong>Truth scores: {{ m.truth_scores }}</strong></p>{% endif %}
<h2>Log-loss</h2>
<table><tr><th>model</th><th>truth-optimal</th><th>constant prior</th><th>model &minus; truth</th><th>KL(truth &#8214; model)</th></tr>
<tr><td>{{ fmt(m.log_loss.model) }}</td><td>{{ fmt(m.log_loss.get("truth")) }}</td><td>{{ fmt(m.log_loss.prior) }}</td>
<td>{{ fmt(m.log_loss.get("model_minus_truth")) }}</td><td>{{ fmt(m.get("kl_truth_to_model")) }}</td></tr></table>
<h2>Per class</h2>
<table><tr><th>class</th>{% for k in class_keys %}<th>{{ k.replace("_", " ") }}</th>{% endfor %}</tr>
{% for name, row in m.per_class.items() %}<tr><th>{{ name }}</th>{% for k in class_keys %}<td>{{ fmt(row.get(k)) }}</td>{% endfor %}</tr>
{% endfor %}</table>
<h2>Per particle type: summed probabilities vs label counts</h2>
<table><tr><th>type</th><th>n</th><th>series</th>{% for o in outputs %}<th>{{ o }}</th>{% endfor %}</tr>
{% for sp, e in m.per_species.items() %}{% for key in ["label_counts", "predicted_sums", "truth_sums"] if key in e %}
<tr><th>{{ sp }}</th><td>{{ "{:,}".format(e.n) }}</td><td>{{ key.replace("_", " ") }}</td>{% for v in e[key] %}<td>{{ "{:,.1f}".format(v) }}</td>{% endfor %}</tr>
{% endfor %}{% endfor %}</table>
<p>Probability sums: max |&Sigma;p &minus; 1| = {{ fmt(m.probability_sum_max_abs_error) }};
rows whose float32 p<sub>0</sub>+p<sub>1</sub>+p<sub>2</sub> exceeds 1 (would abort a Lamarr step): {{ m.rows_first3_sum_above_1_float32 }}.
{% if "preprocessing_max_abs_diff" in m %}Pickled preprocessing vs stored features: max |tX(raw) &minus; feature| = {{ fmt(m.preprocessing_max_abs_diff) }}.{% endif %}</p>
{{ baseline_html }}
{% for title, uri in images %}<h2>{{ title }}</h2><img src="{{ uri }}" alt="{{ title }}">
{% endfor %}</body></html>
"""


def _fmt(value):
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.5g}"
    return str(value)


def write_report(metrics, images, path, model, data):
    import jinja2
    import markupsafe

    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    uris = [(title, "data:image/png;base64," + base64.b64encode(Path(p).read_bytes()).decode())
            for title, p in images]
    class_keys = sorted({k for row in metrics["per_class"].values() for k in row})
    html = env.from_string(REPORT_TEMPLATE).render(
        m=metrics, images=uris, model=str(model), data=str(data), fmt=_fmt,
        class_keys=class_keys, outputs=schema.OUTPUTS,
        baseline_html=markupsafe.Markup(render_baseline_html(metrics)))
    with atomic_file(path, "w") as f:
        f.write(html)
    return path


# ---- data and the function API ---------------------------------------------------------

def _check_preprocessing(preprocessing_path, raw, features, model_path=None):
    """Largest |tX(raw) - stored feature|: the shards and the pickled transformer the
    exported function will embed must agree."""
    from effgen.provenance import load_preprocessing

    transformer = load_preprocessing(preprocessing_path, n_features=len(schema.FEATURES),
                                     model_path=model_path)
    x_raw = np.stack([raw[f"raw_{c}"] for c in schema.FEATURES], axis=1).astype(np.float64)
    redone = np.asarray(transformer.transform(x_raw), dtype=np.float64)
    return float(np.max(np.abs(redone - features)))


def check_data(frame, features, labels, raw_cols, truth_cols, where):
    """Refuse what would make the scores meaningless, before the model is loaded: NaN /
    inf in any column used, labels that are not one-hot 0/1, truth columns that are not
    probabilities summing to 1. Rows are counted over the rows read."""
    for name in list(features) + list(labels) + list(raw_cols):
        check_finite(where, name, frame[name].to_numpy())
    check_one_hot(where, {name: frame[name].to_numpy() for name in labels})
    if truth_cols:
        check_truth(where, frame[truth_cols].to_numpy(np.float64))


def strict_json(value):
    """`value` with every non-finite float replaced by None (JSON has no NaN)."""
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def validate(model_path, data_dir, output_dir, max_rows=SCORED_ROWS, preprocessing_path=None,
             batch_size=65536, baseline_train_dir=None, baseline_predictions=None) -> dict:
    """Score `model_path` on up to `max_rows` rows of the shards in `data_dir`; write the
    plots, report.html and metrics.json into `output_dir`; return the metrics. With
    `preprocessing_path`, also check that the pickled transformer maps the raw columns
    onto the stored features. With `baseline_train_dir` (the network's training split)
    and truth columns, fit the gradient-boosted baseline there and score it beside the
    network; with `baseline_predictions` (an `effgen baseline` file for these rows), score
    the probabilities it holds instead of fitting."""
    from effgen.data.reader import FeatherReader
    from effgen.provenance import load_keras_model

    model_path, output_dir = Path(model_path), Path(output_dir)
    if not model_path.exists():
        raise FileNotFoundError(f"model {model_path} does not exist (run `effgen train` first)")
    reader = FeatherReader(data_dir)
    if list(reader.features) != list(schema.FEATURES) or list(reader.labels) != list(schema.LABELS):
        raise ValueError(f"{data_dir}: features/labels {reader.features}/{reader.labels} do not "
                         f"match effgen.schema")
    raw_cols = [f"raw_{c}" for c in schema.FEATURES]
    missing = [c for c in raw_cols if c not in reader.extra]
    if missing:
        raise DataError(f"{data_dir}: extra columns {missing} are missing (needed for the plots)")
    truth_cols = list(schema.TRUTH) if all(c in reader.extra for c in schema.TRUTH) else []
    frame = reader.as_pandas(columns=list(reader.features) + list(reader.labels) + raw_cols
                             + truth_cols, max_rows=max_rows)
    if len(frame) == 0:
        raise DataError(f"{data_dir} holds no rows")

    check_data(frame, reader.features, reader.labels, raw_cols, truth_cols, data_dir)
    features = frame[list(reader.features)].to_numpy(np.float32)
    labels = frame[list(reader.labels)].to_numpy(np.float32)
    truth = frame[truth_cols].to_numpy(np.float64) if truth_cols else None
    raw = {c: frame[c].to_numpy() for c in raw_cols}
    preprocessing_diff = None if preprocessing_path is None else _check_preprocessing(
        preprocessing_path, raw, features.astype(np.float64), model_path)
    if baseline_train_dir is not None and baseline_predictions is not None:
        raise ValueError("give the baseline's training split or its predictions, not both")
    baseline_from_file = baseline_predictions is not None
    if baseline_from_file:  # checked before the model runs: it must be for these rows
        baseline_pred, fit_info = read_predictions(baseline_predictions, features)

    model = load_keras_model(model_path, compile=True)
    pred = np.asarray(model.predict(features, batch_size=batch_size, verbose=0))
    if pred.shape != labels.shape:
        raise ValueError(f"model {model_path} gives outputs of shape {pred.shape[1:]}, "
                         f"labels have {labels.shape[1:]}")

    metrics = compute_metrics(pred, labels, truth,
                              species_masks({c: raw[f"raw_{c}"] for c in SPECIES.values()}))
    metrics.update(model=str(model_path), data=str(data_dir),
                   momentum_edges_gev=MOMENTUM_EDGES_GEV)
    if preprocessing_diff is not None:
        metrics["preprocessing_max_abs_diff"] = preprocessing_diff

    output_dir.mkdir(parents=True, exist_ok=True)
    log10_p = raw["raw_mc_log10_p"].astype(np.float64)
    p_gev = 10.0 ** log10_p / 1000.0
    images = [
        ("Labels vs predictions per class", plot_class_histograms(
            pred, labels, output_dir / "class_histograms.png")),
        ("Momentum spectrum of long tracks", plot_momentum_spectrum(
            log10_p, pred, labels, truth, output_dir / "momentum_spectrum.png")),
        ("Per particle type", plot_per_species(metrics, output_dir / "per_species.png")),
        ("Pseudorapidity in momentum bins", plot_binned_stacks(
            raw["raw_mc_eta"], r"$\eta$", np.linspace(1.5, 6.0, 46), p_gev, pred, labels,
            output_dir / "eta_by_momentum.png")),
        ("Production z in momentum bins", plot_binned_stacks(
            raw["raw_mc_z"], "production z [mm]", np.linspace(-300, 2700, 61), p_gev, pred,
            labels, output_dir / "z_by_momentum.png", log_y=True)),
        ("Calibration", plot_calibration(pred, labels, truth, output_dir / "calibration.png")),
    ]
    if (baseline_train_dir is not None or baseline_from_file) and truth is not None:
        if not baseline_from_file:
            baseline_pred, fit_info = fit_and_predict(baseline_train_dir, features)
        metrics["baseline"] = baseline_comparison(fidelity_metrics(pred, labels, truth),
                                                  fidelity_metrics(baseline_pred, labels, truth), fit_info)
        images.append(("Calibration against the truth: network and baseline", plot_fidelity_calibration(
            pred, baseline_pred, truth, output_dir / "calibration_vs_baseline.png")))
    metrics["plots"] = [p.name for _, p in images]
    metrics = strict_json(metrics)
    with atomic_file(output_dir / "metrics.json", "w") as f:
        json.dump(metrics, f, indent=1, allow_nan=False)
    write_report(metrics, images, output_dir / "report.html", model_path, data_dir)
    return metrics


# ---- the CLI ---------------------------------------------------------------------------

def register(subparsers):
    from effgen.config import default_paths

    paths = default_paths()
    p = subparsers.add_parser("validate", help="validate the trained model (report.html)",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=paths["model"], help="default %(default)s")
    p.add_argument("--preprocessing", type=Path, default=None,
                   help="pickled transformer, checked against the shards' raw columns "
                        f"(default {paths['preprocessing']}, only if the model's history.json records it)")
    p.add_argument("--data", type=Path, default=paths["validation"],
                   help="shard directory with raw_* extras; truth_* optional (default %(default)s)")
    p.add_argument("--output-dir", type=Path, default=paths["validation_report"],
                   help="default %(default)s")
    p.add_argument("--max-rows", type=int, default=SCORED_ROWS, help="default %(default)s")
    p.add_argument("--baseline-train-data", type=Path, default=None,
                   help="the network's training split: fit the gradient-boosted baseline there and "
                        f"compare (default {paths['train']} if it exists and the data have truth columns)")
    p.add_argument("--baseline", type=Path, default=None,
                   help="the baseline's probabilities on these rows, written by `effgen baseline` "
                        "(instead of fitting it here)")
    p.add_argument("--no-baseline", action="store_true", help="skip the gradient-boosted baseline")
    p.set_defaults(func=_main)


def _main(args):
    from effgen.config import default_paths

    preprocessing = args.preprocessing
    if preprocessing is None:  # the default only if the model's history.json records it
        from effgen.provenance import vouched_default

        preprocessing = vouched_default(default_paths()["preprocessing"], args.model)
    baseline_train = baseline_file = None
    if args.baseline is not None and (args.no_baseline or args.baseline_train_data is not None):
        raise EffgenError("--baseline (its predictions) excludes --baseline-train-data and --no-baseline")
    if args.baseline is not None:
        baseline_file = args.baseline
    elif not args.no_baseline:
        baseline_train = args.baseline_train_data
        if baseline_train is None and default_paths()["train"].exists():
            baseline_train = default_paths()["train"]
    try:
        m = validate(args.model, args.data, args.output_dir, max_rows=args.max_rows,
                     preprocessing_path=preprocessing, baseline_train_dir=baseline_train,
                     baseline_predictions=baseline_file)
    except (FileNotFoundError, ValueError) as err:  # DataError, PreprocessingError too
        raise EffgenError(str(err)) from err
    ll = m["log_loss"]
    truth = f"{ll['truth']:.5f}" if "truth" in ll else "n/a (no truth columns)"
    print(f"effgen validate: {m['n_rows']:,} rows; log-loss model {ll['model']:.5f}, "
          f"truth {truth}, prior {ll['prior']:.5f}; report {args.output_dir / 'report.html'}")
    if "truth" not in ll:
        print("effgen validate: truth scores need truth columns (truth_*); the report scores "
              "the model against the labels only")
    if "baseline" in m:
        b = m["baseline"]
        for who in ("network", "baseline"):
            f = b[who]
            print(f"effgen validate: {who}: mean |p - truth| "
                  + " / ".join(f"{r['mean_abs_diff_vs_truth']:.4f}" for r in f["per_class"].values())
                  + "; mean offset " + " / ".join(f"{r['mean_offset_vs_truth']:+.4f}" for r in f["per_class"].values())
                  + f"; log-loss gap {f['log_loss_gap_pct']:.2f} %")
        print(f"effgen validate: network meets every fidelity target: {b['network_meets_all']}")
    return 0
