"""`effgen describe` of a multi-symbol library (`effgen export --spec --compile`): every
symbol with its kind, inputs, outputs, n_random and hashes, and its parity check against
Keras + scikit-learn when its files are named (--spec, --model ...) or found beside the
library with the manifest's sha256. The models are small random-weight networks in the
production topologies (tests/test_kinds.py), with production_models' fitted tX / tY."""

import json
import pickle
import shutil

import pytest

pytest.importorskip("keras")

from support import SMALL_N_RANDOM as N_RANDOM
from support import small_model_dirs, tracking_entries, write_spec

from effgen import cli
from effgen.checks import production_models as pm
from effgen.checks.describe import describe
from effgen.errors import ConfigError
from effgen.provenance import sha256_of

NAMES = ("acceptance", "efficiency", "resolution", "covariance")
ROWS = 2000


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """models/<name>/{model.keras, tX.pkl[, tY.pkl]} (random weights), models/tracking.toml
    and lib/tracking.so built from it through the CLI."""
    models = small_model_dirs(tmp_path_factory.mktemp("describe_models"), NAMES, n_fit=3000)
    spec = write_spec(models / "tracking.toml", tracking_entries(NAMES))
    out = tmp_path_factory.mktemp("describe_lib") / "lib"
    assert cli.main(["export", "--spec", str(spec), "--output-dir", str(out), "--compile"]) == 0
    return {"models": models, "spec": spec, "so": out / "tracking.so"}


def _check_listing(info, text, models):
    assert info["abi_problems"] == [] and "abi       OK" in text
    assert set(info["symbols"]) == set(NAMES)
    for name in NAMES:
        s = info["symbols"][name]
        m = s["manifest"]
        assert s["kind"] == {"acceptance": "sigmoid", "efficiency": "efficiency"}.get(name, "generator")
        assert m["inputs"] == pm.feature_names(name) and m["outputs"] == pm.output_names(name)
        assert s["n_random"] == (N_RANDOM if pm.n_random(name) else 0)
        assert m["model_sha256"] == sha256_of(models / name / "model.keras")
        assert m["preprocessing_sha256"] == sha256_of(models / name / "tX.pkl")
        assert f"symbol    {name}: {s['kind']}" in text
        assert f"outputs   {len(pm.output_names(name))}: {', '.join(pm.output_names(name))}" in text
        if pm.n_random(name):
            assert m["postprocessing_sha256"] == sha256_of(models / name / "tY.pkl")


def _check_parity(info, names=NAMES):
    for name in names:
        s = info["symbols"][name]
        if s["kind"] == "efficiency":
            assert max(s["max_abs_diff"].values()) <= 1e-5
        else:
            assert s["parity"]["passed"], s["parity"]["failures"]
            assert s["parity"]["rows"] == ROWS


def test_every_symbol_with_its_files_from_the_spec(built, capsys):
    info = describe(built["so"], spec=built["spec"], n_rows=ROWS)
    text = capsys.readouterr().out
    _check_listing(info, text, built["models"])
    _check_parity(info)
    assert "draws:" in text and "max |C - ref| / spread" in text and "max |C - TensorFlow|" in text
    assert "skipped" not in text


def test_files_found_beside_the_library_only_with_the_manifests_hash(built, tmp_path, capsys):
    lib = tmp_path / "lib"
    lib.mkdir()
    shutil.copy(built["so"], lib / "tracking.so")
    for name in NAMES:
        shutil.copytree(built["models"] / name, lib / name)
    # covariance's tY replaced by one fitted on other rows: not the library's, so not used
    with pm._as_lhcb_module():
        (lib / "covariance" / "tY.pkl").write_bytes(pickle.dumps(pm.fit_tY("covariance", n=3000, seed=7)))
    info = describe(lib / "tracking.so", n_rows=ROWS)
    text = capsys.readouterr().out
    _check_parity(info, ("acceptance", "efficiency", "resolution"))
    assert info["symbols"]["resolution"]["files"]["postprocessing"] == str(lib / "resolution" / "tY.pkl")
    assert "parity" not in info["symbols"]["covariance"] and info["symbols"]["covariance"]["files"] == {}
    assert "no postprocessing file 'tY.pkl' with the manifest's sha256" in text


def test_a_named_model_goes_to_the_symbol_built_from_it(built, capsys):
    d = built["models"] / "resolution"
    info = describe(built["so"], model_path=d / "model.keras", preprocessing_path=d / "tX.pkl",
                    postprocessing_path=d / "tY.pkl", n_rows=ROWS)
    capsys.readouterr()
    _check_parity(info, ("resolution",))
    assert all("parity" not in info["symbols"][n] for n in ("acceptance", "covariance"))
    with pytest.raises(ConfigError, match="--symbol"):
        describe(built["so"], model_path=built["spec"], preprocessing_path=d / "tX.pkl")


def test_a_wrong_output_transform_named_fails_the_check(built, tmp_path, capsys):
    """The check is real: resolution's library against a tY fitted on other rows."""
    other = tmp_path / "tY.pkl"
    with pm._as_lhcb_module():
        other.write_bytes(pickle.dumps(pm.fit_tY("resolution", n=3000, seed=7)))
    d = built["models"] / "resolution"
    info = describe(built["so"], model_path=d / "model.keras", preprocessing_path=d / "tX.pkl",
                    postprocessing_path=other, symbol="resolution", n_rows=ROWS)
    text = capsys.readouterr().out
    assert not info["symbols"]["resolution"]["parity"]["passed"]
    assert "WARNING: the library was not built from these postprocessing" in text and "FAILED" in text


def test_describe_cli_lists_every_symbol(built, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EFFGEN_WORKDIR", str(tmp_path / "work"))
    assert cli.main(["describe", str(built["so"]), "--spec", str(built["spec"])]) == 0
    text = capsys.readouterr().out
    for name in NAMES:
        assert f"symbol    {name}:" in text
    manifest = json.loads((built["so"].parent / "covariance.json").read_text())
    assert manifest["postprocessing_file"] == "tY.pkl" and manifest["model_file"] == "model.keras"
    assert cli.main(["describe", str(built["so"]), "--symbol", "exit"]) == 1
    assert capsys.readouterr().err.startswith("effgen describe: symbol 'exit'")
