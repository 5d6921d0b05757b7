import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather
import pytest
from scipy import stats

from effgen import schema
from effgen.data import synth


def _table(n, seed, chunk_size=1 << 18):
    return pa.Table.from_batches(list(synth.generate(n, seed, chunk_size)), schema=synth.arrow_schema())


def _matrix(table, cols, dtype=np.float64):
    return np.stack([table[c].to_numpy() for c in cols], axis=1).astype(dtype)


@pytest.fixture(scope="module")
def big():
    # ~200k rows: enough for the statistical label-vs-truth tests.
    return _table(200_000, 1234)


def test_columns_order_and_types(big):
    expected = schema.FEATURES + [schema.PID] + schema.LABELS + schema.TRUTH
    assert big.column_names == expected
    for name in expected:
        want = pa.int32() if name == schema.PID else pa.float32()
        assert big.schema.field(name).type == want, name
    assert big.num_rows == 200_000


def test_same_seed_identical_different_seed_differs():
    a = _table(70_000, 7, chunk_size=10_000)
    b = _table(70_000, 7, chunk_size=70_000)  # chunking must not change the rows
    c = _table(70_000, 8)
    assert a.equals(b)
    assert not np.array_equal(a["mc_log10_p"].to_numpy(), c["mc_log10_p"].to_numpy())


def test_generate_cuts_batches_to_chunk_size():
    sizes = [b.num_rows for b in synth.generate(25_000, 1, chunk_size=10_000)]
    assert sizes == [10_000, 10_000, 5_000]


def test_truth_is_a_valid_distribution(big):
    truth = _matrix(big, schema.TRUTH, np.float32)
    assert (truth >= 0).all()
    assert np.abs(truth.astype(np.float64).sum(axis=1) - 1.0).max() <= 1e-6


def test_labels_are_one_hot(big):
    labels = _matrix(big, schema.LABELS)
    assert set(np.unique(labels)) <= {0.0, 1.0}
    assert (labels.sum(axis=1) == 1).all()


def test_label_frequencies_agree_with_truth(big):
    """Per class and per momentum bin, the label count must agree with the sum of
    true probabilities within binomial fluctuations (Poisson-binomial variance)."""
    labels = _matrix(big, schema.LABELS)
    truth = _matrix(big, schema.TRUTH)
    log_p = big["mc_log10_p"].to_numpy()
    edges = np.log10([300, 1000, 2000, 3000, 5000, 10000, 30000, 1e6])
    z_scores = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        rows = (log_p >= lo) & (log_p < hi)
        for j in range(4):
            expected = truth[rows, j].sum()
            variance = (truth[rows, j] * (1 - truth[rows, j])).sum()
            if variance < 5:  # class (nearly) impossible in this bin: counts must match exactly
                assert abs(labels[rows, j].sum() - expected) < 10
                continue
            z_scores.append((labels[rows, j].sum() - expected) / np.sqrt(variance))
    z_scores = np.array(z_scores)
    assert np.abs(z_scores).max() < 4.5, z_scores
    # Global check: sum of squares is chi-square distributed (classes are slightly
    # correlated, which only makes this conservative).
    assert z_scores @ z_scores < stats.chi2.ppf(0.9999, df=len(z_scores))


def test_class_fractions_are_realistic(big):
    frac = _matrix(big, schema.LABELS).mean(axis=0)
    not_recoed, long_, upstream, downstream = frac
    assert 0.55 < long_ < 0.78
    assert 0.04 < upstream < 0.12
    assert 0.02 < downstream < 0.09
    assert 0.1 < not_recoed < 0.35


