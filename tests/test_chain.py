"""The whole Lamarr tracking chain inside SQLamarr: acceptance -> efficiency -> (draws)
-> closest approach -> resolution -> covariance -> covariance post-processing, with one
library exporting the four symbols.

A hand-written library with the chain's ABI (every output depends on its inputs and, for
the generators, on the noise) checks the plumbing and that the exact check catches a
noise that is not the one SQLamarr drew. The project's own tracking.so is checked the
same way in test_chain_tracking_library (random-weight production-topology models)."""

import subprocess

import numpy as np
import pytest
from support import MOCK_EFFICIENCY_C, compile_mock, feature_rows

from effgen import schema
from effgen.checks import chain

pytestmark = pytest.mark.lamarr

MOCK_C = r"""
#include <math.h>
float *acceptance(float *out, const float *in)
{
    out[0] = 1.0f / (1.0f + expf(-(1.5f * (in[6] - 2.2f) + 0.1f * in[11] + 0.05f * in[3])));
    return out;
}
""" + MOCK_EFFICIENCY_C + r"""/* Every output mixes inputs and noise, so a wrong input column or noise value shows. */
float *resolution(float *out, const float *in, const float *rnd)
{
    for (int k = 0; k < 9; k++)
        out[k] = 0.1f * in[k] + rnd[k] + 0.01f * rnd[127 - k] + 0.5f * in[9 + k % 3];
    out[6] = expf(0.1f * rnd[6] + 0.01f * in[2]);
    return out;
}
float *covariance(float *out, const float *in, const float *rnd)
{
    for (int i = 0; i < 5; i++) out[i] = 0.3f * rnd[i] - 2.0f + 0.01f * in[6 + i % 3] + 0.1f * in[i];
    for (int k = 0; k < 10; k++) out[5 + k] = tanhf(0.5f * rnd[5 + k] + 0.01f * in[9 + k % 6]);
    return out;
}
"""


@pytest.fixture(scope="module")
def mock_tracking(tmp_path_factory):
    return compile_mock(tmp_path_factory.mktemp("mock_tracking"), MOCK_C, "tracking.so")


@pytest.fixture(scope="module")
def rows(tiny_dataset):
    raw, pid = feature_rows(tiny_dataset["features"])
    return raw[:4000], pid[:4000]


@pytest.fixture(scope="module")
def mock_chain(mock_tracking, rows, tmp_path_factory):
    raw, pid = rows
    d = tmp_path_factory.mktemp("mock_chain")
    return chain.run_chain(mock_tracking, raw, d / "chain.db", pid=pid, seed=9, work_dir=d / "w")


def test_chain_stores_exactly_what_the_library_computes(mock_chain, mock_tracking, rows):
    raw, _ = rows
    report = chain.check_chain(mock_chain, mock_tracking)
    assert report["ok"], report
    # Every step ran on a non-trivial share of the particles.
    assert report["particles"] == report["selected"] == len(raw)
    assert 0 < report["accepted"] < report["selected"]
    assert 0 < report["reconstructed"] < report["accepted"]
    assert report["resolution_rows"] == report["covariance_rows"] == report["reconstructed"]
    assert report["covariance_matrix_rows"] == report["reconstructed"]
    # The generators saw N(0, 1) noise, 128 values a row.
    assert abs(report["noise_mean"]) < 0.02 and abs(report["noise_std"] - 1) < 0.02


def test_only_accepted_particles_get_a_track_type_and_only_tracks_reach_the_generators(mock_chain):
    types = mock_chain["tmp_particles_recoed_as"]
    assert set(np.unique(types["track_type"])) <= {0, 3, 4, 5}
    res_rows = set(mock_chain["resolution_out"]["row"])
    assert res_rows == set(types.loc[types["track_type"].isin([3, 4, 5]), "row"])
    # The generators' flags are the drawn track type, one-hot.
    probe = mock_chain["probe_resolution"].merge(types, on=["row", "mcparticle_id"])
    for col, t in (("in_9", 3), ("in_10", 4), ("in_11", 5)):
        np.testing.assert_array_equal(probe[col].to_numpy(), (probe["track_type"] == t).astype(np.float32))


