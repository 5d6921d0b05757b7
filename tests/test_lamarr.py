"""The efficiency library inside the real Lamarr runtime (SQLamarr).

Hand-written libraries with the Lamarr ABI check the plumbing (selection, input order,
random_category, the abort on probabilities summing above 1); the project's own
exported library, from a tiny random-weight model, is then checked against the
library called directly and against TensorFlow, on the inputs SQLamarr computed."""


import numpy as np
import pytest
from support import MOCK_EFFICIENCY_C, compile_mock, feature_rows

from effgen import schema
from effgen.checks import draws, lamarr, parity, parity_compare

pytestmark = pytest.mark.lamarr

MOCK_C = r"""
#include <math.h>
""" + MOCK_EFFICIENCY_C + r"""/* Constant probabilities for the draw-distribution check. */
float *constant(float *out, const float *in)
{
    (void)in;
    out[0] = 0.125f; out[1] = 0.5f; out[2] = 0.25f; out[3] = 0.125f;
    return out;
}
/* A softmax whose first three outputs sum above 1: Lamarr must abort. */
float *oversum(float *out, const float *in)
{
    (void)in;
    out[0] = 0.5f; out[1] = 0.5f; out[2] = 0.01f; out[3] = 0.0f;
    return out;
}
"""


def mock_probabilities(x):
    """numpy float32 twin of MOCK_C's efficiency()."""
    x = np.asarray(x, np.float32)
    f = np.float32
    a = f(0.8) * x[:, 3] - f(3) + f(0.3) * x[:, 8] - f(0.2) * x[:, 9] + f(0.1) * x[:, 10]
    b = f(0.4) * x[:, 6] - f(1) + f(1e-3) * x[:, 2] + f(2) * x[:, 0] + f(2) * x[:, 1]
    c = f(0.5) * x[:, 11] + f(3) * x[:, 4] - f(3) * x[:, 5] + f(0.1) * x[:, 7]
    z = np.stack([np.zeros_like(a), a, b, c], axis=1).astype(np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def mock_library(tmp_path_factory):
    return compile_mock(tmp_path_factory.mktemp("mock_lib"), MOCK_C, "mock.so")


@pytest.fixture(scope="module")
def sample_rows(tiny_dataset):
    return feature_rows(tiny_dataset["features"])


def test_hepmc_roundtrip_selection_and_input_order(mock_library, sample_rows, tmp_path):
    raw, pid = sample_rows
    raw, pid = raw[:3000].copy(), pid[:3000].copy()
    # Neutral particles must be dropped by Lamarr's selection (propagation_charge = 0).
    neutral = np.arange(0, 3000, 97)
    pid[neutral] = np.where(neutral % 2 == 0, 22, 2112)
    frame = lamarr.run_lamarr_efficiency(mock_library, raw, tmp_path / "l.db", pid=pid, seed=5,
                                         work_dir=tmp_path / "w")
    kept = np.setdiff1d(np.arange(3000), neutral)
    assert frame.attrs["n_mcparticles"] == 3000
    np.testing.assert_array_equal(frame["row"].to_numpy(), kept)
    # The 12 inputs SQLamarr passed, in order, equal the sample's features up to the
    # float32 rounding of momenta in the event store.
    got = frame[schema.FEATURES].to_numpy()
    want = raw[kept]
    np.testing.assert_array_equal(got[:, [0, 1, 2, 8, 9, 10, 11]], want[:, [0, 1, 2, 8, 9, 10, 11]])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # What the Plugin stored is the library evaluated on those inputs.
    np.testing.assert_allclose(frame[schema.OUTPUTS].to_numpy(), mock_probabilities(got),
                               rtol=0, atol=2e-6)
    assert set(np.unique(frame["track_type"])) <= {0, 3, 4, 5}


def test_random_category_counts_match_constant_probabilities(mock_library, sample_rows, tmp_path):
    raw, pid = sample_rows
    n = 20000
    frame = lamarr.run_lamarr_efficiency(mock_library, raw[:n], tmp_path / "c.db", pid=pid[:n],
                                         symbol="constant", seed=11, threads=2, probe_inputs=False,
                                         work_dir=tmp_path / "w")
    assert len(frame) == n and len(frame.attrs["databases"]) == 2
    probs = np.tile(np.float32([0.125, 0.5, 0.25, 0.125]), (n, 1))
    np.testing.assert_array_equal(frame[schema.OUTPUTS].to_numpy(), probs)
    dist = draws.draw_distribution(frame["track_type"].to_numpy(), probs,
                                    raw[frame["row"].to_numpy(), schema.FEATURES.index("mc_log10_p")])
    assert dist["other_types"] == 0
    assert dist["overall"]["dof"] == 3
    assert dist["passed"], dist


def test_probabilities_summing_above_one_abort_the_step(mock_library, sample_rows, tmp_path):
    raw, pid = sample_rows
    # random_category (in the TemporaryTable step) refuses the row: the step aborts.
    with pytest.raises(lamarr.LamarrError, match="aborted.*TemporaryTable"):
        lamarr.run_lamarr_efficiency(mock_library, raw[:50], tmp_path / "o.db", pid=pid[:50],
                                     symbol="oversum", probe_inputs=False, work_dir=tmp_path / "w")


def test_pid_from_flags_follows_propagation_charge_convention():
    f = np.zeros((4, 12), np.float32)
    f[:, 11] = [1, -1, 1, -1]
    f[0, 8] = f[1, 8] = 1          # electrons
    f[2, 9] = 1                    # muon
    f[3, 10] = 1                   # hadron
    # propagation_charge: leptons pid > 0 -> -1, hadrons pid > 0 -> +1
    np.testing.assert_array_equal(lamarr.pid_from_flags(f), [-11, 11, -13, -211])


def test_kinematics_reproduce_the_features(sample_rows):
    raw, pid = sample_rows
    k = lamarr.kinematics(raw[:1000], pid[:1000])
    p = np.sqrt(k["px"] ** 2 + k["py"] ** 2 + k["pz"] ** 2)
    np.testing.assert_allclose(np.log10(p), raw[:1000, 3], rtol=1e-6)
    np.testing.assert_allclose(k["px"] / k["pz"], raw[:1000, 4], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(np.arctan2(k["py"], k["px"]), raw[:1000, 7], rtol=0, atol=2e-6)
    pt = np.hypot(k["px"], k["py"])
    eta = -np.log(np.tan(0.5 * np.arctan2(pt, k["pz"])))
    np.testing.assert_allclose(eta, raw[:1000, 6], rtol=0, atol=2e-5)


# ---- the project's own library -------------------------------------------------------
@pytest.fixture(scope="module")
def project_library(tiny_dataset, tmp_path_factory):
    """A tiny seed-architecture model (random weights), exported and compiled as
    `make lamarr-lib` does."""
    from effgen.codegen.export import export
    from effgen.codegen.native import compile_shared
    from effgen.training.network import build_model

    d = tmp_path_factory.mktemp("project_lib")
    build_model(width=12, n_blocks=2, seed=11).save(d / "model.keras")
    paths = export(d / "model.keras", tiny_dataset["preprocessing"], d, backend="effgen")
    return compile_shared(paths["source"], d / "efficiency.so"), d / "model.keras"


def test_project_library_inside_lamarr(project_library, tiny_dataset, sample_rows, tmp_path):
    from effgen.codegen.native import Library
    from effgen.provenance import load_preprocessing

    so, model = project_library
    raw, pid = sample_rows
    frame = lamarr.run_lamarr_efficiency(so, raw, tmp_path / "lamarr.db", pid=pid, seed=3,
                                         threads=2, work_dir=tmp_path / "w")
    # Every particle (all charged, pz > 0) went through; no step aborted.
    np.testing.assert_array_equal(frame["row"].to_numpy(), np.arange(len(raw)))
    feats = frame[schema.FEATURES].to_numpy()      # what SQLamarr passed, float32
    probs = frame[schema.OUTPUTS].to_numpy()       # what the library answered
    np.testing.assert_allclose(feats, raw, rtol=1e-6, atol=1e-6)

    # The same library called directly on the same float32 inputs: identical values.
    np.testing.assert_array_equal(Library(so).per_call(feats), probs)
    # TensorFlow on the same inputs: within the effgen tolerance.
    tf_probs, _ = parity.tf_reference(model, load_preprocessing(tiny_dataset["preprocessing"]), feats)
    assert np.abs(probs.astype(np.float64) - tf_probs).max() <= parity_compare.TOLERANCES["effgen"]["function"]

    # Lamarr's draws (its own ranlux48 uniforms) follow TF's probabilities.
    types = frame["track_type"].to_numpy()
    assert set(np.unique(types)) <= {0, 3, 4, 5}
    dist = draws.draw_distribution(types, tf_probs, feats[:, schema.FEATURES.index("mc_log10_p")])
    assert dist["passed"], dist
    # The CLI's own check (direct calls + goodness of fit against the library) agrees.
    assert lamarr.check_against_library(frame, so) == 0
