"""The inverse of the output transform tY in C against scikit-learn's inverse_transform
(run on float64, the reference effgen states), on many rows: the bulk, the tails, the
knots, values beyond the bounds, +-inf and NaN; and the refusals, by name."""

import ctypes

import numpy as np
import pytest
from sklearn.compose import ColumnTransformer
from sklearn.decomposition import PCA
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import MinMaxScaler, QuantileTransformer, StandardScaler

from effgen.codegen.backends.effgen_c import generate_postprocessing
from effgen.codegen.native import compile_shared
from effgen.codegen.postprocessing_ir import (
    UnsupportedPostprocessingError,
    check_width,
    read_postprocessing,
)
from effgen.errors import EffgenError, ExportError
from effgen.safe_pickle import DecorrTransformer

PEDANTIC = ["-std=c99", "-O3", "-fPIC", "-shared", "-Wall", "-Wextra", "-Werror", "-pedantic"]
# |C - float32(sklearn)| / (spread of the target), on every row: the C returns float, so
# the rounding of the result itself (up to 6e-8 of |value|, more than 1e-6 of the spread
# for a target far from 0, e.g. 1e3 +- 1) is not counted; what remains is the error of
# the computation.
TOL = 1e-6


def targets(n, seed, width):
    """Targets shaped like resolution's / covariance's: gaussian, heavy-tailed, skewed,
    bounded, discrete (repeated quantiles), far from 0; correlated."""
    rng = np.random.default_rng(seed)
    makers = [lambda: rng.normal(0.0, 0.02, n), lambda: rng.standard_t(3, n) * 0.1,
              lambda: rng.lognormal(0.0, 1.0, n), lambda: rng.beta(0.3, 3.0, n),
              lambda: rng.poisson(20, n).astype(np.float64), lambda: rng.exponential(2.0, n) - 5.0,
              lambda: 1e3 + rng.normal(0.0, 1.0, n)]
    x = np.stack([makers[k % len(makers)]() * (1 + k // len(makers)) for k in range(width)], axis=1)
    x[:, 1:] += 10.0 * x[:, :1]  # correlations for the decorrelation
    return x


def fitted(kind, width, n_quantiles=500):
    x = targets(20000, 1, width)
    qt = QuantileTransformer(n_quantiles=n_quantiles, output_distribution="normal",
                             subsample=10**6, random_state=0)
    if kind == "quantile":
        return qt.fit(x)
    if kind == "covariance":
        return Pipeline([("scaler", StandardScaler()), ("decorr", DecorrTransformer()),
                         ("quantile", qt)]).fit(x)
    if kind == "scalers":  # nested pipeline, passthrough, a scaler without mean / std
        inner = Pipeline([("nomean", StandardScaler(with_mean=False)), ("skip", "passthrough")])
        return Pipeline([("std", StandardScaler()), ("inner", inner),
                         ("nostd", StandardScaler(with_std=False))]).fit(x)
    raise ValueError(kind)


def network_outputs(width, seed, n=200000):
    """What a generator's linear output layer may give: the bulk, far tails, exactly the
    normal quantiles of the knots and one ulp around them, the u = 1e-7 bounds, +-inf."""
    from scipy import stats

    rng = np.random.default_rng(seed)
    y = [rng.normal(0.0, 1.3, (n, width))]
    y.append(rng.uniform(-9.0, 9.0, (20000, width)))
    knots = stats.norm.ppf(np.linspace(0, 1, 500)[1:-1])
    bounds = stats.norm.ppf([1e-7, 1 - 1e-7])
    special = np.concatenate([knots, bounds, [0.0, 5.19, 5.2, -5.2, 38.0, -38.0, 1e30, -1e30]])
    special = special.astype(np.float32)
    special = np.concatenate([special, np.nextafter(special, np.float32(np.inf)),
                              np.nextafter(special, np.float32(-np.inf)),
                              np.float32([np.inf, -np.inf])])
    for k in range(width):
        block = np.zeros((len(special), width))
        block[:, k] = special
        y.append(block)
    return np.concatenate(y).astype(np.float32)


def build(tmp_path, ir, name, prefix="tp"):
    code = generate_postprocessing(ir, prefix=prefix)
    src = "#include <math.h>\n" + code.text + f"""
void run(float *y, long n)
{{
    long r;
    for (r = 0; r < n; ++r)
        {code.function}(y + {ir.n_features} * r);
}}
"""
    c = tmp_path / f"{name}.c"
    c.write_text(src)
    lib = ctypes.CDLL(str(compile_shared(c, tmp_path / f"{name}.so", cflags=PEDANTIC)))
    return lib


def run(lib, y):
    y = np.array(y, dtype=np.float32, order="C", copy=True)
    lib.run(y.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), ctypes.c_long(len(y)))
    return y


def relative_error(tY, y, got):
    """|C - float32(sklearn)| / spread per value (spread = the target's std), where the
    float32 reference is finite; elsewhere (a scaler alone overflows float, as it should)
    the C must give the same infinity."""
    expected = tY.inverse_transform(y.astype(np.float64))
    with np.errstate(over="ignore"):
        exp32 = expected.astype(np.float32)
    finite = np.isfinite(exp32)
    np.testing.assert_array_equal(got[~finite], exp32[~finite])
    spread = targets(20000, 1, y.shape[1]).std(axis=0)
    err = np.where(finite, np.abs(got.astype(np.float64) - np.where(finite, exp32, 0)), 0) / spread
    return err, expected


CASES = [("quantile", 9), ("covariance", 15), ("scalers", 5)]


@pytest.fixture(scope="module", params=CASES, ids=[c[0] for c in CASES])
def case(request, tmp_path_factory):
    kind, width = request.param
    tY = fitted(kind, width)
    ir = read_postprocessing(tY, width)
    return kind, tY, build(tmp_path_factory.mktemp(kind), ir, kind)


def test_inverse_matches_sklearn_on_every_row(case):
    kind, tY, lib = case
    width = tY.n_features_in_
    y = network_outputs(width, seed=2)
    if kind == "scalers":  # sklearn refuses inf, and a scaler maps 3e38 and inf apart
        y = y[np.isfinite(y).all(axis=1)]
    finite = np.clip(y, -3e38, 3e38)  # sklearn refuses inf; norm.cdf(+-3e38) is 1 / 0 alike
    got = run(lib, y)
    err, expected = relative_error(tY, finite, got)
    if kind != "scalers":  # a quantile step bounds every output
        assert np.isfinite(got).all()
    worst = np.unravel_index(err.argmax(), err.shape)
    assert err.max() <= TOL, (f"{kind}: max |C - sklearn| / spread = {err.max():.3g} at row "
                              f"{worst[0]} column {worst[1]} (y = {y[worst]!r})")


def test_the_rows_reach_both_bounds_and_every_segment(tmp_path):
    """The inputs above do probe the bounds (u within 1e-7 of 0 or 1 gives exactly the
    first / last quantile) and the interpolation between the knots."""
    tY = fitted("quantile", 9)
    lib = build(tmp_path, read_postprocessing(tY), "bounds")
    got = run(lib, network_outputs(9, seed=2))
    q = tY.quantiles_.astype(np.float32)
    for k in range(9):
        assert (got[:, k] == q[0, k]).any() and (got[:, k] == q[-1, k]).any()
        # every knot interval holds an interpolated value (strictly inside it)
        inside = np.searchsorted(q[:, k], got[:, k], side="left")
        assert len(np.unique(inside[(got[:, k] > q[0, k]) & (got[:, k] < q[-1, k])])) > 0.9 * (
            len(np.unique(q[:, k])) - 1)


def test_nan_propagates_as_in_sklearn(case):
    kind, tY, lib = case
    width = tY.n_features_in_
    y = np.zeros((3, width), dtype=np.float32)
    y[0, 0] = np.nan
    y[2, width - 1] = np.nan
    got = run(lib, y)
    expected = tY.inverse_transform(y.astype(np.float64))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    assert np.isnan(got[0, 0]) and np.isfinite(got[1]).all()


def test_two_postprocessings_share_one_file(tmp_path):
    a = read_postprocessing(fitted("quantile", 3))
    b = read_postprocessing(fitted("covariance", 4))
    ca, cb = generate_postprocessing(a, prefix="res"), generate_postprocessing(b, prefix="cov")
    src = ("#include <math.h>\n" + ca.source + cb.source + ca.tables + cb.tables
           + "void both(float *y, float *z) { res_postprocess(y); cov_postprocess(z); }\n")
    (tmp_path / "both.c").write_text(src)
    compile_shared(tmp_path / "both.c", tmp_path / "both.so", cflags=PEDANTIC)


# ---- refusals ------------------------------------------------------------------------

def _fit(est, width=4):
    return est.fit(targets(3000, 4, width))


@pytest.mark.parametrize("tY, pattern", [
    (lambda: _fit(Pipeline([("s", StandardScaler()), ("pca", PCA())])),
     r"tY step 2 'pca' \(PCA\): no C inverse supported; supported: QuantileTransformer"),
    (lambda: _fit(MinMaxScaler()), r"tY \(MinMaxScaler\): no C inverse supported"),
    (lambda: _fit(ColumnTransformer([("q", QuantileTransformer(n_quantiles=10), [0, 1])])),
     r"tY \(ColumnTransformer\): no C inverse"),
    (lambda: _fit(QuantileTransformer(n_quantiles=10)), r"output_distribution='uniform'"),
    (lambda: QuantileTransformer(output_distribution="normal"), r"not fitted"),
    (lambda: StandardScaler(), r"not fitted"),
    (lambda: DecorrTransformer(), r"not fitted \(no eig\)"),
    (lambda: Pipeline([("skip", "passthrough")]), r"empty Pipeline"),
])
def test_unsupported_steps_are_refused_by_name(tY, pattern):
    with pytest.raises(UnsupportedPostprocessingError, match=pattern) as info:
        read_postprocessing(tY())
    assert isinstance(info.value, EffgenError)


def test_complex_eigenvectors_are_refused():
    d = _fit(DecorrTransformer())
    d.eig = d.eig.astype(np.complex128) + 1j * 1e-3
    with pytest.raises(UnsupportedPostprocessingError, match="complex"):
        read_postprocessing(d)
    d.eig = d.eig.real.astype(np.complex128)  # complex dtype, real values: fine
    assert read_postprocessing(d).steps[0].matrix.dtype == np.float64


def test_widths_are_checked():
    tY = fitted("covariance", 15)
    with pytest.raises(ExportError, match=r"tY \(Pipeline\(StandardScaler, DecorrTransformer, "
                                          r"QuantileTransformer\(normal\)\)\) transforms 15 "
                                          r"columns but the model has 9 outputs"):
        read_postprocessing(tY, 9)
    ir = read_postprocessing(tY, 15)
    with pytest.raises(ExportError, match="resolution has 14 outputs"):
        check_width(ir, 14, model="resolution")
    # steps that disagree inside the pipeline
    bad = Pipeline([("a", _fit(StandardScaler(), 4)), ("b", _fit(StandardScaler(), 5))])
    with pytest.raises(UnsupportedPostprocessingError, match=r"step 2 'b' .* takes 5 columns"):
        read_postprocessing(bad)


def test_ir_lists_the_inverse_in_reverse_order():
    ir = read_postprocessing(fitted("covariance", 6))
    assert [s.kind for s in ir.steps] == ["quantile", "matrix", "scale"]
    assert ir.description == "Pipeline(StandardScaler, DecorrTransformer, QuantileTransformer(normal))"


def test_a_non_uniform_reference_grid_is_still_exact(tmp_path):
    """The knot search guesses from scikit-learn's uniform references_ and then walks to
    the right knot: a skewed grid must give the same values."""
    tY = fitted("quantile", 4, n_quantiles=200)
    tY.references_ = tY.references_ ** 3
    lib = build(tmp_path, read_postprocessing(tY), "skewed")
    y = network_outputs(4, seed=8, n=50000)
    err, _ = relative_error(tY, np.clip(y, -3e38, 3e38), run(lib, y))
    assert err.max() <= TOL, err.max()