def test_generator_inputs_are_the_closest_approach_and_the_resolution_outputs(mock_chain, rows):
    raw, _ = rows
    probe = mock_chain["probe_resolution"]
    x = raw[probe["row"].to_numpy()]
    idx = {n: i for i, n in enumerate(schema.FEATURES)}
    feats = probe[[f"in_{i}" for i in range(12)]].to_numpy()
    # tx, ty, log10 p and the particle flags are the particle's (float32 event store).
    np.testing.assert_allclose(feats[:, 3:6], x[:, [idx["mc_tx"], idx["mc_ty"], idx["mc_log10_p"]]],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(feats[:, 6:9], x[:, [idx["mc_is_e"], idx["mc_is_mu"], idx["mc_is_h"]]])
    # The closest approach to the beam: (x, y) is perpendicular to (tx, ty) there.
    dot = feats[:, 0] * feats[:, 3] + feats[:, 1] * feats[:, 4]
    assert np.abs(dot).max() < 1e-3
    cov = mock_chain["probe_covariance"]
    res = mock_chain["resolution_out"]
    np.testing.assert_array_equal(cov[["in_6", "in_7", "in_8"]].to_numpy(),
                                  res[["chi2PerDoF", "nDoF_f", "ghostProb"]].to_numpy().astype(np.float32))


def test_covariance_matrix_is_the_sql_post_processing(mock_chain):
    out = mock_chain["covariance_out"][chain.COVARIANCE_OUTPUTS].to_numpy()
    m = mock_chain["covariance"][chain.COV_MATRIX].to_numpy()
    sig = np.sqrt(np.exp(out[:, :5].astype(np.float64)))
    np.testing.assert_allclose(m[:, chain.COV_MATRIX.index("cov00")], sig[:, 0] ** 2, rtol=1e-14)
    np.testing.assert_allclose(m[:, chain.COV_MATRIX.index("cov13")],
                               out[:, chain.COVARIANCE_OUTPUTS.index("corr_ClosestToBeam_1_3")]
                               * sig[:, 1] * sig[:, 3], rtol=1e-14)


def test_the_check_catches_noise_other_than_sqlamarrs(mock_chain, mock_tracking):
    """Replace the probed noise by another N(0, 1) draw: the exact check must fail for
    the generators (and only for them)."""
    tables = dict(mock_chain)
    probe = tables["probe_resolution"].copy()
    cols = [f"rnd_{k}" for k in range(chain.N_RANDOM)]
    probe[cols] = np.random.default_rng(0).normal(size=(len(probe), len(cols))).astype(np.float32)
    tables["probe_resolution"] = probe
    report = chain.check_chain(tables, mock_tracking)
    assert not report["ok"]
    assert report["resolution_mismatched_rows"] == report["resolution_rows"]
    assert report["acceptance_mismatched_rows"] == report["covariance_mismatched_rows"] == 0


def test_a_library_without_the_four_symbols_is_refused_before_sqlamarr(rows, tmp_path):
    d = tmp_path
    (d / "only.c").write_text("float *efficiency(float *o, const float *i) { (void)i; return o; }\n")
    so = d / "only.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(so), str(d / "only.c")], check=True)
    with pytest.raises(chain.LamarrError, match="does not export acceptance, resolution, covariance"):
        chain.run_chain(so, rows[0][:10], d / "x.db")
    assert not (d / "x.db").exists()


def test_cli_chain_mode(mock_tracking, tiny_dataset, tmp_path):
    import os
    import sys

    env = {**os.environ, "EFFGEN_WORKDIR": str(tmp_path / "w")}
    proc = subprocess.run([sys.executable, "-m", "effgen", "lamarr", "--chain", "--library",
                           str(mock_tracking), "--sample", str(tiny_dataset["features"]),
                           "--rows", "1500", "--seed", "4"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    assert "lamarr chain: OK" in proc.stdout
    assert (tmp_path / "w" / "lamarr" / "chain.db").is_file()


def test_cli_chain_mode_reads_the_root_tuple(mock_tracking, tiny_dataset, tmp_path):
    import os
    import sys

    env = {**os.environ, "EFFGEN_WORKDIR": str(tmp_path / "w")}
    db = tmp_path / "c.db"
    proc = subprocess.run([sys.executable, "-m", "effgen", "lamarr", "--chain", "--library",
                           str(mock_tracking), "--sample", str(tiny_dataset["sample"]),
                           "--rows", "800", "--db", str(db)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    assert "lamarr chain: 800 particles" in proc.stdout and "lamarr chain: OK" in proc.stdout
    # A database the user named is not replaced without --force.
    again = subprocess.run([sys.executable, "-m", "effgen", "lamarr", "--chain", "--library",
                            str(mock_tracking), "--sample", str(tiny_dataset["sample"]),
                            "--rows", "800", "--db", str(db)], capture_output=True, text=True, env=env)
    assert again.returncode == 1 and "exists: pass --force" in again.stderr


# ---- effgen's own tracking library ------------------------------------------------------
@pytest.fixture(scope="module")
def effgen_tracking(tmp_path_factory):
    """tracking.so exported by `effgen export --spec --compile` from four small
    RANDOM-weight models of the chain's kinds: a sigmoid acceptance and a softmax
    efficiency (12 features), and the two generators in the production form (features +
    128 noise through Concatenate, `x + x_` residuals) with the production stand-ins'
    fitted tX and tY (covariance: StandardScaler -> LHCb's DecorrTransformer ->
    QuantileTransformer)."""
    from support import small_generator_dir

    from effgen.checks import production_models
    from effgen.codegen.spec import export_spec
    from effgen.training.acceptance import build_acceptance_model
    from effgen.training.network import build_model

    d = tmp_path_factory.mktemp("effgen_tracking")
    dirs = {}
    for name, model in (("acceptance", build_acceptance_model(width=16, n_blocks=2, seed=1)),
                        ("efficiency", build_model(width=16, n_blocks=1, seed=2))):
        dirs[name] = production_models.write_model_dir(name, d / name, seed=3)
        model.save(dirs[name] / "model.keras")
    for name in ("resolution", "covariance"):
        dirs[name] = small_generator_dir(name, d / name, seed=4)
    lines = []
    for name, m in dirs.items():
        lines += ["[[model]]", f'symbol = "{name}"', f'model = "{m}/model.keras"',
                  f'preprocessing = "{m}/tX.pkl"']
        if (m / "tY.pkl").is_file():
            lines.append(f'postprocessing = "{m}/tY.pkl"')
    (d / "tracking.toml").write_text("\n".join(lines) + "\n")
    lib = export_spec(d / "tracking.toml", d / "out", backend="effgen", compile=True)["library"]
    return lib, dirs


def test_chain_with_effgens_tracking_library(effgen_tracking, tmp_path):
    import keras

    from effgen.checks import production_models
    from effgen.checks.parity_kinds import TOLERANCES, keras_reference
    from effgen.provenance import load_postprocessing, load_preprocessing

    lib, dirs = effgen_tracking
    raw = production_models.features("efficiency", 2500, seed=8)
    tables = chain.run_chain(lib, raw, tmp_path / "chain.db", seed=21, work_dir=tmp_path / "w")
    report = chain.check_chain(tables, lib)
    assert report["ok"], report
    assert 0 < report["reconstructed"] < report["accepted"] < report["selected"] == len(raw)

    # What Lamarr stored is also what Keras + scikit-learn give on the inputs and noise
    # SQLamarr passed (kinds' stated tolerances).
    def reference(name, inputs, noise=None):
        model = keras.models.load_model(dirs[name] / "model.keras", compile=False)
        ct = load_preprocessing(dirs[name] / "tX.pkl")
        ty = load_postprocessing(dirs[name] / "tY.pkl") if noise is not None else None
        return keras_reference(model, ct, ty, inputs, noise)

    feats = tables["probe_features"][[f"in_{i}" for i in range(12)]].to_numpy()
    for name, cols in (("acceptance", chain.ACCEPTANCE_OUTPUTS), ("efficiency", chain.EFFICIENCY_OUTPUTS)):
        stored = tables[f"{name}_out"][cols].to_numpy()
        assert np.abs(stored - reference(name, feats)).max() <= TOLERANCES["sigmoid"]["absolute"], name
    for name, n_in, cols in (("resolution", 12, chain.RESOLUTION_OUTPUTS),
                             ("covariance", 15, chain.COVARIANCE_OUTPUTS)):
        probe = tables[f"probe_{name}"].drop(columns=["row", "mcparticle_id"]).to_numpy(np.float32)
        ref = reference(name, probe[:, :n_in], probe[:, n_in:])
        stored = tables[f"{name}_out"][cols].to_numpy()
        spread = np.where(ref.std(axis=0) > 0, ref.std(axis=0), 1.0)
        worst = (np.abs(stored - ref) / spread).max()
        assert worst <= TOLERANCES["generator"]["relative_to_spread"], (name, worst)
