"""Files that are never half-written and directories with one writer: atomic writes, the sweep of what a
killed write left, and an exclusive lock on an output directory. Imports only config (for UserError)."""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from .config import UserError

LOCK = ".lock"
# A full disk, a read-only or forbidden place: a problem the user fixes, reported in one line.
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def write_error(path: Path, e: OSError) -> UserError | None:
    """The one-line error for a failed write of `path`, or None if `e` is not a disk problem (a bug)."""
    if e.errno not in DISK_ERRNOS:
        return None
    return UserError(f"{path}: cannot write ({e.strerror}); the previous version is intact")


def atomic_write(path: Path, data, durable: bool = True) -> None:
    """Write `data` (bytes, or a function that writes to an open binary file) to `path` so that readers see
    either nothing or the whole file. `durable`: fsync before the rename, so that the file also survives a
    power loss whole; without it (prep's work files, which carry a checksum instead) a crash may leave it
    short or empty, never half-named."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")  # the pattern remove_partials sweeps
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)  # e.g. torch.save, without holding the whole file in memory first
            else:
                f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk, a signal: leave no half-written file behind
        tmp.unlink(missing_ok=True)
        raise


def remove_partials(directory: Path) -> int:
    """Delete the temporary files a killed `atomic_write` left under `directory`; returns how many."""
    partials = [p for p in Path(directory).rglob(".*.tmp*") if p.is_file()]
    for p in partials:
        p.unlink()
    return len(partials)


class DirectoryLock:
    """An exclusive lock on `directory` (flock on directory/.lock, which holds the holder's pid), held until
    release() or the process ends: the kernel drops a dead process's lock, so a stale one never blocks.
    A second writer is refused at once with one line naming the holder."""

    def __init__(self, directory: Path, what: str):
        self.path, self.what = Path(directory) / LOCK, what
        self._fd: int | None = None

    def acquire(self) -> "DirectoryLock":
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise UserError(f"{self.path.parent}: in use by another {self.what} (pid {holder}); wait for it "
                                "to finish or choose another output directory") from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder released and removed that file meanwhile: lock the new one
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        """Remove the lock file and drop the lock (removing first, so a waiter re-opens a fresh file)."""
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False
