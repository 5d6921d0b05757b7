"""The effgen C backend against its references: scikit-learn for the preprocessing,
scipy for the inverse normal CDF, numpy for tanh, graph.evaluate for the network
alone, and TensorFlow for the whole model."""

import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
keras = pytest.importorskip("keras")

from sklearn.compose import ColumnTransformer
from sklearn.preprocessing import FunctionTransformer, QuantileTransformer, StandardScaler
from support import edge_values, fit_preprocessing, raw_features, seed_like_model

from effgen.checks.random_category import python_track_type
from effgen.codegen.backends.effgen_c import (
    generate,
    generate_activations,
    generate_core,
    generate_preprocessing,
    interp_slopes,
    search_knots,
)
from effgen.codegen.graph import evaluate, read_chain
from effgen.codegen.native import Library, check_library, compile_shared
from effgen.codegen.preprocessing_ir import (
    Output,
    PreprocessingIR,
    UnsupportedPreprocessingError,
    read_preprocessing,
)

PEDANTIC = ["-std=c99", "-O3", "-fPIC", "-shared", "-Wall", "-Wextra", "-Werror", "-pedantic"]
TOL = 1e-5  # value parity with the framework (DOMAIN.md section 6)


def build(tmp_path, source, name, cflags=PEDANTIC):
    c = tmp_path / f"{name}.c"
    c.write_text(source)
    return compile_shared(c, tmp_path / f"{name}.so", cflags=cflags)


# ---- preprocessing -------------------------------------------------------------------

@pytest.fixture(scope="module")
def ct():
    return fit_preprocessing()


@pytest.fixture(scope="module", params=["float32", "float64"])
def pre_lib(request, ct, tmp_path_factory):
    ir = read_preprocessing(ct, sklearn_dtype=request.param)
    return request.param, pre_library(ir, tmp_path_factory.mktemp("pre"), f"pre_{request.param}")


def pre_library(ir, tmp_path, name):
    """The preprocessing of `ir` alone, compiled with test entry points (12 raw inputs)."""
    # EFFGEN_PATH_AVX2 (as the library defines it on x86-64): effgen_preprocess_vec too
    src = ("#include <math.h>\n#if defined(__GNUC__) && defined(__x86_64__)\n#define EFFGEN_PATH_AVX2 1\n"
           "#endif\n" + generate_preprocessing(ir) + """
void test_pre(float *z, const float *x, long n)
{
    long r;
    for (r = 0; r < n; ++r)
        effgen_preprocess(z + 12 * r, x + 12 * r);
}
double test_ndtri(double p)
{
    return effgen_ndtri(p);
}
#if defined(EFFGEN_VPRE)
EFFGEN_VPRE_ATTR void test_vndtri(double *z, const double *p, long n)  /* n a multiple of 4 */
{
    long k;
    for (k = 0; k < n; k += 4)
        _mm256_storeu_pd(z + k, effgen_vndtri(_mm256_loadu_pd(p + k)));
}
#else
void test_vndtri(double *z, const double *p, long n)
{
    (void)z, (void)p, (void)n;
}
#endif
int test_has_vec(void)  /* 1: built and runnable; 0: built, no AVX2 here; -1: not built */
{
#if defined(EFFGEN_VPRE)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") ? 1 : 0;
#else
    return -1;
#endif
}
void test_pre_vec(float *z, const float *x, long n)
{
#if defined(EFFGEN_VPRE)
    long r;
    for (r = 0; r < n; ++r)
        effgen_preprocess_vec(z + 12 * r, x + 12 * r);
#else
    (void)z, (void)x, (void)n;
#endif
}
""")
    import ctypes
    so = build(tmp_path, src, name)
    lib = ctypes.CDLL(str(so))
    lib.test_ndtri.argtypes, lib.test_ndtri.restype = [ctypes.c_double], ctypes.c_double
    return lib


def vector_path_runs(lib):
    import platform
    built = lib.test_has_vec()
    assert built >= 0 or platform.machine() not in ("x86_64", "AMD64")
    return built == 1


