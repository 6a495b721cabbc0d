"""Publishing a result in one atomic step.

A result folder is written whole into a hidden staging folder beside ``out`` (same parent, so
same file system) and then renamed onto ``out``; an existing ``out`` is first renamed aside and
removed only once the new one is in place. A reader therefore sees the old result or the new
one, never a mixture, whatever kills the writer and whenever.

Names, all in ``out``'s parent:

``.{name}.prism-stage-{pid}-{random}``  a result (or file) being written
``.{name}.prism-old-{pid}-{random}``    the previous result, between the swap and its removal
``.{name}.prism-lock``                  the lock the swap holds; it holds the holder's pid

Two writers into one ``out``: each writes its own stage, and only the swap (two renames) runs
under an exclusive ``fcntl.flock`` on the lock file. A second writer therefore *waits* (up to
``wait_s``, default :data:`LOCK_WAIT_S`) rather than being refused: the swap takes milliseconds,
batch jobs that happen to share an ``out`` should not fail for it, and the last writer wins
whole. A wait that times out is an :class:`OutputError` naming the holder's pid.

Leftovers of killed runs are swept by the next run into the same parent: a stage or old folder
is abandoned when nobody holds the ``flock`` its writer keeps on it and its pid is not alive
here (or it is older than :data:`STALE_AFTER_S`, for pids of another host or container). An
old folder whose ``out`` is missing (killed between the two renames) is put back, not removed.

Files (``invert --save``) need no lock: ``os.replace`` of a finished staged file is atomic, and
concurrent writers leave one whole file (the last).
"""
from __future__ import annotations

import errno
import fcntl
import os
import re
import secrets
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import OutputError

__all__ = ["LOCK_WAIT_S", "STALE_AFTER_S", "check_writable", "staged_dir", "publish_dir",
           "staged_file", "publish_file", "sweep_stale"]

LOCK_WAIT_S = 60.0
"""How long a writer waits for another writer's swap into the same ``out`` (seconds)."""
STALE_AFTER_S = 24 * 3600.0
"""Age after which an unlocked leftover is removed even if its pid looks alive (pid reuse,
another host sharing the folder)."""

_LEFTOVER = re.compile(r"\.(?P<name>.+)\.prism-(?:(?P<tag>stage|old)-(?P<pid>\d+)-[0-9a-f]+|lock)")


def _hidden(out: Path, tag: str) -> Path:
    return out.with_name(f".{out.name}.prism-{tag}-{os.getpid()}-{secrets.token_hex(4)}")


def _output_error(path, exc: OSError, flag: str, doing: str = "write") -> OutputError:
    """One line: the path, what failed, and what to do."""
    where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(path) else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        what, todo = "no space left on the device", f"free some space or choose another {flag}"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        what, todo = "permission denied", f"choose a {flag} in a folder you can write to"
    else:
        what, todo = exc.strerror or str(exc), f"choose another {flag}"
    return OutputError(f"{flag} {path}: cannot {doing}{where}: {what}; {todo}")


def _absolute(out, flag: str) -> Path:
    if out is None or not str(out).strip():
        raise OutputError(f"{flag} is empty; give a path such as results/edit-1")
    path = Path(os.path.abspath(os.fspath(out)))
    if not path.name:
        raise OutputError(f"{flag} {out} is the root folder; give a folder below it")
    if path.is_symlink():  # publish where the link points: a swap would replace the link itself
        path = Path(os.path.realpath(path))
    return path


def _check_replaceable(out: Path, marker: str | None, flag: str) -> None:
    """An existing folder is replaced whole, so it must be a previous result (or empty):
    ``--out ~/Documents`` must not delete someone's documents."""
    if marker is None:
        return
    try:
        entries = sorted(os.listdir(out))
    except OSError as exc:
        raise _output_error(out, exc, flag, "read the existing folder") from None
    if entries and marker not in entries:
        shown = ", ".join(entries[:3]) + (", …" if len(entries) > 3 else "")
        raise OutputError(f"{flag} {out} exists and is not a prism-rt result (no {marker}; it holds {shown}); "
                          f"it would be replaced whole, so give a new or empty folder")


