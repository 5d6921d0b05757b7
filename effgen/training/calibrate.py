"""Calibration-in-the-large: after training, refit the output Dense layer's bias (and,
optionally, one common scale of its logits) on held-out rows by minimising their
log-loss.

The log-loss of softmax(a * z + b) is convex in (a, b) for fixed logits z, and at its
optimum the derivative in each b_k is mean(p_k) - mean(label_k) = 0: the refitted model
predicts each class's fraction of the rows it was fitted on exactly. Stochastic training
ends with its output bias off by a few 1e-3 (the last steps' noise); the refit removes
that without touching the hidden layers. The new values are folded into the output
Dense layer (kernel * a, bias * a + b), so the deployed topology is unchanged.

Keras is imported lazily; the fit itself is numpy."""

from dataclasses import dataclass

import numpy as np

from effgen.training.recipes import CALIBRATIONS as METHODS


@dataclass(frozen=True)
class OutputFit:
    scale: float              # a (1.0 for "bias")
    shift: np.ndarray         # b, with b[0] = 0 (softmax is invariant to a common shift)
    iterations: int
    log_loss_before: float
    log_loss_after: float

    def describe(self) -> dict:
        return {"scale": self.scale, "bias_shift": [float(v) for v in self.shift],
                "iterations": self.iterations, "log_loss_before": self.log_loss_before,
                "log_loss_after": self.log_loss_after}


def softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def fit_output(logits, labels, scale=False, max_iter=50, tol=1e-10) -> OutputFit:
    """Minimise the mean log-loss of softmax(a * logits + b) over b (and a when `scale`)
    by damped Newton steps. logits: (n, k); labels: (n, k) one-hot (or class
    probabilities: the optimum then matches their means)."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    if z.ndim != 2 or z.shape != y.shape or len(z) == 0:
        raise ValueError(f"calibration: logits {z.shape} and labels {y.shape} must be equal, "
                         "non-empty (n, k) arrays")
    missing = np.flatnonzero(y.sum(axis=0) == 0)
    if len(missing):
        # The optimum would push that class's bias to -infinity.
        raise ValueError(f"calibration: classes {missing.tolist()} never occur in the "
                         f"{len(y)} rows fitted on")
    n, k = z.shape

    def loss(a, b):  # the soft-label log-loss (equals the usual one for one-hot labels)
        lz = a * z + b
        lz = lz - lz.max(axis=1, keepdims=True)
        return float(np.mean(np.log(np.exp(lz).sum(axis=1)) - np.sum(y * lz, axis=1)))

    a, b = 1.0, np.zeros(k)
    before = current = loss(a, b)
    iterations = 0
    while iterations < max_iter:
        iterations += 1
        p = softmax(a * z + b)
        r = p - y
        # Parameters: [a] (if scale) + b[1:]; b[0] stays 0.
        grad = [r.mean(axis=0)[1:]]
        h_bb = (np.diag(p.mean(axis=0)) - p.T @ p / n)[1:, 1:]
        if scale:
            pz = np.sum(p * z, axis=1)
            g_a = np.mean(np.sum(r * z, axis=1))
            h_ab = (np.mean(p * z, axis=0) - np.mean(p * pz[:, None], axis=0))[1:]
            h_aa = np.mean(np.sum(p * z * z, axis=1) - pz ** 2)
            grad = [np.array([g_a])] + grad
            hess = np.block([[np.array([[h_aa]]), h_ab[None, :]], [h_ab[:, None], h_bb]])
        else:
            hess = h_bb
        g = np.concatenate(grad)
        step = np.linalg.solve(hess + 1e-12 * np.eye(len(g)), g)
        # Backtracking: a full Newton step is taken near the optimum.
        t = 1.0
        while True:
            a_new = a - t * step[0] if scale else a
            b_new = b.copy()
            b_new[1:] -= t * step[-(k - 1):]
            new = loss(a_new, b_new)
            if new <= current or t < 1e-6:
                break
            t *= 0.5
        a, b, current = a_new, b_new, new
        if np.max(np.abs(t * step)) < tol:
            break
    return OutputFit(float(a), b, iterations, before, current)


def output_layers(model):
    """The model's output Dense layer (linear) and the sub-model computing its logits.
    The network must end in Dense(linear) -> Softmax, as effgen's networks do."""
    import keras

    last = model.layers[-1]
    dense = last.input._keras_history[0] if isinstance(last, keras.layers.Softmax) else None
    if not isinstance(dense, keras.layers.Dense) or dense.activation.__name__ != "linear" \
            or not dense.use_bias:
        raise ValueError("calibration needs a model ending in Dense(linear, with bias) -> Softmax")
    return dense, keras.Model(model.inputs, dense.output)


def model_logits(model, features, batch_size=65_536):
    _, logits_model = output_layers(model)
    return logits_model.predict(features, batch_size=batch_size, verbose=0).astype(np.float64)


def apply_output_fit(model, fit: OutputFit):
    """Fold softmax(a * z + b) into the output Dense layer, in place."""
    dense, _ = output_layers(model)
    kernel, bias = (np.asarray(w, dtype=np.float64) for w in dense.get_weights())
    dense.set_weights([(fit.scale * kernel).astype(np.float32),
                       (fit.scale * bias + fit.shift).astype(np.float32)])


def calibrate_model(model, features, labels, method) -> dict | None:
    """Refit the model's output layer on (features, labels) by `method` (METHODS) and
    return what was done, for history.json; None for "none"."""
    if method not in METHODS:
        raise ValueError(f"calibration {method!r} not in {METHODS}")
    if method == "none":
        return None
    labels = np.asarray(labels, dtype=np.float64)
    z = model_logits(model, features)
    fit = fit_output(z, labels, scale=method == "scale_bias")
    apply_output_fit(model, fit)
    before = softmax(z).mean(axis=0) - labels.mean(axis=0)
    after = softmax(fit.scale * z + fit.shift).mean(axis=0) - labels.mean(axis=0)
    return {"method": method, "rows": int(len(labels)), **fit.describe(),
            "mean_prediction_minus_label_before": [float(v) for v in before],
            "mean_prediction_minus_label_after": [float(v) for v in after]}
