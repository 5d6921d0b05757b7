"""Shared builders for the tests (no test module imports another): plausible raw rows,
a fitted preprocessing, a seed-like Keras model with random weights, knot-probing values,
a hand-written ABI core whose outputs a test controls, and small random-weight models of
the tracking chain's kinds with spec files for them."""

import json

import numpy as np
from sklearn.compose import ColumnTransformer
from sklearn.preprocessing import QuantileTransformer

from effgen.codegen.abi import render_abi
from effgen.codegen.backends import Core
from effgen.codegen.native import Library, compile_shared

OUTPUTS = ["not_recoed", "long", "upstream", "downstream"]
NAMES = [f"f{i}" for i in range(12)]
ABI_PEDANTIC = ("-std=c99", "-O2", "-fPIC", "-shared", "-Wall", "-Wextra", "-Werror", "-pedantic")


def raw_features(n, seed):
    """Plausible raw rows in schema order, with a few awkward columns: a discrete z
    (repeated quantiles) and a spike at exactly 0 in tx."""
    from effgen.checks import production_models

    return production_models.features("efficiency", n, seed)


def fit_preprocessing(n=20000, seed=0, n_quantiles=1000):
    ct = ColumnTransformer([
        ("quantile", QuantileTransformer(output_distribution="normal", n_quantiles=n_quantiles),
         list(range(8))),
        ("flags", "passthrough", [8, 9, 10, 11])])
    return ct.fit(raw_features(n, seed))


def seed_like_model(width=64, blocks=5, seed=0):
    """The seed's topology (residual tanh blocks, separate Softmax) with random weights."""
    import keras

    keras.utils.set_random_seed(seed)
    init = "he_normal"
    inp = keras.layers.Input((12,))
    x = keras.layers.Dense(width, activation="tanh", kernel_initializer=init)(inp)
    for _ in range(blocks):
        x = keras.layers.Add()([x, keras.layers.Dense(width, activation="tanh",
                                                       kernel_initializer=init)(x)])
    x = keras.layers.Dense(4, kernel_initializer=init, bias_initializer="random_normal")(x)
    return keras.Model(inp, keras.layers.Softmax()(x))


def edge_values(q):
    """Raw values that probe np.interp: every knot exactly, midpoints, one float ulp
    either side of each knot, outside the range, and +-inf."""
    q32 = np.unique(q.astype(np.float32))
    mids = ((q32[1:].astype(np.float64) + q32[:-1]) / 2).astype(np.float32)
    span = float(q32[-1] - q32[0]) or 1.0
    outside = np.float32([q32[0] - span, q32[-1] + span, q32[0] - 1e-7, q32[-1] + 1e-7,
                          np.inf, -np.inf, 3e38, -3e38])
    return np.concatenate([q32, mids, np.nextafter(q32, np.float32(np.inf)),
                           np.nextafter(q32, np.float32(-np.inf)), outside])



# ---- a controllable core for the ABI layer ---------------------------------------------

# out[k] = in[k] + (in[k+4] * in[k+8] - in[k+4] * in[k+8]): in[0..3] are the raw
# probabilities; in[4+k] = FLT_MAX, in[8+k] = 2 overflow to inf - inf (a NaN core output).
CORE = """
static void test_core(float *out, const float *in)
{
    int k;
    for (k = 0; k < 4; ++k)
        out[k] = in[k] + (in[k + 4] * in[k + 8] - in[k + 4] * in[k + 8]);
}
"""
CORE_BATCH = CORE + """
static void test_core_batch(float *out, const float *in, long n)
{
    long r;
    for (r = 0; r < n; ++r)
        test_core(out + 4 * r, in + 12 * r);
}
"""

def build_abi_library(tmp_path, symbol="eff2", has_batch=False):
    core = Core(source=CORE_BATCH if has_batch else CORE, row_fn="test_core",
                batch_fn="test_core_batch" if has_batch else None)
    src, hdr = render_abi(core, symbol=symbol, input_names=NAMES,
                          manifest={"backend": "test", "model_sha256": "00ff"})
    (tmp_path / f"{symbol}.c").write_text(src)
    (tmp_path / f"{symbol}.h").write_text(hdr)
    so = compile_shared(tmp_path / f"{symbol}.c", tmp_path / f"lib{symbol}.so", cflags=ABI_PEDANTIC)
    return Library(so, symbol)


def rows_for_probabilities(p):
    """Inputs whose core output is exactly the float32 rows `p` (n x 4)."""
    x = np.zeros((len(p), 12), dtype=np.float32)
    x[:, :4] = p
    return x


def lamarr_sum(p):
    s = p[:, 0].copy()
    for a in (np.float32(0), np.float32(0), p[:, 1], p[:, 2]):
        s = (s + a).astype(np.float32)
    return s


# ---- small random-weight models of the tracking chain's kinds ---------------------------

SMALL_WIDTH, SMALL_N_RANDOM = 16, 8


def small_model(name, width=SMALL_WIDTH, blocks=2, n_random=SMALL_N_RANDOM, seed=0, **variant):
    """`name`'s production topology (production_models.TOPOLOGIES) at a small width and
    noise, RANDOM weights: Add() residuals for the classifiers, `x = x + x_` for the
    generators; `variant` (noise_first, last_activation) builds malformed models."""
    from effgen.checks import production_models

    return production_models.build_model(name, seed, width=width, n_blocks=blocks,
                                         n_random=n_random, **variant)


