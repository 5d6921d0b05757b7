"""The parity harness: its checks on constructed inputs (each must be able to fail),
then end to end on the project's exported library from a tiny random-weight model."""

import json

import numpy as np
import pytest

from effgen import schema
from effgen.checks import draws, parity, parity_build, parity_compare, random_category
from effgen.codegen import abi
from effgen.codegen.backends import Core
from effgen.codegen.export import write_sources

TOL = 1e-5


def _probs(n, seed):
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 1.5, (n, 4))
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def _trivial_header(symbol="efficiency"):
    core = "static void core(float *out, const float *in) { (void)in; out[0] = out[1] = out[2] = out[3] = 0.25f; }"
    return abi.render_abi(Core(core, "core"), symbol=symbol, manifest={"backend": "effgen"})[1]


def test_header_cdef_declares_the_four_exports():
    import cffi

    cdef = parity_build.header_cdef(_trivial_header("eff2"))
    for decl in ("float *eff2(float *out, const float *in);",
                 "void eff2_batch(float *out, const float *in, long n);",
                 "int eff2_track_type(const float *in, float r);",
                 "const char *eff2_manifest(void);",
                 "#define EFF2_N_INPUTS 12", "#define EFF2_N_OUTPUTS 4"):
        assert decl in cdef, cdef
    cffi.FFI().cdef(cdef)  # cffi accepts it as is


def test_draw_agreement_separates_rounding_from_errors():
    n = 50_000
    ref = _probs(n, 1)
    rng = np.random.default_rng(2)
    r = rng.random(n, dtype=np.float32)
    # A C side within the tolerance of TF: differences only next to a boundary.
    c = np.clip(ref + rng.uniform(-TOL, TOL, ref.shape).astype(np.float32), 0, 1)
    # Put some uniforms right at TF's boundaries so that rounding actually happens.
    bounds = random_category.cumulative_boundaries(ref)
    r[:500] = bounds[:500, 1] + np.float32(0.5 * TOL)
    c[:500, 1] = ref[:500, 1] + np.float32(TOL)
    c_types = random_category.python_track_type(c, r)
    ok = draws.draw_agreement(c_types, ref, c, r, TOL)
    assert ok["disagreements"] > 0 and ok["unexplained"] == 0 and ok["self_disagreements"] == 0
    assert all(d["rounding"] for d in ok["listed"])

    # A draw that swaps long and upstream: caught twice over.
    swapped = np.where(c_types == 3, 4, np.where(c_types == 4, 3, c_types))
    bad = draws.draw_agreement(swapped, ref, c, r, TOL)
    assert bad["unexplained"] > 1000 and bad["self_disagreements"] > 1000


def test_draw_distribution_accepts_the_right_law_and_rejects_a_biased_one():
    n, n_draws = 20_000, 200_000
    ref = _probs(n, 3)
    log10_p = np.random.default_rng(4).uniform(2.5, 5.6, n).astype(np.float32)
    u = np.random.default_rng(5).random(n_draws, dtype=np.float32)
    rows = np.arange(n_draws) % n
    good = random_category.python_track_type(ref[rows], u)
    res = draws.draw_distribution(good, ref, log10_p)
    assert res["passed"], res
    assert len(res["per_bin"]) == 8  # 6 momentum bins plus under/overflow
    assert res["overall"]["p_value"] >= draws.P_VALUE_MIN

    biased = ref.copy()
    biased[:, 0] = np.clip(biased[:, 0] - 0.01, 0, 1)
    biased[:, 1] += 0.01
    res_b = draws.draw_distribution(random_category.python_track_type(biased[rows], u), ref, log10_p)
    assert not res_b["passed"] and "overall" in res_b["failing_tests"]


def test_chisquare_merges_sparse_cells():
    res = draws.chisquare_merged([990, 3, 1, 1006], [1000.0, 4.0, 1.5, 994.5], [0, 3, 4, 5])
    assert res["dof"] == 2 and len(res["cells"]) == 3
    assert sum(res["observed"]) == 2000
    assert res["cells"] == ["0", "3+4", "5"] and res["observed"][1] == 4
    lone = draws.chisquare_merged([10, 0], [10.0, 0.0], [0, 3])
    assert lone["dof"] == 0 and lone["p_value"] is None


