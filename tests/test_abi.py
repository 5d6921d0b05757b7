"""The shared ABI layer, on a hand-written core whose outputs the test controls:
out[k] = in[k] + (in[k+4] * in[k+8] - in[k+4] * in[k+8]), so in[0..3] are the raw
probabilities (in[4..11] = 0), and in[4+k] = FLT_MAX, in[8+k] = 2 overflows to
inf - inf: the core itself returns a NaN for finite inputs."""

import json
import subprocess

import numpy as np
import pytest
from support import CORE, build_abi_library, lamarr_sum, rows_for_probabilities

from effgen.checks.random_category import python_track_type
from effgen.codegen.abi import exported_names, render_abi
from effgen.codegen.backends import Core
from effgen.codegen.native import check_library, exported_symbols, undefined_symbols

PEDANTIC = ("-std=c99", "-O2", "-fPIC", "-shared", "-Wall", "-Wextra", "-Werror", "-pedantic")
OUTPUTS = ["not_recoed", "long", "upstream", "downstream"]
NAMES = [f"f{i}" for i in range(12)]


@pytest.fixture(scope="module", params=[False, True], ids=["row-loop", "core-batch"])
def lib(request, tmp_path_factory):
    return build_abi_library(tmp_path_factory.mktemp("abi"), has_batch=request.param)