def run_pre(lib, x, fn="test_pre"):
    import ctypes
    x = np.ascontiguousarray(x, dtype=np.float32)
    z = np.empty_like(x)
    p = ctypes.POINTER(ctypes.c_float)
    getattr(lib, fn)(z.ctypes.data_as(p), x.ctypes.data_as(p), ctypes.c_long(len(x)))
    return z


def probe_rows(ct):
    """Rows that probe the quantile transform: the toy's rows scaled beyond the fitted
    range, then per column every knot, its neighbours, the outside and +-inf."""
    qt = ct.named_transformers_["quantile"]
    rows = [raw_features(200000, seed=5)]
    rows[0][:, :8] *= np.float32(1.3)  # reach beyond the fitted range too
    for k in range(8):  # per column, the knots, their neighbours and the outside
        v = edge_values(qt.quantiles_[:, k])
        block = np.repeat(raw_features(1, seed=k), len(v), axis=0)
        block[:, k] = v
        rows.append(block)
    return np.concatenate(rows)


def test_quantile_transform_matches_sklearn(ct, pre_lib):
    dtype, lib = pre_lib
    x = probe_rows(ct)
    assert np.isinf(x).any() and len(x) > 200000
    # sklearn refuses inf; the C clips it like the largest finite float, as sklearn clips
    # any value beyond the fitted range
    big = np.finfo(np.float32).max
    finite = np.clip(x, -big, big)
    expected = ct.transform(finite if dtype == "float32" else finite.astype(np.float64))
    got = run_pre(lib, x)
    assert np.isfinite(got).all()
    diff = np.abs(got.astype(np.float64) - np.asarray(expected, dtype=np.float32))
    assert diff.max() <= 1e-6, f"max |C - sklearn| = {diff.max():.3g} at row {diff.max(1).argmax()}"
    np.testing.assert_array_equal(got[:, 8:], x[:, 8:])


def test_vector_preprocessing_is_the_scalar_one_bit_for_bit(ct, pre_lib):
    """effgen_preprocess_vec (the AVX code paths': norm.ppf 4 columns at once) gives
    effgen_preprocess's floats exactly, tails, edges, infinities and NaN included."""
    import platform
    _, lib = pre_lib
    built = lib.test_has_vec()
    assert built >= 0 or platform.machine() not in ("x86_64", "AMD64")
    if built != 1:
        pytest.skip("no AVX2 on this CPU (or not x86-64): the vector path cannot run here")
    x = probe_rows(ct)
    x[::101, :8] = np.nan
    scalar, vector = run_pre(lib, x), run_pre(lib, x, "test_pre_vec")
    assert np.isnan(scalar).any()
    np.testing.assert_array_equal(vector.view(np.uint32), scalar.view(np.uint32))


