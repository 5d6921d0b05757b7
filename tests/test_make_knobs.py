"""The Makefile's knobs without running the main job: defaults from effgen/config.py's
table, every knob passed explicitly, refused paths, the library build stamped with every
flag and the compiler, and a manifest that stays JSON for any flags. Fast: no TensorFlow,
the library built is a hand-written ABI core."""

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from effgen import config
from effgen.checks import parity
from effgen.codegen import native
from effgen.codegen.abi import render_abi
from effgen.codegen.backends import Core
from effgen.codegen.native import Library

pytestmark = pytest.mark.make

REPO = Path(__file__).resolve().parents[1]


def _env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS") and k not in config.KNOBS}
    env.update(extra)
    return env


def _make(*args, env=None, cwd=REPO):
    return subprocess.run(["make", "-f", str(REPO / "Makefile"), "--no-print-directory", *args],
                          cwd=cwd, capture_output=True, text=True, env=env or _env())


def _print(var, *args, env=None):
    proc = _make("-s", f"print-{var}", *args, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_defaults_mk_is_generated_from_the_table():
    assert (REPO / "defaults.mk").read_text() == config.make_include()


def test_make_sees_the_table_defaults_and_the_environment_and_the_command_line():
    for name, knob in config.KNOBS.items():
        if knob.type in ("int", "float", "str") and name != "CC":
            default = config.table_default(name)  # None: the recipe's, empty in make
            assert _print(knob.make or name) == ("" if default is None else str(default).removesuffix(".0"))
    # Precedence: command line > environment > table.
    assert _print("BATCH_SIZE", env=_env(BATCH_SIZE="123")) == "123"
    assert _print("BATCH_SIZE", "BATCH_SIZE=7", env=_env(BATCH_SIZE="123")) == "7"


def test_library_flags_of_make_parity_and_bench_agree():
    make_flags = _print("CFLAGS_LIB").split()
    assert make_flags == config.library_cflags()  # ARCH_FLAGS empty
    assert "-Wl,-z,relro,-z,now" in make_flags
    # bench compiles with native's defaults; parity's production build with the same
    # compile flags (less -Werror: it reports on C that warns) and link flags (-shared is
    # the extension builder's).
    assert list(native.DEFAULT_CFLAGS) == make_flags
    production = parity.VARIANTS["production"]
    assert production["cflags"] + ["-shared"] + production["ldflags"] == \
        [f for f in make_flags if f != "-Werror"]


def test_make_passes_every_knob_to_every_stage(tmp_path):
    work = tmp_path / "w"
    knobs = ["N_PARTICLES=1234", "SEED=77", "RECIPE=seed", "BATCH_SIZE=99", "STEPS_PER_EPOCH=5", "MAX_EPOCHS=3",
             "PRE_TRAINING_TIME_LIMIT_SECONDS=11", "FINE_TUNING_TIME_LIMIT_SECONDS=22",
             "ACCEPTANCE_TIME_LIMIT_SECONDS=33"]
    proc = _make("-n", "lamarr-lib", f"W={work}", *knobs)
    assert proc.returncode == 0, proc.stderr
    all_lines = proc.stdout.replace("\\\n", " ").splitlines()
    # The acceptance model and tracking.so have their own lines (checked below).
    tracking = [line for line in all_lines if "--target acceptance" in line or "--spec" in line]
    lines = {stage: line for line in all_lines if line not in tracking
             for stage in ("synth", "preprocess", "train", "validate", "export", "describe")
             if f"effgen {stage}" in line}
    acceptance = " ".join(next(line for line in tracking if "--target acceptance" in line).split())
    for flag in ("--batch-size 99", "--steps-per-epoch 5", "--max-epochs 3", "--pre-limit 11",
                 "--ft-limit 33", "--seed 77", "--recipe seed", f"--output {work}/acceptance/model.keras",
                 f"--train-data {work}/data/train", f"--validation-data {work}/data/validation",
                 f"--test-data {work}/data/test"):
        assert flag in acceptance, acceptance
    assert "--ft-limit 22" not in acceptance
    spec = " ".join(next(line for line in tracking if "--spec" in line).split())
    assert f"--spec {work}/lamarr/tracking/tracking.toml --output-dir {work}/lamarr/tracking --compile" in spec
    assert "--backend effgen --cc gcc" in spec
    assert "--n 1234" in lines["synth"] and "--seed 77" in lines["synth"]
    assert "--seed 77" in lines["preprocess"]
    train = " ".join(lines["train"].split())
    for flag in ("--batch-size 99", "--steps-per-epoch 5", "--max-epochs 3", "--pre-limit 11",
                 "--ft-limit 22", "--seed 77", "--recipe seed", f"--output {work}/model/model.keras",
                 f"--train-data {work}/data/train", f"--validation-data {work}/data/validation"):
        assert flag in train, train
    for stage in ("validate", "export", "describe"):
        assert f"--model {work}/model/model.keras" in lines[stage]
        assert f"--preprocessing {work}/model/tX.pkl" in lines[stage]


def _train_lines(*args):
    proc = _make("-n", "lamarr-lib", *args)
    assert proc.returncode == 0, proc.stderr
    return [" ".join(line.split()) for line in proc.stdout.replace("\\\n", " ").splitlines()
            if "effgen train" in line and "--target acceptance" not in line]


def test_unset_training_knobs_leave_the_recipe_its_values(tmp_path):
    (train,) = _train_lines(f"W={tmp_path / 'w'}", "TEACHERS=0")
    assert "--recipe default" in train
    for flag in ("--batch-size", "--steps-per-epoch", "--max-epochs", "--pre-limit", "--ft-limit", "--teachers"):
        assert flag not in train, train


def test_the_main_job_trains_teachers_then_the_model_on_their_mean(tmp_path):
    work = tmp_path / "w"
    *teachers, student = _train_lines(f"W={work}", "SEED=7", "TEACHERS=3", "TEACHER_MAX_EPOCHS=4",
                                      "TEACHER_TIME_LIMIT_SECONDS=40", "STUDENT_MAX_EPOCHS=2",
                                      "STUDENT_TIME_LIMIT_SECONDS=20")
    models = [f"{work}/teachers/{k}/model.keras" for k in (1, 2, 3)]
    assert len(teachers) == 3
    for k, line in enumerate(teachers, start=1):
        # Seeds 7 + k: other networks than the student's (seed 7) and each other's.
        for flag in ("--recipe default", f"--output {models[k - 1]}", f"--seed $((7 + {k}))",
                     "--max-epochs 4", "--ft-limit 40", f"> {work}/teachers/{k}/train.log"):
            assert flag in line, line
        assert "--teachers" not in line
    for flag in ("--recipe default", f"--output {work}/model/model.keras", "--seed 7",
                 "--teachers " + " ".join(models), "--max-epochs 2", "--ft-limit 20"):
        assert flag in student, student
    # MAX_EPOCHS and FINE_TUNING_TIME_LIMIT_SECONDS, when set, rule both.
    for line in _train_lines(f"W={work}", "MAX_EPOCHS=3", "FINE_TUNING_TIME_LIMIT_SECONDS=9"):
        assert "--max-epochs 3" in line and "--ft-limit 9" in line, line
    # The notebook's recipe learns the labels, as the notebook did.
    (seed,) = _train_lines(f"W={work}", "RECIPE=seed")
    assert "--teachers" not in seed and "--recipe seed" in seed
    for bad in ("x", "10", "-1", "1.5", "", "1 2"):
        proc = _make("-n", "lamarr-lib", f"W={work}", f"TEACHERS={bad}")
        assert proc.returncode != 0 and f"TEACHERS='{bad}' must be a whole number from 0 to 9" in proc.stderr
    # The teachers' seeds are shell arithmetic: a leading zero would be octal (010 + 1 = 9).
    for bad in ("010", "08", "42.0", "1e2", "-3"):
        proc = _make("-n", "lamarr-lib", f"W={work}", f"SEED={bad}")
        assert proc.returncode != 0 and f"SEED='{bad}' must be written in plain digits" in proc.stderr
    assert _train_lines(f"W={work}", "SEED=010", "TEACHERS=0")  # no teachers: any SEED the table takes


def test_output_model_in_the_environment_is_where_make_trains_and_exports(tmp_path):
    model = tmp_path / "elsewhere" / "m.keras"
    proc = _make("-n", "lamarr-lib", f"W={tmp_path / 'w'}", env=_env(OUTPUT_MODEL=str(model)))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.replace("\\\n", " ")
    assert f"--output {model}" in out and f"--model {model}" in out


@pytest.mark.parametrize("var", ["TRAIN_DATA", "VALIDATION_DATA"])
def test_data_directories_elsewhere_in_the_environment_stop_make_clearly(tmp_path, var):
    proc = _make("-n", "lamarr-lib", f"W={tmp_path / 'w'}", env=_env(**{var: str(tmp_path / "x")}))
    assert proc.returncode != 0
    assert f"{var}={tmp_path / 'x'} is set, but the main job writes" in proc.stderr
    # The same directory make uses is fine.
    split = var.split("_")[0].lower()
    ok = _make("-n", "lamarr-lib", f"W={tmp_path / 'w'}",
               env=_env(**{var: str(tmp_path / "w" / "data" / split)}))
    assert ok.returncode == 0, ok.stderr


def test_clean_with_a_space_in_w_deletes_nothing(tmp_path):
    (tmp_path / "scratch" / "my").mkdir(parents=True)
    (tmp_path / "work").mkdir()
    decoys = [tmp_path / "scratch" / "my" / "keep", tmp_path / "work" / "keep"]
    for d in decoys:
        d.write_text("mine")
    for w in ("scratch/my work", "a;b", "x$$(touch pwned)", "*", "."):
        proc = _make("clean", f"W={w}", cwd=tmp_path)
        assert proc.returncode != 0, w
        assert "effgen: W=" in proc.stderr, proc.stderr
    assert all(d.read_text() == "mine" for d in decoys)
    assert not (tmp_path / "pwned").exists()


def test_clean_removes_only_a_main_job_work_directory(tmp_path):
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "thesis.tex").write_text("x")
    proc = _make("clean", f"W={mine}")
    assert proc.returncode != 0 and "not removing it" in proc.stderr
    assert (mine / "thesis.tex").exists()
    work = tmp_path / "w"
    work.mkdir()
    (work / ".effgen.lock").touch()
    assert _make("clean", f"W={work}").returncode == 0
    assert not work.exists()


