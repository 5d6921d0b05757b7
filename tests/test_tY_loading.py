"""Loading tY.pkl: the same allow-list as tX.pkl; LHCb's pickles, which name their
notebook module `preprocessing_utils.DecorrTransformer`, load without that module and
give the same inverse; unknown classes are named with the file."""

import ctypes
import hashlib
import pickle
import sys
import textwrap

import numpy as np
import pytest
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import QuantileTransformer, StandardScaler

from effgen.codegen.backends.effgen_c import generate_postprocessing
from effgen.codegen.native import compile_shared
from effgen.codegen.postprocessing_ir import read_postprocessing_file
from effgen.errors import EffgenError, PreprocessingError, ProvenanceError
from effgen.provenance import load_postprocessing
from effgen.safe_pickle import UnsafePickleError

# LHCb's class as their notebooks define it (a plain class, not a BaseEstimator), in a
# module that also imports notebook-only packages.
LHCB_MODULE = textwrap.dedent("""
    import numpy as np
    from feather_io import FeatherWriter  # notebook-only

    class DecorrTransformer:
        def fit(self, X, y=None):
            self.cov = np.cov(X.T)
            _, self.eig = np.linalg.eig(self.cov)
            return self

        def transform(self, X):
            return X.dot(self.eig)

        def inverse_transform(self, dX):
            return dX.dot(self.eig.T)
""")


def _targets(n=20000, width=15, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, width)) * rng.uniform(0.1, 3.0, width)
    x[:, 1:] += 0.7 * x[:, :1]
    x[:, -1] = np.exp(x[:, -1])
    return x


@pytest.fixture
def lhcb_pickle(tmp_path, monkeypatch):
    """A covariance-like tY = Pipeline(StandardScaler, preprocessing_utils.DecorrTransformer,
    QuantileTransformer(normal)) pickled by reference to LHCb's module, which is then
    made unimportable again; returns the file and the original object."""
    moddir = tmp_path / "notebooks"
    moddir.mkdir()
    (moddir / "preprocessing_utils.py").write_text(LHCB_MODULE)
    fake_feather = type(sys)("feather_io")
    fake_feather.FeatherWriter = object
    sys.path.insert(0, str(moddir))
    sys.modules["feather_io"] = fake_feather
    try:
        import preprocessing_utils

        tY = Pipeline([("scaler", StandardScaler()),
                       ("decorr", preprocessing_utils.DecorrTransformer()),
                       ("quantile", QuantileTransformer(n_quantiles=300, output_distribution="normal"))])
        tY.fit(_targets())
        path = tmp_path / "tY.pkl"
        path.write_bytes(pickle.dumps(tY))
    finally:
        sys.path.remove(str(moddir))
        sys.modules.pop("preprocessing_utils", None)
        sys.modules.pop("feather_io", None)
    with pytest.raises(ImportError):
        import preprocessing_utils  # noqa: F401 (the user's machine does not have it)
    assert b"preprocessing_utils" in path.read_bytes()
    return path, tY


def test_lhcb_tY_loads_without_lhcb_module(lhcb_pickle):
    path, original = lhcb_pickle
    loaded = load_postprocessing(path)
    step = loaded.named_steps["decorr"]
    assert type(step).__name__ == "DecorrTransformer" and type(step).__module__.startswith("effgen.")
    np.testing.assert_array_equal(step.eig, original.named_steps["decorr"].eig)
    np.testing.assert_array_equal(step.cov, original.named_steps["decorr"].cov)
    y = np.random.default_rng(1).normal(size=(5000, 15))
    np.testing.assert_array_equal(loaded.inverse_transform(y), original.inverse_transform(y))
    x = _targets(100, seed=2)
    np.testing.assert_array_equal(loaded.transform(x), original.transform(x))


def test_lhcb_tY_compiles_to_the_original_inverse(lhcb_pickle, tmp_path):
    """From LHCb's file to C, checked against the object LHCb pickled (their class)."""
    path, original = lhcb_pickle
    ir = read_postprocessing_file(path, n_outputs=15)
    code = generate_postprocessing(ir, prefix="covariance_post")
    src = "#include <math.h>\n" + code.text + f"""
void run(float *y, long n)
{{
    long r;
    for (r = 0; r < n; ++r)
        {code.function}(y + 15 * r);
}}
"""
    (tmp_path / "cov.c").write_text(src)
    lib = ctypes.CDLL(str(compile_shared(tmp_path / "cov.c", tmp_path / "cov.so")))
    y = np.random.default_rng(3).normal(0, 1.5, size=(100000, 15)).astype(np.float32)
    got = y.copy()
    lib.run(got.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), ctypes.c_long(len(got)))
    expected = original.inverse_transform(y.astype(np.float64))
    spread = _targets().std(axis=0)
    err = np.abs(got - expected.astype(np.float32)) / spread
    assert err.max() <= 1e-6, f"max |C - sklearn| / spread = {err.max():.3g}"


