"""Read a fitted output transform `tY` into the steps of its inverse, as plain arrays a C
generator can print.

A generator network (DOMAIN.md section 8) is trained on `tY.transform(targets)`; at run
time its linear outputs go through `tY.inverse_transform` to come back in physical units.
Accepted, alone or as (nested) `Pipeline`s, which are inverted last step first:

    QuantileTransformer(output_distribution="normal")
        u = norm.cdf(x); quantiles[-1] if u + 1e-7 > 1; quantiles[0] if u - 1e-7 < 0;
        else np.interp(u, references_, quantiles_)        (sklearn's _transform_col)
    StandardScaler          x * scale_ (with_std), then + mean_ (with_mean)
    DecorrTransformer       x @ eig.T (LHCb's class, or effgen's compatible one)

Anything else (PCA, a ColumnTransformer, which has no inverse_transform, a uniform
QuantileTransformer, ...) is refused with an error naming the step. The IR lists the
steps in the order the inverse applies them. The reference is scikit-learn run on a
float64 array (`tY.inverse_transform(y.astype(np.float64))`): the generated C computes
in double from the network's float outputs and rounds once, at the end. Measured
(tests/test_postprocessing.py, 1M rows including tails, knots, the 1e-7 bounds and
+-inf): equal to float32(sklearn) on every value for a QuantileTransformer and for
scalers, within 6e-10 of the target's spread for StandardScaler -> DecorrTransformer ->
QuantileTransformer (summation order of the matrix product); the tests hold it to 1e-6
of the spread. Against unrounded float64 the float result itself adds up to 6e-8 of
|value|.
"""

from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np

from effgen.errors import ExportError, UnsupportedPreprocessingError
from effgen.provenance import load_postprocessing

BOUNDS_THRESHOLD = 1e-7  # sklearn.preprocessing._data.BOUNDS_THRESHOLD

SUPPORTED = ("QuantileTransformer(output_distribution='normal'), StandardScaler, "
             "DecorrTransformer, and Pipelines of them")


class UnsupportedPostprocessingError(UnsupportedPreprocessingError):
    """The output transform tY holds a step without a C inverse."""


@dataclass
class QuantileInverse:
    """Inverse of QuantileTransformer(normal): column k of x -> column k of the output."""
    label: str
    quantiles: np.ndarray    # (n_quantiles, n_features) float64, non-decreasing per column
    references: np.ndarray   # (n_quantiles,) float64, increasing (0 .. 1)
    kind: str = "quantile"

    @property
    def n_features(self) -> int:
        return self.quantiles.shape[1]


@dataclass
class ScaleInverse:
    """Inverse of StandardScaler: x * scale, then + mean (either may be None)."""
    label: str
    n: int
    scale: Optional[np.ndarray]
    mean: Optional[np.ndarray]
    kind: str = "scale"

    @property
    def n_features(self) -> int:
        return self.n


@dataclass
class MatrixInverse:
    """Inverse of DecorrTransformer: out = x @ matrix, matrix = eig.T (n x n, float64)."""
    label: str
    matrix: np.ndarray
    kind: str = "matrix"

    @property
    def n_features(self) -> int:
        return self.matrix.shape[0]


@dataclass
class PostprocessingIR:
    """The inverse of tY: `steps` in the order they apply to the network's outputs."""
    n_features: int
    description: str
    steps: List[object] = field(default_factory=list)


def _refuse(label, why):
    raise UnsupportedPostprocessingError(f"{label}: {why}; supported: {SUPPORTED}")


def _finite(label, name, values):
    a = np.asarray(values)
    if np.iscomplexobj(a):
        if np.any(a.imag != 0):
            _refuse(label, f"{name} is complex (non-zero imaginary parts)")
        a = a.real
    a = np.asarray(a, dtype=np.float64)
    if not np.isfinite(a).all():
        _refuse(label, f"{name} holds non-finite values")
    return np.ascontiguousarray(a)