# ---- the library build ---------------------------------------------------------------

CORE = """
static float *test_core(float *out, const float *in)
{
    int j;
    for (j = 0; j < 4; ++j)
        out[j] = in[j];
    return out;
}
"""


@pytest.fixture
def staged_work(tmp_path):
    """A work directory whose stages up to the generated C look done (mtimes in order),
    so that `make <lib>` only compiles: the C is a hand-written core behind the ABI."""
    work = tmp_path / "w"
    src, hdr = render_abi(Core(source=CORE, row_fn="test_core"), symbol="efficiency",
                          input_names=[f"f{i}" for i in range(12)], manifest={"backend": "test"})
    files = [("data/sample.root", ""), ("data/train/definitions.json", "{}"),
             ("model/tX.pkl", ""), ("teachers/1/model.keras", ""), ("teachers/2/model.keras", ""),
             ("model/model.keras", ""), ("lamarr/.backend", "effgen efficiency\n"),
             ("lamarr/efficiency.h", hdr), ("lamarr/efficiency.c", src)]
    t0 = time.time() - 1000
    for i, (name, text) in enumerate(files):
        path = work / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        os.utime(path, (t0 + 10 * i, t0 + 10 * i))
    return work


def _build(work, *args):
    lib = work / "lamarr" / "efficiency.so"
    proc = _make(f"W={work}", str(lib), *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return lib, "gcc" in proc.stdout or " -o " in proc.stdout


def test_changing_flags_or_compiler_rebuilds_the_library(staged_work, tmp_path):
    lib, built = _build(staged_work)
    assert built
    assert not _build(staged_work)[1]  # up to date
    assert _build(staged_work, "ARCH_FLAGS=-DEFFGEN_NO_DISPATCH")[1]
    assert not _build(staged_work, "ARCH_FLAGS=-DEFFGEN_NO_DISPATCH")[1]
    # Another compiler (here: gcc behind a wrapper reporting another version).
    wrapper = tmp_path / "cc-other"
    wrapper.write_text('#!/bin/sh\n[ "$1" = --version ] && { echo "other-cc 9.9"; exit 0; }\n'
                       'exec gcc "$@"\n')
    wrapper.chmod(0o755)
    assert _build(staged_work, "ARCH_FLAGS=-DEFFGEN_NO_DISPATCH", f"CC={wrapper}")[1]
    assert not _build(staged_work, "ARCH_FLAGS=-DEFFGEN_NO_DISPATCH", f"CC={wrapper}")[1]


def test_manifest_stays_json_for_flags_with_quotes_and_backslashes(staged_work):
    lib, built = _build(staged_work, 'ARCH_FLAGS=-DEFFGEN_X="a\\b" -DEFFGEN_Y=\\"q\\"')
    assert built
    manifest = Library(lib, "efficiency").manifest()  # json.loads inside
    assert "-DEFFGEN_X=a/b" in manifest["cflags"]
    assert "relro" in manifest["cflags"]
    json.dumps(manifest)


def test_library_is_linked_with_full_relro(staged_work):
    lib, _ = _build(staged_work)
    out = subprocess.run(["readelf", "-d", "-l", str(lib)], capture_output=True, text=True).stdout
    assert "GNU_RELRO" in out and "BIND_NOW" in out


# ---- tracking.so: the spec make writes ------------------------------------------------

def _generator_dir(path, files=("model.keras", "tX.pkl", "tY.pkl")):
    path.mkdir(parents=True)
    for name in files:
        (path / name).write_text("")
    return path


def test_tracking_spec_lists_acceptance_efficiency_and_the_generators_given(tmp_path):
    import tomllib

    work = tmp_path / "w"
    res, cov = _generator_dir(tmp_path / "res"), _generator_dir(tmp_path / "cov")
    spec = work / "lamarr" / "tracking" / "tracking.toml"
    proc = _make(f"W={work}", str(spec))
    assert proc.returncode == 0, proc.stderr
    models = tomllib.loads(spec.read_text())["model"]
    assert [m["symbol"] for m in models] == ["acceptance", "efficiency"]
    assert models[0] == {"symbol": "acceptance", "model": f"{work}/acceptance/model.keras",
                         "preprocessing": f"{work}/model/tX.pkl"}
    assert models[1]["model"] == f"{work}/model/model.keras" and "postprocessing" not in models[1]

    proc = _make(f"W={work}", f"RESOLUTION={res}", f"COVARIANCE={cov}", str(spec))
    assert proc.returncode == 0, proc.stderr
    models = tomllib.loads(spec.read_text())["model"]
    assert [m["symbol"] for m in models] == ["acceptance", "efficiency", "resolution", "covariance"]
    for m, d in zip(models[2:], (res, cov)):
        assert m == {"symbol": m["symbol"], "model": f"{d}/model.keras", "preprocessing": f"{d}/tX.pkl",
                     "postprocessing": f"{d}/tY.pkl"}
    # Unchanged text: the file is left alone (its mtime drives the library's rebuild).
    before = spec.stat().st_mtime_ns
    time.sleep(0.05)
    assert _make(f"W={work}", f"RESOLUTION={res}", f"COVARIANCE={cov}", str(spec)).returncode == 0
    assert spec.stat().st_mtime_ns == before


def test_lamarr_lib_dry_run_exports_the_generators_given(tmp_path):
    work = tmp_path / "w"
    res, cov = _generator_dir(tmp_path / "res"), _generator_dir(tmp_path / "cov")
    proc = _make("-n", "lamarr-lib", f"W={work}", f"RESOLUTION={res}", f"COVARIANCE={cov}")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.replace("\\\n", " ")
    assert f'model = "{res}/model.keras"' in out.replace("\\n", "\n")
    assert f"export --spec {work}/lamarr/tracking/tracking.toml" in " ".join(out.split())
    assert f"{work}/lamarr/tracking.so" in out


@pytest.mark.parametrize("missing", ["model.keras", "tY.pkl"])
def test_a_generator_directory_without_its_files_stops_make_clearly(tmp_path, missing):
    files = [f for f in ("model.keras", "tX.pkl", "tY.pkl") if f != missing]
    res = _generator_dir(tmp_path / "res", files)
    proc = _make("-n", "lamarr-lib", f"W={tmp_path / 'w'}", f"RESOLUTION={res}")
    assert proc.returncode != 0
    assert f"RESOLUTION={res} holds no {missing}" in proc.stderr
    bad = _make("-n", "lamarr-lib", f"W={tmp_path / 'w'}", "COVARIANCE=a;b")
    assert bad.returncode != 0 and "COVARIANCE='a;b' holds a space or a shell character" in bad.stderr


def test_the_baseline_is_fitted_beside_the_training_and_validate_reads_it(tmp_path):
    """Up to MAIN_JOBS stages side by side (the baseline with one thread beside the
    training), unless the command line gives its own -j."""
    work = tmp_path / "w"

    def lines(*args):
        proc = _make("-n", "lamarr-lib", f"W={work}", "SEED=7", *args)
        assert proc.returncode == 0, proc.stderr
        return [" ".join(line.split()) for line in proc.stdout.replace("\\\n", " ").splitlines()]

    default = lines()
    assert "-j3 lamarr-lib" in default[0], default[0]
    baseline = next(line for line in default if "effgen baseline" in line)
    for flag in (f"--train-data {work}/data/train", f"--data {work}/data/test",
                 f"--output {work}/baseline/predictions.npz", "--seed 7", "--threads 1"):
        assert flag in baseline, baseline
    validate = next(line for line in default if "effgen validate" in line)
    assert f"--baseline {work}/baseline/predictions.npz" in validate
    assert "--baseline-train-data" not in validate
    # The acceptance model's epoch lines go to its own log, beside the efficiency's.
    acceptance = next(line for line in default if "--target acceptance" in line)
    assert f"> {work}/acceptance/train.log 2>&1" in acceptance

    alone = lines("MAIN_JOBS=1")
    assert "-j1 lamarr-lib" in alone[0]
    assert "--threads auto" in next(line for line in alone if "effgen baseline" in line)
    assert "-j3" not in lines("-j4")[0]
