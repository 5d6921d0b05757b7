"""Model kinds beyond the efficiency softmax: the sigmoid classifier (acceptance) and the
generator f(out, in, rnd) (resolution, covariance), read from the model, exported alone
or several into one library (`effgen export --spec --compile`), checked against Keras +
scikit-learn run here on the same rows and noise. Every model is random-weight: small
widths in the production topologies, with the tX / tY of
effgen.checks.production_models (covariance tY: StandardScaler -> DecorrTransformer ->
QuantileTransformer, pickled under LHCb's module name)."""

import json
import pickle

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from support import SMALL_N_RANDOM as N_RANDOM
from support import small_model, small_model_dirs, tracking_entries, write_spec

from effgen import cli
from effgen.checks import production_models as pm
from effgen.checks.parity_kinds import (
    SymbolLibrary,
    acceptance_args,
    check_symbol,
    python_category,
    run_spec_parity,
)
from effgen.codegen.graph import UnsupportedModelError, evaluate, read_chain
from effgen.codegen.kinds import EFFICIENCY, GENERATOR, SIGMOID, kind_of
from effgen.errors import ConfigError, EffgenError, ExportError
from effgen.provenance import sha256_of


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """DIR/<name>/{model.keras, tX.pkl[, tY.pkl]}: production_models' fitted transforms,
    small random-weight networks."""
    return small_model_dirs(tmp_path_factory.mktemp("kinds_models"), pm.TOPOLOGIES, n_fit=4000)


# ---- graph: two inputs, both residual spellings, production sizes ----------------------

@pytest.mark.parametrize("name", sorted(pm.TOPOLOGIES))
def test_production_topologies_read_as_chains_that_evaluate_like_keras(name, tmp_path):
    """Full production widths and depths (random weights), saved and reloaded: the walk
    sees every residual, `x + x_` included (a dropped one would change the values)."""
    model = pm.build_model(name)
    model.save(tmp_path / "m.keras")
    model = keras.models.load_model(tmp_path / "m.keras", compile=False)
    n_features = len(pm.feature_names(name))
    chain = read_chain(model, n_features=n_features)
    blocks = pm.TOPOLOGIES[name][2]
    assert sum(type(op).__name__ == "Residual" for op in chain.ops) == blocks
    assert chain.n_random == pm.n_random(name)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, n_features)).astype(np.float32)
    inputs = [x]
    if chain.n_random:
        inputs.append(rng.normal(size=(500, chain.n_random)).astype(np.float32))
    want = model.predict(inputs if len(inputs) > 1 else x, verbose=0)
    np.testing.assert_allclose(evaluate(chain, np.hstack(inputs)), want, atol=2e-5)
    assert kind_of(chain).name == {"acceptance": "sigmoid", "efficiency": "efficiency"}.get(name, "generator")


@pytest.mark.parametrize("blocks", [1, 12])
def test_one_to_twelve_plus_residual_blocks(blocks):
    chain = read_chain(small_model("resolution", blocks=blocks), n_features=12)
    assert [type(op).__name__ for op in chain.ops] == ["Dense"] + ["Residual"] * blocks + ["Dense"]
    assert chain.n_features == 12 and chain.n_random == N_RANDOM


def test_features_told_from_noise_by_the_width_of_tX():
    """A model listing its inputs as [noise, features] but concatenating features first is
    fine: the features input is the one as wide as tX's output."""
    f = keras.layers.Input((12,), name="features")
    z = keras.layers.Input((N_RANDOM,), name="noise")
    out = keras.layers.Dense(3)(keras.layers.Concatenate()([f, z]))
    chain = read_chain(keras.Model([z, f], out), n_features=12)
    assert (chain.n_features, chain.n_random) == (12, N_RANDOM)


def test_noise_first_is_refused_by_name():
    with pytest.raises(UnsupportedModelError, match="'join' \\(Concatenate\\).*noise 'noise' before "
                                                    "the features 'features'"):
        read_chain(small_model("resolution", noise_first=True), n_features=12)