def test_truth_depends_on_physics(big):
    """Long needs momentum and an origin before the end of the VELO; downstream needs
    an origin after it; electrons plateau lower than muons."""
    truth = _matrix(big, schema.TRUTH)
    logp = big["mc_log10_p"].to_numpy()
    z = big["mc_z"].to_numpy()
    eta = big["mc_eta"].to_numpy()
    central = (eta > 2.5) & (eta < 4.5)
    assert truth[(logp < 3.0) & central, 1].mean() < 0.05
    assert truth[(logp > 4.0) & central & (z < 100), 1].mean() > 0.85
    assert truth[(z > 1000) & (z < 2000), 1].max() < 0.01
    assert truth[(z > 1000) & (z < 2000) & (logp > 4) & central, 3].mean() > 0.5
    plateau = (logp > 4.0) & central & (z < 100)
    is_e = big["mc_is_e"].to_numpy() == 1
    is_mu = big["mc_is_mu"].to_numpy() == 1
    assert truth[plateau & is_e, 1].mean() + 0.05 < truth[plateau & is_mu, 1].mean()
    # The magnet kick: same direction (tx) and momentum, opposite charge differ.
    q = big["mc_charge"].to_numpy()
    tx = big["mc_tx"].to_numpy()
    # Positive particles are kicked towards +x: at large |tx| the charge that is kicked
    # outwards leaves the T-station acceptance more often.
    soft = (logp > 3.3) & (logp < 3.5) & central & (z < 100)
    right, left = soft & (tx > 0.12), soft & (tx < -0.12)
    assert truth[right & (q > 0), 1].mean() + 0.05 < truth[right & (q < 0), 1].mean()
    assert truth[left & (q < 0), 1].mean() + 0.05 < truth[left & (q > 0), 1].mean()


def test_direction_is_consistent(big):
    eta = big["mc_eta"].to_numpy().astype(np.float64)
    phi = big["mc_phi"].to_numpy().astype(np.float64)
    tx = big["mc_tx"].to_numpy().astype(np.float64)
    ty = big["mc_ty"].to_numpy().astype(np.float64)
    np.testing.assert_allclose(np.arctan2(ty, tx), phi, atol=1e-5)
    np.testing.assert_allclose(np.arcsinh(1 / np.hypot(tx, ty)), eta, rtol=1e-5)
    assert eta.min() >= 1.5 and eta.max() <= 6.0
    logp = big["mc_log10_p"].to_numpy()
    assert logp.min() >= 2.5 and logp.max() <= 6.0
    assert 3.5 < np.median(logp) < 3.9


def test_species_flags_pid_and_charge(big):
    pid = big[schema.PID].to_numpy()
    q = big["mc_charge"].to_numpy()
    flags = _matrix(big, ["mc_is_e", "mc_is_mu", "mc_is_h"])
    assert (flags.sum(axis=1) == 1).all()
    np.testing.assert_array_equal(flags[:, 0] == 1, np.abs(pid) == 11)
    np.testing.assert_array_equal(flags[:, 1] == 1, np.abs(pid) == 13)
    np.testing.assert_array_equal(flags[:, 2] == 1, np.isin(np.abs(pid), [211, 321, 2212]))
    lepton = np.isin(np.abs(pid), [11, 13])
    np.testing.assert_array_equal(np.sign(pid), np.where(lepton, -q, q))  # e- is +11
    assert abs((q > 0).mean() - 0.5) < 0.01
    assert abs((np.abs(pid) == 211).mean() - 0.70) < 0.01


def test_vertices(big):
    z = big["mc_z"].to_numpy()
    x = big["mc_x"].to_numpy()
    prompt = np.abs(z) < 150
    assert 0.8 < prompt.mean() < 0.9
    robust_sigma = 1.4826 * np.median(np.abs(x[prompt]))  # immune to the few displaced
    assert 0.025 < robust_sigma < 0.035
    assert 2000 < z.max() < 2700


def test_write_sample_and_cli_refuses_overwrite(tmp_path):
    out = tmp_path / "s.feather"
    synth.write_sample(out, 3000, 5, progress=False)
    table = feather.read_table(out)
    assert table.equals(_table(3000, 5))
    assert [p.name for p in tmp_path.iterdir()] == ["s.feather"]  # no temporaries left
    before = out.read_bytes()
    cmd = [sys.executable, "-m", "effgen", "synth", "--n", "100", "--seed", "1", "--output", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode != 0 and "--force" in res.stderr
    assert out.read_bytes() == before
    res = subprocess.run(cmd + ["--force"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert feather.read_table(out).num_rows == 100
