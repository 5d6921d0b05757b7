"""The scikinC reference backend: conversion, strict C99, and agreement with sklearn +
TensorFlow on the project's toy sample, with scikinC's own approximations measured
per stage (network alone, preprocessing alone, whole function)."""

import ctypes
import subprocess

import numpy as np
import pyarrow as pa
import pytest

keras = pytest.importorskip("keras")

from effgen import schema
from effgen.codegen.backends.scikinc import core_function, generate_core, step_function, to_sequential
from effgen.codegen.graph import UnsupportedModelError, read_chain
from effgen.data import synth
from effgen.training.network import build_model

STRICT = ["gcc", "-std=c99", "-O3", "-fPIC", "-shared", "-Wall", "-Wextra", "-pedantic", "-Werror"]

# Tolerances, measured with the fixtures below (seed-size model, 50k rows of
# effgen.data.synth) and then given a margin. Measured: network 1.4e-6; preprocessing
# 3.5e-5 for |z| < 3, 4.9e-2 in the far tails; whole function 1.6e-5 on rows whose
# features all have |z| < 3 (98 % of rows), 3.3e-5 at the 99.9th percentile, 9.3e-3
# at worst. The tails come from scikinC itself: it maps quantiles onto
# linspace(1e-7, 1 - 1e-7) where sklearn maps onto linspace(0, 1) and then clips, and
# its uniform-to-normal table is float, so u near 1 has a 6e-8 resolution.
NETWORK_ATOL = 5e-6
PREPROCESSING_BULK_ATOL = 1e-4     # transformed features with |z| < 3
PREPROCESSING_TAIL_ATOL = 0.2      # anywhere (|z| up to 5.2)
WHOLE_P999_ATOL = 1e-4             # 99.9 % of rows
WHOLE_BULK_ATOL = 1e-4             # rows whose continuous features all have |z| < 3
WHOLE_MAX_ATOL = 0.03              # every row

N_ROWS = 50_000
_FPTR = ctypes.POINTER(ctypes.c_float)


def _features(n, seed):
    table = pa.Table.from_batches(list(synth.generate(n, seed)))
    return np.column_stack([table[c].to_numpy() for c in schema.FEATURES]).astype(np.float32)


def _preprocessing(x):
    from sklearn.compose import ColumnTransformer
    from sklearn.preprocessing import QuantileTransformer

    return ColumnTransformer([
        ("quantile", QuantileTransformer(output_distribution="normal", random_state=0), list(range(8))),
        ("flags", "passthrough", list(range(8, 12))),
    ]).fit(np.asarray(x, dtype=np.float64))


def _with_random_biases(model, seed):
    # he_normal kernels with zero biases would not notice a converter dropping biases.
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if type(layer).__name__ == "Dense":
            kernel, bias = layer.get_weights()
            layer.set_weights([kernel, rng.normal(0, 0.1, bias.shape).astype(np.float32)])
    return model