def small_generator_dir(name, directory, width=SMALL_WIDTH, blocks=2, seed=0):
    """A RANDOM-weight generator of the production form (two inputs joined by
    Concatenate, features first; residuals written `x = x + x_`) but small, with the
    production number of noise inputs, beside the production stand-ins' fitted tX / tY
    (effgen.checks.production_models; the covariance tY pickled as LHCb's):
    model.keras, tX.pkl, tY.pkl in `directory`."""
    from effgen.checks import production_models

    directory = production_models.write_model_dir(name, directory, seed=seed)
    model = small_model(name, width=width, blocks=blocks, seed=seed,
                        n_random=production_models.n_random(name))
    model.save(directory / "model.keras")
    return directory


def small_model_dirs(directory, names, n_fit):
    """DIR/<name>/{model.keras, tX.pkl[, tY.pkl]} for each name: production_models'
    transforms fitted on n_fit rows and small_model's RANDOM-weight network."""
    from effgen.checks import production_models

    for name in names:
        production_models.save_transforms(name, directory / name, n=n_fit)
        small_model(name).save(directory / name / "model.keras")
    return directory


def write_spec(path, entries):
    """A spec TOML with one [[model]] table per dict in `entries`."""
    lines = []
    for e in entries:
        lines.append("[[model]]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in e.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def tracking_entries(names=("acceptance", "efficiency", "resolution", "covariance"),
                     n_random=SMALL_N_RANDOM):
    """Spec entries for DIR/<name>/{model.keras,tX.pkl[,tY.pkl]} (paths relative to the spec)."""
    from effgen.checks import production_models

    entries = []
    for name in names:
        e = {"symbol": name, "model": f"{name}/model.keras", "preprocessing": f"{name}/tX.pkl"}
        if production_models.n_random(name):
            e.update(postprocessing=f"{name}/tY.pkl", n_random=n_random)
        entries.append(e)
    return entries


# ---- Lamarr runs: mock libraries and sample rows ----------------------------------------

# A mock efficiency(): probabilities that depend on every input, so a swapped or shifted
# column shows; out[] obeys the Lamarr-sum guarantee. Needs <math.h>.
MOCK_EFFICIENCY_C = r"""
float *efficiency(float *out, const float *in)
{
    float a = 0.8f * in[3] - 3.0f + 0.3f * in[8] - 0.2f * in[9] + 0.1f * in[10];
    float b = 0.4f * in[6] - 1.0f + 1e-3f * in[2] + 2.0f * in[0] + 2.0f * in[1];
    float c = 0.5f * in[11] + 3.0f * in[4] - 3.0f * in[5] + 0.1f * in[7];
    float m = fmaxf(fmaxf(a, b), fmaxf(c, 0.0f));
    float e0 = expf(-m), e1 = expf(a - m), e2 = expf(b - m), e3 = expf(c - m);
    float s = e0 + e1 + e2 + e3;
    out[0] = e0 / s; out[1] = e1 / s; out[2] = e2 / s;
    out[3] = 1.0f - out[0] - out[1] - out[2];
    if (out[3] < 0.0f) out[3] = 0.0f;
    while (out[0] + 0.0f + 0.0f + out[1] + out[2] > 1.0f) out[0] = nextafterf(out[0], 0.0f);
    return out;
}
"""


def compile_mock(directory, source, name):
    """DIR/<name> compiled from the C `source` (a mock library SQLamarr loads)."""
    import subprocess

    (directory / "mock.c").write_text(source)
    so = directory / name
    subprocess.run(["gcc", "-std=c99", "-O2", "-fPIC", "-shared", "-Wall", "-Werror",
                    "-o", str(so), str(directory / "mock.c"), "-lm"], check=True)
    return so


def feature_rows(features_path):
    """(raw float32 features in schema order, int64 pids) of a feather sample."""
    import pyarrow.feather as feather

    from effgen import schema

    table = feather.read_table(features_path, columns=schema.FEATURES + [schema.PID])
    raw = np.column_stack([table.column(c).to_numpy() for c in schema.FEATURES]).astype(np.float32)
    return raw, table.column(schema.PID).to_numpy().astype(np.int64)


def learnable_sample(n=4096, seed=0):
    """12 features and one-hot labels drawn from probabilities that depend on them."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 12)).astype("float32")
    logits = np.stack([x[:, 0], 2 * x[:, 1], -x[:, 0], np.zeros(n)], axis=1)
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    cls = (rng.random(n)[:, None] > np.cumsum(p, axis=1)).sum(axis=1)
    return x, np.eye(4, dtype="float32")[cls]


def repeated_batches(x, y, batch, seed=0):
    """A shuffled, endlessly repeated tf.data stream of whole batches."""
    import tensorflow as tf
    return (tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=seed)
            .batch(batch, drop_remainder=True).repeat())


def crashing_batches(x, y, batch, after_batches):
    """Like repeated_batches (unshuffled), but the source fails after `after_batches`
    batches, as the seed's did when a shard vanished mid-phase."""
    import tensorflow as tf

    def gen():
        for i in range(10**9):
            if i >= after_batches:
                raise FileNotFoundError("shard vanished")
            j = (i * batch) % (len(x) - batch)
            yield x[j:j + batch], y[j:j + batch]
    spec = (tf.TensorSpec((batch, x.shape[1]), tf.float32), tf.TensorSpec((batch, y.shape[1]), tf.float32))
    return tf.data.Dataset.from_generator(gen, output_signature=spec)