def test_two_level_knot_search_finds_the_bisections_knot(tmp_path):
    """effgen_preprocess_vec's knot search (block pivots, then one block compare) gives
    effgen_preprocess's floats exactly for every group shape: no pivot (n <= 32), n not
    a multiple of 32, more than 8 columns (two chunks), and the bisection kept beyond
    2080 knots; knots, neighbours, the outside, infinities and NaN."""
    from effgen.codegen.backends.effgen_c import _preprocessing_context
    x = raw_features(20000, seed=4)
    cases = {
        "mixed": ColumnTransformer([
            ("q20", QuantileTransformer(output_distribution="normal", n_quantiles=20), [0, 1]),
            ("q100", QuantileTransformer(output_distribution="normal", n_quantiles=100), [2, 3, 4]),
            ("q3000", QuantileTransformer(output_distribution="normal", n_quantiles=3000), [5, 6]),
            ("q1000", QuantileTransformer(output_distribution="normal", n_quantiles=1000), [7])],
            remainder="passthrough"),
        "chunks": ColumnTransformer([
            ("q50", QuantileTransformer(output_distribution="normal", n_quantiles=50), list(range(10)))],
            remainder="passthrough"),
    }
    shapes = set()
    for name, ct in cases.items():
        ct.fit(x)
        ir = read_preprocessing(ct)
        for g in _preprocessing_context(ir)["qt_groups"]:
            shapes.add((g["n"], g["pivot"], g.get("n_pivots"), len(g.get("chunks", []))))
        lib = pre_library(ir, tmp_path, name)
        if not vector_path_runs(lib):
            pytest.skip("no AVX2 on this CPU (or not x86-64): the vector path cannot run here")
        rows = [raw_features(20000, seed=6)]
        rows[0][:, :10] *= np.float32(1.3)
        quantiles = [t.quantiles_ for _, t, _ in ct.transformers_ if isinstance(t, QuantileTransformer)]
        columns = [c for _, t, cols in ct.transformers_ if isinstance(t, QuantileTransformer) for c in cols]
        k = 0
        for q in quantiles:
            for j in range(q.shape[1]):
                v = edge_values(q[:, j])
                block = np.repeat(raw_features(1, seed=k), len(v), axis=0)
                block[:, columns[k]] = v
                rows.append(block)
                k += 1
        rows = np.concatenate(rows)
        rows[::97, :10] = np.nan
        scalar, vector = run_pre(lib, rows), run_pre(lib, rows, "test_pre_vec")
        np.testing.assert_array_equal(vector.view(np.uint32), scalar.view(np.uint32))
    assert shapes == {(20, True, 0, 1), (100, True, 3, 1), (3000, False, None, 0), (1000, True, 31, 1),
                      (50, True, 1, 2)}


def test_vector_ndtri_is_the_scalar_one_bit_for_bit(pre_lib):
    """effgen_vndtri (the central region in vectors, the tails lane by lane) gives
    effgen_ndtri's doubles exactly, across the region boundaries and far tails."""
    import ctypes
    _, lib = pre_lib
    if not vector_path_runs(lib):
        pytest.skip("no AVX2 on this CPU (or not x86-64): the vector path cannot run here")
    rng = np.random.default_rng(6)
    edges = np.array([0.075, 0.925, 0.5, 1e-7, 1 - 1e-7, np.exp(-25.0), 1 - np.exp(-25.0), 0.0, 1.0,
                      -0.5, 1.5, np.nan, 5e-324, 2.2250738585072014e-308, 1e-300, np.inf, -np.inf])
    p = np.concatenate([rng.random(40000), 10.0 ** -rng.uniform(0, 320, 20000),
                        1 - 10.0 ** -rng.uniform(1, 16, 10000), np.nextafter(edges, 2), edges,
                        np.nextafter(edges, -2)])
    p = rng.permutation(np.concatenate([p, np.zeros(-len(p) % 4)]))
    z = np.empty_like(p)
    dp = ctypes.POINTER(ctypes.c_double)
    lib.test_vndtri(z.ctypes.data_as(dp), p.ctypes.data_as(dp), ctypes.c_long(len(p)))
    expected = np.array([lib.test_ndtri(v) for v in p])
    np.testing.assert_array_equal(z.view(np.uint64), expected.view(np.uint64))


def test_repeated_quantiles_are_exercised(ct):
    ir = read_preprocessing(ct)
    repeated = [o for o in ir.outputs if o.kind == "quantile"
                and (o.quantile.first_equal != np.arange(len(o.quantile.quantiles))).any()]
    assert len(repeated) >= 2  # the discrete z and the spike in tx


def test_inverse_normal_cdf_matches_scipy(pre_lib):
    from scipy.special import ndtri
    _, lib = pre_lib
    rng = np.random.default_rng(3)
    p = np.concatenate([rng.random(20000), 10.0 ** -rng.uniform(0, 300, 5000),
                        1 - 10.0 ** -rng.uniform(1, 16, 5000), 0.5 + rng.normal(0, 1e-9, 1000),
                        [0.5, 0.02425, 0.97575, 1e-7, 1 - 1e-7]])
    got = np.array([lib.test_ndtri(v) for v in p])
    ref = ndtri(p)
    rel = np.abs(got - ref) / np.maximum(np.abs(ref), 1e-300)
    assert rel.max() < 1e-13, f"worst p = {p[rel.argmax()]!r}"
    assert lib.test_ndtri(0.0) == -np.inf and lib.test_ndtri(1.0) == np.inf


