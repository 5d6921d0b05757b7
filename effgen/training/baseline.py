"""A gradient-boosted baseline for the network: scikit-learn's
HistGradientBoostingClassifier fitted on the same training rows, with its own early
stopping on a held-out part of them (issue 14). `effgen validate` scores it beside the
network on the same rows, so the report says whether the network earns its place.

`effgen baseline` fits it and writes its probabilities on the rows `effgen validate`
scores, so that the main job can fit it while the network trains; the file records a
hash of those rows and validate refuses it for any others.

scikit-learn is imported lazily (importing effgen stays light)."""

import argparse
import hashlib
import json
import os
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from effgen.atomic import atomic_file
from effgen.errors import DataError, EffgenError

MAX_LEAF_NODES = 63
MAX_ITER = 500
VALIDATION_FRACTION = 0.1
N_ITER_NO_CHANGE = 10
# Rows `effgen validate` scores by default (the first ones of the split); `effgen baseline`
# predicts the same ones, so both commands share it: the row fingerprint refuses a mismatch.
SCORED_ROWS = 1_000_000


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


def fit_and_predict(train_dir, features, max_train_rows=None, seed=0, threads="auto"):
    """Fit on the training split; the probabilities on `features`' rows and a
    description of the fit."""
    x_train, y_train = load_training_rows(train_dir, max_rows=max_train_rows)
    fitted = fit_baseline(x_train, y_train, seed=seed, threads=threads)
    start = time.monotonic()
    pred = fitted.predict_proba(features)
    info = fitted.describe() | {"predict_s": round(time.monotonic() - start, 3),
                                "train_data": str(train_dir)}
    return pred, info


# ---- predictions on file: fitted beside the training, read by validate ------------------

PREDICTIONS_FORMAT = "effgen-baseline-predictions-1"


def rows_fingerprint(features) -> str:
    """sha256 of the float32 feature rows (and their shape): which rows were scored."""
    rows = np.ascontiguousarray(features, dtype=np.float32)
    digest = hashlib.sha256(repr(rows.shape).encode())
    digest.update(memoryview(rows).cast("B"))
    return digest.hexdigest()


def scored_rows(data_dir, max_rows):
    """The features of the rows `effgen validate --max-rows` scores: the first max_rows."""
    from effgen.data.reader import FeatherReader

    reader = FeatherReader(data_dir)
    return reader.as_pandas(columns=list(reader.features), max_rows=max_rows).to_numpy(np.float32)


def write_predictions(path, proba, features, info):
    """One .npz (no pickles): the probabilities, the rows' fingerprint, the fit's description."""
    with atomic_file(path, "wb") as f:
        np.savez(f, format=np.array(PREDICTIONS_FORMAT), proba=np.asarray(proba, dtype=np.float64),
                 rows_sha256=np.array(rows_fingerprint(features)), info=np.array(json.dumps(info)))


def read_predictions(path, features):
    """(probabilities, fit description) from `write_predictions`, checked to be for
    exactly these feature rows."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"baseline predictions {path} do not exist (run `effgen baseline` first)")
    try:
        with np.load(path, allow_pickle=False) as z:
            fmt, proba = str(z["format"]), z["proba"]
            rows, info = str(z["rows_sha256"]), json.loads(str(z["info"]))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as err:
        raise DataError(f"{path} is not a baseline predictions file written by `effgen baseline` "
                        f"({type(err).__name__}: {err})") from err
    if fmt != PREDICTIONS_FORMAT:
        raise DataError(f"{path} has format {fmt!r}, expected {PREDICTIONS_FORMAT!r}")
    if rows != rows_fingerprint(features):
        raise DataError(f"{path} holds the baseline's probabilities for other rows than the "
                        f"{len(features):,} being scored (another split, sample or --max-rows): "
                        "rerun `effgen baseline` with the same --data and --max-rows")
    if proba.ndim != 2 or len(proba) != len(features) or not np.all(np.isfinite(proba)):
        raise DataError(f"{path}: probabilities of shape {proba.shape} (finite: "
                        f"{bool(np.all(np.isfinite(proba)))}) for {len(features):,} rows")
    return proba, info


# ---- the CLI ---------------------------------------------------------------------------

def _threads(text):
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"--threads: {text!r} is neither 'auto' nor a positive integer")
    return value


def register(subparsers):
    from effgen.config import default_paths

    paths = default_paths()
    p = subparsers.add_parser(
        "baseline", help="fit the gradient-boosted baseline; its probabilities for `effgen validate`",
        description=__doc__.split("\n\n")[0])
    p.add_argument("--train-data", type=Path, default=paths["train"],
                   help="the network's training split (default %(default)s)")
    p.add_argument("--data", type=Path, default=paths["test"],
                   help="the split `effgen validate --data` scores (default %(default)s)")
    p.add_argument("--max-rows", type=int, default=SCORED_ROWS,
                   help="as `effgen validate --max-rows` (default %(default)s)")
    p.add_argument("--output", type=Path, default=paths["baseline"],
                   help="the .npz to write (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="default %(default)s")
    p.add_argument("--threads", type=_threads, default="auto",
                   help="OpenMP threads: 'auto' (1 on a machine busier than its cores) or a number; "
                        "1 when it runs beside another stage (default %(default)s)")
    p.set_defaults(func=_main)


def _main(args):
    try:
        features = scored_rows(args.data, args.max_rows)
        pred, info = fit_and_predict(args.train_data, features, seed=args.seed, threads=args.threads)
    except (FileNotFoundError, ValueError) as err:  # DataError too
        raise EffgenError(str(err)) from err
    info |= {"data": str(args.data), "max_rows": args.max_rows}
    write_predictions(args.output, pred, features, info)
    print(f"effgen baseline: {info['n_iter']} iterations on {info['train_rows']:,} rows in "
          f"{info['fit_s']:.1f} s; probabilities for {len(features):,} rows of {args.data} "
          f"in {args.output}")
    return 0
