"""Files that are never half-written and directories with one writer: atomic writes, the sweep of what a
killed write left, an exclusive lock on an output directory (closed in forked workers), and the open-file
limit (raised to the hard limit; EMFILE said in one line). Imports only config (for UserError)."""

from __future__ import annotations

import errno
import fcntl
import os
import resource
from pathlib import Path

from .config import UserError

LOCK = ".lock"
# A full disk, a read-only or forbidden place: a problem the user fixes, reported in one line.
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}
# The process's open-file limit (EMFILE) or the system's table (ENFILE): not the input's fault.
OPEN_FILE_ERRNOS = {errno.EMFILE, errno.ENFILE}


def raise_open_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (allowed without privileges; most shells and systemd
    units give 1,024 soft under a higher hard limit); returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass  # a limit the kernel caps lower (nr_open): keep the one in force
    return soft


def open_files_error(e: OSError) -> str:
    """The one line for EMFILE/ENFILE: which limit, and the remedy."""
    where = f"{e.filename}: " if e.filename else ""
    if e.errno == errno.ENFILE:
        return (f"{where}the system's open-file table is full (fs.file-max); close other programs or raise it, then "
                "run the same command again to resume (finished work is kept)")
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return (f"{where}too many open files (this process may hold {soft:,}: ulimit -n); raise the limit (ulimit -n "
            "4096, or the hard limit in /etc/security/limits.conf) and run the same command again to resume "
            "(finished work is kept)")


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


_held: set[int] = set()  # descriptors of the locks this process holds (forked children close theirs)


def close_inherited_locks() -> None:
    """In a forked child: close its copies of the parent's lock descriptors. An flock belongs to the open file,
    which a fork shares: a child holding a copy would keep the lock after its parent died."""
    for fd in list(_held):
        os.close(fd)
    _held.clear()


class DirectoryLock:
    """An exclusive lock on `directory` (flock on directory/.lock, which holds the holder's pid), held until
    release() or the process ends: the kernel drops a dead process's lock, so a stale one never blocks (forked
    workers close their copies, close_inherited_locks). A second writer is refused at once with one line
    naming the holder."""

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
        _held.add(fd)
        return self

    def release(self) -> None:
        """Remove the lock file and drop the lock (removing first, so a waiter re-opens a fresh file)."""
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            _held.discard(self._fd)
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False