def test_other_transformers_are_refused_by_name():
    x = raw_features(2000, seed=1)
    scaled = ColumnTransformer([("scale", StandardScaler(), [0, 1]),
                                ("flags", "passthrough", [8])]).fit(x)
    with pytest.raises(UnsupportedPreprocessingError, match="'scale' is a StandardScaler"):
        read_preprocessing(scaled)
    uniform = ColumnTransformer([("q", QuantileTransformer(n_quantiles=100), [0])]).fit(x)
    with pytest.raises(UnsupportedPreprocessingError, match="'q'.*output_distribution='uniform'"):
        read_preprocessing(uniform)
    func = ColumnTransformer([("f", FunctionTransformer(np.log1p), [0])]).fit(np.abs(x))
    with pytest.raises(UnsupportedPreprocessingError, match="'f' is a FunctionTransformer"):
        read_preprocessing(func)
    with pytest.raises(UnsupportedPreprocessingError, match="StandardScaler"):
        read_preprocessing(StandardScaler().fit(x))


def test_remainder_passthrough_and_drop_follow_column_order():
    x = raw_features(3000, seed=2)
    ct = ColumnTransformer([("q", QuantileTransformer(output_distribution="normal",
                                                      n_quantiles=50), [3, 1])],
                           remainder="passthrough").fit(x)
    ir = read_preprocessing(ct)
    assert [(o.kind, o.input_index) for o in ir.outputs] == \
        [("quantile", 3), ("quantile", 1)] + [("passthrough", i) for i in (0, 2, *range(4, 12))]
    dropped = ColumnTransformer([("q", QuantileTransformer(output_distribution="normal",
                                                           n_quantiles=50), [5])]).fit(x)
    assert [(o.kind, o.input_index) for o in read_preprocessing(dropped).outputs] == [("quantile", 5)]


# ---- activations ------------------------------------------------------------------------

@pytest.mark.parametrize("impl, bound", [("fast", 4e-7), ("libm", 2e-7)])
def test_activation_error_bounds_on_dense_grid(tmp_path, impl, bound):
    import ctypes
    src = ("#include <math.h>\n#define EFFGEN_INLINE inline\n" + generate_activations(impl) + """
void test_act(float *y, const float *x, long n, int which)
{
    long i;
    for (i = 0; i < n; ++i)
        y[i] = which == 0 ? effgen_tanh(x[i]) : which == 1 ? effgen_sigmoid(x[i]) :
               which == 2 ? effgen_relu(x[i]) : which == 3 ? effgen_elu(x[i]) : effgen_linear(x[i]);
}
""")
    lib = ctypes.CDLL(str(build(tmp_path, src, f"act_{impl}")))
    x = np.concatenate([np.linspace(-12, 12, 2_400_001), [0, -0.0, 1e-30, 9, -9, 3e38, -3e38]])
    x = x.astype(np.float32)
    xd = x.astype(np.float64)
    with np.errstate(over="ignore"):
        references = [np.tanh(xd), 1 / (1 + np.exp(-xd)), np.maximum(xd, 0),
                      np.where(xd > 0, xd, np.expm1(np.minimum(xd, 0))), xd]
    for which, ref in enumerate(references):
        y = np.empty_like(x)
        p = ctypes.POINTER(ctypes.c_float)
        lib.test_act(y.ctypes.data_as(p), x.ctypes.data_as(p), ctypes.c_long(len(x)), which)
        err = np.abs(y.astype(np.float64) - ref) / np.maximum(1, np.abs(ref))
        assert err.max() <= bound, f"activation {which}: max error {err.max():.3g} at x = {x[err.argmax()]}"
        if which == 0:
            assert (np.abs(y) <= 1.0).all()


