"""Read the fitted scikit-learn preprocessing into plain arrays a C generator can print.

Accepted: a fitted `ColumnTransformer` whose transformers are
`QuantileTransformer(output_distribution="normal")` (dense input) and "passthrough",
with remainder "drop" or "passthrough". The output column order is the
ColumnTransformer's: transformers in order, then the remainder. Anything else is refused
with an error naming the transformer.

The generated C reproduces `QuantileTransformer.transform` as run by scikit-learn on an
array of dtype `sklearn_dtype`. The dtype matters in the upper tail: on float32 input
scikit-learn rounds the interpolated uniform value to float32 before `norm.ppf` (and
computes `ndtri` in float32), which moves values near u = 1 by up to ~1e-2; so the
generator must know which dtype the model's training features were transformed in.
`effgen preprocess` and `effgen parity` transform float64 arrays: that is the default.
"""

from dataclasses import dataclass, field
from typing import List

import numpy as np

from effgen.errors import UnsupportedPreprocessingError  # noqa: F401 (re-exported)
from effgen.provenance import load_preprocessing

BOUNDS_THRESHOLD = 1e-7  # sklearn.preprocessing._data.BOUNDS_THRESHOLD
DTYPES = ("float32", "float64")




@dataclass
class QuantileColumn:
    """One continuous column: output = clip(ppf(interp(x, quantiles, references)))."""
    input_index: int
    quantiles: np.ndarray    # float64, non-decreasing
    references: np.ndarray   # float64, 0..1

    @property
    def first_equal(self) -> np.ndarray:
        """For each knot j, the first index holding the same value (repeated quantiles)."""
        q = self.quantiles
        starts = np.r_[True, q[1:] != q[:-1]]
        return np.maximum.accumulate(np.where(starts, np.arange(len(q)), 0))


@dataclass
class Output:
    kind: str                # "quantile" or "passthrough"
    input_index: int
    quantile: QuantileColumn = None


@dataclass
class PreprocessingIR:
    n_inputs: int
    outputs: List[Output] = field(default_factory=list)
    sklearn_dtype: str = "float64"
    clip_min: float = 0.0
    clip_max: float = 0.0

    @property
    def n_outputs(self) -> int:
        return len(self.outputs)


def _input_indices(cols, n_features, name):
    if isinstance(cols, str) or (isinstance(cols, (list, tuple)) and cols and
                                 isinstance(cols[0], str)):
        raise UnsupportedPreprocessingError(
            f"transformer {name!r} selects columns by name ({cols!r}); effgen needs a "
            f"ColumnTransformer fitted on a plain array with integer column indices")
    try:
        idx = np.arange(n_features)[cols]
    except (IndexError, TypeError) as err:
        raise UnsupportedPreprocessingError(f"transformer {name!r}: column selector {cols!r}: {err}") from err
    return [int(i) for i in np.atleast_1d(idx)]


def _is_identity(fitted, spec):
    if isinstance(spec, str) and spec == "passthrough":
        return True
    return (type(fitted).__name__ == "FunctionTransformer" and fitted.func is None
            and spec == "passthrough")


def read_preprocessing(ct, sklearn_dtype="float64") -> PreprocessingIR:
    """Turn a fitted ColumnTransformer into a PreprocessingIR."""
    from scipy import stats

    if sklearn_dtype not in DTYPES:
        raise ValueError(f"sklearn_dtype {sklearn_dtype!r}: expected one of {DTYPES}")
    if type(ct).__name__ != "ColumnTransformer":
        raise UnsupportedPreprocessingError(
            f"preprocessing is a {type(ct).__name__}; effgen compiles a ColumnTransformer of "
            f"QuantileTransformer(output_distribution='normal') and 'passthrough'")
    if not hasattr(ct, "transformers_"):
        raise UnsupportedPreprocessingError("the ColumnTransformer is not fitted")
    n_features = int(ct.n_features_in_)
    specs = dict((name, trans) for name, trans, _ in ct.transformers)
    ir = PreprocessingIR(n_inputs=n_features, sklearn_dtype=sklearn_dtype)
    for name, fitted, cols in ct.transformers_:
        spec = specs.get(name, ct.remainder if name == "remainder" else None)
        idx = _input_indices(cols, n_features, name)
        if not idx or (isinstance(spec, str) and spec == "drop") or fitted == "drop":
            continue
        if _is_identity(fitted, spec):
            ir.outputs += [Output("passthrough", i) for i in idx]
            continue
        kind = type(fitted).__name__
        if kind != "QuantileTransformer":
            raise UnsupportedPreprocessingError(
                f"transformer {name!r} is a {kind}; effgen supports only "
                f"QuantileTransformer(output_distribution='normal') and 'passthrough'")
        if fitted.output_distribution != "normal":
            raise UnsupportedPreprocessingError(
                f"transformer {name!r}: QuantileTransformer(output_distribution="
                f"{fitted.output_distribution!r}); effgen supports only 'normal'")
        quantiles = np.asarray(fitted.quantiles_, dtype=np.float64)
        references = np.asarray(fitted.references_, dtype=np.float64)
        if quantiles.shape != (len(references), len(idx)):
            raise UnsupportedPreprocessingError(
                f"transformer {name!r}: quantiles_ of shape {quantiles.shape} for {len(idx)} "
                f"columns and {len(references)} references")
        if not np.isfinite(quantiles).all() or (np.diff(quantiles, axis=0) < 0).any():
            raise UnsupportedPreprocessingError(
                f"transformer {name!r}: quantiles_ are not finite and non-decreasing")
        for k, i in enumerate(idx):
            col = QuantileColumn(i, np.ascontiguousarray(quantiles[:, k]), references.copy())
            ir.outputs.append(Output("quantile", i, col))
    if not ir.outputs:
        raise UnsupportedPreprocessingError("the ColumnTransformer produces no columns")
    # scikit-learn's clipping of the normal output (see QuantileTransformer._transform_col)
    eps = np.spacing(1)
    ir.clip_min = float(stats.norm.ppf(BOUNDS_THRESHOLD - eps))
    ir.clip_max = float(stats.norm.ppf(1 - (BOUNDS_THRESHOLD - eps)))
    return ir




def read_preprocessing_file(path, sklearn_dtype="float64") -> PreprocessingIR:
    try:
        return read_preprocessing(load_preprocessing(path), sklearn_dtype=sklearn_dtype)
    except UnsupportedPreprocessingError as err:
        raise UnsupportedPreprocessingError(f"{path}: {err}") from err
