"""Trust and safety: no pickle runs code at any place that loads one, a recorded
provenance is checked before unpickling, a model is refused for the contract it was
trained on, train locks its output and keeps resumable runs, lamarr keeps the user's
database."""

import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from support import build_abi_library, fit_preprocessing, raw_features, seed_like_model

from effgen import cli, schema
from effgen.codegen.export import export
from effgen.codegen.native import Library, compile_shared
from effgen.errors import ProvenanceError
from effgen.provenance import load_preprocessing, sha256_of
from effgen.safe_pickle import DecorrTransformer, UnsafePickleError
from effgen.training.train import checkpoint_dir

REPO = Path(__file__).resolve().parents[1]


class Payload:
    """A pickle whose loading runs a shell command (creating `marker`)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A seed-like model with random weights and its (real) preprocessing, no history."""
    d = tmp_path_factory.mktemp("model")
    seed_like_model(width=16, blocks=1).save(d / "model.keras")
    with open(d / "tX.pkl", "wb") as f:
        pickle.dump(fit_preprocessing(n=5000), f)
    return d


@pytest.fixture
def evil(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(Payload(marker)))
    return path, marker


def _run(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    return rc, err


def _library(tmp_path):
    lib = build_abi_library(tmp_path, symbol="efficiency")
    return Path(lib.path), tmp_path / "efficiency.h"


@pytest.mark.parametrize("stage", ["export", "describe", "validate", "parity", "bench"])
def test_a_payload_pickle_runs_nowhere(stage, evil, model_dir, tiny_dataset, tmp_path, capsys):
    path, marker = evil
    model = model_dir / "model.keras"
    if stage == "export":
        argv = ["export", "--model", model, "--preprocessing", path, "--output-dir", tmp_path / "o"]
    elif stage == "describe":
        lib, _ = _library(tmp_path)
        argv = ["describe", lib, "--model", model, "--preprocessing", path,
                "--validation", tiny_dataset["validation"]]
    elif stage == "validate":
        argv = ["validate", "--model", model, "--preprocessing", path,
                "--data", tiny_dataset["validation"], "--output-dir", tmp_path / "v"]
    elif stage == "parity":
        lib, header = _library(tmp_path)
        argv = ["parity", "--library", lib, "--header", header, "--model", model,
                "--preprocessing", path, "--data", tiny_dataset["validation"], "--rows", "100",
                "--variants", "", "--output-dir", tmp_path / "p"]
    else:
        argv = ["bench", "--quick", "--sections", "codegen", "--model", model,
                "--preprocessing", path, "--output-dir", tmp_path / "b"]
    rc, err = _run(capsys, *argv)
    assert not marker.exists(), "the pickle's payload ran"
    assert rc == 1
    assert err.startswith(f"effgen {stage}: ") and err.count("\n") == 1, err
    assert "posix.system" in err and str(path) in err


def test_a_recorded_preprocessing_is_checked_before_unpickling(evil, model_dir, tmp_path, monkeypatch):
    path, marker = evil
    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    (d / "history.json").write_text(json.dumps({
        "model_sha256": sha256_of(d / "model.keras"),
        "preprocessing_sha256": sha256_of(d / "tX.pkl")}))
    # Even a loader that would run the payload is never reached.
    monkeypatch.setattr("effgen.provenance.loads", pickle.loads)
    with pytest.raises(ProvenanceError, match="trained on features made by a preprocessing"):
        load_preprocessing(path, model_path=d / "model.keras")
    with pytest.raises(ProvenanceError):
        export(d / "model.keras", path, tmp_path / "out")
    assert not marker.exists()
    # The recorded one loads.
    assert load_preprocessing(d / "tX.pkl", model_path=d / "model.keras").n_features_in_ == 12


def test_a_preprocessing_nobody_named_is_not_unpickled(evil, model_dir, tiny_dataset, tmp_path,
                                                      monkeypatch, capsys):
    """validate and describe in a directory holding someone's build/model/tX.pkl."""
    path, marker = evil
    work = tmp_path / "cwd"
    (work / "build" / "model").mkdir(parents=True)
    shutil.copy(path, work / "build" / "model" / "tX.pkl")
    shutil.copy(model_dir / "model.keras", work / "build" / "model" / "model.keras")
    monkeypatch.chdir(work)
    monkeypatch.delenv("EFFGEN_WORKDIR", raising=False)
    monkeypatch.delenv("OUTPUT_PREPROCESSING", raising=False)
    monkeypatch.setattr("effgen.provenance.loads", pickle.loads)  # would run it if reached
    lib, _ = _library(tmp_path)
    rc = cli.main(["describe", str(lib)])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "parity    skipped" in out.out
    rc, err = _run(capsys, "validate", "--data", tiny_dataset["validation"])
    assert rc == 0, err
    assert not marker.exists()


def test_lhcb_decorr_transformer_is_read_as_the_local_equivalent(tmp_path):
    """A Pipeline(StandardScaler, preprocessing_utils.DecorrTransformer, QuantileTransformer)
    pickled by reference to LHCb's module loads without that module."""
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import QuantileTransformer, StandardScaler

    module = tmp_path / "preprocessing_utils.py"
    module.write_text(textwrap.dedent("""
        import numpy as np
        from sklearn.base import BaseEstimator, TransformerMixin

        class DecorrTransformer(BaseEstimator, TransformerMixin):
            def fit(self, X, y=None):
                self.cov = np.cov(X.T)
                _, self.eig = np.linalg.eig(self.cov)
                return self

            def transform(self, X):
                return X @ self.eig
    """))
    sys.path.insert(0, str(tmp_path))
    try:
        import preprocessing_utils

        x = raw_features(3000, 1)[:, :5].astype(np.float64)
        x[:, 1] += 0.5 * x[:, 0]
        pipe = Pipeline([("s", StandardScaler()), ("d", preprocessing_utils.DecorrTransformer()),
                         ("q", QuantileTransformer(n_quantiles=100))]).fit(x)
        blob = pickle.dumps(pipe)
        expected = pipe.transform(x)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("preprocessing_utils", None)
    from effgen.safe_pickle import loads

    loaded = loads(blob)
    assert isinstance(loaded.steps[1][1], DecorrTransformer)
    np.testing.assert_array_equal(loaded.transform(x), expected)


def test_the_allow_list_names_what_it_refuses():
    with pytest.raises(UnsafePickleError, match="builtins.eval"):
        from effgen.safe_pickle import loads

        loads(pickle.dumps(eval))


# ---- the contract the model was trained on -------------------------------------------

def _permuted_history(d, features):
    (d / "history.json").write_text(json.dumps({
        "model_sha256": sha256_of(d / "model.keras"),
        "preprocessing_sha256": sha256_of(d / "tX.pkl"),
        "features": features, "labels": list(schema.LABELS)}))


def test_a_model_trained_on_shards_in_another_order_is_refused_by_name(tiny_dataset, tmp_path):
    from effgen.training.train import train

    data = tmp_path / "data"
    for split in ("train", "validation"):
        shutil.copytree(tiny_dataset[split], data / split)
        defs = json.loads((data / split / "definitions.json").read_text())
        defs["features"] = defs["features"][::-1]  # the same 12 columns, another order
        (data / split / "definitions.json").write_text(json.dumps(defs))
    model = tmp_path / "model" / "model.keras"
    train(data / "train", data / "validation", model, batch_size=256, steps_per_epoch=2,
          max_epochs=1, pre_limit_s=30, ft_limit_s=30, width=8, blocks=1, verbose=0)
    with pytest.raises(ProvenanceError, match="position 0: trained on 'mc_charge', expected 'mc_x'"):
        export(model, tiny_dataset["preprocessing"], tmp_path / "out")


def test_describe_feeds_tensorflow_what_the_model_was_trained_on(model_dir, tmp_path, capsys):
    """A library built from a model (its history lost) whose history says it was trained
    on its features in another order: describe shows the disagreement."""
    from effgen.checks.describe import describe

    plain = tmp_path / "plain"
    shutil.copytree(model_dir, plain)
    paths = export(plain / "model.keras", plain / "tX.pkl", tmp_path / "lib")
    lib = compile_shared(paths["source"], tmp_path / "lib" / "efficiency.so")
    same = describe(lib, model_path=plain / "model.keras", preprocessing_path=plain / "tX.pkl",
                    n_rows=2000)
    assert max(same["max_abs_diff"].values()) < 1e-4

    permuted = tmp_path / "permuted"
    shutil.copytree(model_dir, permuted)
    _permuted_history(permuted, list(schema.FEATURES[::-1]))
    out = describe(lib, model_path=permuted / "model.keras",
                   preprocessing_path=permuted / "tX.pkl", n_rows=2000)
    assert max(out["max_abs_diff"].values()) > 1e-2
    assert "trained on its features in another order" in capsys.readouterr().out
    assert Library(lib).batch(raw_features(3, 0)).shape == (3, 4)


# ---- train: a lock per output, an interrupted run kept unless --restart ---------------

def _train_argv(tiny_dataset, out):
    return ["train", "--train-data", tiny_dataset["train"], "--validation-data",
            tiny_dataset["validation"], "--output", out, "--batch-size", "256",
            "--steps-per-epoch", "2", "--max-epochs", "1", "--width", "8", "--blocks", "1"]


def test_train_keeps_a_resumable_run_unless_told(tiny_dataset, tmp_path, capsys):
    out = tmp_path / "model.keras"
    run = checkpoint_dir(out)
    run.mkdir()
    (run / "state.json").write_text("{}")
    (run / "pretraining-last.keras").write_text("epochs of work")
    rc, err = _run(capsys, *_train_argv(tiny_dataset, out))
    assert rc == 1 and err.count("\n") == 1
    assert "--resume to continue it or --restart to discard it" in err
    assert (run / "pretraining-last.keras").read_text() == "epochs of work"
    rc, err = _run(capsys, *_train_argv(tiny_dataset, out), "--resume", "--restart")
    assert rc == 1 and "not allowed with" in err


def test_two_trains_on_one_output_the_second_fails_clearly(tiny_dataset, tmp_path, capsys):
    out = tmp_path / "model.keras"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from effgen.atomic import exclusive_lock
            with exclusive_lock({str(out.with_name('.model.keras.lock'))!r}, "x"):
                print("held", flush=True)
                time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        rc, err = _run(capsys, *_train_argv(tiny_dataset, out))
    finally:
        holder.kill()
        holder.wait()
    assert rc == 1 and err.count("\n") == 1
    assert f"{out} is in use by another run (pid {holder.pid}" in err
    assert not checkpoint_dir(out).exists()


# ---- lamarr --db -----------------------------------------------------------------------

def test_lamarr_keeps_an_existing_database_and_checks_the_symbol_first(tmp_path, capsys):
    lib, _ = _library(tmp_path)
    keep = tmp_path / "keep.db"
    keep.write_text("the user's data")
    sample = tmp_path / "sample.feather"
    sample.write_text("not read before the checks")
    rc, err = _run(capsys, "lamarr", "--library", lib, "--db", keep, "--sample", sample)
    assert rc == 1 and "keep.db exists: pass --force to replace it" in err
    rc, err = _run(capsys, "lamarr", "--library", lib, "--db", keep, "--sample", sample,
                   "--symbol", "efficency", "--force")
    assert rc == 1 and "does not export 'efficency'" in err and err.count("\n") == 1
    assert keep.read_text() == "the user's data"