# ---- the whole library -------------------------------------------------------------------

@pytest.fixture(scope="module")
def model():
    return seed_like_model()


BUILDS = {  # name: (extra flags, code paths the manifest may report)
    "dispatch": ([], ("avx512f", "avx2+fma", "baseline")),
    "dispatch-avx2": (["-DEFFGEN_MAX_ISA=1"], ("avx2+fma", "baseline")),
    "no-dispatch": (["-DEFFGEN_NO_DISPATCH"], ("baseline",)),
}


@pytest.fixture(scope="module", params=list(BUILDS))
def full_lib(request, ct, model, tmp_path_factory):
    src, hdr = generate(read_chain(model), read_preprocessing(ct), symbol="eff2",
                        manifest={"model_sha256": "test"})
    flags, isas = BUILDS[request.param]
    so = build(tmp_path_factory.mktemp("full"), src, "eff2", cflags=PEDANTIC + flags)
    lib = Library(so, "eff2")
    assert lib.manifest()["isa"] in isas
    return lib


def test_library_exports_and_manifest(full_lib):
    check_library(full_lib.path, "eff2")
    m = full_lib.manifest()
    assert m["backend"] == "effgen" and m["symbol"] == "eff2" and m["tanh"] == "fast"


def test_values_match_tensorflow(ct, model, full_lib):
    x = raw_features(60000, seed=11)
    # as effgen preprocess / parity do: sklearn on float64, the network in float32
    pre = ct.transform(x.astype(np.float64)).astype(np.float32)
    expected = model.predict(pre, verbose=0, batch_size=8192)
    got = full_lib.batch(x)
    diff = np.abs(got - expected).max(axis=0)
    assert diff.max() <= TOL, f"max |C - TF| per class = {diff}"
    assert ((got >= 0) & (got <= 1)).all()
    one = full_lib.per_call(x[:3001])  # odd count: tiles and the remainder rows
    np.testing.assert_array_equal(one, got[:3001])
    np.testing.assert_array_equal(full_lib.batch(x[:3001]), got[:3001])


def test_nan_and_inf_inputs(full_lib):
    x = np.repeat(raw_features(1, seed=4), 24, axis=0)
    x[np.arange(12), np.arange(12)] = np.nan
    x[12 + np.arange(8), np.arange(8)] = np.where(np.arange(8) % 2, np.inf, -np.inf)
    x[20:, :8] = np.inf
    out = full_lib.batch(x)
    np.testing.assert_array_equal(out[:12], np.tile(np.float32([1, 0, 0, 0]), (12, 1)))
    assert np.isfinite(out).all() and ((out >= 0) & (out <= 1)).all()
    np.testing.assert_array_equal(full_lib.per_call(x), out)


def test_track_type_agrees_with_reference(full_lib):
    x = raw_features(3000, seed=6)
    r = np.random.default_rng(7).random(3000, dtype=np.float32)
    probs = full_lib.batch(x)
    np.testing.assert_array_equal(full_lib.track_type(x, r), python_track_type(probs, r))


@pytest.mark.parametrize("tanh", ["fast", "libm"])
def test_network_alone_matches_numpy_reference(tmp_path, model, tanh):
    chain = read_chain(model)
    identity = PreprocessingIR(n_inputs=12, outputs=[Output("passthrough", i) for i in range(12)])
    src, _ = generate(chain, identity, symbol="efficiency", tanh=tanh)
    src += f"""
void test_network(float *out, const float *z, long n)
{{
    long r;
    for (r = 0; r < n; ++r)
        {generate_core(chain, identity).network_fn}(out + 4 * r, z + 12 * r);
}}
"""
    lib = Library(build(tmp_path, src, "net"), "efficiency")
    x = np.random.default_rng(8).normal(size=(50000, 12)).astype(np.float32)
    reference = evaluate(chain, x)
    bound = 2e-6 if tanh == "fast" else 1e-6
    diff = np.abs(lib.batch(x) - reference).max()
    assert diff <= bound, f"max |C - numpy float64| = {diff:.3g}"
    import ctypes
    out = np.empty((len(x), 4), dtype=np.float32)
    p = ctypes.POINTER(ctypes.c_float)
    lib._lib.test_network(out.ctypes.data_as(p), x.ctypes.data_as(p), ctypes.c_long(len(x)))
    assert np.abs(out - reference).max() <= bound


