"""Issue 7: SIGKILL a stage mid-way; the previous outputs stay intact and the next run
completes. Each test starts the real CLI as a subprocess, polls its output directory
until the moment named by the test (a temporary has appeared, is half written, the
commit has begun...) and kills it there. Training has its own kill test in test_train.py.

A killed run leaves its temporaries (`.<name>.tmp-<host>-<pid>-<random>`, beside the
output); the next run staging the same output removes them, as their process is gone.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from effgen import provenance
from effgen.data import preprocess, synth
from effgen.data.reader import FeatherReader
from effgen.data.sources import Source
from effgen.provenance import sha256_of

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}


def _cli(*args):
    return [sys.executable, "-m", "effgen", *map(str, args)]


def _kill_when(args, ready, poll=5e-3, timeout=120, must=True):
    """Run `effgen args`, SIGKILL it as soon as ready() is true (checked every `poll`
    seconds). Fails unless the kill is what ended it, i.e. unless it was still running;
    with must=False, returns whether it was instead."""
    proc = subprocess.Popen(_cli(*args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=ENV, cwd=ROOT)
    try:
        deadline = time.monotonic() + timeout
        while proc.poll() is None and not ready():
            assert time.monotonic() < deadline, f"effgen {args[0]}: moment never came"
            time.sleep(poll)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    if not must:
        return proc.returncode == -signal.SIGKILL
    assert proc.returncode == -signal.SIGKILL, \
        f"effgen {args[0]} ended by itself (rc {proc.returncode}) before it could be killed"


def _run_cli(args):
    res = subprocess.run(_cli(*args), capture_output=True, text=True, env=ENV, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]


def _hidden(d):
    """Dot-named entries of `d`: where temporaries live."""
    d = Path(d)
    return sorted(p.name for p in d.iterdir() if p.name.startswith(".")) if d.is_dir() else []


def _temps(d, name):
    """Temporaries for output `name` in `d`, with their sizes (0 for a directory)."""
    out = {}
    for p in Path(d).iterdir() if Path(d).is_dir() else ():
        if p.name.startswith(f".{name}."):
            try:
                out[p] = 0 if p.is_dir() else p.stat().st_size
            except FileNotFoundError:  # renamed or removed while we looked
                pass
    return out


# ---- synth --------------------------------------------------------------------------------

SYNTH_N = 1_000_000  # ~84 MB, about a second of writing


@pytest.mark.parametrize("previous, moment", [(True, "created"), (True, "half"), (False, "half")])
def test_synth_killed_mid_write(tmp_path, previous, moment):
    out = tmp_path / "sample.feather"
    if previous:
        synth.write_sample(out, 20_000, 1, progress=False)
        before = sha256_of(out)
    min_size = {"created": 0, "half": 32 << 20}[moment]
    args = ["synth", "--n", SYNTH_N, "--seed", 2, "--output", out]
    args += ["--force"] if previous else []

    _kill_when(args, lambda: any(s >= min_size for s in _temps(tmp_path, out.name).values()))
    if previous:
        assert sha256_of(out) == before
        assert Source(out).num_entries == 20_000
    else:
        assert not out.exists()
    left = _hidden(tmp_path)
    assert left and all(n.startswith(f".{out.name}.tmp-") for n in left), left

    _run_cli(args)
    assert Source(out).num_entries == SYNTH_N
    assert [p.name for p in tmp_path.iterdir()] == [out.name], "stale temporaries were not swept"


# ---- preprocess ---------------------------------------------------------------------------

PRE_N = 100_000
PRE_SHARD = 2_500


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    d = tmp_path_factory.mktemp("kill_samples")
    small, big = d / "small.feather", d / "big.feather"
    synth.write_sample(small, 20_000, 1, progress=False)
    synth.write_sample(big, PRE_N, 2, progress=False)
    return small, big


def _state(data, pre):
    """sha256 of every file at a final name: the split directories and the pickle."""
    files = {str(p.relative_to(data)): p for split in preprocess.SPLITS
             for p in (data / split).rglob("*") if p.is_file()}
    if pre.exists():
        files[pre.name] = pre
    return {k: sha256_of(v) for k, v in sorted(files.items())}


def _rows(data):
    return {split: FeatherReader(data / split).n_rows for split in preprocess.SPLITS}


def _first_shard_in_temp(data, split):
    return lambda: any(d.is_dir() and any(d.glob("part-*.feather"))
                       for d in _temps(data, split))


def _replaced(path, before):
    def ready():
        try:
            return os.stat(path).st_ino != before
        except FileNotFoundError:
            return False
    return ready


@pytest.mark.parametrize("previous, moment", [(True, "test"), (True, "commit"), (False, "train")])
def test_preprocess_killed_mid_way(samples, tmp_path, previous, moment):
    small, big = samples
    data, pre = tmp_path / "data", tmp_path / "model" / "tX.pkl"
    if previous:
        preprocess.preprocess(small, data, pre, 1, shard_rows=4000, progress=False)
    before = _state(data, pre) if data.exists() else {}
    rows_before = _rows(data) if previous else None
    ino = pre.stat().st_ino if pre.exists() else None
    ready = {"train": _first_shard_in_temp(data, "train"),
             # train is complete under a temporary name, test is being written
             "test": _first_shard_in_temp(data, "test"),
             # the pickle is committed last: once it is replaced, all outputs must be new
             "commit": _replaced(pre, ino)}[moment]
    args = ["preprocess", "--input", big, "--output-dir", data, "--preprocessing", pre,
            "--seed", 3, "--shard-rows", PRE_SHARD, "--max-fit-rows", 20_000]
    args += ["--force"] if previous else []

    _kill_when(args, ready)
    killed = _state(data, pre) if data.exists() else {}
    if moment != "commit":
        assert _hidden(data), "the killed run's temporaries should still be there"
        if previous:  # readable as before, the half-written shards beside it unseen
            assert _rows(data) == rows_before
            provenance.load_preprocessing(pre, n_features=12)

    _run_cli(args)
    after = _state(data, pre)
    assert after != before
    # Whatever the moment: all previous outputs, or all new ones, never a mix.
    assert killed == (after if moment == "commit" else before)
    total = 0
    for split in preprocess.SPLITS:
        r = FeatherReader(data / split)
        assert all(f.parent == data / split and f.name.startswith("part-") for f in r.data_files)
        total += r.n_rows
    assert total == PRE_N
    provenance.load_preprocessing(pre, n_features=12)
    assert _hidden(data) == [] and _hidden(pre.parent) == [], "stale temporaries were not swept"


# ---- export -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two models taking the same preprocessing: the previous export's and the next one's
    (production-sized, so that writing its .c takes a few milliseconds)."""
    import pickle

    from support import fit_preprocessing, seed_like_model

    d = tmp_path_factory.mktemp("kill_models")
    seed_like_model(width=16, blocks=1, seed=1).save(d / "old.keras")
    seed_like_model(width=64, blocks=5, seed=2).save(d / "new.keras")
    with open(d / "tX.pkl", "wb") as f:
        pickle.dump(fit_preprocessing(n=5000, seed=9, n_quantiles=200), f)
    return d / "old.keras", d / "new.keras", d / "tX.pkl"