def test_concatenate_of_a_layer_output_is_refused_by_name():
    f = keras.layers.Input((12,), name="features")
    z = keras.layers.Input((4,), name="noise")
    h = keras.layers.Dense(4, name="pre")(f)
    out = keras.layers.Dense(3)(keras.layers.Concatenate(name="cat")([h, z]))
    with pytest.raises(UnsupportedModelError, match="'cat' \\(Concatenate\\)"):
        read_chain(keras.Model([f, z], out), n_features=12)


def test_unsupported_activation_in_a_generator_is_refused_by_name():
    with pytest.raises(UnsupportedModelError, match="'out' \\(Dense\\).*'softplus'"):
        read_chain(small_model("resolution", last_activation="softplus"), n_features=12)


def test_kinds_read_from_the_model():
    assert kind_of(read_chain(small_model("acceptance"))) is SIGMOID
    assert kind_of(read_chain(small_model("efficiency"))) is EFFICIENCY
    assert kind_of(read_chain(small_model("covariance"), n_features=15)) is GENERATOR
    inp = keras.layers.Input((12,))
    three = keras.Model(inp, keras.layers.Dense(3, activation="sigmoid", name="three")(inp))
    with pytest.raises(UnsupportedModelError, match="'three' is Dense\\(3, sigmoid\\)"):
        kind_of(read_chain(three))
    tanh = small_model("acceptance", last_activation="tanh")
    with pytest.raises(UnsupportedModelError, match="'out' is Dense\\(1, tanh\\)"):
        kind_of(read_chain(tanh))


# ---- one library, every kind -------------------------------------------------------------

@pytest.fixture(scope="module")
def library(models, tmp_path_factory):
    """`effgen export --spec tracking.toml --compile`, through the CLI."""
    spec = write_spec(models / "tracking.toml", tracking_entries())
    out = tmp_path_factory.mktemp("kinds_lib") / "lib"
    assert cli.main(["export", "--spec", str(spec), "--output-dir", str(out), "--compile"]) == 0
    return {"spec": spec, "out": out, "so": out / "tracking.so"}


def test_spec_exports_every_kind_into_one_library(library):
    from effgen.codegen.native import exported_symbols

    out = library["out"]
    assert exported_symbols(library["so"]) == sorted(
        ["acceptance", "acceptance_batch", "acceptance_draw", "acceptance_manifest",
         "efficiency", "efficiency_batch", "efficiency_track_type", "efficiency_manifest",
         "resolution", "resolution_batch", "resolution_manifest",
         "covariance", "covariance_batch", "covariance_manifest"])
    header = (out / "tracking.h").read_text()
    assert "float *resolution(float *out, const float *in, const float *rnd);" in header
    assert "float *acceptance(float *out, const float *in);" in header
    for name in pm.TOPOLOGIES:
        manifest = json.loads((out / f"{name}.json").read_text())
        assert manifest["inputs"] == pm.feature_names(name)
        assert manifest["outputs"] == pm.output_names(name)
        assert f'#include "{name}.h"' in header
        if pm.n_random(name):
            assert manifest["kind"] == "generator" and manifest["n_random"] == N_RANDOM
            assert manifest["postprocessing_sha256"] == sha256_of(library["spec"].parent / name / "tY.pkl")
            assert f"{name.upper()}_N_RANDOM {N_RANDOM}" in (out / f"{name}.h").read_text()
    # The library's own manifest says the same (read through each symbol).
    lib = SymbolLibrary(library["so"], "covariance")
    assert lib.manifest["n_random"] == N_RANDOM and "Decorr" in lib.manifest["postprocessing"]


def test_spec_library_matches_keras_and_sklearn(library):
    report = run_spec_parity(library["spec"], library["so"], rows=3000, per_row_rows=500)
    assert report["passed"], report["failures"]
    assert set(report["symbols"]) == set(pm.TOPOLOGIES)
    assert report["symbols"]["acceptance"]["draws"]["n"] == 500