def _compile(source, path):
    c_path = path.with_suffix(".c")
    c_path.write_text(source)
    proc = subprocess.run(STRICT + [str(c_path), "-o", str(path), "-lm"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return ctypes.CDLL(str(path))


def _test_exports(core_source, core_fn, symbol, n_out):
    """Batch wrappers (the only exported functions) around the core and its steps."""
    pre, net = step_function(symbol, "preprocessing"), step_function(symbol, "network")
    return core_source + f"""
void t_core(float *o, const float *i, long n)
{{ long k; for (k = 0; k < n; ++k) {core_fn}(o + {n_out} * k, i + 12 * k); }}
void t_pre(float *o, const float *i, long n) {{ long k; for (k = 0; k < n; ++k) {pre}(o + 12 * k, i + 12 * k); }}
void t_net(float *o, const float *i, long n) {{ long k; for (k = 0; k < n; ++k) {net}(o + {n_out} * k, i + 12 * k); }}
"""


def _batch(fn, x, n_out):
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.full((len(x), n_out), -7.0, dtype=np.float32)
    fn(out.ctypes.data_as(_FPTR), x.ctypes.data_as(_FPTR), ctypes.c_long(len(x)))
    return out


@pytest.fixture(scope="module")
def seed_case(tmp_path_factory):
    """Seed topology (width 128, 5 residual blocks), random weights, compiled core."""
    model = _with_random_biases(build_model(seed=7), seed=3)
    ct = _preprocessing(_features(20_000, seed=1))
    core = generate_core(model, ct, symbol="efficiency")
    source, core_fn = core.source, core.row_fn
    lib = _compile(_test_exports(source, core_fn, "efficiency", 4),
                   tmp_path_factory.mktemp("scikinc") / "seed.so")
    x = _features(N_ROWS, seed=2)
    z = ct.transform(x.astype(np.float64))
    return dict(model=model, ct=ct, core=core, source=source, core_fn=core_fn, lib=lib, x=x, z=z,
                reference=model.predict(z.astype(np.float32), batch_size=8192, verbose=0))


def test_sequential_rewrite_computes_the_functional_model(seed_case):
    z = seed_case["z"][:5000].astype(np.float32)
    seq = to_sequential(read_chain(seed_case["model"]))
    assert [type(layer).__name__ for layer in seq.layers] == ["Dense"] + ["ResidualDense"] * 5 + ["Dense", "Softmax"]
    np.testing.assert_allclose(seq.predict(z, verbose=0), seed_case["model"].predict(z, verbose=0),
                               rtol=0, atol=1e-6)


def test_network_alone_matches_tensorflow(seed_case):
    got = _batch(seed_case["lib"].t_net, seed_case["z"], 4)
    assert np.abs(got - seed_case["reference"]).max() < NETWORK_ATOL


def test_preprocessing_matches_sklearn_within_scikinc_interpolation(seed_case):
    z = seed_case["z"]
    err = np.abs(_batch(seed_case["lib"].t_pre, seed_case["x"], 12) - z)
    np.testing.assert_array_equal(err[:, 8:], 0)  # passthrough flags are copied
    bulk = np.abs(z[:, :8]) < 3
    assert err[:, :8][bulk].max() < PREPROCESSING_BULK_ATOL
    assert err.max() < PREPROCESSING_TAIL_ATOL


def test_whole_function_on_raw_rows_matches_sklearn_then_tensorflow(seed_case):
    got = _batch(seed_case["lib"].t_core, seed_case["x"], 4)
    err = np.abs(got - seed_case["reference"])
    bulk = (np.abs(seed_case["z"][:, :8]) < 3).all(axis=1)
    assert bulk.mean() > 0.95
    assert np.quantile(err.max(axis=1), 0.999) < WHOLE_P999_ATOL
    assert err[bulk].max() < WHOLE_BULK_ATOL
    assert err.max() < WHOLE_MAX_ATOL


def test_core_compiles_strictly_and_every_scikinc_function_is_static(seed_case):
    # The fixture compiled with -std=c99 -Wall -Wextra -pedantic -Werror; here: exports.
    path = seed_case["lib"]._name
    nm = subprocess.run(["nm", "-D", "--defined-only", path], capture_output=True, text=True, check=True)
    exported = sorted(line.split()[-1] for line in nm.stdout.splitlines() if line.split()[-2] in "TDBR")
    assert exported == ["t_core", "t_net", "t_pre"]
    assert 'extern "C"' not in seed_case["source"] and "FLOAT_T" not in seed_case["source"]
    assert "_inverse" not in seed_case["source"]  # unreachable helpers are dropped
    assert seed_case["core_fn"] == core_function("efficiency")


def test_nan_in_any_input_gives_nan_outputs(seed_case):
    # The ABI layer maps NaN inputs itself; the core must at least not hang or invent numbers.
    x = np.repeat(seed_case["x"][:1], 12, axis=0)
    x[np.arange(12), np.arange(12)] = np.nan
    assert np.isnan(_batch(seed_case["lib"].t_core, x, 4)).all()


@pytest.mark.parametrize("swap", [False, True])
def test_other_activations_and_no_softmax(tmp_path, swap):
    inp = keras.layers.Input((12,))
    h = keras.layers.Dense(16, activation="relu")(inp)
    for activation in ("sigmoid", "elu", "linear", "tanh"):
        r = keras.layers.Dense(16, activation=activation)(h)
        h = keras.layers.Add()([r, h] if swap else [h, r])
    model = _with_random_biases(keras.Model(inp, keras.layers.Dense(3)(h)), seed=5)
    x = _features(3000, seed=4)
    ct = _preprocessing(x)
    core = generate_core(model, ct, symbol="other")
    source, core_fn = core.source, core.row_fn
    lib = _compile(_test_exports(source, core_fn, "other", 3), tmp_path / "other.so")
    z = ct.transform(x.astype(np.float64)).astype(np.float32)
    np.testing.assert_allclose(_batch(lib.t_net, z, 3), model.predict(z, verbose=0), rtol=0, atol=1e-5)


def test_unsupported_model_is_refused_by_name():
    inp = keras.layers.Input((12,))
    x = keras.layers.BatchNormalization(name="bn")(keras.layers.Dense(8)(inp))
    model = keras.Model(inp, keras.layers.Softmax()(keras.layers.Dense(4)(x)))
    with pytest.raises(UnsupportedModelError, match="'bn' \\(BatchNormalization\\)"):
        generate_core(model, _preprocessing(_features(2000, seed=1)))


def test_network_without_leading_dense_is_refused():
    inp = keras.layers.Input((12,))
    with pytest.raises(UnsupportedModelError, match="start with a Dense"):
        generate_core(keras.Model(inp, keras.layers.Softmax()(inp)), _preprocessing(_features(2000, seed=1)))


def test_preprocessing_of_the_wrong_width_is_refused():
    from sklearn.preprocessing import QuantileTransformer

    qt = QuantileTransformer(n_quantiles=100).fit(_features(500, seed=1)[:, :8])
    with pytest.raises(ValueError, match="outputs 8 features but model .* takes 12"):
        generate_core(build_model(width=8, n_blocks=1), qt)


def test_symbol_must_be_a_c_identifier():
    with pytest.raises(ValueError, match="not a C identifier"):
        generate_core(build_model(width=8, n_blocks=1), _preprocessing(_features(2000, seed=1)),
                      symbol="eff-1")


def test_through_the_abi_layer(seed_case, tmp_path):
    from effgen.codegen.abi import render_abi
    from effgen.codegen.native import Library, check_library, compile_shared

    c_source, header = render_abi(
        seed_case["core"], symbol="efficiency",
        manifest={"backend": "scikinc", "model_sha256": "not-a-real-model"})
    (tmp_path / "efficiency.c").write_text(c_source)
    so = compile_shared(tmp_path / "efficiency.c", tmp_path / "efficiency.so")
    check_library(so, "efficiency")
    lib = Library(so)
    assert lib.manifest()["backend"] == "scikinc"
    x, reference = seed_case["x"][:5000], seed_case["reference"][:5000]
    got = lib.batch(x)
    np.testing.assert_array_equal(lib.per_call(x[:200]), got[:200])
    err = np.abs(got - reference)
    assert np.quantile(err.max(axis=1), 0.999) < WHOLE_P999_ATOL and err.max() < WHOLE_MAX_ATOL
    nan_row = x[:1].copy()
    nan_row[0, 3] = np.nan
    np.testing.assert_array_equal(lib.batch(nan_row), [[1, 0, 0, 0]])