def test_an_unknown_class_is_named_with_the_file(tmp_path):
    moddir = tmp_path / "mods"
    moddir.mkdir()
    (moddir / "lhcb_extras.py").write_text(
        "from sklearn.preprocessing import StandardScaler\n"
        "class FancyScaler(StandardScaler):\n    pass\n")
    sys.path.insert(0, str(moddir))
    try:
        import lhcb_extras

        blob = pickle.dumps(lhcb_extras.FancyScaler().fit(_targets(100, 3)))
    finally:
        sys.path.remove(str(moddir))
        sys.modules.pop("lhcb_extras", None)
    path = tmp_path / "tY.pkl"
    path.write_bytes(blob)
    with pytest.raises(UnsafePickleError, match=rf"{path}: refused: the pickle names "
                                                r"lhcb_extras\.FancyScaler") as info:
        load_postprocessing(path)
    assert isinstance(info.value, EffgenError)


def test_loading_checks_the_file(tmp_path):
    tY = QuantileTransformer(n_quantiles=20, output_distribution="normal").fit(_targets(200, 3))
    good = tmp_path / "tY.pkl"
    good.write_bytes(pickle.dumps(tY))
    with pytest.raises(PreprocessingError, match=r"missing\.pkl: postprocessing \(tY\) file is missing"):
        load_postprocessing(tmp_path / "missing.pkl")
    with pytest.raises(PreprocessingError, match="is a directory"):
        load_postprocessing(tmp_path)
    (tmp_path / "bad.pkl").write_bytes(b"not a pickle")
    with pytest.raises(PreprocessingError, match=r"bad\.pkl: cannot unpickle the postprocessing"):
        load_postprocessing(tmp_path / "bad.pkl")
    (tmp_path / "array.pkl").write_bytes(pickle.dumps(np.zeros(3)))
    with pytest.raises(PreprocessingError, match=r"array\.pkl: expected a fitted transformer .* ndarray"):
        load_postprocessing(tmp_path / "array.pkl")
    digest = hashlib.sha256(good.read_bytes()).hexdigest()
    assert load_postprocessing(good, sha256=digest).n_features_in_ == 3
    with pytest.raises(ProvenanceError, match=r"tY\.pkl: sha256 .* is not the expected 00ff"):
        load_postprocessing(good, sha256="00ff")


def test_a_file_without_c_inverse_names_the_file_and_step(tmp_path):
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import MinMaxScaler

    from effgen.codegen.postprocessing_ir import UnsupportedPostprocessingError

    path = tmp_path / "tY.pkl"
    path.write_bytes(pickle.dumps(Pipeline([("s", StandardScaler()), ("mm", MinMaxScaler())])
                                  .fit(_targets(200, 3))))
    with pytest.raises(UnsupportedPostprocessingError,
                       match=rf"{path}: tY step 2 'mm' \(MinMaxScaler\): no C inverse supported"):
        read_postprocessing_file(path)
    # a class outside the allow-list is refused before anything is built
    path.write_bytes(pickle.dumps(Pipeline([("s", StandardScaler()), ("pca", PCA())])
                                  .fit(_targets(200, 3))))
    with pytest.raises(UnsafePickleError, match=r"sklearn\.decomposition\._pca\.PCA"):
        read_postprocessing_file(path)


def test_effgens_own_decorr_transformer_pickled_plainly_loads(tmp_path):
    """A tY fitted with effgen's DecorrTransformer and pickled without LHCb's module name."""
    from effgen.safe_pickle import DecorrTransformer

    y = _targets(3000, 4)
    scaler = StandardScaler().fit(y)
    decorr = DecorrTransformer().fit(scaler.transform(y))
    qt = QuantileTransformer(n_quantiles=100, output_distribution="normal")
    tY = Pipeline([("scale", scaler), ("decorr", decorr),
                   ("quantile", qt.fit(decorr.transform(scaler.transform(y))))])
    path = tmp_path / "tY.pkl"
    path.write_bytes(pickle.dumps(tY))
    assert DecorrTransformer.__module__.encode() in path.read_bytes()
    loaded = load_postprocessing(path)
    z = np.random.default_rng(0).normal(size=(100, 4))
    np.testing.assert_array_equal(loaded.inverse_transform(z), tY.inverse_transform(z))