def _quantile(label, qt):
    if not hasattr(qt, "quantiles_"):
        _refuse(label, "the QuantileTransformer is not fitted")
    if qt.output_distribution != "normal":
        _refuse(label, f"QuantileTransformer(output_distribution={qt.output_distribution!r}); "
                       "effgen inverts only 'normal'")
    quantiles = _finite(label, "quantiles_", qt.quantiles_)
    references = _finite(label, "references_", qt.references_)
    if quantiles.ndim != 2 or quantiles.shape[0] != len(references) or len(references) < 2:
        _refuse(label, f"quantiles_ of shape {quantiles.shape} for {len(references)} references")
    if (np.diff(quantiles, axis=0) < 0).any():
        _refuse(label, "quantiles_ are not non-decreasing")
    if (np.diff(references) <= 0).any():
        _refuse(label, "references_ are not increasing")
    return QuantileInverse(label, quantiles, references)


def _scaler(label, sc):
    n = getattr(sc, "n_features_in_", None)
    if n is None or not hasattr(sc, "scale_"):
        _refuse(label, "the StandardScaler is not fitted")
    scale = None if not sc.with_std or sc.scale_ is None else _finite(label, "scale_", sc.scale_)
    mean = None if not sc.with_mean or sc.mean_ is None else _finite(label, "mean_", sc.mean_)
    for name, a in (("scale_", scale), ("mean_", mean)):
        if a is not None and a.shape != (n,):
            _refuse(label, f"{name} of shape {a.shape} for {n} features")
    return ScaleInverse(label, int(n), scale, mean)


def _decorr(label, dt):
    eig = getattr(dt, "eig", None)
    if eig is None:
        _refuse(label, "the DecorrTransformer is not fitted (no eig)")
    eig = _finite(label, "eig", eig)
    if eig.ndim != 2 or eig.shape[0] != eig.shape[1]:
        _refuse(label, f"eig of shape {eig.shape} is not square")
    return MatrixInverse(label, np.ascontiguousarray(eig.T))


_READERS = {"QuantileTransformer": _quantile, "StandardScaler": _scaler,
            "DecorrTransformer": _decorr}


def _describe(obj) -> str:
    name = type(obj).__name__
    if name == "Pipeline":
        return "Pipeline(" + ", ".join(_describe(s) for _, s in obj.steps
                                       if s is not None and s != "passthrough") + ")"
    if name == "QuantileTransformer":
        return f"QuantileTransformer({getattr(obj, 'output_distribution', '?')})"
    return name


def _forward_steps(obj, label):
    """The supported steps of `obj` in forward (transform) order."""
    if type(obj).__name__ == "Pipeline":
        out = []
        for k, (name, step) in enumerate(obj.steps, start=1):
            sub = f"{label} step {k} {name!r}"
            if step is None or (isinstance(step, str) and step == "passthrough"):
                continue
            out += _forward_steps(step, sub)
        return out
    kind = type(obj).__name__
    reader = _READERS.get(kind)
    if reader is None:
        _refuse(f"{label} ({kind})", "no C inverse supported")
    return [reader(f"{label} ({kind})", obj)]


def read_postprocessing(tY, n_outputs=None, *, what="tY") -> PostprocessingIR:
    """Turn a fitted output transform into the IR of its inverse. `n_outputs`, if given,
    is the model's number of outputs, which tY's width must equal. `what` names tY in
    messages (e.g. its file)."""
    if isinstance(tY, str):
        _refuse(what, f"is the string {tY!r}, not a fitted transformer")
    forward = _forward_steps(tY, what)
    if not forward:
        _refuse(what, "is an empty Pipeline")
    width = forward[0].n_features
    for step in forward[1:]:
        if step.n_features != width:
            raise UnsupportedPostprocessingError(
                f"{step.label} takes {step.n_features} columns but the step before it "
                f"outputs {width}")
    ir = PostprocessingIR(n_features=width, description=_describe(tY), steps=forward[::-1])
    if n_outputs is not None:
        check_width(ir, n_outputs, what=what)
    return ir


def check_width(ir: PostprocessingIR, n_outputs: int, *, what="tY", model="the model") -> None:
    """Refuse a tY whose width is not the model's number of outputs."""
    if ir.n_features != n_outputs:
        raise ExportError(f"{what} ({ir.description}) transforms {ir.n_features} columns but "
                          f"{model} has {n_outputs} outputs")


def read_postprocessing_file(path, n_outputs=None) -> PostprocessingIR:
    """Load tY.pkl through the allow-list (provenance.load_postprocessing) and read it."""
    return read_postprocessing(load_postprocessing(path), n_outputs, what=f"{path}: tY")