def test_parity_catches_a_wrong_output_transform(library, models, tmp_path):
    """The check has teeth: the same library compared with another tY fails."""
    ty = pm.fit_tY("resolution", n=4000, seed=7)
    ct = pickle.loads((models / "resolution" / "tX.pkl").read_bytes())
    model = keras.models.load_model(models / "resolution" / "model.keras", compile=False)
    res = check_symbol(SymbolLibrary(library["so"], "resolution"), model, ct, ty, 2000, 1, 100)
    assert not res["passed"]


def test_generator_nan_and_inf(library):
    lib = SymbolLibrary(library["so"], "resolution")
    x = np.tile(pm.features("resolution", 1), (3, 1))
    rnd = np.zeros((3, N_RANDOM), np.float32)
    x[1, 2] = np.inf
    rnd[2, 0] = np.nan
    out = lib.per_row(x, rnd)
    assert np.isfinite(out[:2]).all() and np.isnan(out[2]).all()
    clamped = x[1:2].copy()
    clamped[0, 2] = np.finfo(np.float32).max
    np.testing.assert_array_equal(out[1], lib.per_row(clamped, rnd[1:2])[0])
    np.testing.assert_array_equal(lib.batch(x, rnd), out)


def test_acceptance_nan_input_is_zero_and_draw_is_random_category(library):
    lib = SymbolLibrary(library["so"], "acceptance")
    x = pm.features("acceptance", 400, seed=3)
    x[0, 3] = np.nan
    p = lib.per_row(x)
    assert p[0, 0] == 0.0 and ((p >= 0) & (p <= 1)).all()
    r = np.random.default_rng(5).random(400, dtype=np.float32)
    r[:3] = [np.float32(1) - p[5, 0], 0.999999, np.nan]
    np.testing.assert_array_equal(lib.draw(x, r), python_category(acceptance_args(p), r))


# ---- refusals: by name, nothing written --------------------------------------------------

def _refused(models, tmp_path, entries, match, error=EffgenError):
    spec = write_spec(models / f"bad_{tmp_path.name}.toml", entries)
    out = tmp_path / "out"
    with pytest.raises(error, match=match):
        from effgen.codegen.spec import export_spec

        export_spec(spec, out, compile=True)
    assert not out.exists() or not any(out.iterdir())


def test_noise_width_disagreeing_with_the_model_is_refused(models, tmp_path):
    entries = tracking_entries(("acceptance", "resolution"))
    entries[1]["n_random"] = 128
    _refused(models, tmp_path, entries, "'resolution'.*noise input is 8 wide, not the n_random = 128",
             ExportError)


def test_noise_first_model_in_a_spec_is_refused(models, tmp_path):
    small_model("resolution", noise_first=True).save(models / "noise_first.keras")
    entries = tracking_entries(("acceptance", "resolution"))
    entries[1]["model"] = "noise_first.keras"
    _refused(models, tmp_path, entries, "noise_first.keras.*'join' \\(Concatenate\\).*noise")


def test_output_transform_without_inverse_is_refused(models, tmp_path):
    from sklearn.preprocessing import MinMaxScaler

    with open(models / "minmax.pkl", "wb") as f:
        pickle.dump(MinMaxScaler().fit(pm.targets("resolution", 500)), f)
    entries = tracking_entries(("resolution",))
    entries[0]["postprocessing"] = "minmax.pkl"
    _refused(models, tmp_path, entries, "MinMaxScaler")


def test_spec_mistakes_are_refused_by_name(models, tmp_path):
    entries = tracking_entries(("acceptance",))
    _refused(models, tmp_path / "a", [dict(entries[0], colour="red")], "unknown key.*'colour'", ConfigError)
    _refused(models, tmp_path / "b", entries + entries, "symbol 'acceptance' already exported", ConfigError)
    clash = dict(entries[0], symbol="acceptance_batch")
    _refused(models, tmp_path / "c", entries + [clash], "would both export 'acceptance_batch'", ConfigError)
    missing = dict(entries[0], model="nowhere.keras")
    _refused(models, tmp_path / "d", [missing], "'acceptance'.*nowhere.keras")
    _refused(models, tmp_path / "e", [{"symbol": "x", "model": "m"}], "missing preprocessing", ConfigError)