def check_writable(out, *, folder: bool = True, marker: str | None = "result.json", flag: str = "--out") -> Path:
    """Preflight, before any model loads: ``out`` can be published. Returns it absolute.

    Refuses an empty path, a folder ``out`` that is an existing file (or a file ``out`` that is
    a folder), an existing folder that is not a previous result (see ``marker``), the current
    folder or one above it, and a parent that is a file or not writable. A parent that does not
    exist yet is fine if its nearest existing ancestor is writable (it is made when writing).
    """
    path = _absolute(out, flag)
    if folder:
        if path.exists() and not path.is_dir():
            raise OutputError(f"{flag} {out} exists and is not a folder; choose another {flag}")
        if Path.cwd().resolve().is_relative_to(path.resolve()):
            raise OutputError(f"{flag} {out} is the current folder or above it; it would be replaced whole, "
                              f"so give a folder below it")
        if path.is_dir():
            _check_replaceable(path, marker, flag)
    elif path.is_dir():
        raise OutputError(f"{flag} {out} is a folder; give a file name such as {path / 'inversion.npz'}")
    ancestor = path.parent
    while not os.path.lexists(ancestor):
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"{flag} {out} lies below {ancestor}, which is a file; choose another {flag}")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(f"{flag} {out}: cannot write into {ancestor}: permission denied; "
                          f"choose a {flag} in a folder you can write to")
    return path


