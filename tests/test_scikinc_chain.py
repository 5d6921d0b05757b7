"""The scikinC reference route for the rest of the tracking chain (DOMAIN.md section 8):
generators built as LHCb builds them (scikinC's tX, network and tY_inverse plus the
hand-written wrapper) and the sigmoid classifier, against Keras + scikit-learn on the
same rows and the same noise. Random-weight models throughout.

The network here is a one-input Keras model over the joined width [tX(in), rnd]: a
Dense after Concatenate([features, noise]) computes exactly this, so the reference does
not depend on how a two-input graph is read."""

import ctypes
import subprocess

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from sklearn.compose import ColumnTransformer
from sklearn.decomposition import PCA
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import QuantileTransformer, StandardScaler

from effgen.codegen.backends.scikinc import (
    core_function,
    generate_core,
    generate_generator_core,
    generator_function,
)
from effgen.codegen.graph import read_chain
from effgen.codegen.postprocessing_ir import UnsupportedPostprocessingError
from effgen.errors import ExportError
from effgen.safe_pickle import DecorrTransformer

STRICT = ["gcc", "-std=c99", "-O3", "-fPIC", "-shared", "-Wall", "-Wextra", "-pedantic", "-Werror"]
N_FEATURES, N_RANDOM, N_ROWS = 12, 16, 20000
# Measured with these fixtures (random-weight networks, 20k rows), then given a margin:
# network alone 2.4e-6; whole generator, worst output of a row in units of that
# target's spread: median 1.2e-5, 99th percentile 2.3e-4, worst 8.5e-4 (resolution-like
# tY; covariance-like 8.3e-6 / 2.2e-4 / 7e-4; no tY 4.6e-7 / 5.6e-6 / 1.3e-4). The
# error is scikinC's QuantileTransformer: a float 4096-point normal table and
# references on linspace(1e-7, 1 - 1e-7), forward in tX and inverse in tY. Sigmoid
# classifier: network 3e-7, whole 99th percentile 1.1e-6, worst 9.2e-5.
NETWORK_ATOL = 5e-6
GEN_MEDIAN, GEN_P99, GEN_MAX = 5e-5, 1e-3, 5e-3
_FPTR = ctypes.POINTER(ctypes.c_float)


def _features(n, seed):
    rng = np.random.default_rng(seed)
    reals = np.stack([rng.normal(0, 0.05, n), rng.normal(0, 0.05, n), rng.normal(0, 40, n),
                      rng.normal(0, 0.15, n), rng.standard_t(4, n) * 0.1,
                      rng.normal(4.0, 0.45, n)], axis=1)
    species, track = rng.integers(0, 3, n), rng.integers(0, 3, n)
    flags = np.stack([species == 0, species == 1, species == 2, track == 0, track == 1,
                      track == 2], axis=1)
    return np.concatenate([reals, flags], axis=1).astype(np.float32)


def _tX():
    return ColumnTransformer([
        ("quantile", QuantileTransformer(output_distribution="normal", n_quantiles=500), list(range(6))),
        ("flags", "passthrough", list(range(6, 12)))]).fit(_features(20000, 1).astype(np.float64))


def _targets(n, width, seed=2):
    rng = np.random.default_rng(seed)
    makers = [lambda: rng.standard_t(4, n) * 0.02, lambda: rng.gamma(2.0, 0.6, n),
              lambda: np.round(rng.uniform(5, 40, n)), lambda: rng.beta(0.6, 8.0, n)]
    y = np.stack([makers[k % 4]() for k in range(width)], axis=1)
    y[:, 1:] += 0.3 * y[:, :1] / 0.02
    return y


def _tY(kind, width):
    y = _targets(20000, width)
    qt = QuantileTransformer(output_distribution="normal", n_quantiles=500)
    if kind == "quantile":
        return qt.fit(y)
    # covariance's form; each step fitted alone (DecorrTransformer is not an estimator)
    scaler = StandardScaler().fit(y)
    decorr = DecorrTransformer().fit(scaler.transform(y))
    qt.fit(decorr.transform(scaler.transform(y)))
    return Pipeline([("scale", scaler), ("decorr", decorr), ("quantile", qt)])