def _awkward_probabilities(n, seed=0):
    """float32 rows near the simplex, many of whose Lamarr sums land on or just past 1."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet([1, 1, 1, 0.05], size=n).astype(np.float32)
    bump = rng.integers(0, 4, size=(n, 3))           # push up by 0..3 ulps
    for _ in range(3):
        up = bump > 0
        p[:, :3] = np.where(up, np.nextafter(p[:, :3], np.float32(2)), p[:, :3])
        bump -= 1
    return p


def test_exports_exactly_the_four_functions_and_no_finite_imports(lib):
    assert exported_symbols(lib.path) == sorted(exported_names("eff2"))
    assert not [s for s in undefined_symbols(lib.path) if s.endswith("_finite")]
    check_library(lib.path, "eff2")
    with pytest.raises(RuntimeError, match="exports"):
        check_library(lib.path, "efficiency")


def test_manifest_is_json_with_names_and_build_info(lib):
    m = lib.manifest()
    assert m["inputs"] == NAMES and m["outputs"] == OUTPUTS
    assert m["symbol"] == "eff2" and m["backend"] == "test" and m["model_sha256"] == "00ff"
    assert "-pedantic" in m["cflags"] and m["compiler"] and m["isa"]


def test_valid_probabilities_pass_unchanged(lib):
    p = np.random.default_rng(1).dirichlet([1, 1, 1, 1], size=5000).astype(np.float32)
    p = p[lamarr_sum(p) <= 1]
    np.testing.assert_array_equal(lib.batch(rows_for_probabilities(p)), p)
    np.testing.assert_array_equal(lib.per_call(rows_for_probabilities(p[:500])), p[:500])


def test_lamarr_sum_never_exceeds_one_and_fix_is_minimal(lib):
    p = _awkward_probabilities(20000)
    over = lamarr_sum(p) > 1
    assert over.sum() > 1000  # the test data does exercise the fix-up
    out = lib.batch(rows_for_probabilities(p))
    assert (lamarr_sum(out) <= 1).all()
    np.testing.assert_array_equal(out[~over], p[~over])
    np.testing.assert_array_equal(out[:, 3], p[:, 3])
    changed = out != p
    assert (changed.sum(axis=1)[over] == 1).all()        # one value moved per bad row
    largest = np.argmax(p[:, :3], axis=1)
    assert (np.argmax(changed[over, :3], axis=1) == largest[over]).all()
    # minimal: one ulp less of a step would break Lamarr's rule again
    undo = out[over].copy()
    rows = np.arange(len(undo))
    undo[rows, largest[over]] = np.nextafter(undo[rows, largest[over]], np.float32(2))
    assert (lamarr_sum(undo) > 1).all()
    np.testing.assert_array_equal(lib.per_call(rows_for_probabilities(p[:2000])), out[:2000])


def test_values_are_clamped_to_unit_interval(lib):
    p = np.array([[-0.5, 0.2, 0.3, 1.5], [1.5, -1, -2, 0.5], [-np.inf, np.inf, 0, 0]],
                 dtype=np.float32)
    out = lib.batch(rows_for_probabilities(p))
    assert ((out >= 0) & (out <= 1)).all() and (lamarr_sum(out) <= 1).all()
    np.testing.assert_array_equal(out[0], np.float32([0, 0.2, 0.3, 1]))
    np.testing.assert_array_equal(out[1], np.float32([1, 0, 0, 0.5]))


def test_nan_input_anywhere_gives_not_recoed(lib):
    x = rows_for_probabilities(np.full((12, 4), 0.25, dtype=np.float32))
    x[np.arange(12), np.arange(12)] = np.nan
    expected = np.tile(np.float32([1, 0, 0, 0]), (12, 1))
    np.testing.assert_array_equal(lib.batch(x), expected)
    np.testing.assert_array_equal(lib.per_call(x), expected)
    assert (lib.track_type(x, np.float32(0.999)) == 0).all()


def test_nan_from_the_core_gives_not_recoed(lib):
    x = rows_for_probabilities(np.full((4, 4), 0.25, dtype=np.float32))
    x[np.arange(4), 4 + np.arange(4)] = np.finfo(np.float32).max  # overflow: inf - inf
    x[np.arange(4), 8 + np.arange(4)] = 2
    expected = np.tile(np.float32([1, 0, 0, 0]), (4, 1))
    np.testing.assert_array_equal(lib.batch(x), expected)
    np.testing.assert_array_equal(lib.per_call(x), expected)


def test_infinite_inputs_are_taken_as_the_largest_float(lib):
    big = np.finfo(np.float32).max
    p = np.full((6, 4), 0.25, dtype=np.float32)
    x = rows_for_probabilities(p)
    x[0, 4], x[1, 8], x[2, 5], x[3, 9], x[4, 4:8] = np.inf, np.inf, -np.inf, -np.inf, np.inf
    x[5, 4:8], x[5, 8:] = np.inf, 2
    clamped = np.clip(x, -big, big)
    out = lib.batch(x)
    np.testing.assert_array_equal(out, lib.batch(clamped))
    np.testing.assert_array_equal(lib.per_call(x), out)
    np.testing.assert_array_equal(out[:5], p[:5])                       # FLT_MAX * 0 -> 0
    np.testing.assert_array_equal(out[5], np.float32([1, 0, 0, 0]))     # overflow -> NaN


def test_batch_of_zero_rows_writes_nothing(lib):
    out = np.full((1, 4), 7, dtype=np.float32)
    lib._batch(out.ctypes.data_as(lib._fptr), np.zeros((1, 12), np.float32).ctypes.data_as(lib._fptr), 0)
    assert (out == 7).all()


def test_track_type_matches_python_reference(lib):
    rng = np.random.default_rng(2)
    p = _awkward_probabilities(4000, seed=3)
    x = rows_for_probabilities(p)
    probs = lib.batch(x)
    below_one = np.nextafter(np.float32(1), np.float32(0))
    edge = np.array([0, below_one, 1e-30], dtype=np.float32)
    for r in [rng.random(len(x), dtype=np.float32), *edge,
              probs[:, 0], lamarr_sum(probs),                  # r exactly on a cumulative sum
              np.nextafter(lamarr_sum(probs), np.float32(0))]:
        got = lib.track_type(x, r)
        np.testing.assert_array_equal(got, python_track_type(probs, r))
        assert set(np.unique(got)) <= {0, 3, 4, 5}


def test_python_track_type_follows_random_category():
    p = np.float32([[0.5, 0.25, 0.125, 0.125]])
    # r < p0 -> 0; p0 <= r < p0+p1 -> 3; then 4; the rest -> 5
    for r, t in [(0.0, 0), (0.49, 0), (0.5, 3), (0.74, 3), (0.75, 4), (0.874, 4), (0.875, 5)]:
        assert python_track_type(p, r)[0] == t
    # float accumulation: 0.1f + 0.2f + 0.7f rounds to exactly 1, so nothing is left for 5
    q = np.float32([[0.1, 0.2, 0.7, 0.0]])
    assert python_track_type(q, np.nextafter(np.float32(1), np.float32(0)))[0] == 4


def test_symbol_parameter_and_header_match_the_library(tmp_path):
    lib = build_abi_library(tmp_path, symbol="eff_other")
    assert exported_symbols(lib.path) == sorted(exported_names("eff_other"))
    prog = tmp_path / "main.c"
    prog.write_text("""