def _try_flock(path: Path) -> int | None:
    """An fd holding an exclusive flock on ``path`` (file or folder), or None if another holds it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


class _Lock:
    """Exclusive lock of one ``out``: flock on ``.{name}.prism-lock``, holder's pid inside.

    The file is unlinked on release; a taker whose lock landed on an unlinked inode (it opened
    the file just before the unlink) sees the inode differ from the path's and retries, so
    removal never lets two holders in. ``wait_s=0`` tries once.
    """

    def __init__(self, out: Path, wait_s: float, flag: str = "--out"):
        self.out, self.wait_s, self.flag, self.fd = out, wait_s, flag, None
        self.path = out.with_name(f".{out.name}.prism-lock")

    def acquire(self) -> bool:
        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as exc:
                raise _output_error(self.out, exc, self.flag, "lock") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.01)
                continue
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            self.fd = fd
            return True

    def holder(self) -> str:
        try:
            return self.path.read_text().strip() or "unknown"
        except OSError:
            return "unknown"

    def __enter__(self) -> "_Lock":
        if not self.acquire():
            raise OutputError(f"{self.flag} {self.out} is being published by another process (pid {self.holder()}) "
                              f"for over {self.wait_s:g} s; wait for it to finish or choose another {self.flag}")
        return self

    def __exit__(self, *exc) -> None:
        try:
            os.unlink(self.path)  # safe while held: later takers check the inode
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except OSError:
            pass


def sweep_stale(parent, *, stale_after_s: float = STALE_AFTER_S) -> list[Path]:
    """Remove what killed runs left in ``parent``; returns the paths removed or restored.

    Never touches a leftover whose writer still holds its flock. Errors are ignored: sweeping
    is housekeeping and must not fail a run.
    """
    parent = Path(parent)
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return []
    done = []
    now = time.time()
    for entry in entries:
        match = _LEFTOVER.fullmatch(entry.name)
        if not match:
            continue
        path = Path(entry.path)
        try:
            if match["tag"] is None:  # a lock file left by a killed holder: free it if unheld
                lock = _Lock(parent / match["name"], 0)
                if lock.acquire():
                    lock.__exit__()
                continue
            young = now - entry.stat(follow_symlinks=False).st_mtime < stale_after_s
            if young and _pid_alive(int(match["pid"])):  # (our own pid too: a sibling thread's stage)
                continue
            fd = _try_flock(path)
            if fd is None:
                continue
            try:
                out = parent / match["name"]
                if match["tag"] == "old":
                    lock = _Lock(out, 0)
                    if not lock.acquire():
                        continue
                    try:
                        if not os.path.lexists(out):  # killed between the two renames: put it back
                            os.rename(path, out)
                            done.append(path)
                            continue
                    finally:
                        lock.__exit__()
                _remove(path)
                done.append(path)
            finally:
                os.close(fd)
        except OSError:
            continue
    return done


def publish_dir(stage, out, *, marker: str | None = "result.json", wait_s: float = LOCK_WAIT_S,
                flag: str = "--out") -> Path:
    """Rename the finished folder ``stage`` onto ``out`` in one step (see the module docstring).

    ``stage`` must be in ``out``'s parent. An existing ``out`` must be a folder holding
    ``marker`` (or be empty); it is renamed aside, and put back if the new one cannot be moved
    in. The old folder is removed after the lock is released.
    """
    stage, out = Path(stage), _absolute(out, flag)
    old = old_fd = None
    with _Lock(out, wait_s, flag):
        try:
            if os.path.lexists(out):
                if out.is_symlink() or not out.is_dir():
                    raise OutputError(f"{flag} {out} exists and is not a folder; choose another {flag}")
                _check_replaceable(out, marker, flag)
                old = _hidden(out, "old")
                old_fd = _try_flock(out)  # keeps sweepers off it until it is removed
                os.rename(out, old)
            try:
                os.rename(stage, out)
            except OSError:
                if old is not None:
                    os.rename(old, out)
                    old = None
                raise
        except OSError as exc:
            if old_fd is not None:
                os.close(old_fd)
            raise _output_error(out, exc, flag, "publish the result") from None
    if old is not None:
        _remove(old)
    if old_fd is not None:
        os.close(old_fd)
    return out


@contextmanager
def staged_dir(out, *, marker: str | None = "result.json", wait_s: float = LOCK_WAIT_S,
               flag: str = "--out") -> Iterator[Path]:
    """Yield an empty staging folder beside ``out``; publish it onto ``out`` when the block
    ends normally, remove it on any exception. An ``OSError`` in the block (full disk,
    permissions) becomes an :class:`OutputError` naming ``out``.
    """
    out = check_writable(out, marker=marker, flag=flag)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(out.parent)
        stage = _hidden(out, "stage")
        os.mkdir(stage, 0o777)
        fd = _try_flock(stage)
    except OSError as exc:
        raise _output_error(out, exc, flag, "create a staging folder") from None
    try:
        try:
            yield stage
        except OSError as exc:
            raise _output_error(out, exc, flag) from None
        publish_dir(stage, out, marker=marker, wait_s=wait_s, flag=flag)
    finally:
        if os.path.lexists(stage):
            _remove(stage)
        if fd is not None:
            os.close(fd)


def publish_file(tmp, path, *, flag: str = "--save") -> Path:
    """Replace ``path`` by the finished file ``tmp`` (same folder) in one ``os.replace``."""
    path = _absolute(path, flag)
    if path.is_dir():
        raise OutputError(f"{flag} {path} is a folder; give a file name such as {path / 'inversion.npz'}")
    try:
        os.replace(tmp, path)
    except OSError as exc:
        raise _output_error(path, exc, flag) from None
    return path


@contextmanager
def staged_file(path, *, flag: str = "--save") -> Iterator[Path]:
    """Yield a staging file name beside ``path`` (the file exists, empty); ``os.replace`` it
    onto ``path`` when the block ends normally, remove it on any exception. Write it by name or
    by opening it; an ``OSError`` in the block becomes an :class:`OutputError` naming ``path``.
    """
    path = check_writable(path, folder=False, flag=flag)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(path.parent)
        tmp = _hidden(path, "stage")
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        fd = _try_flock(tmp)
    except OSError as exc:
        raise _output_error(path, exc, flag, "create a staging file") from None
    try:
        try:
            yield tmp
        except OSError as exc:
            raise _output_error(path, exc, flag) from None
        publish_file(tmp, path, flag=flag)
    finally:
        if os.path.lexists(tmp):
            _remove(tmp)
        if fd is not None:
            os.close(fd)
