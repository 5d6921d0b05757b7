"""A gradient-boosted baseline for the network: scikit-learn's
HistGradientBoostingClassifier fitted on the same training rows, with its own early
stopping on a held-out part of them (issue 14). `effgen validate` scores it beside the
network on the same rows, so the report says whether the network earns its place.

scikit-learn is imported lazily (importing effgen stays light)."""

import os
import time
from dataclasses import dataclass

import numpy as np

MAX_LEAF_NODES = 63
MAX_ITER = 500
VALIDATION_FRACTION = 0.1
N_ITER_NO_CHANGE = 10


def openmp_threads():
    """1 on a machine already busier than its cores, else None (scikit-learn's choice).
    OpenMP's spinning barriers collapse under oversubscription: 20 iterations on 300k
    rows took 373 s with 2 threads against 47 s with 1 on this project's 2-core machine
    at load 7."""
    try:
        busy = os.getloadavg()[0] >= (os.cpu_count() or 1)
    except OSError:
        busy = False
    return 1 if busy else None


@dataclass
class Baseline:
    model: object        # the fitted HistGradientBoostingClassifier
    fit_s: float
    train_rows: int
    n_iter: int
    threads: int | None = None

    def predict_proba(self, features) -> np.ndarray:
        """(n, n_classes) probabilities in label order (every class was seen in fitting)."""
        return self.model.predict_proba(np.asarray(features, dtype=np.float32))

    def describe(self) -> dict:
        return {"model": "HistGradientBoostingClassifier", "max_leaf_nodes": MAX_LEAF_NODES,
                "early_stopping": True, "validation_fraction": VALIDATION_FRACTION,
                "n_iter_no_change": N_ITER_NO_CHANGE, "max_iter": MAX_ITER,
                "n_iter": self.n_iter, "train_rows": self.train_rows, "fit_s": round(self.fit_s, 3),
                "threads": self.threads or "default"}


def fit_baseline(features, labels, seed=0, max_iter=MAX_ITER, threads="auto") -> Baseline:
    """Fit on (n, n_features) features and (n, n_classes) one-hot labels. Every class
    must occur, or predict_proba's columns would not line up with the labels. `threads`:
    OpenMP threads, "auto" for openmp_threads(), None for scikit-learn's default."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from threadpoolctl import threadpool_limits

    features = np.asarray(features, dtype=np.float32)
    labels = np.asarray(labels)
    if features.ndim != 2 or labels.ndim != 2 or len(features) != len(labels):
        raise ValueError(f"baseline: features {features.shape} and labels {labels.shape} "
                         "must be 2-d with the same number of rows")
    y = labels.argmax(axis=1)
    missing = sorted(set(range(labels.shape[1])) - set(np.unique(y).tolist()))
    if missing:
        raise ValueError(f"baseline: classes {missing} never occur in the {len(y)} training rows")
    clf = HistGradientBoostingClassifier(
        max_leaf_nodes=MAX_LEAF_NODES, max_iter=max_iter, early_stopping=True,
        validation_fraction=VALIDATION_FRACTION, n_iter_no_change=N_ITER_NO_CHANGE,
        random_state=seed)
    threads = openmp_threads() if threads == "auto" else threads
    start = time.monotonic()
    with threadpool_limits(limits=threads, user_api="openmp"):
        clf.fit(features, y)
    return Baseline(clf, time.monotonic() - start, len(y), int(clf.n_iter_), threads)


def load_training_rows(train_dir, max_rows=None):
    """Features and labels of the training split, as the network saw them."""
    from effgen.data.reader import FeatherReader

    reader = FeatherReader(train_dir)
    frame = reader.as_pandas(columns=list(reader.features) + list(reader.labels), max_rows=max_rows)
    return (frame[list(reader.features)].to_numpy(np.float32),
            frame[list(reader.labels)].to_numpy(np.float32))
