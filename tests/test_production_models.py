"""The random-weight stand-ins for Lamarr's tracking models have the production
topologies of DOMAIN.md section 8, and their tY pickles reference LHCb's module."""

import pickle

import numpy as np
import pytest

from effgen import safe_pickle
from effgen.checks import production_models as pm

# Parameter counts DOMAIN.md section 8 gives for the production models.
PRODUCTION_PARAMS = {"acceptance": 166_913, "efficiency": 84_740,
                     "resolution": 184_329, "covariance": 152_463}


@pytest.mark.parametrize("name", sorted(PRODUCTION_PARAMS))
def test_topology_and_transforms(name):
    model = pm.build_model(name)
    assert model.count_params() == PRODUCTION_PARAMS[name]
    feats, outs = pm.feature_names(name), pm.output_names(name)
    assert [tuple(i.shape) for i in model.inputs][0] == (None, len(feats))
    assert tuple(model.output.shape) == (None, len(outs))
    x = pm.features(name, 500, seed=3)
    z = pm.fit_tX(name).transform(x)
    assert z.shape == (500, len(feats)) and np.all(np.isfinite(z))
    if pm.n_random(name):
        assert [tuple(i.shape) for i in model.inputs][1] == (None, pm.N_RANDOM)
        y = model.predict([z, np.random.default_rng(0).normal(size=(500, pm.N_RANDOM))], verbose=0)
        physical = pm.fit_tY(name).inverse_transform(y)
        assert physical.shape == (500, len(outs)) and np.all(np.isfinite(physical))
    else:
        y = model.predict(z, verbose=0)
        assert np.all((y >= 0) & (y <= 1))


def test_generator_residuals_are_operations_not_layers():
    """The generators write `x = x + x_` (Keras 3 lists no Add layer for it), the
    classifiers use Add() layers: both forms must reach the code generator."""
    layer_types = {n: {type(lay).__name__ for lay in pm.build_model(n).layers}
                   for n in ("acceptance", "resolution")}
    assert "Add" in layer_types["acceptance"]
    assert "Add" not in layer_types["resolution"]


def test_covariance_tY_is_pickled_as_lhcb_writes_it(tmp_path):
    pm.main(["--output-dir", str(tmp_path), "--only", "covariance", "resolution"])
    blob = (tmp_path / "covariance" / "tY.pkl").read_bytes()
    assert b"preprocessing_utils" in blob and b"DecorrTransformer" in blob
    with pytest.raises(ModuleNotFoundError):
        pickle.loads(blob)  # a user's machine has no preprocessing_utils
    loaded = safe_pickle.loads(blob)
    assert isinstance(loaded.steps[1][1], safe_pickle.DecorrTransformer)
    y = np.random.default_rng(1).normal(size=(200, 15))
    np.testing.assert_allclose(loaded.inverse_transform(y),
                               pm.fit_tY("covariance").inverse_transform(y), rtol=1e-12)
    for name in ("covariance", "resolution"):
        assert {p.name for p in (tmp_path / name).iterdir()} == {"model.keras", "tX.pkl", "tY.pkl"}
