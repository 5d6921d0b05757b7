"""Random-weight stand-ins for Lamarr's tracking models, in the production topologies of
DOMAIN.md section 8, with fitted tX and tY: for parity tests and benchmarks of the
tracking chain, never for physics.

    acceptance   12 features -> Dense(128) -> 10 x [Dense(128), Add()] -> Dense(1, sigmoid)
    efficiency   12 features -> Dense(128) -> 5 x [Dense(128), Add()] -> Dense(4) -> Softmax
    resolution   Concatenate([12 features, 128 noise]) -> Dense(128) -> 10 x `x = x + x_`
                 -> Dense(9, linear);  tY = QuantileTransformer(normal)
    covariance   Concatenate([15 features, 128 noise]) -> Dense(128) -> 8 x `x = x + x_`
                 -> Dense(15, linear); tY = Pipeline(StandardScaler, DecorrTransformer,
                 QuantileTransformer(normal))

The weights are random (the trained acceptance model initialises its residual kernels
to zero; here every block gets random kernels so that a dropped residual shows up in
parity). tX and tY are fitted on plausible synthetic columns, not on LHCb data. The
covariance tY's DecorrTransformer is pickled under LHCb's module name,
`preprocessing_utils.DecorrTransformer`, as LHCb's notebooks write it.

    python -m effgen.checks.production_models --output-dir DIR [--seed S]

writes DIR/<name>/{model.keras,tX.pkl,tY.pkl} for the four models (no tY for the
classifiers), the layout `make lamarr-lib RESOLUTION=DIR/resolution ...` reads.
"""

import argparse
import contextlib
import pickle
import sys
import types
from pathlib import Path

import numpy as np

from effgen import atomic
from effgen.safe_pickle import DecorrTransformer

WIDTH = 128
N_RANDOM = 128
FLAGS = ["mc_is_e", "mc_is_mu", "mc_is_h", "long", "upstream", "downstream"]
CLOSEST = ["x_ClosestToBeam", "y_ClosestToBeam", "z_ClosestToBeam",
           "tx_ClosestToBeam", "ty_ClosestToBeam", "mc_log10_p"]
EFFICIENCY_FEATURES = ["mc_x", "mc_y", "mc_z", "mc_log10_p", "mc_tx", "mc_ty", "mc_eta",
                       "mc_phi", "mc_is_e", "mc_is_mu", "mc_is_h", "mc_charge"]
RESOLUTION_TARGETS = ["dx", "dy", "dz", "dtx", "dty", "dp", "chi2PerDoF", "nDoF_f", "ghostProb"]
COVARIANCE_TARGETS = (
    [f"log_cov_ClosestToBeam_{i}_{i}" for i in range(5)]
    + [f"corr_ClosestToBeam_{j}_{i}" for i in range(1, 5) for j in range(i)])


# name: (features, outputs, residual blocks, noise inputs, how the residual is written)
TOPOLOGIES = {
    "acceptance": (EFFICIENCY_FEATURES, ["acceptance"], 10, 0, "Add"),
    "efficiency": (EFFICIENCY_FEATURES, ["not_recoed", "long", "upstream", "downstream"],
                   5, 0, "Add"),
    "resolution": (CLOSEST + FLAGS, RESOLUTION_TARGETS, 10, N_RANDOM, "+"),
    "covariance": (CLOSEST[:5] + ["mc_log10_p", "chi2PerDoF", "nDoF_f", "ghostProb"] + FLAGS,
                   COVARIANCE_TARGETS, 8, N_RANDOM, "+"),
}


def feature_names(name):
    return list(TOPOLOGIES[name][0])


def output_names(name):
    return list(TOPOLOGIES[name][1])


def n_random(name):
    return TOPOLOGIES[name][3]


# ---- plausible columns ------------------------------------------------------------

def _flags(rng, n):
    species = rng.integers(0, 3, n)
    track = rng.integers(0, 3, n)
    return np.stack([species == 0, species == 1, species == 2,
                     track == 0, track == 1, track == 2], axis=1).astype(np.float32)