def test_momentum_bins_use_gev_edges_on_log10_mev():
    b, names = draws.momentum_bins(np.log10([400.0, 500.0, 2999.0, 3000.0, 250e3]))
    assert list(b) == [0, 1, 1, 2, 7]
    assert names[1] == "0.5-3" and names[-1] == "p>200"


def test_lamarr_safety_and_values_flag_what_lamarr_rejects():
    p = _probs(100, 6)
    clean = random_category.lamarr_safety(p)
    assert clean["nan_values"] == clean["negative_values"] == clean["above_one_values"] == 0
    q = p.copy()
    q[7] = [0.6, 0.41, 0.0, 0.0]
    q[8, 2] = np.nan
    s = random_category.lamarr_safety(q)
    assert s["lamarr_sum_above_one"] >= 1 and s["nan_values"] == 1
    v = parity_compare.value_stats(q, p)
    assert v["nan_rows"] == 1 and v["worst_rows"][0]["row"] in (7, 8)


# ---- end to end ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny seed-architecture model with random (untrained) weights: parity must hold
    whatever the weights."""
    from effgen.training.network import build_model

    path = tmp_path_factory.mktemp("tiny_model") / "model.keras"
    build_model(width=12, n_blocks=2, seed=7).save(path)
    return path


@pytest.fixture(scope="module")
def raw_rows(tiny_dataset):
    import pyarrow.feather as feather

    table = feather.read_table(tiny_dataset["features"], columns=schema.FEATURES)
    return np.column_stack([table.column(c).to_numpy() for c in schema.FEATURES]).astype(np.float32)


@pytest.mark.sanitizer
def test_sanitizer_build_catches_an_out_of_bounds_read(tiny_model, tiny_dataset, raw_rows, tmp_path):
    # A core that reads one float past its input: harmless-looking in a normal build
    # (it reads the next row), a heap-buffer-overflow on the last row under ASan.
    core = ("static void core(float *out, const float *in)\n"
            "{ out[0] = 0.25f + 0.0f * in[12]; out[1] = out[2] = out[3] = 0.25f; }")
    write_sources(Core(core, "core"), tmp_path, symbol="efficiency", manifest={"backend": "effgen"})
    report = parity.run_parity(model_path=tiny_model, preprocessing_path=tiny_dataset["preprocessing"],
                               raw=raw_rows, source=tmp_path / "efficiency.c", rows=300, draws=0,
                               variants=("production", "sanitize"), output_dir=tmp_path / "out",
                               progress=False)
    assert not report["passed"]
    assert "values" in report["targets"]["production"]  # ran to the end without a sanitizer
    san = report["targets"]["sanitize"]
    assert "values" not in san and "AddressSanitizer" in san["failures"][0]
    assert "heap-buffer-overflow" in san["failures"][0]


def _export_library(model, preprocessing, out_dir, backend):
    from effgen.codegen.export import export
    from effgen.codegen.native import check_library, compile_shared

    paths = export(model, preprocessing, out_dir, backend=backend)
    so = compile_shared(paths["source"], out_dir / "efficiency.so")
    check_library(so, "efficiency")
    return so, paths["source"]


@pytest.mark.sanitizer
def test_exported_library_matches_tensorflow(tiny_model, tiny_dataset, raw_rows, tmp_path):
    so, source = _export_library(tiny_model, tiny_dataset["preprocessing"], tmp_path / "lib", "effgen")
    report = parity.run_parity(model_path=tiny_model, preprocessing_path=tiny_dataset["preprocessing"],
                               raw=raw_rows, library=so, source=source, rows=20_000, draws=200_000,
                               variants=("production", "portable", "sanitize"), sanitize_rows=2000,
                               output_dir=tmp_path / "out", progress=False)
    assert report["passed"], report["failures"]
    assert report["backend"] == "effgen" and report["network_function"]
    for name in ("abi", "production", "portable", "sanitize"):
        t = report["targets"][name]
        assert t["rows"] == (2000 if name == "sanitize" else 20_000)
        for how in ("per_row", "batch"):
            assert t["values"][how]["max"] <= 1e-5 and t["values"][how]["nan_rows"] == 0
        assert t["draws_identical_uniforms"]["unexplained"] == 0
        assert t["draws_identical_uniforms"]["self_disagreements"] == 0
        if name != "abi":
            assert t["values"]["network"]["max"] <= 1e-5
    dist = report["draw_distribution"]
    assert dist["n_draws"] == 200_000 and dist["target"] == "abi"
    assert dist["min_p_value"] >= draws.P_VALUE_MIN
    # The outputs a user reads.
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    assert on_disk["passed"] and on_disk["rows"] == 20_000
    assert (tmp_path / "out" / "differences.png").stat().st_size > 1000
    assert "PASSED" in (tmp_path / "out" / "summary.txt").read_text()


def test_scikinc_library_meets_its_stated_tolerance(tiny_model, tiny_dataset, raw_rows, tmp_path):
    so, source = _export_library(tiny_model, tiny_dataset["preprocessing"], tmp_path / "lib", "scikinc")
    report = parity.run_parity(model_path=tiny_model, preprocessing_path=tiny_dataset["preprocessing"],
                               raw=raw_rows, library=so, source=source, rows=5000, draws=0,
                               variants=("production",), output_dir=tmp_path / "out", progress=False)
    assert report["backend"] == "scikinc"
    assert report["passed"], report["failures"]
    worst = report["targets"]["abi"]["values"]["per_row"]["max"]
    # Looser than effgen's 1e-5 (scikinC's approximate quantile transform) but bounded.
    assert 1e-5 < worst <= parity_compare.TOLERANCES["scikinc"]["function"]


def test_a_library_from_another_model_is_flagged(tiny_model, tiny_dataset, raw_rows, tmp_path):
    from effgen.training.network import build_model

    so, source = _export_library(tiny_model, tiny_dataset["preprocessing"], tmp_path / "lib", "effgen")
    other = tmp_path / "other.keras"
    build_model(width=12, n_blocks=2, seed=8).save(other)
    report = parity.run_parity(model_path=other, preprocessing_path=tiny_dataset["preprocessing"],
                               raw=raw_rows, library=so, rows=2000, draws=0, variants=(),
                               output_dir=tmp_path / "out", progress=False)
    assert not report["passed"]
    failures = report["targets"]["abi"]["failures"]
    assert any("model_sha256" in f for f in failures)
    assert any("max |C - TF|" in f for f in failures)
    assert "FAILED" in (tmp_path / "out" / "summary.txt").read_text()


def test_a_source_without_its_manifest_is_refused_before_any_work(tmp_path):
    """The backend and the network function come from the manifest export writes
    beside the source, not from the C text: without it, parity stops at once."""
    write_sources(Core("static void core(float *out, const float *in) { (void)in; "
                       "out[0] = out[1] = out[2] = out[3] = 0.25f; }", "core"),
                  tmp_path, symbol="efficiency", manifest={"backend": "effgen"})
    (tmp_path / "efficiency.json").unlink()
    with pytest.raises(parity.ParityError, match="no manifest .*efficiency.json"):
        parity.run_parity(model_path=tmp_path / "absent.keras", preprocessing_path=tmp_path / "absent.pkl",
                          raw=np.zeros((4, 12), np.float32), source=tmp_path / "efficiency.c",
                          output_dir=tmp_path / "out", progress=False)


def test_worker_runs_under_its_old_and_new_module_paths(tmp_path):
    import subprocess
    import sys

    for module in ("effgen.checks.parity", "effgen.checks.parity_worker"):
        res = subprocess.run([sys.executable, "-m", module, "--worker", str(tmp_path / "missing.json")],
                             capture_output=True, text=True)
        assert res.returncode != 0 and "missing.json" in res.stderr, (module, res.stderr[-500:])