#include <stdio.h>
#include "eff_other.h"
int main(void)
{
    float in[EFF_OTHER_N_INPUTS] = {0.5f, 0.25f, 0.125f, 0.125f};
    float out[EFF_OTHER_N_OUTPUTS], batch[2 * EFF_OTHER_N_OUTPUTS];
    float in2[2 * EFF_OTHER_N_INPUTS] = {0.5f, 0.25f, 0.125f, 0.125f};
    float *ret = eff_other(out, in);
    eff_other_batch(batch, in2, 2);
    printf("%d %g %g %g %g %d %d %s\\n", ret == out, out[0], out[1], out[2], out[3],
           eff_other_track_type(in, 0.6f), (int)(batch[4] == 0.0f), eff_other_manifest());
    return 0;
}
""")
    exe = tmp_path / "main"
    subprocess.run(["gcc", "-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic", f"-I{tmp_path}",
                    "-o", str(exe), str(prog), str(lib.path), f"-Wl,-rpath,{tmp_path}"],
                   check=True, capture_output=True)
    fields = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.split(" ", 7)
    assert fields[:7] == ["1", "0.5", "0.25", "0.125", "0.125", "3", "1"]
    assert json.loads(fields[7])["symbol"] == "eff_other"


def test_invalid_symbol_is_refused():
    with pytest.raises(ValueError, match="not a C identifier"):
        render_abi(Core(CORE, "test_core"), symbol="1eff", input_names=NAMES, manifest={})


def test_manifest_records_the_kind_and_the_core_functions(lib):
    m = lib.manifest()
    assert m["kind"] == "efficiency"
    assert m["functions"]["row"] == "test_core" and m["functions"]["network"] is None
    assert m["functions"]["batch"] in (None, "test_core_batch")


# ---- library hygiene (issue 12) ---------------------------------------------------------

# A core whose every output is a fixed, valid distribution: two libraries with the same
# symbol but different constants tell which one answered.
def _constant_core(p):
    body = "".join(f"    out[{k}] = {v!r}f;\n" for k, v in enumerate(p))
    return Core(f"static void const_core(float *out, const float *in)\n{{\n    (void)in;\n{body}}}\n",
                "const_core")


def _build(core, directory, symbol, cflags=PEDANTIC):
    from effgen.codegen.native import Library, compile_shared

    directory.mkdir(parents=True, exist_ok=True)
    src, _ = render_abi(core, symbol=symbol, input_names=NAMES, manifest={"backend": "test"})
    (directory / f"{symbol}.c").write_text(src)
    return Library(compile_shared(directory / f"{symbol}.c", directory / f"lib{symbol}.so",
                                  cflags=cflags), symbol)


def test_internal_calls_ignore_an_interposing_library(tmp_path):
    """Another library exporting the same names, loaded first with RTLD_GLOBAL (as
    LD_PRELOAD would), must not answer this library's batch and track_type calls."""
    import ctypes

    other = _build(_constant_core([0.0, 1.0, 0.0, 0.0]), tmp_path / "other", "interposed")
    ctypes.CDLL(str(other.path), mode=ctypes.RTLD_GLOBAL)
    this = _build(_constant_core([1.0, 0.0, 0.0, 0.0]), tmp_path / "this", "interposed")
    x = np.zeros((5, 12), np.float32)
    x[1, 0] = np.inf  # a row that the batch redoes one by one
    expected = np.tile(np.float32([1, 0, 0, 0]), (5, 1))
    np.testing.assert_array_equal(this.per_call(x), expected)
    np.testing.assert_array_equal(this.batch(x), expected)
    # r = 0.5: track type 0 from this model, 3 (long) from the other one
    assert list(this.track_type(x, 0.5)) == [0] * 5
    assert list(other.track_type(x, 0.5)) == [3] * 5


