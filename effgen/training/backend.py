"""Which Keras backend trains: JAX or TensorFlow, chosen before Keras is first imported.

Keras 3 fixes its backend when it is first imported (from $KERAS_BACKEND). `effgen train`
imports Keras only once `activate` has set that variable, so the TRAIN_BACKEND knob (or
the recipe's own choice) decides; a $KERAS_BACKEND already set is overwritten. A process
that has already imported Keras (a notebook, pytest) trains on the backend it has; asking
for another then fails with a clear error instead of silently training elsewhere.

On this project's CPUs Keras on JAX with a numpy feed trains ~1.6x more samples per
CPU-second than TensorFlow at batch 1024 (per-step dispatch overhead; issue 14). Export,
parity and describe load the saved .keras file under TensorFlow: the file format is the
same for both backends. With a GPU (the `gpu` extra installs jax[cuda12]) JAX places the
model there by itself: the same code path."""

import os
import sys

from effgen.errors import TrainingError

BACKENDS = ("jax", "tensorflow")


def active_backend():
    """The backend of an already-imported Keras, or None if Keras is not imported yet."""
    if "keras" not in sys.modules:
        return None
    import keras
    return keras.backend.backend()


def activate(requested=None, preferred="jax") -> str:
    """Make `requested` (else, when Keras is not imported yet, `preferred`) the backend
    Keras will use, and return the one in use. With Keras already imported its backend
    stays; a `requested` other than it raises TrainingError."""
    for name, value in (("backend", requested), ("the recipe's backend", preferred)):
        if value is not None and value not in BACKENDS:
            raise TrainingError(f"{name} {value!r} is not one of {', '.join(BACKENDS)}")
    active = active_backend()
    if active is not None:
        if requested is not None and requested != active:
            raise TrainingError(
                f"cannot train on the {requested} backend: this process already imported Keras "
                f"with the {active} backend (Keras fixes it at first import); run `effgen train` "
                f"in a fresh process with TRAIN_BACKEND={requested}, or omit the backend")
        return active
    choice = requested or preferred or BACKENDS[0]
    os.environ["KERAS_BACKEND"] = choice
    return choice


def describe_device(backend) -> str:
    """What the backend trains on: "CPU" or "GPU x<n> (<name>)" (the history records it)."""
    if backend == "jax":
        import jax
        gpus = [d for d in jax.devices() if d.platform == "gpu"]
        return f"GPU x{len(gpus)} ({gpus[0].device_kind})" if gpus else "CPU"
    import tensorflow as tf
    gpus = tf.config.list_physical_devices("GPU")
    return f"GPU x{len(gpus)} ({gpus[0].name})" if gpus else "CPU"
