"""The main job through make, as a user runs it: two concurrent `make lamarr-lib` on one
work directory, and a build killed mid-way. The sample and the training are tiny, so the
whole chain takes well under a minute; each make is a real subprocess."""

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from effgen import schema
from effgen.codegen.export import sha256_of
from effgen.codegen.native import Library, check_library

pytestmark = [pytest.mark.make, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
# RESOLUTION= / COVARIANCE= directories the runs pass (set by the concurrent_runs fixture).
GENERATORS = {}
TINY_KNOBS = ["N_PARTICLES=20000", "BATCH_SIZE=512", "PRE_TRAINING_TIME_LIMIT_SECONDS=2",
              "FINE_TUNING_TIME_LIMIT_SECONDS=2", "ACCEPTANCE_TIME_LIMIT_SECONDS=2"]


def _env():
    env = {k: v for k, v in os.environ.items()
           if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS") and not k.startswith("EFFGEN_")}
    env.update(TF_CPP_MIN_LOG_LEVEL="3", MAX_EPOCHS="2")
    return env


def _make(work, *targets):
    generators = [f"{v}={d}" for v, d in GENERATORS.items()]
    return subprocess.Popen(["make", "-C", str(REPO), f"W={work}", *TINY_KNOBS, *generators, *targets],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=_env(), start_new_session=True)


def _finish(proc, timeout=600):
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def _paths(work):
    w = Path(work)
    return {"sample": w / "data" / "sample.root", "model": w / "model" / "model.keras",
            "tx": w / "model" / "tX.pkl", "lib": w / "lamarr" / "efficiency.so",
            "src": w / "lamarr" / "efficiency.c", "lamarr": w / "lamarr",
            "acceptance": w / "acceptance" / "model.keras", "tracking": w / "lamarr" / "tracking.so"}


def _tf_reference(paths, rows):
    import keras

    from effgen.codegen.preprocessing_ir import load_preprocessing

    pre = load_preprocessing(paths["tx"]).transform(rows.astype(np.float64)).astype(np.float32)
    return keras.saving.load_model(paths["model"], compile=False).predict(pre, verbose=0)


def _raw_rows(paths, n=3000):
    import uproot

    from effgen.data.synth import features_view

    with uproot.open(paths["sample"]) as f:  # the tuple; its features as preprocess derives them
        view = features_view(f["TrackingTupler/sim"].arrays(library="np", entry_stop=n))
    return np.stack([view[c] for c in schema.FEATURES], axis=1).astype(np.float32)


@pytest.fixture(scope="module")
def concurrent_runs(tmp_path_factory):
    """Two `make lamarr-lib` started together on the same work directory."""
    from support import small_generator_dir

    work = tmp_path_factory.mktemp("make_work")
    models = tmp_path_factory.mktemp("generators")
    # Small RANDOM-weight generators in the production form, with production tX / tY.
    GENERATORS.update(RESOLUTION=small_generator_dir("resolution", models / "resolution", seed=5),
                      COVARIANCE=small_generator_dir("covariance", models / "covariance", seed=6))
    first = _make(work, "lamarr-lib")
    time.sleep(0.2)
    second = _make(work, "lamarr-lib")
    # Generous: the two production-size libraries compile for minutes on a loaded machine.
    return work, [_finish(first, timeout=1800), _finish(second, timeout=1800)]


def test_concurrent_runs_both_succeed_and_the_work_is_done_once(concurrent_runs):
    work, results = concurrent_runs
    for rc, out in results:
        assert rc == 0, out[-3000:]
    logs = "\n".join(out for _, out in results)
    # Each stage ran once: the queued run found the other's outputs up to date.
    w = Path(work)
    for stage in ("bin/effgen synth --n", "bin/effgen preprocess --input",
                  *(f"--output {w}/{m}/model.keras" for m in ("teachers/1", "teachers/2", "model")),
                  "bin/effgen validate",
                  "bin/effgen export --model", "-o " + str(_paths(work)["lib"]),
                  "bin/effgen train --target acceptance", "bin/effgen export --spec"):
        assert logs.count(stage) == 1, (stage, logs[-3000:])
    assert logs.count("bin/effgen describe") == 2
    assert "waiting for the other run" in logs


def test_concurrent_runs_leave_one_consistent_library(concurrent_runs):
    work, _ = concurrent_runs
    paths = _paths(work)
    check_library(paths["lib"], "efficiency")
    lib = Library(paths["lib"])
    manifest = lib.manifest()
    assert manifest["model_sha256"] == sha256_of(paths["model"])
    assert manifest["preprocessing_sha256"] == sha256_of(paths["tx"])
    assert manifest["trained_with_this_preprocessing"] == "checked"
    rows = _raw_rows(paths)
    np.testing.assert_allclose(lib.batch(rows), _tf_reference(paths, rows), atol=1e-5, rtol=0)
    assert [p.name for p in paths["lamarr"].iterdir() if ".tmp" in p.name] == []


def test_tracking_library_holds_the_four_symbols_and_runs_the_chain(concurrent_runs, tmp_path):
    import ctypes

    import keras

    from effgen.codegen.native import exported_symbols
    from effgen.codegen.preprocessing_ir import load_preprocessing

    work, _ = concurrent_runs
    paths = _paths(work)
    exported = exported_symbols(paths["tracking"])
    assert {"acceptance", "efficiency", "resolution", "covariance"} <= set(exported)
    rows = _raw_rows(paths, 500)
    # Its efficiency is efficiency.so's model; its acceptance the trained acceptance model.
    np.testing.assert_allclose(Library(paths["tracking"]).batch(rows), Library(paths["lib"]).batch(rows),
                               atol=1e-6, rtol=0)
    fn = ctypes.CDLL(str(paths["tracking"])).acceptance
    fptr = ctypes.POINTER(ctypes.c_float)
    fn.argtypes, fn.restype = [fptr, fptr], fptr
    got = np.zeros((len(rows), 1), np.float32)
    x = np.ascontiguousarray(rows, np.float32)
    for i in range(len(rows)):
        fn(got[i].ctypes.data_as(fptr), x[i].ctypes.data_as(fptr))
    pre = load_preprocessing(paths["tx"]).transform(rows.astype(np.float64)).astype(np.float32)
    want = keras.saving.load_model(paths["acceptance"], compile=False).predict(pre, verbose=0)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert (paths["acceptance"].parent / "acceptance.json").is_file()

    # The whole chain inside SQLamarr with the library make built.
    from effgen.checks import chain

    tables = chain.run_chain(paths["tracking"], rows, tmp_path / "chain.db", seed=2, work_dir=tmp_path / "w")
    report = chain.check_chain(tables, paths["tracking"])
    assert report["ok"] and report["reconstructed"] > 0, report


def _load(lib_path, tmp_path):
    """Open a copy under a fresh name: dlopen would hand back an already-loaded library
    for a path it has seen, hiding a rebuilt file."""
    copy = tmp_path / f"copy{len(list(tmp_path.glob('copy*')))}.so"
    shutil.copy(lib_path, copy)
    return Library(copy)


def _kill_build(work, when):
    """Start `make lamarr-lib` with only the library to rebuild and SIGKILL the whole
    process group while the compiler runs ("compile") or once the linker has begun
    writing the per-run temporary library ("link"). Returns whether make was still
    running, and the temporaries the kill left (for "link": proof it came before the
    rename)."""
    paths = _paths(work)
    old = paths["src"].stat().st_mtime - 60
    os.utime(paths["lib"], (old, old))
    proc = _make(work, "lamarr-lib")
    deadline = time.monotonic() + 120
    tmp = []
    while time.monotonic() < deadline and proc.poll() is None:
        tmp = list(paths["lamarr"].glob("efficiency.so.tmp.*"))
        ready = bool(tmp) if when == "link" else any(
            "cc1" in _cmdline(pid) for pid in _group_pids(proc.pid))
        if ready:
            break
        time.sleep(0.002)
    alive = proc.poll() is None
    if alive:
        os.killpg(proc.pid, signal.SIGKILL)
    _finish(proc)
    return alive, list(paths["lamarr"].glob("efficiency.so.tmp.*"))


def _group_pids(pgid):
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == pgid:
                    pids.append(int(entry.name))
            except ProcessLookupError:
                pass
    return pids


def _cmdline(pid):
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


@pytest.mark.parametrize("when", ["compile", "link"])
def test_killed_build_keeps_the_old_library_and_the_next_run_completes(concurrent_runs,
                                                                       tmp_path, when):
    work = tmp_path / "work"
    shutil.copytree(concurrent_runs[0], work, symlinks=True)
    paths = _paths(work)
    before = sha256_of(paths["lib"])
    rows = _raw_rows(paths, 500)
    expected = _load(paths["lib"], tmp_path).batch(rows)

    # The link window is a few milliseconds; retry until a kill lands inside it.
    for _attempt in range(5):
        alive, left = _kill_build(work, when)
        if alive and (left or when == "compile"):
            break
    assert alive, "make finished before it could be killed"
    assert when == "compile" or left, "never killed the build between link and rename"

    assert sha256_of(paths["lib"]) == before
    np.testing.assert_array_equal(_load(paths["lib"], tmp_path).batch(rows), expected)

    rc, out = _finish(_make(work, "lamarr-lib"))
    assert rc == 0, out[-3000:]
    assert "-o " + str(paths["lib"]) in out  # it did rebuild
    assert paths["lib"].stat().st_mtime >= paths["src"].stat().st_mtime
    check_library(paths["lib"], "efficiency")
    assert [p.name for p in paths["lamarr"].iterdir() if ".tmp" in p.name] == []
    np.testing.assert_array_equal(_load(paths["lib"], tmp_path).batch(rows), expected)