def features(name, n, seed=0):
    """n plausible raw rows of `name`'s inputs (float32, in order), with repeated values
    and spikes like the real columns (a discrete z, a spike at exactly 0)."""
    rng = np.random.default_rng(seed)
    if name in ("acceptance", "efficiency"):
        x = np.empty((n, 12), dtype=np.float32)
        x[:, 0:2] = rng.normal(0, 0.03, (n, 2))
        x[:, 2] = np.where(rng.random(n) < 0.15, rng.uniform(-300, 2500, n), rng.normal(0, 45, n))
        x[:, 2] = np.where(rng.random(n) < 0.2, np.round(x[:, 2] / 100) * 100, x[:, 2])
        x[:, 3] = rng.normal(3.7, 0.5, n)
        x[:, 4:6] = rng.normal(0, 0.1, (n, 2))
        x[:, 4] = np.where(rng.random(n) < 0.3, 0.0, x[:, 4])
        x[:, 6] = rng.uniform(1.5, 6, n)
        x[:, 7] = rng.uniform(-np.pi, np.pi, n)
        species = rng.integers(0, 3, n)
        x[:, 8], x[:, 9], x[:, 10] = species == 0, species == 1, species == 2
        x[:, 11] = rng.choice([-1, 1], n)
        return x
    reals = np.stack([rng.normal(0, 0.05, n), rng.normal(0, 0.05, n), rng.normal(0, 40, n),
                      rng.normal(0, 0.15, n), rng.normal(0, 0.15, n),
                      rng.normal(4.0, 0.45, n)], axis=1)
    if name == "covariance":
        reals = np.concatenate([reals, _resolution_targets(rng, n)[:, 6:9]], axis=1)
    return np.concatenate([reals.astype(np.float32), _flags(rng, n)], axis=1)


def _resolution_targets(rng, n):
    return np.stack([rng.standard_t(4, n) * 0.02, rng.standard_t(4, n) * 0.02,
                     rng.standard_t(3, n) * 0.3, rng.standard_t(4, n) * 1e-4,
                     rng.standard_t(4, n) * 1e-4, rng.normal(0, 0.005, n),
                     rng.gamma(2.0, 0.6, n), np.round(rng.uniform(5, 40, n)),
                     rng.beta(0.6, 8.0, n)], axis=1)


def targets(name, n, seed=0):
    """n plausible rows of a generator's targets in physical units (float64)."""
    rng = np.random.default_rng(seed + 1)
    if name == "resolution":
        return _resolution_targets(rng, n)
    # Covariance: correlated log-variances (a shared momentum term) and correlations in (-1, 1).
    common = rng.normal(0, 1, (n, 1))
    log_cov = -8 + np.arange(5) + 0.8 * common + 0.3 * rng.normal(0, 1, (n, 5))
    corr = np.tanh(0.5 * common + 0.4 * rng.normal(0, 1, (n, 10)))
    return np.concatenate([log_cov, corr], axis=1)


# ---- fitted transforms -------------------------------------------------------------

def fit_tX(name, n=20000, seed=0):
    """ColumnTransformer: QuantileTransformer(normal) on the real columns, passthrough on
    the flags (efficiency and acceptance share this form; the efficiency's mc_charge is a
    flag too)."""
    from sklearn.compose import ColumnTransformer
    from sklearn.preprocessing import QuantileTransformer

    n_features = len(feature_names(name))
    n_real = 8 if name in ("acceptance", "efficiency") else n_features - len(FLAGS)
    ct = ColumnTransformer([
        ("quantile", QuantileTransformer(output_distribution="normal", n_quantiles=1000,
                                         random_state=seed),
         list(range(n_real))),
        ("flags", "passthrough", list(range(n_real, n_features)))])
    return ct.fit(features(name, n, seed))


def fit_tY(name, n=20000, seed=0):
    """The generator's output transform, fitted on synthetic targets (see module doc)."""
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import QuantileTransformer, StandardScaler

    y = targets(name, n, seed)
    quantile = QuantileTransformer(output_distribution="normal", n_quantiles=1000,
                                   random_state=seed)
    if name == "resolution":
        return quantile.fit(y)
    scaler = StandardScaler().fit(y)
    z = scaler.transform(y)
    decorr = DecorrTransformer().fit(z)
    quantile.fit(decorr.transform(z))
    # Each step is fitted above: Pipeline.fit would clone the DecorrTransformer, which is
    # not a scikit-learn estimator.
    return Pipeline([("scale", scaler), ("decorr", decorr), ("quantile", quantile)])


