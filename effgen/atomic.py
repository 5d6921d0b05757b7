"""Write-to-temporary-then-rename helpers, so a failure or a kill never leaves half an output.

Temporaries sit beside their output, hidden and recognisable:
`.<name>.tmp-<host>-<pid>-<random>[<suffix>]`. A run that is killed cannot remove its
own; the next run staging the same output removes those whose process (on this host)
is gone, so killed runs do not pile up copies of large outputs.

`atomic_outputs()` stages several outputs and renames them into place back to back only
once all are written, and only then deletes what they replaced: outputs that belong
together (a data split and its preprocessing, a .c and its .h) are never left mixed by
a kill, except in the microseconds of the renames themselves.
"""

import contextlib
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

from effgen.errors import EffgenError

_HOST = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def _umask_mode(base):
    """The mode a plainly created file/dir would get (mkstemp/mkdtemp use 0600/0700)."""
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask


def _prefix(path: Path) -> str:
    """Start of the names of `path`'s temporaries made on this host; the pid follows."""
    return f".{path.name}.tmp-{_HOST}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    try:  # a killed process nobody reaped yet is a zombie: it writes nothing more
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _remove(p):
    if os.path.isdir(p) and not os.path.islink(p):
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)


def _mkstemp(**kw):
    fd, tmp = tempfile.mkstemp(**kw)
    os.close(fd)
    return tmp


def sweep(path):
    """Remove temporaries of `path` left by processes of this host that no longer run
    (killed mid-write). Those of running processes are theirs and are left alone."""
    path = Path(path)
    prefix = _prefix(path)
    try:
        entries = os.listdir(path.parent)
    except FileNotFoundError:
        return
    for name in entries:
        if name.startswith(prefix):
            pid = name[len(prefix):].split("-", 1)[0]
            if pid.isdigit() and not _alive(int(pid)):
                _remove(path.parent / name)


class Outputs:
    """Outputs staged under temporary names; `atomic_outputs` commits them together."""

    def __init__(self):
        self._staged = []  # (temporary, final path), in commit order

    def _stage(self, path: Path, make, suffix="") -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        sweep(path)
        tmp = Path(make(prefix=f"{_prefix(path)}{os.getpid()}-", suffix=suffix, dir=path.parent))
        self._staged.append((tmp, path))
        return tmp

    def path(self, path) -> Path:
        """An empty temporary file that will replace `path`. It keeps `path`'s suffix, for
        writers that infer the format from it (e.g. Keras' model.save)."""
        path = Path(path)
        tmp = self._stage(path, _mkstemp, path.suffix)
        os.chmod(tmp, _umask_mode(0o666))
        return tmp

    @contextlib.contextmanager
    def file(self, path, mode="wb"):
        """A file object to write what will replace `path`; flushed to disk when closed."""
        with open(self.path(path), mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())

    def dir(self, path, force=False) -> Path:
        """An empty temporary directory that will replace `path`. An existing non-empty
        `path` is refused unless `force`."""
        path = Path(path)
        if path.exists() and any(path.iterdir()) and not force:
            raise FileExistsError(f"{path} exists and is not empty (use --force to replace it)")
        tmp = self._stage(path, tempfile.mkdtemp)
        os.chmod(tmp, _umask_mode(0o777))
        return tmp

    def _commit(self) -> list:
        """Rename every temporary over its output, back to back; return the replaced
        directories, moved aside (under a temporary name) for deletion afterwards."""
        replaced = []
        for tmp, path in self._staged:
            old = None
            if tmp.is_dir() and path.is_dir():
                old = tmp.with_name(tmp.name + "-old")
                os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                if old is not None and not path.exists():
                    os.replace(old, path)  # put the old directory back before giving up
                raise
            if old is not None:
                replaced.append(old)
        self._staged = []
        return replaced

    def _discard(self):
        for tmp, _ in self._staged:
            _remove(tmp)
        self._staged = []


@contextlib.contextmanager
def atomic_outputs():
    """Yield an `Outputs` to stage outputs on; if the block succeeds, rename them all
    into place in the order staged, then delete the directories they replaced. If it
    fails, remove the temporaries and leave the old outputs untouched."""
    outputs = Outputs()
    try:
        yield outputs
        replaced = outputs._commit()
    except BaseException:
        outputs._discard()
        raise
    for old in replaced:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path, mode="wb"):
    """Yield a file object on a temporary name beside `path`; rename it over `path`
    only if the block succeeds."""
    with atomic_outputs() as out, out.file(path, mode) as f:
        yield f


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path` for a writer that wants a file name
    (e.g. Keras' model.save); rename it over `path` only if the block succeeds."""
    with atomic_outputs() as out:
        yield out.path(path)


@contextlib.contextmanager
def scratch_dir(path):
    """A temporary working directory beside `path`, named like `path`'s temporaries (so
    the next run sweeps one a kill left behind); removed when the block ends, whatever
    happens. Nothing is renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep(path)
    tmp = tempfile.mkdtemp(prefix=f"{_prefix(path)}{os.getpid()}-", dir=path.parent)
    try:
        yield Path(tmp)
    finally:
        _remove(tmp)


@contextlib.contextmanager
def atomic_dir(path, force=False):
    """Yield a temporary directory beside `path`; on success it replaces `path`.

    An existing non-empty `path` is refused unless `force`; with `force` the old
    directory is removed only after the new one is in place."""
    with atomic_outputs() as out:
        yield out.dir(path, force)


class LockedError(EffgenError, RuntimeError):
    """Another process holds the lock on an output."""


@contextlib.contextmanager
def exclusive_lock(path, what):
    """Hold an exclusive lock on `path` (a hidden lock file, created if needed) for the
    block, or raise LockedError at once if another process holds it: two runs writing one
    output would delete each other's work. The kernel drops the lock when the holder
    dies, so a killed run never leaves it stuck."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise LockedError(f"{what} is in use by another run (pid {holder}, lock {path}); "
                              "wait for it to finish") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)
