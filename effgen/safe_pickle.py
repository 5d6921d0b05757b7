"""Unpickling a fitted preprocessing without trusting it: a pickle may name only the
classes on an allow-list (scikit-learn's fitted transformers, numpy's array and scalar
reconstruction, a few builtins), so a tX.pkl cannot run code while it is read.

A plain `pickle.load` calls whatever the file names (`os.system`, `builtins.exec`, ...):
reading a pickle is running a program. The allow-list names classes, never modules, so
callables that reach the file system or the interpreter (numpy.load, FunctionTransformer,
getattr) stay out. LHCb's `preprocessing_utils.DecorrTransformer` (DOMAIN.md section 8) is
read as the local equivalent below, so its notebook-only module is not needed."""

import _compat_pickle
import io
import pickle

import numpy as np

from effgen.errors import PreprocessingError


class UnsafePickleError(PreprocessingError):
    """The pickle names a class outside the allow-list."""


class DecorrTransformer:
    """LHCb's decorrelation step: fit stores cov = np.cov(X.T) and eig, its eigenvectors;
    transform(X) = X @ eig; inverse_transform(dX) = dX @ eig.T."""

    def fit(self, X, y=None):
        self.cov = np.cov(np.asarray(X, dtype=np.float64).T)
        _, self.eig = np.linalg.eig(self.cov)
        return self

    def transform(self, X):
        return np.asarray(X) @ self.eig

    def inverse_transform(self, X):
        return np.asarray(X) @ self.eig.T

    def __setstate__(self, state):  # scikit-learn's BaseEstimator pickles its __dict__
        self.__dict__.update(state)


_NUMPY = [
    ("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer"),
]
_SKLEARN = {
    "sklearn.compose._column_transformer": ["ColumnTransformer", "_RemainderColsList"],
    "sklearn.pipeline": ["Pipeline"],
    # A fitted "passthrough" column is a FunctionTransformer with func=None; any other
    # func would itself have to be on this list to be read.
    "sklearn.preprocessing._function_transformer": ["FunctionTransformer"],
    "sklearn.preprocessing._data": ["QuantileTransformer", "StandardScaler", "MinMaxScaler",
                                    "MaxAbsScaler", "RobustScaler"],
}
ALLOWED = {
    *((f"numpy.{core}.{mod}", name) for core in ("core", "_core") for mod, name in _NUMPY),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("builtins", "slice"), ("builtins", "object"), ("builtins", "set"), ("builtins", "frozenset"),
    ("_codecs", "encode"),  # bytes in protocol 2 pickles
    ("copyreg", "_reconstructor"),
    ("collections", "OrderedDict"),
    *((module, name) for module, names in _SKLEARN.items() for name in names),
}
# Classes read as effgen's own: LHCb's (their notebook module, which users do not have)
# and effgen's DecorrTransformer pickled under its own module name (a tY fitted with it
# and pickled plainly).
MAPPED = {(module, "DecorrTransformer"): DecorrTransformer
          for module in ("preprocessing_utils", DecorrTransformer.__module__)}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        # Python 2 names (__builtin__, copy_reg) in old protocols, mapped as pickle does.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        else:
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in MAPPED:
            return MAPPED[(module, name)]
        if (module, name) not in ALLOWED:
            raise UnsafePickleError(
                f"the pickle names {module}.{name}, which effgen does not load (it reads "
                "only scikit-learn's transformers and Pipeline, numpy arrays, and LHCb's "
                "preprocessing_utils.DecorrTransformer as its own equivalent)")
        return super().find_class(module, name)


def loads(data: bytes):
    """Unpickle `data` through the allow-list; UnsafePickleError names what it refused."""
    return _RestrictedUnpickler(io.BytesIO(data)).load()