def test_export_cli_refuses_spec_with_model_flags_in_one_line(models, tmp_path, capsys):
    spec = write_spec(models / "one.toml", tracking_entries(("acceptance",)))
    rc = cli.main(["export", "--spec", str(spec), "--model", str(models / "acceptance/model.keras"),
                   "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "--model" in err[0]
    assert not (tmp_path / "o").exists()


def test_single_generator_export_cli(models, tmp_path, capsys):
    """`effgen export --model --preprocessing --postprocessing --symbol`: the kind comes
    from the model; a tY on a classifier is refused."""
    d = models / "resolution"
    rc = cli.main(["export", "--model", str(d / "model.keras"), "--preprocessing", str(d / "tX.pkl"),
                   "--postprocessing", str(d / "tY.pkl"), "--symbol", "smear",
                   "--output-dir", str(tmp_path / "gen")])
    assert rc == 0
    manifest = json.loads((tmp_path / "gen" / "smear.json").read_text())
    assert manifest["kind"] == "generator" and manifest["symbol"] == "smear"
    assert manifest["signature"] == "float *f(float *out, const float *in, const float *rnd)"
    a = models / "acceptance"
    rc = cli.main(["export", "--model", str(a / "model.keras"), "--preprocessing", str(a / "tX.pkl"),
                   "--postprocessing", str(d / "tY.pkl"), "--symbol", "acc",
                   "--output-dir", str(tmp_path / "acc")])
    assert rc == 1 and "an output transform is for generators" in capsys.readouterr().err
    assert not (tmp_path / "acc").exists()


def test_parity_spec_cli(library, tmp_path, capsys):
    rc = cli.main(["parity", "--spec", str(library["spec"]), "--library", str(library["so"]),
                   "--rows", "600", "--per-row-rows", "50", "--output-dir", str(tmp_path / "p")])
    assert rc == 0, capsys.readouterr()
    report = json.loads((tmp_path / "p" / "report.json").read_text())
    assert report["passed"] and report["symbols"]["covariance"]["n_random"] == N_RANDOM


def test_failed_compile_writes_nothing(models, tmp_path):
    from effgen.codegen.spec import export_spec
    from effgen.errors import CompileError

    spec = write_spec(models / "compile.toml", tracking_entries(("acceptance",)))
    with pytest.raises(CompileError, match="tracking.so|compile.so"):
        export_spec(spec, tmp_path / "out", compile=True, cc="false")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


DRIVER = r"""
#include <stdio.h>
#include "tracking.h"
/* Every symbol, one call per row and in batch (n not a multiple of any chunk or tile),
 * under ASan/UBSan; the two must agree bit for bit. */
int main(void)
{
    enum { N = 77, R = %(n_random)d };
    static float acc_in[N * 12], res_in[N * 12], cov_in[N * 15], rnd[N * R];
    static float a[N], e[N * 4], res[N * 9], cov[N * 15], one[15];
    int i, k, bad = 0;
    for (i = 0; i < N * 12; ++i) acc_in[i] = res_in[i] = (float)((i * 37) %% 11) * 0.1f - 0.5f;
    for (i = 0; i < N * 15; ++i) cov_in[i] = (float)((i * 29) %% 13) * 0.1f - 0.6f;
    for (i = 0; i < N * R; ++i) rnd[i] = (float)((i * 13) %% 7) * 0.3f - 1.0f;
    acceptance_batch(a, acc_in, N);
    efficiency_batch(e, acc_in, N);
    resolution_batch(res, res_in, rnd, N);
    covariance_batch(cov, cov_in, rnd, N);
    for (i = 0; i < N; ++i) {
        bad += *acceptance(one, acc_in + i * 12) != a[i];
        bad += acceptance_draw(acc_in + i * 12, 0.5f) != (0.5f >= 1.0f - a[i]);
        efficiency(one, acc_in + i * 12);
        for (k = 0; k < 4; ++k) bad += one[k] != e[i * 4 + k];
        resolution(one, res_in + i * 12, rnd + i * R);
        for (k = 0; k < 9; ++k) bad += one[k] != res[i * 9 + k];
        covariance(one, cov_in + i * 15, rnd + i * R);
        for (k = 0; k < 15; ++k) bad += one[k] != cov[i * 15 + k];
    }
    printf("%%d\n", bad);
    return bad != 0;
}
"""


@pytest.mark.sanitizer
def test_every_kind_under_sanitizers(library, tmp_path):
    """The sources of the spec library, portable path (-DEFFGEN_NO_DISPATCH: an ifunc
    resolver runs before ASan's runtime in an executable), built with ASan/UBSan into a
    C driver that calls every entry point."""
    import subprocess

    out = library["out"]
    (tmp_path / "driver.c").write_text(DRIVER % {"n_random": N_RANDOM})
    exe = tmp_path / "driver"
    sources = [str(out / f"{name}.c") for name in pm.TOPOLOGIES]
    subprocess.run(["gcc", "-std=c99", "-O1", "-g", "-DEFFGEN_NO_DISPATCH", "-I", str(out),
                    "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
                    "-Wall", "-Wextra", "-Werror", *sources, str(tmp_path / "driver.c"),
                    "-o", str(exe), "-lm"], check=True, capture_output=True)
    proc = subprocess.run([str(exe)], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "0", proc.stdout + proc.stderr


def _acceptance_with_history(models, tmp_path, features, labels=("acceptance",)):
    """The random-weight acceptance model copied with a history.json as `effgen train
    --target acceptance` writes it (features, labels, both sha256)."""
    import shutil

    d = tmp_path / "acceptance"
    shutil.copytree(models / "acceptance", d)
    (d / "history.json").write_text(json.dumps({
        "features": list(features), "labels": list(labels),
        "model_sha256": sha256_of(d / "model.keras"), "preprocessing_sha256": sha256_of(d / "tX.pkl")}))
    return d


@pytest.mark.parametrize("symbol", ["acceptance", "acc"])
def test_sigmoid_export_checks_the_trained_feature_order(models, tmp_path, symbol):
    """A sigmoid model's history.json gets the efficiency's contract check: features in
    the ABI's order (also for a symbol effgen has no input names for), one label."""
    from effgen.codegen.export import export
    from effgen.errors import ProvenanceError
    from effgen.schema import FEATURES

    good = _acceptance_with_history(models, tmp_path / "good", FEATURES)
    paths = export(good / "model.keras", good / "tX.pkl", tmp_path / "out_good", symbol=symbol)
    manifest = json.loads(paths["manifest"].read_text())
    assert manifest["kind"] == "sigmoid" and manifest["trained_with_this_preprocessing"] == "checked"
    swapped = list(FEATURES)
    swapped[2], swapped[3] = swapped[3], swapped[2]
    bad = _acceptance_with_history(models, tmp_path / "swapped", swapped)
    with pytest.raises(ProvenanceError, match=r"features in another order.*history.json.*position 2: "
                                              rf"trained on '{FEATURES[3]}', expected '{FEATURES[2]}'"):
        export(bad / "model.keras", bad / "tX.pkl", tmp_path / "out_bad", symbol=symbol)
    two = _acceptance_with_history(models, tmp_path / "two", FEATURES, labels=("acceptance", "other"))
    with pytest.raises(ProvenanceError, match="outputs .*2 trained vs 1 expected"):
        export(two / "model.keras", two / "tX.pkl", tmp_path / "out_two", symbol=symbol)
    assert not (tmp_path / "out_bad").exists() and not (tmp_path / "out_two").exists()
