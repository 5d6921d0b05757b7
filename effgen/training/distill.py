"""Distillation: train one network on the mean of several teachers' probabilities.

Networks trained alike from different seeds err differently: on the main job's sample two
default-recipe runs' long-track errors correlate at 0.76 row by row, and the mean of their
probabilities is 8-10 % closer to the truth on every class than either (issue 14). A mean
of networks is not one network the code generator can deploy at one network's cost, but
a network of the same size trained on that mean as its labels (soft labels, the same
cross-entropy) reproduces it: on the same rows, a student of two teachers scored what
their mean scored, and a student of one teacher what that teacher scored.

`effgen train --teachers A.keras B.keras` does it; the main job (Makefile) trains the
teachers side by side, one per core, then the student."""

from pathlib import Path

import numpy as np

from effgen.provenance import recorded_history, sha256_of


def load_teachers(paths, n_features, n_classes, preprocessing_sha256):
    """The teacher models, each checked to take `n_features` inputs and give
    `n_classes` outputs, and (where its history.json says) to have been trained on
    features made by the same tX.pkl; and their sha256, in order."""
    import keras

    if not paths:
        raise ValueError("distillation needs at least one teacher model")
    models, digests = [], []
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"teacher {path} does not exist")
        digest = sha256_of(path)
        try:
            model = keras.models.load_model(path, compile=False)
        except Exception as err:  # Keras raises several types for a bad file
            raise ValueError(f"teacher {path}: not a loadable Keras model: {err}") from None
        shape_in, shape_out = tuple(model.inputs[0].shape), tuple(model.outputs[0].shape)
        if shape_in[1:] != (n_features,) or shape_out[1:] != (n_classes,):
            raise ValueError(f"teacher {path} maps {shape_in[1:]} inputs to {shape_out[1:]} outputs; "
                             f"the training split has {n_features} features and {n_classes} labels")
        history = recorded_history(path, digest)
        made_by = None if history is None else history.get("preprocessing_sha256")
        if made_by is not None and made_by != preprocessing_sha256:
            raise ValueError(f"teacher {path} was trained on features of another preprocessing "
                             f"(tX.pkl sha256 {made_by}, the training split's is {preprocessing_sha256})")
        models.append(model)
        digests.append(digest)
    return models, digests


def mean_probabilities(models, features, batch_size=65536):
    """The mean of the models' outputs on `features`, as float32 labels."""
    total = np.zeros((len(features), models[0].outputs[0].shape[-1]), dtype=np.float64)
    for model in models:
        total += model.predict(features, batch_size=batch_size, verbose=0)
    return (total / len(models)).astype(np.float32)
