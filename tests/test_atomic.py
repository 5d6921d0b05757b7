"""effgen.atomic's failure paths that a kill cannot reach: an error inside the commit."""

import os

import pytest

from effgen import atomic


def test_failed_rename_during_commit_puts_the_old_directory_back(tmp_path, monkeypatch):
    out = tmp_path / "split"
    out.mkdir()
    (out / "part-0.feather").write_text("old")
    real_replace = os.replace

    def failing_replace(src, dst):
        # the new directory's rename, once the old one has been moved aside
        if str(dst) == str(out) and not str(src).endswith("-old"):
            raise OSError("disk on fire")
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk on fire"):
        with atomic.atomic_outputs() as staged:
            (staged.dir(out, force=True) / "part-0.feather").write_text("new")
    assert (out / "part-0.feather").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["split"]  # no temporaries left


def test_sweep_treats_an_unreaped_killed_process_as_gone(tmp_path):
    import subprocess
    import time

    proc = subprocess.Popen(["sleep", "60"])
    proc.kill()  # not waited for: a zombie until proc.wait()
    stat = f"/proc/{proc.pid}/stat"
    deadline = time.monotonic() + 10
    while open(stat).read().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    out = tmp_path / "sample.feather"
    leftover = tmp_path / f"{atomic._prefix(out)}{proc.pid}-abc"
    live = tmp_path / f"{atomic._prefix(out)}{os.getpid()}-def"
    leftover.write_text("half")
    live.write_text("mine")
    atomic.sweep(out)
    proc.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name]


def test_scratch_dir_is_removed_whatever_happens_and_a_dead_runs_is_swept(tmp_path):
    import subprocess

    target = tmp_path / "data" / "scratch"
    proc = subprocess.Popen(["true"])
    proc.wait()
    (tmp_path / "data").mkdir()
    dead = tmp_path / "data" / f"{atomic._prefix(target)}{proc.pid}-old"  # a killed run's
    dead.mkdir()
    (dead / "spill.arrows").write_bytes(b"x" * 100)
    with atomic.scratch_dir(target) as tmp:
        assert not dead.exists() and tmp.is_dir() and tmp.parent == target.parent
        (tmp / "file").write_text("scratch")
    assert list((tmp_path / "data").iterdir()) == []
    with pytest.raises(RuntimeError), atomic.scratch_dir(target) as tmp:
        (tmp / "file").write_text("scratch")
        raise RuntimeError("failed midway")
    assert list((tmp_path / "data").iterdir()) == [] and not target.exists()
