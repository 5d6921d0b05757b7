"""The tracking-acceptance model: a binary classifier on the efficiency's 12 features.

Lamarr's first tracking step (DOMAIN.md section 8): Dense(128, tanh, he_normal, L2) ->
10 x [Dense(128, tanh, kernel zeros), Add()] -> Dense(1, sigmoid), 166,913 parameters
at the production size. It is trained on the same shards and behind the same tX.pkl as
the efficiency model; its label is the tuple's `acceptance` flag, which preprocess keeps
in the shards as an extra column. At run time Lamarr keeps a particle when
`random_category(1 - acc, acc) == 1`.

Keras is imported inside the functions so importing effgen stays light."""

import json
from pathlib import Path

import numpy as np

from effgen.data.reader import FeatherReader, check_finite
from effgen.errors import DataError

LABEL = "acceptance"
OUTPUTS = ["acceptance"]
# Rows of the test split the short check after training scores (a few seconds).
CHECK_ROWS = 200_000


def build_acceptance_model(n_features=12, n_classes=1, width=128, n_blocks=10, l2=1e-3, seed=None):
    """The production acceptance topology. The residual Dense layers start with zero
    kernels (each block starts as the identity, as LHCb's model does); the first Dense
    carries the L2 penalty (`l2` = 0: none). `n_classes` must be 1 (one sigmoid)."""
    import keras

    if n_classes != 1 or n_features < 1 or width < 1 or n_blocks < 0:
        raise ValueError(f"build_acceptance_model: need n_classes == 1, n_features >= 1, width >= 1, "
                         f"n_blocks >= 0; got {n_classes=}, {n_features=}, {width=}, {n_blocks=}")
    derived = iter(range(2))

    def he():
        return keras.initializers.HeNormal(seed=None if seed is None else seed * 1000 + next(derived))

    inputs = keras.layers.Input(shape=(n_features,))
    x = keras.layers.Dense(width, activation="tanh", kernel_initializer=he(),
                           kernel_regularizer=keras.regularizers.L2(l2) if l2 else None)(inputs)
    for _ in range(n_blocks):
        r = keras.layers.Dense(width, activation="tanh", kernel_initializer="zeros")(x)
        x = keras.layers.Add()([x, r])
    outputs = keras.layers.Dense(1, activation="sigmoid", kernel_initializer=he())(x)
    return keras.Model(inputs=[inputs], outputs=[outputs])


class AcceptanceReader(FeatherReader):
    """The efficiency shards with the `acceptance` column as the one (0/1) label."""

    def __init__(self, path):
        super().__init__(path)
        if LABEL not in self.extra:
            raise DataError(f"{self.path}: no '{LABEL}' column among the shards' extra columns "
                            f"({', '.join(self.extra) or 'none'}): rerun `effgen preprocess` on a "
                            f"tuple with the '{LABEL}' branch")
        self.extra = [c for c in self.extra if c != LABEL]
        self.labels = [LABEL]

    def validate(self, progress=False):
        """NaN / inf in a feature, or a label other than 0 and 1: DataError naming the
        file, column and first bad row. Returns the number of rows checked."""
        from tqdm import tqdm

        rows = 0
        for file in tqdm(self.data_files, desc=f"validate {self.path.name}", disable=not progress):
            data = self._read(file, self.features + self.labels)
            for name, values in data.items():
                check_finite(file, name, values)
            bad = ~np.isin(data[LABEL], (0.0, 1.0))
            if bad.any():
                first = int(np.argmax(bad))
                raise DataError(f"{file}: label column '{LABEL}' is not 0/1: {int(bad.sum())} values "
                                f"(first at row {first}: {data[LABEL][first]})")
            rows += len(data[self.features[0]])
        return rows


def binary_metrics(p, y, bins=10) -> dict:
    """Log-loss of the predictions against the prior's (the training-free baseline that
    always answers the mean label), and calibration: per decile of the prediction, the
    mean prediction against the fraction accepted."""
    p = np.clip(np.asarray(p, np.float64).ravel(), 1e-7, 1 - 1e-7)
    y = np.asarray(y, np.float64).ravel()
    prior = float(np.clip(y.mean(), 1e-7, 1 - 1e-7))

    def logloss(q):
        return float(-np.mean(y * np.log(q) + (1 - y) * np.log1p(-q)))

    edges = np.unique(np.quantile(p, np.linspace(0, 1, bins + 1)))
    which = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, len(edges) - 2)
    table = []
    for b in range(len(edges) - 1):
        sel = which == b
        if sel.any():
            table.append({"rows": int(sel.sum()), "mean_prediction": float(p[sel].mean()),
                          "fraction_accepted": float(y[sel].mean())})
    gap = max(abs(t["mean_prediction"] - t["fraction_accepted"]) for t in table)
    return {"rows": int(len(y)), "prior": prior, "log_loss": logloss(p),
            "prior_log_loss": logloss(np.full_like(p, prior)), "max_calibration_gap": gap,
            "calibration": table}


def check_on_test_split(model, test_dir, output_json, rows=CHECK_ROWS) -> dict:
    """binary_metrics of `model` on the first `rows` rows of the test split (shuffled by
    preprocess, so a fair sample), written to `output_json`; returns them."""
    from effgen.atomic import atomic_file

    reader = AcceptanceReader(test_dir)
    x, y = next(reader.iter_xy(min(rows, reader.n_rows)))
    metrics = binary_metrics(model.predict(x, batch_size=8192, verbose=0), y)
    metrics["data"] = str(test_dir)
    with atomic_file(Path(output_json), "w") as f:
        json.dump(metrics, f, indent=1)
    print(f"acceptance check on {metrics['rows']:,} rows of {test_dir}: log-loss "
          f"{metrics['log_loss']:.4f} vs {metrics['prior_log_loss']:.4f} for the prior "
          f"({metrics['prior']:.3f}); largest calibration gap over deciles "
          f"{metrics['max_calibration_gap']:.4f}", flush=True)
    return metrics