def _network(n_in, n_out, blocks=3, width=32, last="linear", seed=0):
    """The production shape, small: Dense -> blocks x (x + Dense(x)) -> Dense(n_out)."""
    keras.utils.set_random_seed(seed)
    init = keras.initializers.RandomNormal(stddev=1 / np.sqrt(width))
    bias = keras.initializers.RandomNormal(stddev=0.1)
    inp = keras.layers.Input((n_in,))
    x = keras.layers.Dense(width, activation="tanh", kernel_initializer=init, bias_initializer=bias)(inp)
    for _ in range(blocks):
        x = keras.layers.Add()([x, keras.layers.Dense(width, activation="tanh", kernel_initializer=init,
                                                      bias_initializer=bias)(x)])
    out = keras.layers.Dense(n_out, activation=last, kernel_initializer=init, bias_initializer=bias)(x)
    return keras.Model(inp, out)


def _compile(source, path, n_in, n_out, core_fn, net_fn, generator=True):
    call = (f"{core_fn}(o + {n_out} * k, i + {n_in} * k, r + {N_RANDOM} * k)" if generator
            else f"{core_fn}(o + {n_out} * k, i + {n_in} * k)")
    n_net = n_in + N_RANDOM if generator else n_in
    source += f"""
void t_core(float *o, const float *i, const float *r, long n)
{{ long k; {'' if generator else '(void)r; '}for (k = 0; k < n; ++k) {call}; }}
void t_net(float *o, const float *z, long n)
{{ long k; for (k = 0; k < n; ++k) {net_fn}(o + {n_out} * k, z + {n_net} * k); }}
"""
    c_path = path.with_suffix(".c")
    c_path.write_text(source)
    proc = subprocess.run(STRICT + [str(c_path), "-o", str(path), "-lm"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return ctypes.CDLL(str(path))


def _call(fn, n_out, *arrays):
    arrays = [np.ascontiguousarray(a, dtype=np.float32) for a in arrays]
    out = np.full((len(arrays[0]), n_out), -7.0, dtype=np.float32)
    fn(out.ctypes.data_as(_FPTR), *[a.ctypes.data_as(_FPTR) for a in arrays], ctypes.c_long(len(out)))
    return out


@pytest.fixture(scope="module", params=[("quantile", 9), ("covariance", 15), (None, 5)],
                ids=["resolution-like", "covariance-like", "no-tY"])
def generator(request, tmp_path_factory):
    kind, n_out = request.param
    tX = _tX()
    tY = _tY(kind, n_out) if kind else None
    model = _network(N_FEATURES + N_RANDOM, n_out)
    chain = read_chain(model)
    core = generate_generator_core(chain, tX, tY, symbol="resolution", n_random=N_RANDOM)
    lib = _compile(core.source, tmp_path_factory.mktemp("gen") / "gen.so", N_FEATURES, n_out,
                   core.row_fn, core.network_fn)
    x = _features(N_ROWS, 3)
    rnd = np.random.default_rng(4).normal(size=(N_ROWS, N_RANDOM)).astype(np.float32)
    z = np.concatenate([tX.transform(x.astype(np.float64)).astype(np.float32), rnd], axis=1)
    net = model.predict(z, batch_size=4096, verbose=0)
    physical = tY.inverse_transform(net.astype(np.float64)) if tY is not None else net
    return dict(kind=kind, n_out=n_out, tY=tY, core=core, lib=lib, x=x, rnd=rnd, z=z, net=net,
                physical=physical)


def test_generator_network_alone_matches_keras(generator):
    got = _call(generator["lib"].t_net, generator["n_out"], generator["z"])
    assert np.abs(got - generator["net"]).max() < NETWORK_ATOL


def test_generator_matches_keras_and_sklearn_in_physical_units(generator):
    got = _call(generator["lib"].t_core, generator["n_out"], generator["x"], generator["rnd"])
    spread = np.asarray(generator["physical"]).std(axis=0)
    err = (np.abs(got - generator["physical"]) / spread).max(axis=1)
    assert np.isfinite(got).all()
    assert np.median(err) < GEN_MEDIAN, np.median(err)
    assert np.quantile(err, 0.99) < GEN_P99, np.quantile(err, 0.99)
    assert err.max() < GEN_MAX, err.max()


def test_generator_source_is_lhcbs_route(generator):
    src, core = generator["core"].source, generator["core"]
    assert core.row_fn == core_function("resolution")
    assert core.network_fn == generator_function("resolution", "dnn")
    assert ("resolution_tY_inverse(out, buf)" in src) == (generator["kind"] is not None)
    assert 'extern "C"' not in src and "FLOAT_T" not in src
    # tY's forward functions are never called: dropped
    assert "scikinc_resolution_tY(" not in src
    if generator["kind"] == "covariance":
        assert "scikinc_resolution_tY_decorr_inverse" in src


def test_sigmoid_classifier_matches_keras(tmp_path):
    """Acceptance's form: the classifier route with a last Dense(1, sigmoid)."""
    tX = _tX()
    model = _network(N_FEATURES, 1, blocks=4, last="sigmoid", seed=3)
    core = generate_core(model, tX, symbol="acceptance")
    lib = _compile(core.source, tmp_path / "acc.so", N_FEATURES, 1, core.row_fn, core.network_fn,
                   generator=False)
    x = _features(N_ROWS, 5)
    z = tX.transform(x.astype(np.float64)).astype(np.float32)
    reference = model.predict(z, batch_size=4096, verbose=0)
    np.testing.assert_allclose(_call(lib.t_net, 1, z), reference, rtol=0, atol=NETWORK_ATOL)
    got = _call(lib.t_core, 1, x, np.zeros((N_ROWS, 1)))
    assert np.quantile(np.abs(got - reference), 0.99) < 1e-4


def test_generator_refusals():
    tX, model = _tX(), _network(N_FEATURES + N_RANDOM, 4)
    chain = read_chain(model)
    pca = Pipeline([("s", StandardScaler()), ("pca", PCA())]).fit(_targets(500, 4))
    with pytest.raises(UnsupportedPostprocessingError, match=r"step 2 'pca' \(PCA\)"):
        generate_generator_core(chain, tX, pca, symbol="resolution", n_random=N_RANDOM)
    with pytest.raises(ExportError, match="transforms 9 columns but the model has 4 outputs"):
        generate_generator_core(chain, tX, _tY("quantile", 9), symbol="resolution", n_random=N_RANDOM)
    with pytest.raises(ValueError, match="12 features and the noise is 8 wide, but the network takes 28"):
        generate_generator_core(chain, tX, None, symbol="resolution", n_random=8)
    with pytest.raises(ValueError, match="not a C identifier"):
        generate_generator_core(chain, tX, None, symbol="res-1", n_random=N_RANDOM)


# ---- the production topologies through `effgen export --backend scikinc` ---------------

# Measured with the random-weight stand-ins of seed 0 on 20000 rows, in units of each
# target's spread: resolution median 1.6e-6, 99th percentile 5.3e-4, worst 1.2e-3;
# covariance median 7.5e-3, 99th percentile 5.1e-2, worst 0.31.
# Covariance's error is scikinC's tX: its QuantileTransformer does not average over
# repeated quantiles as scikit-learn does, so the discrete nDoF_f feature is off by up
# to 0.26 in z (network alone 2.4e-6, tY's inverse 1e-4: see the tests above).
PRODUCTION_MAX = {"resolution": 1e-2, "covariance": 1.0}
PRODUCTION_MEDIAN = {"resolution": 1e-5, "covariance": 3e-2}


@pytest.mark.parametrize("name", ["resolution", "covariance"])
def test_production_generators_through_export(name, tmp_path):
    """Two-input models (`x + x_` residuals, 128 noise values), tY.pkl pickled by
    reference to LHCb's module, exported by the scikinc backend, wrapped by the
    generator ABI and built with the library's own flags."""
    from effgen.checks import production_models as pm
    from effgen.codegen.export import export
    from effgen.codegen.native import compile_shared
    from effgen.provenance import load_postprocessing, load_preprocessing

    d = pm.write_model_dir(name, tmp_path / name, seed=1)
    paths = export(d / "model.keras", d / "tX.pkl", tmp_path / "out", backend="scikinc",
                   symbol=name, postprocessing_path=d / "tY.pkl")
    lib = ctypes.CDLL(str(compile_shared(paths["source"], tmp_path / f"{name}.so")))
    fn = getattr(lib, name)
    fn.argtypes, fn.restype = [_FPTR] * 3, _FPTR
    n = 2000
    x = pm.features(name, n, seed=5)
    rnd = np.random.default_rng(6).normal(size=(n, pm.N_RANDOM)).astype(np.float32)
    model = keras.models.load_model(d / "model.keras")
    z = load_preprocessing(d / "tX.pkl").transform(x.astype(np.float64)).astype(np.float32)
    net = model.predict([z, rnd], batch_size=1000, verbose=0)
    reference = load_postprocessing(d / "tY.pkl").inverse_transform(net.astype(np.float64))
    got = np.zeros_like(net)
    for i in range(n):
        fn(got[i].ctypes.data_as(_FPTR), x[i].ctypes.data_as(_FPTR), rnd[i].ctypes.data_as(_FPTR))
    assert np.isfinite(got).all()
    err = (np.abs(got - reference) / reference.std(axis=0)).max(axis=1)
    assert np.median(err) < PRODUCTION_MEDIAN[name] and err.max() < PRODUCTION_MAX[name], (
        np.median(err), err.max())