@pytest.mark.parametrize("backend", ["effgen", "scikinc"])
def test_export_killed_while_writing_the_source(models, tmp_path, backend):
    from effgen.codegen.export import export
    from effgen.codegen.native import check_library, compile_shared

    old, new, pre = models
    out = tmp_path / "lamarr"
    (out / "efficiency.so").parent.mkdir()
    (out / "efficiency.so").write_bytes(b"built earlier")  # other files in the directory
    args = ["export", "--model", new, "--preprocessing", pre, "--output-dir", out,
            "--backend", backend]
    # The .c is the big file, written after the .h, but its temporary lives ~1.5 ms: on a
    # loaded machine the poller can miss it and the export ends by itself; then retry.
    for _attempt in range(5):
        paths = export(old, pre, out, backend=backend)
        before = {k: sha256_of(p) for k, p in paths.items()}
        if _kill_when(args, lambda: bool(_temps(out, "efficiency.c")), poll=5e-4, must=False):
            break
    else:
        pytest.fail("the export ended by itself in 5 tries before it could be killed")
    killed = {k: sha256_of(p) for k, p in paths.items()}
    if killed == before:  # else the kill landed after the commit
        assert _hidden(out), "the killed run's temporary should still be there"
    check_library(compile_shared(paths["source"], tmp_path / "killed.so"), "efficiency")

    # The next run, in-process to spare a second TensorFlow start (the CLI only parses
    # its arguments and calls export()).
    export(new, pre, out, backend=backend)
    after = {k: sha256_of(p) for k, p in paths.items()}
    assert after != before
    if killed not in (before, after):
        # The one window renames cannot close: the kill landed between the back-to-back
        # renames (the .h first). Each file is still whole, the .c is the previous one
        # (compiled above), and the next export, which make runs as the .c is stale,
        # repairs the pair (checked just below).
        # (the .h and the manifest .json are renamed before the .c)
        assert killed["source"] == before["source"] and killed["header"] == after["header"] \
            and killed["manifest"] in (before["manifest"], after["manifest"]), \
            "the .c, .h and .json are neither a whole export nor the known commit window"
    assert sha256_of(new) in paths["source"].read_text() and sha256_of(new) in paths["header"].read_text()
    assert (out / "efficiency.so").read_bytes() == b"built earlier"
    assert _hidden(out) == [], "stale temporaries were not swept"


# ---- leftovers ----------------------------------------------------------------------------

def test_sweep_removes_the_temporaries_of_dead_processes_only(tmp_path):
    from effgen.atomic import Outputs, sweep

    target = tmp_path / "x.feather"
    live = Outputs().path(target)  # this process's: alive
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = live.with_name(live.name.replace(f"-{os.getpid()}-", f"-{gone.pid}-"))
    dead.mkdir()
    (dead / "part-00000.feather").write_bytes(b"half")
    host = live.name[len(".x.feather.tmp-"):].split(f"-{os.getpid()}-")[0]
    # another output's, and another host's (whose processes this one cannot see)
    others = [dead.with_name(dead.name.replace(".x.", ".y.")),
              dead.with_name(dead.name.replace(f"-{host}-", "-elsewhere-"))]
    for p in others:
        p.write_bytes(b"")
    sweep(target)
    assert sorted(tmp_path.iterdir()) == sorted([live, *others])
