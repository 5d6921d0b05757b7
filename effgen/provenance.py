"""What ties the artefacts of one run together: file hashes, the provenance record a
trained model keeps beside it (history.json: the model's and the preprocessing's sha256,
the feature and label names in the order the model was trained on), and the one way to
load a preprocessing (tX.pkl) and an output transform (tY.pkl).

Trust: a tX.pkl or tY.pkl is read through effgen.safe_pickle's allow-list, never plain pickle; when
the history of the model it goes with names a preprocessing, the file's sha256 is checked
against it before a byte is unpickled."""

import hashlib
import json
import os
import zipfile
from pathlib import Path

import numpy as np

from effgen import schema
from effgen.errors import InputFileError, ModelFileError, PreprocessingError, ProvenanceError
from effgen.safe_pickle import UnsafePickleError, loads


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


def recorded_for_model(model_path):
    """The history.json record of the model file at `model_path` (hashing it), or None."""
    model_path = Path(model_path)
    if not model_path.is_file() or not model_path.with_name("history.json").is_file():
        return None
    return recorded_history(model_path, sha256_of(model_path))


def check_contract(model_path, recorded, features=schema.FEATURES, labels=schema.LABELS) -> bool:
    """Refuse a model whose history says it was trained on its inputs in another order
    (or on other outputs) than `features` / `labels`, the order the preprocessing outputs
    and the ABI takes. Returns whether the history let the check be made."""
    if not recorded or "features" not in recorded or "labels" not in recorded:
        return False
    history = Path(model_path).with_name("history.json")
    for what, trained, expected in (("features", recorded["features"], features),
                                    ("outputs", recorded["labels"], labels)):
        if list(trained) != list(expected):
            diffs = [f"position {i}: trained on {t!r}, expected {e!r}"
                     for i, (t, e) in enumerate(zip(trained, expected)) if t != e]
            if len(trained) != len(expected):
                diffs.append(f"{len(trained)} trained vs {len(expected)} expected")
            raise ProvenanceError(
                f"model {model_path} was trained on its {what} in another order than the "
                f"deployed function's ({history}): {'; '.join(diffs[:4])}: retrain on shards "
                f"whose definitions.json lists them in the standard order")
    return True


def vouched_default(default_path, model_path):
    """`default_path` if the history of the model at `model_path` records its sha256, else
    None: a tX.pkl nobody named on the command line is loaded only when the provenance
    record of the model in use vouches for it (never just because it sits in ./build)."""
    default_path = Path(default_path)
    recorded = recorded_for_model(model_path) if model_path is not None else None
    want = None if recorded is None else recorded.get("preprocessing_sha256")
    if want is None or not default_path.is_file() or sha256_of(default_path) != want:
        return None
    return default_path


def trained_order(model_path, features=schema.FEATURES):
    """Column indices into `features` giving the inputs in the order the model at
    `model_path` was trained on (its history.json), or None when not recorded."""
    recorded = recorded_for_model(model_path)
    trained = None if recorded is None else recorded.get("features")
    if not trained or sorted(trained) != sorted(features):
        return None
    return [list(features).index(f) for f in trained]


def _read_bytes(path, what, missing_hint=""):
    """The bytes of `path`; errors name the file and `what` it should be."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise PreprocessingError(f"{path}: {what} file is missing{missing_hint}") from None
    except IsADirectoryError:
        raise PreprocessingError(f"{path}: is a directory, not a {what} file") from None
    return data


def _loads_file(path, data, what):
    """Unpickle `data` (read from `path`) through the allow-list; errors name the file."""
    try:
        return loads(data)
    except UnsafePickleError as err:
        raise UnsafePickleError(f"{path}: refused: {err}") from None
    except Exception as err:  # unpickling can raise nearly anything
        raise PreprocessingError(f"{path}: cannot unpickle the {what} "
                                 f"(corrupt or not a pickle): {err!r}") from err


def load_preprocessing(path, n_features=None, *, model_path=None):
    """Load a fitted scikit-learn ColumnTransformer (tX.pkl) through the allow-list.
    Errors name the file. `n_features`, if given, is the number of raw inputs it must
    take. With `model_path`, a preprocessing that model's history.json does not record is
    refused before it is unpickled."""
    from sklearn.compose import ColumnTransformer

    path = Path(path)
    data = _read_bytes(path, "preprocessing", " (run `effgen preprocess` first)")
    if model_path is not None:
        recorded = recorded_for_model(model_path)
        if recorded is not None:
            check_provenance(model_path, recorded["model_sha256"], path,
                             hashlib.sha256(data).hexdigest())
    ct = _loads_file(path, data, "preprocessing")
    if not isinstance(ct, ColumnTransformer):
        raise PreprocessingError(f"{path}: expected a ColumnTransformer, got {type(ct).__name__}")
    if not hasattr(ct, "transformers_"):
        raise PreprocessingError(f"{path}: the ColumnTransformer is not fitted")
    if n_features is not None and getattr(ct, "n_features_in_", None) != n_features:
        raise PreprocessingError(f"{path}: the ColumnTransformer takes "
                                 f"{getattr(ct, 'n_features_in_', '?')} inputs, expected {n_features}")
    return ct


def load_postprocessing(path, *, sha256=None):
    """Load a fitted output transform (tY.pkl: a QuantileTransformer, StandardScaler,
    DecorrTransformer or a Pipeline of them) through the same allow-list as tX.pkl.
    A tY.pkl pickled by LHCb's notebooks names `preprocessing_utils.DecorrTransformer`:
    it is read as effgen's compatible class. With `sha256`, a file whose hash differs is
    refused before it is unpickled. Errors name the file; which steps have a C inverse
    is effgen.codegen.postprocessing_ir's business."""
    path = Path(path)
    data = _read_bytes(path, "postprocessing (tY)")
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise ProvenanceError(f"{path}: sha256 {hashlib.sha256(data).hexdigest()} is not the "
                              f"expected {sha256}")
    obj = _loads_file(path, data, "postprocessing (tY)")
    if not hasattr(obj, "inverse_transform"):
        raise PreprocessingError(f"{path}: expected a fitted transformer with an "
                                 f"inverse_transform, got {type(obj).__name__}")
    return obj


def preprocessing_width(ct) -> int:
    """Number of columns the fitted preprocessing outputs."""
    try:
        return len(ct.get_feature_names_out())
    except (AttributeError, ValueError):
        return int(ct.transform(np.zeros((1, ct.n_features_in_))).shape[1])


def load_keras_model(path, compile=False):
    """Load a .keras model; a missing file and a corrupt one get different messages
    (Keras itself says "File not found" for both)."""
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"Keras model {path} does not exist (run `effgen train`)")
    if not zipfile.is_zipfile(path):
        raise ModelFileError(f"{path}: not a readable .keras file (corrupt or truncated)")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    try:  # safe_mode (the default) refuses Lambda layers, which would hold code
        return keras.models.load_model(str(path), compile=compile)
    except Exception as err:  # Keras raises ValueError, KeyError, OSError, ...
        raise ModelFileError(f"{path}: cannot load the Keras model (corrupt?): {err}") from err
