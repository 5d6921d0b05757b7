import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather
import pytest
from scipy import stats

from effgen import errors, schema
from effgen.data import derive, synth


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


def _tuple(n, seed, chunk_size=1 << 18):
    chunks = list(synth.generate_tuple(n, seed, chunk_size))
    return {c: np.concatenate([ch[c] for ch in chunks]) for c in synth.TUPLE_BRANCHES}


@pytest.fixture(scope="module")
def tup():
    return _tuple(200_000, 1234)


def test_tuple_branches_are_the_ones_the_derivation_reads(tup):
    assert list(tup) == list(synth.TUPLE_BRANCHES)
    for name in derive.REQUIRED + derive.OPTIONAL:
        assert name in tup, name
    for name, dtype in synth.TUPLE_BRANCHES.items():
        assert tup[name].dtype == dtype, name


def test_tuple_derives_to_the_feature_view(tup, big):
    """generate() is the tuple through preprocess' derivation, row for row."""
    view = synth.features_view(tup)
    for name in big.column_names:
        np.testing.assert_array_equal(view[name], big[name].to_numpy(), err_msg=name)


def test_tuple_kinematics_are_consistent(tup):
    p, pt = tup["mc_p"].astype(np.float64), tup["mc_pt"].astype(np.float64)
    px, py, pz = (tup[c].astype(np.float64) for c in ("mc_px", "mc_py", "mc_pz"))
    np.testing.assert_allclose(np.sqrt(px**2 + py**2 + pz**2), p, rtol=1e-5)
    np.testing.assert_allclose(np.hypot(px, py), pt, rtol=1e-5)
    np.testing.assert_allclose(pz / p, np.tanh(tup["mc_eta"].astype(np.float64)), rtol=1e-5)
    np.testing.assert_allclose(px / pz, tup["mc_tx"], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(py / pz, tup["mc_ty"], rtol=1e-4, atol=1e-7)
    assert (pz > 0).all() and set(np.unique(tup["mc_charge"])) == {-1, 1}
    mass = dict(zip(np.abs(tup["mcID"]).tolist(), tup["mc_mass"].tolist()))
    assert mass[211] == pytest.approx(139.57) and mass[13] == pytest.approx(105.658)


def test_tuple_identifiers_are_unique(tup):
    key = tup["runNumber"].astype(np.int64) * 10**12 + tup["evtNumber"] * 1000 + tup["mc_key"]
    assert len(np.unique(key)) == len(key)
    assert tup["mc_key"].max() < synth.PARTICLES_PER_EVENT


def test_type_encodes_the_labels_and_acceptance_the_geometry(tup, big):
    """type 3/4/5 are the reconstructed classes, every other code is not_recoed; a
    reconstructed particle is always in the acceptance, whose rate follows eta."""
    labels = _matrix(big, schema.LABELS)
    t = tup["type"]
    for j, code in enumerate(schema.TRACK_TYPES[1:], start=1):
        np.testing.assert_array_equal(labels[:, j] == 1, t == code)
    assert set(np.unique(t[labels[:, 0] == 1])) == {0, 1, 6}  # other codes occur too
    acc = tup["acceptance"]
    assert set(np.unique(acc)) == {0, 1}
    assert (acc[labels[:, 0] == 0] == 1).all()
    eta = tup["mc_eta"]
    central, outside = (eta > 2.3) & (eta < 4.7), (eta < 1.8) | (eta > 5.2)
    assert acc[central].mean() > 0.99 and acc[outside].mean() < 0.03
    np.testing.assert_array_equal(tup["reconstructed"], t != 0)


@pytest.mark.parametrize("suffix", [".root", ".feather", ".parquet"])
def test_write_sample_in_each_format(tmp_path, suffix):
    out = tmp_path / f"s{suffix}"
    synth.write_sample(out, 3000, 5, chunk_size=1000, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temporaries left
    if suffix == ".root":
        import uproot

        with uproot.open(out) as f:
            got = f[derive.TREE].arrays(library="np")
    else:
        import pyarrow.parquet as pq

        table = feather.read_table(out) if suffix == ".feather" else pq.read_table(out)
        got = {c: table.column(c).to_numpy() for c in table.column_names}
    want = _tuple(3000, 5)
    assert list(got) == list(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
        assert got[name].dtype == want[name].dtype, name


def test_write_sample_root_compression(tmp_path):
    """The bench's realistic tuple: the same arrays, ZLIB-compressed as uproot does by default."""
    import uproot

    plain, zipped = tmp_path / "plain.root", tmp_path / "zlib.root"
    synth.write_sample(plain, 20_000, 5, progress=False)
    synth.write_sample(zipped, 20_000, 5, progress=False, root_compression=uproot.ZLIB(1))
    assert zipped.stat().st_size < 0.9 * plain.stat().st_size
    with uproot.open(plain) as a, uproot.open(zipped) as b:
        assert b.file.compression == uproot.ZLIB(1)
        want, got = a[derive.TREE].arrays(library="np"), b[derive.TREE].arrays(library="np")
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_write_sample_refuses_unknown_format(tmp_path):
    with pytest.raises(errors.ConfigError, match=r"s\.csv.*\.root"):
        synth.write_sample(tmp_path / "s.csv", 10, 1, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_overwrite(tmp_path):
    import uproot

    out = tmp_path / "s.root"
    synth.write_sample(out, 3000, 5, progress=False)
    before = out.read_bytes()
    cmd = [sys.executable, "-m", "effgen", "synth", "--n", "100", "--seed", "1", "--output", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode != 0 and "--force" in res.stderr
    assert out.read_bytes() == before
    res = subprocess.run(cmd + ["--force"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    with uproot.open(out) as f:
        assert f[derive.TREE].num_entries == 100