def test_preprocessing_width_must_match_network(ct):
    inp = keras.layers.Input((10,))
    small = keras.Model(inp, keras.layers.Softmax()(keras.layers.Dense(4)(inp)))
    with pytest.raises(ValueError, match="takes 10 inputs but the preprocessing produces 12"):
        generate(read_chain(small), read_preprocessing(ct))


def test_weights_are_printed_so_they_read_back_exactly(model):
    import re
    chain = read_chain(model)
    identity = PreprocessingIR(n_inputs=12, outputs=[Output("passthrough", i) for i in range(12)])
    src, _ = generate(chain, identity)
    for op in chain.ops[:-1]:  # the Softmax has no weights
        dense = getattr(op, "dense", op)
        # packed as the kernels read them: panels of 16 columns, zero-padded
        n_panels = -(-dense.n_out // 16)
        kernel = np.zeros((dense.n_in, n_panels * 16), np.float32)
        kernel[:, :dense.n_out] = dense.kernel
        bias = np.zeros(n_panels * 16, np.float32)
        bias[:dense.n_out] = dense.bias
        packed = kernel.reshape(dense.n_in, n_panels, 16).transpose(1, 0, 2)
        for suffix, expected in (("w", packed), ("b", bias)):
            body = re.search(rf"effgen_layer_{dense.name}_{suffix}\[[^]]*\] EFFGEN_ALIGN = \{{(.*?)\}};", src, re.S)
            values = np.array([np.float32(v.strip().rstrip("f")) for v in body.group(1).split(",")])
            np.testing.assert_array_equal(values, expected.ravel())


def test_float_search_knots_compare_with_every_float_as_the_double_knots_do(ct):
    """The knot search reads float copies of the knots (half the cache lines): for every
    float input near any knot, qf <= x must hold exactly when q <= x (the same knot is
    found; the parity tests check the values end to end)."""
    rng = np.random.default_rng(3)
    knots = [np.asarray(t.quantiles_, np.float64) for _, t, _ in ct.transformers_ if hasattr(t, "quantiles_")]
    q = np.concatenate([k.ravel() for k in knots] + [
        rng.normal(0, 1e3, 2000),                           # doubles between floats
        np.float32(rng.normal(0, 1, 500)).astype(np.float64),  # doubles that are floats
        [0.0, -0.0, 1e-300, -1e-300, 3.5e38, -3.5e38]])      # tiny, and beyond the float range
    qf = search_knots(q)
    assert qf.dtype == np.float32
    assert np.isinf(qf[q > np.finfo(np.float32).max]).all()
    for step in range(-3, 4):  # x: each knot rounded to float, and its float neighbours
        with np.errstate(over="ignore"):  # the knots beyond the float range: x = inf
            x = np.float32(q)
        for _ in range(abs(step)):
            x = np.nextafter(x, np.float32(np.inf) if step > 0 else np.float32(-np.inf))
        np.testing.assert_array_equal(qf <= x, q <= x.astype(np.float64))


def test_tabulated_slopes_give_np_interp_bit_for_bit(ct):
    """The C interpolation reads a slope per knot interval (no division per row):
    slope[j] * (x - q[j]) + r[j] must equal np.interp(x, q, r) for x inside every
    interval, on the fitted tables and on knots with repeats and tiny gaps."""
    rng = np.random.default_rng(5)
    cases = [(np.asarray(t.quantiles_[:, k], np.float64), np.asarray(t.references_, np.float64))
             for _, t, _ in ct.transformers_ if hasattr(t, "quantiles_") for k in range(t.quantiles_.shape[1])]
    q = np.sort(np.concatenate([rng.normal(0, 1, 300), np.repeat(rng.normal(0, 1, 20), 3),
                                np.nextafter(0.5, 1) + np.zeros(2), [0.5]]))
    cases.append((q, np.linspace(0, 1, len(q))))
    for q, r in cases:
        slope = interp_slopes(q, r)
        assert slope.shape == q.shape and np.isfinite(slope).all()
        j = np.flatnonzero(q[1:] > q[:-1])
        for t in (0.25, 0.5, 0.9):
            x = q[j] + t * (q[j + 1] - q[j])
            x = x[(x > q[j]) & (x < q[j + 1])]
            k = np.searchsorted(q, x, side="right") - 1
            np.testing.assert_array_equal(slope[k] * (x - q[k]) + r[k], np.interp(x, q, r))


# ---- the generated file reads top-down (issue 11) -----------------------------------------

def test_fast_tanh_constants_are_the_fit_scripts_output():
    from effgen.codegen import fit_tanh

    p, q = fit_tanh.fit()
    template = generate_activations("fast")
    for line in fit_tanh.c_lines(p, q):
        assert f"    {line}\n" in template, line
    x = np.linspace(0.0, fit_tanh.X_MAX, 100001)
    assert np.abs(fit_tanh.evaluate(p, q, x) - np.tanh(x)).max() < 1e-7


def test_source_order_names_and_dispatch(ct, model):
    import re

    from effgen.codegen.backends.effgen_c import VARIANTS

    src, _ = generate(read_chain(model), read_preprocessing(ct), symbol="eff2")
    first_table = min(m.start() for m in re.finditer(r"^static const (float|double|short|int) effgen_\w+\[[^]]*\]"
                                                     r"( EFFGEN_ALIGN)? = \{", src, re.M))
    exported = [src.index(f"EFFGEN_EXPORT {t}eff2{s}(") for t, s in
                (("float *", ""), ("void ", "_batch"), ("int ", "_track_type"), ("const char *", "_manifest"))]
    sections = [src.index(s) for s in ("Contents, in file order", "==== 1.", "2.3 Preprocessing",
                                       "2.4 Activations", "Code path portable", "Dispatch:", "==== 3.",
                                       "==== 4.")]
    assert sections == sorted(sections) and max(exported) < first_table
    assert re.search(r"\w \+ 0(?![.\w])|\+ 0 \+|\[0 \+ ", src) is None
    # every Dense layer named after its Keras layer, in comments and C symbols
    for op in read_chain(model).ops[:-1]:
        name = getattr(op, "dense", op).name
        assert f"static void effgen_layer_{name}_portable(" in src and f"Layer {name} " in src
    # one dispatch entry per code path, in VARIANTS order
    for fn in ("forward", "forward_batch", "network"):
        table = re.search(rf"effgen_resolve_{fn}\(void\)\n\{{\n.*?= \{{(.*?)\}};", src, re.S).group(1)
        assert [e.strip() for e in table.split(",") if e.strip()] == [f"effgen_{fn}_{v['name']}" for v in VARIANTS]


def test_narrow_output_layer_gets_the_one_vector_tile_kernel(ct, model):
    """On the AVX2 path (two vectors per 16-column panel) a one-panel layer of at most 8
    columns, the 4-output layer, is tiled with one vector per row (half the FMAs); wider
    layers keep the panel kernel. Its values: the per-call vs batch tests above."""
    import re

    src, _ = generate(read_chain(model), read_preprocessing(ct), symbol="eff2")
    calls = dict(re.findall(r"static void (effgen_layer_\w+)_tile_avx2\(.*?\)\n\{\n\s*(effgen_dense_tile\w*)\(",
                            src, re.S))
    denses = [getattr(op, "dense", op) for op in read_chain(model).ops]
    widths = {f"effgen_layer_{d.name}": d.n_out for d in denses if hasattr(d, "kernel")}
    assert calls and set(calls) == set(widths)
    for layer, kernel in calls.items():
        assert kernel == ("effgen_dense_tile_narrow_avx2" if widths[layer] <= 8 else "effgen_dense_tile_avx2"), layer
    assert "effgen_dense_tile_narrow_avx512" not in src  # one vector per panel there already


def test_layer_symbols_stay_unique_for_awkward_keras_names(tmp_path):
    inp = keras.layers.Input((12,))
    h = keras.layers.Dense(8, activation="tanh", name="a-b")(inp)
    h = keras.layers.Dense(8, activation="tanh", name="a_b")(h)
    h = keras.layers.Dense(8, activation="tanh", name="tanh")(h)
    out = keras.layers.Softmax(name="network")(keras.layers.Dense(4, name="d_tile")(h))
    model = keras.Model(inp, out)
    identity = PreprocessingIR(n_inputs=12, outputs=[Output("passthrough", i) for i in range(12)])
    src, _ = generate(read_chain(model), identity, symbol="eff3")
    lib = Library(build(tmp_path, src, "eff3"), "eff3")
    x = np.random.default_rng(3).normal(size=(100, 12)).astype(np.float32)
    np.testing.assert_allclose(lib.batch(x), model.predict(x, verbose=0), rtol=0, atol=TOL)


def test_manifest_names_backend_kind_and_functions(full_lib):
    m = full_lib.manifest()
    assert m["kind"] == "efficiency" and m["isa_variants"] == ["baseline", "avx2+fma", "avx512f"]
    assert m["functions"] == {"row": "effgen_forward", "batch": "effgen_forward_batch",
                              "network": "effgen_network", "isa": "effgen_isa"}


# ---- backends are plug-ins (issue 11) ------------------------------------------------------

def test_backends_register_themselves():
    from effgen.codegen import backends

    assert backends.names()[:2] == ("effgen", "scikinc")
    with pytest.raises(ValueError, match="backend 'nope': expected one of"):
        backends.get("nope")


def test_a_new_backend_is_one_registration(tmp_path, ct, model):
    """A backend registered from outside export is found by name, handed the model,
    chain and preprocessing, and wrapped with the ABI like the built-in ones."""
    import json
    import pickle

    from effgen.codegen import backends
    from effgen.codegen.export import export

    seen = {}

    def generate_toy(request):
        seen.update(chain=request.chain.describe(), symbol=request.symbol, kind=request.kind.name)
        return backends.Core(
            source="static void toy_row(float *out, const float *in)\n"
                   "{ (void)in; out[0] = 0.5f; out[1] = 0.25f; out[2] = 0.125f; out[3] = 0.125f; }\n",
            row_fn="toy_row", info={"toy": True})

    model.save(tmp_path / "model.keras")
    with open(tmp_path / "tX.pkl", "wb") as f:
        pickle.dump(ct, f)
    toy = backends.register(backends.Backend(name="toy", description="test", generate=generate_toy))
    try:
        paths = export(tmp_path / "model.keras", tmp_path / "tX.pkl", tmp_path / "out", backend="toy",
                       symbol="eff_toy")
    finally:
        backends._REGISTRY.pop(toy.name)
    assert seen == {"chain": read_chain(model).describe(), "symbol": "eff_toy", "kind": "efficiency"}
    lib = Library(compile_shared(paths["source"], tmp_path / "toy.so", cflags=PEDANTIC), "eff_toy")
    check_library(lib.path, "eff_toy")
    np.testing.assert_array_equal(lib.batch(np.zeros((3, 12), np.float32)),
                                  np.tile(np.float32([0.5, 0.25, 0.125, 0.125]), (3, 1)))
    m = lib.manifest()
    on_disk = json.loads(paths["manifest"].read_text())
    assert m["backend"] == on_disk["backend"] == "toy" and m["toy"] is True
    assert on_disk["functions"] == {"row": "toy_row", "batch": None, "network": None, "isa": None}
    assert {k: v for k, v in m.items() if k not in ("isa", "cflags", "compiler")} == on_disk
