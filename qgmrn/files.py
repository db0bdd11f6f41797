"""Small file helpers shared by training, data preparation and export (no torch here)."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path


def remove_stale(parent: Path, pattern: str, max_age_s: float) -> None:
    """Leftovers of a write that was killed (a `ckpt.pt.*.tmp`, an export's `.partial` staging
    directory): matches of `pattern` in `parent` older than `max_age_s`, so that a live write of
    another process, always younger, is never touched."""
    if not parent.is_dir():
        return
    now = time.time()
    for p in parent.glob(pattern):
        try:
            if now - p.stat().st_mtime > max_age_s:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()
        except OSError:
            pass


def os_error_line(e: OSError, where) -> str:
    """An OSError as the one line a user reads: what went wrong and the path it concerns."""
    return f"{e.strerror or e}: {e.filename or where}"


class Busy(RuntimeError):
    """Another process holds the lock; the message names it."""


def current_umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def open_no_link(path: Path, flags: int, mode: int = 0o644) -> int:
    """os.open that never follows a symbolic link at `path`: a link planted there (to make us
    overwrite its target) is removed and the file made afresh. Lock and pid files are ours."""
    while True:
        try:
            return os.open(path, flags | os.O_NOFOLLOW, mode)
        except OSError as e:
            if e.errno != errno.ELOOP:
                raise
            os.unlink(path)                      # a symlink: never a file we wrote


def write_private(path: Path, text: str) -> None:
    """Write a small file of ours (a pid file) without following a symlink planted at `path`."""
    fd = open_no_link(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    with os.fdopen(fd, "w") as f:
        f.write(text)


class FileLock:
    """An exclusive, non-blocking lock on `path` (flock: the kernel frees it when its holder dies),
    holding the holder's pid and host for whoever finds it taken. The file goes when released."""

    def __init__(self, path: Path, what: str):
        self.path = Path(path)
        while True:
            fd = open_no_link(self.path, os.O_RDWR | os.O_CREAT)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise Busy(f"{what} is in use by {holder}") from None
            try:        # the holder before us may have removed the file after we opened it: retry
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        self.fd = fd

    def release(self) -> None:
        self.path.unlink(missing_ok=True)
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


@contextlib.contextmanager
def atomic_file(path, binary: bool = False):
    """Write `path` whole or not at all, never through a link: the data goes to a fresh temporary
    file beside it (mkstemp: O_EXCL, so a symlink planted under any name is never followed), which
    then replaces `path` (rename replaces a link planted at `path` itself, not its target). Every
    file the trainer, export and the generators write atomically goes through here.

        with atomic_file(out / "eval.json") as f:
            f.write(text)
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())          # mkstemp makes it 0600; a run's files share one mode
        with os.fdopen(fd, "wb" if binary else "w") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_atomic(path, data: str | bytes) -> None:
    """atomic_file for text or bytes already in memory."""
    with atomic_file(path, binary=isinstance(data, bytes)) as f:
        f.write(data)


def append_no_link(path):
    """A file opened for appending that is never a symlink planted at `path` (metrics.jsonl)."""
    return os.fdopen(open_no_link(Path(path), os.O_WRONLY | os.O_APPEND | os.O_CREAT), "a")