@pytest.mark.parametrize("flag", ["-ffast-math", "-Ofast", "-ffinite-math-only", "-funsafe-math-optimizations",
                                  "-fassociative-math -fno-trapping-math -fno-signed-zeros", "-freciprocal-math"])
def test_flags_that_break_the_guarantees_are_refused(tmp_path, flag):
    from effgen.errors import CompileError

    with pytest.raises(CompileError, match="#error.*effgen: built with"):
        _build(_constant_core([1.0, 0.0, 0.0, 0.0]), tmp_path, "eff_fm",
               cflags=PEDANTIC + tuple(flag.split()))


@pytest.mark.parametrize("flag", ["-fno-math-errno", "-fno-trapping-math", "-fno-signed-zeros"])
def test_harmless_math_flags_still_build(tmp_path, flag):
    lib = _build(_constant_core([1.0, 0.0, 0.0, 0.0]), tmp_path, "eff_ok", cflags=PEDANTIC + (flag,))
    assert list(lib.track_type(np.zeros((1, 12), np.float32), 0.5)) == [0]


@pytest.mark.parametrize("symbol, rule", [
    ("efficiency\n", "not a C identifier"), ("eff-1", "not a C identifier"),
    ("1eff", "not a C identifier"), ("", "empty"), ("x" * 65, "at most 64"),
    ("x" * 5000, "at most 64"), ("_start", "starts with '_'"), ("__libc_start_main", "starts with '_'"),
    ("int", "C keyword"), ("restrict", "C keyword"), ("_Bool", "starts with '_'"),
    ("system", "C library"), ("main", "C library"), ("exp", "C library"), ("expf", "C library"),
    ("tanhf", "C library"), ("malloc", "C library"), ("effgen_x", "effgen's prefix"),
    ("EFFGEN_X", "effgen's prefix"),
])
def test_bad_symbols_are_refused_naming_the_rule(symbol, rule):
    from effgen.codegen.symbols import check_symbol
    from effgen.errors import ConfigError

    with pytest.raises(ConfigError, match=rule):
        check_symbol(symbol)
    with pytest.raises(ConfigError, match=rule):
        render_abi(Core(CORE, "test_core"), symbol=symbol, input_names=NAMES, manifest={})


@pytest.mark.parametrize("symbol", ["efficiency", "eff2", "x" * 64, "Efficiency_v2", "acceptance"])
def test_good_symbols_pass(symbol):
    from effgen.codegen.symbols import check_symbol

    assert check_symbol(symbol) == symbol


def test_export_refuses_a_bad_symbol_before_loading_anything(tmp_path):
    """`effgen export --symbol` prints one line naming the rule (no model or pickle
    exists: the symbol is checked first)."""
    import sys

    res = subprocess.run([sys.executable, "-m", "effgen", "export", "--model", str(tmp_path / "none.keras"),
                          "--preprocessing", str(tmp_path / "none.pkl"), "--output-dir", str(tmp_path),
                          "--symbol", "system"], capture_output=True, text=True)
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [
        "effgen export: symbol 'system': a C library / libm name; the library would export it "
        "to Lamarr's whole process"]
    assert list(tmp_path.iterdir()) == []


def test_track_type_outside_the_unit_interval_is_as_documented(lib, tmp_path):
    """The header's promise: r < 0 gives 0, r >= 1 or NaN gives 5."""
    p = np.float32([[0.2, 0.3, 0.1, 0.4], [0.0, 0.5, 0.5, 0.0], [1.0, 0.0, 0.0, 0.0]])
    x = rows_for_probabilities(p)
    for r, expected in ((-0.1, 0), (-np.inf, 0), (1.0, 5), (2.0, 5), (np.inf, 5), (np.nan, 5)):
        assert list(lib.track_type(x, r)) == [expected] * 3, r
    header = (lib.path.parent / "eff2.h").read_text()
    assert "r < 0 gives 0; r >= 1 or a NaN r gives 5" in header