# ---- Keras models with random weights ---------------------------------------------

def build_model(name, seed=0, *, width=WIDTH, n_blocks=None, n_random=None,
                noise_first=False, last_activation=None):
    """`name`'s topology with random weights (see module doc): production widths and
    depths by default; `width`, `n_blocks` and `n_random` shrink it for fast tests, and
    `noise_first` / `last_activation` build the malformed variants the exporter refuses."""
    import keras

    feats, outs, blocks, noise, residual = TOPOLOGIES[name]
    n_blocks = blocks if n_blocks is None else n_blocks
    noise = noise if n_random is None or not noise else n_random
    keras.utils.set_random_seed(seed)

    def dense(units, activation="tanh", scale=1.0, name=None):
        # Scaled so that the outputs stay O(1) through the blocks.
        return keras.layers.Dense(units, activation=activation, name=name,
                                  kernel_initializer=keras.initializers.RandomNormal(
                                      stddev=scale / np.sqrt(width)),
                                  bias_initializer=keras.initializers.RandomNormal(stddev=0.1))

    x_in = keras.layers.Input((len(feats),), name="features")
    inputs = [x_in]
    x = x_in
    if noise:
        rnd = keras.layers.Input((noise,), name="noise")
        inputs.append(rnd)
        x = keras.layers.Concatenate(name="join")([rnd, x_in] if noise_first else [x_in, rnd])
    x = dense(width)(x)
    for _ in range(n_blocks):
        x_ = dense(width)(x)
        x = keras.layers.Add()([x, x_]) if residual == "Add" else x + x_
    if name == "acceptance":
        out = dense(1, last_activation or "sigmoid", name="out")(x)
    elif name == "efficiency":
        out = keras.layers.Softmax()(dense(len(outs), "linear")(x))
    else:
        # A GAN generator's outputs are roughly N(0, 1) in tY's normal space.
        out = dense(len(outs), last_activation or "linear", scale=0.5, name="out")(x)
    return keras.Model(inputs, out, name=name)


@contextlib.contextmanager
def _as_lhcb_module():
    """Pickle DecorrTransformer as `preprocessing_utils.DecorrTransformer`, the reference
    LHCb's notebooks write (pickle checks that the name resolves to the same class)."""
    module = types.ModuleType("preprocessing_utils")
    module.DecorrTransformer = DecorrTransformer
    saved = DecorrTransformer.__module__, sys.modules.get("preprocessing_utils")
    DecorrTransformer.__module__ = "preprocessing_utils"
    sys.modules["preprocessing_utils"] = module
    try:
        yield
    finally:
        DecorrTransformer.__module__ = saved[0]
        if saved[1] is None:
            sys.modules.pop("preprocessing_utils", None)
        else:
            sys.modules["preprocessing_utils"] = saved[1]


def write_model_dir(name, directory, seed=0):
    """DIR/{model.keras, tX.pkl[, tY.pkl]} for `name`, each file written atomically."""
    directory = save_transforms(name, directory, seed=seed)
    model = build_model(name, seed)
    with atomic.atomic_path(directory / "model.keras") as tmp:
        model.save(tmp)
    return directory


def save_transforms(name, directory, n=20000, seed=0):
    """DIR/tX.pkl and, for a generator, DIR/tY.pkl (its DecorrTransformer pickled under
    LHCb's module name), fitted on n synthetic rows; each file written atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic.atomic_file(directory / "tX.pkl") as f:
        pickle.dump(fit_tX(name, n=n, seed=seed), f)
    if n_random(name):
        with _as_lhcb_module():
            blob = pickle.dumps(fit_tY(name, n=n, seed=seed))
        with atomic.atomic_file(directory / "tY.pkl") as f:
            f.write(blob)
    return directory


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m effgen.checks.production_models",
        description="Write random-weight models in Lamarr's production tracking topologies "
                    "(for parity tests and benchmarks only).")
    parser.add_argument("--output-dir", required=True, type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="+", choices=sorted(TOPOLOGIES), default=sorted(TOPOLOGIES))
    args = parser.parse_args(argv)
    for name in args.only:
        print(write_model_dir(name, args.output_dir / name, seed=args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
