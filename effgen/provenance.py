"""What ties the artefacts of one run together: file hashes, the provenance record a
trained model keeps beside it (history.json), and the one way to load a preprocessing
(tX.pkl)."""

import hashlib
import json
import pickle
from pathlib import Path

import numpy as np

from effgen.errors import PreprocessingError, ProvenanceError


def sha256_of(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def recorded_history(model_path, model_sha256):
    """The history.json beside `model_path` if it names this model's sha256, else None."""
    history = Path(model_path).with_name("history.json")
    try:
        recorded = json.loads(history.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(recorded, dict) or recorded.get("model_sha256") != model_sha256:
        return None  # no history, or the history of another model
    return recorded


def check_provenance(model_path, model_sha256, preprocessing_path, preprocessing_sha256) -> bool:
    """Refuse a preprocessing other than the one the model was trained behind, when the
    training history beside the model says which; same-width preprocessings would
    otherwise export silently wrong physics. Returns whether the check could be made."""
    recorded = recorded_history(model_path, model_sha256)
    want = None if recorded is None else recorded.get("preprocessing_sha256")
    if want is None:
        return False
    if preprocessing_sha256 != want:
        raise ProvenanceError(
            f"model {model_path} was trained on features made by a preprocessing with sha256 "
            f"{want[:16]}... ({Path(model_path).with_name('history.json')}), but "
            f"{preprocessing_path} has sha256 {preprocessing_sha256[:16]}...: "
            f"export with the tX.pkl the model was trained with, or retrain")
    return True


def load_preprocessing(path, n_features=None):
    """Unpickle a fitted scikit-learn ColumnTransformer (tX.pkl). Errors name the file.
    `n_features`, if given, is the number of raw inputs it must take."""
    from sklearn.compose import ColumnTransformer

    path = Path(path)
    try:
        with open(path, "rb") as f:
            ct = pickle.load(f)
    except FileNotFoundError:
        raise PreprocessingError(f"{path}: preprocessing file is missing "
                                 "(run `effgen preprocess` first)") from None
    except Exception as err:  # unpickling can raise nearly anything
        raise PreprocessingError(f"{path}: cannot unpickle the preprocessing: {err!r}") from err
    if not isinstance(ct, ColumnTransformer):
        raise PreprocessingError(f"{path}: expected a ColumnTransformer, got {type(ct).__name__}")
    if not hasattr(ct, "transformers_"):
        raise PreprocessingError(f"{path}: the ColumnTransformer is not fitted")
    if n_features is not None and getattr(ct, "n_features_in_", None) != n_features:
        raise PreprocessingError(f"{path}: the ColumnTransformer takes "
                                 f"{getattr(ct, 'n_features_in_', '?')} inputs, expected {n_features}")
    return ct


def preprocessing_width(ct) -> int:
    """Number of columns the fitted preprocessing outputs."""
    try:
        return len(ct.get_feature_names_out())
    except (AttributeError, ValueError):
        return int(ct.transform(np.zeros((1, ct.n_features_in_))).shape[1])
