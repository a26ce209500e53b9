"""Prep's worker processes (fork): a pool that stops the run when a worker dies, naming it, and workers that
never outlive their parent.

- A worker killed by a signal (the OOM killer, a crash in a decoder) breaks the pool (ProcessPoolExecutor
  breaks instead of waiting forever for the lost task); `Pool.died` names the worker, how it died and the
  unit or shard it was on (each worker notes it in `.work/.busy-PID`).
- A parent killed by any signal takes its workers with it: each asks the kernel for SIGKILL when its parent
  dies (prctl PR_SET_PDEATHSIG) and closes its copies of the parent's lock descriptors, so the output
  directory's lock goes with the parent and the next prep can resume at once.
- Tests stop a run at a known point: with ALEXNET_PREP_HOLD=units (or shards) in the environment, each process
  that finishes its first unit (or shard) says so in `.work/.held-PID` and waits there to be killed.
"""

from __future__ import annotations

import collections
import ctypes
import multiprocessing as mp
import os
import signal
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from .. import files

HOLD = "ALEXNET_PREP_HOLD"  # test hook: "units" or "shards"
_PR_SET_PDEATHSIG = 1

counter: Any = None  # images done, shared with the parent for a progress bar that moves within units
_work: Path | None = None
_busy_fd: int | None = None  # this worker's note of what it is preparing, .work/.busy-PID (read when it dies)
_held: set[str] = set()


class WorkerDied(Exception):
    """A worker process died (a signal, the OOM killer, a crash in native code); finished work is kept and
    the same command resumes. The message names the unit and the signal."""


def busy_path(work: Path, pid: int) -> Path:
    return work / f".busy-{pid}"


def held_path(work: Path, pid: int) -> Path:
    return work / f".held-{pid}"


def held(work: Path) -> list[int]:
    """The pids of processes held by the test hook (ALEXNET_PREP_HOLD) in a run whose work directory is `work`."""
    return sorted(int(p.name.split("-")[1]) for p in Path(work).glob(".held-*"))


def _die_with_parent(parent: int) -> None:
    """SIGKILL this process when its parent dies (Linux); if it died already, exit now."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # no prctl here: the getppid check below still catches an early death
        pass
    if os.getppid() != parent:
        os._exit(1)


def _init(shared_counter, work: Path | None, parent: int) -> None:
    global counter, _work
    # First: Ctrl-C reaches the whole process group, the parent alone reports it; SIGTERM ends a worker
    # quietly (the parent's handler, inherited through fork, would raise in here).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _die_with_parent(parent)
    files.close_inherited_locks()
    counter, _work = shared_counter, work
    from threadpoolctl import threadpool_limits

    # one process per core: the statistics' dot products on one BLAS thread are 1.6x faster than with OpenBLAS
    # waking a thread per core for every image (0.13 against 0.21 ms per image); kept for the worker's life
    threadpool_limits(1, user_api="blas")


def note_busy(what: str) -> None:
    """Note (in a worker) what it is preparing; "" when it is done with it."""
    global _busy_fd
    if _work is None:  # the serial path has no pool to lose
        return
    if _busy_fd is None:
        _busy_fd = os.open(busy_path(_work, os.getpid()), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.ftruncate(_busy_fd, 0)
    os.pwrite(_busy_fd, what.encode(), 0)


def count(n: int = 1) -> None:
    """Add to the images-done counter the parent's progress reads."""
    if counter is not None:
        with counter.get_lock():
            counter.value += n


def hold(stage: str, work: Path) -> None:
    """The test hook: with ALEXNET_PREP_HOLD=`stage`, after this process's first unit or shard, say so and wait
    to be killed (SIGKILL, SIGTERM; the parent's own handlers apply when it holds itself)."""
    if os.environ.get(HOLD) != stage or stage in _held:
        return
    _held.add(stage)
    files.atomic_write(held_path(work, os.getpid()), stage.encode(), durable=False)
    while True:
        time.sleep(3600)


class Pool:
    """The worker processes, with what multiprocessing.Pool lacks: a worker that dies stops the run, named
    with its unit and signal. `size` workers, started at once (a first task each), so that a worker that
    cannot start stops the run here."""

    def __init__(self, workers: int, work: Path | None, shared_counter):
        self.work, self.size = work, workers
        self.executor = ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"), initializer=_init,
                                            initargs=(shared_counter, work, os.getpid()))
        self._processes: dict = {}
        try:
            for f in [self.submit(os.getpid) for _ in range(workers)]:
                self.wait(f)
        except BaseException:
            self.close()
            raise

    def submit(self, fn, *args):
        try:
            future = self.executor.submit(fn, *args)
        except BrokenProcessPool:  # a worker died while the parent was busy elsewhere (reading an archive)
            raise self.died() from None
        # the executor forgets its processes once broken: keep them, to name the one that died
        self._processes.update(getattr(self.executor, "_processes", None) or {})
        return future

    def wait(self, future, tick=lambda: None):
        """The result of one task (re-raising its worker's exception, or WorkerDied if a worker died), calling
        `tick` (a progress update) while it is in flight."""
        while True:
            try:
                result = future.result(timeout=0.25)
                break
            except FutureTimeout:
                tick()
            except BrokenProcessPool:
                raise self.died() from None
        tick()
        return result

    def imap(self, fn, items, ahead: int, tick=lambda: None):
        """fn(item) for each item, in order, at most `ahead` in flight (items may be a generator that must not
        run far ahead, like archive readers)."""
        in_flight: collections.deque = collections.deque()
        for item in items:
            in_flight.append(self.submit(fn, item))
            while len(in_flight) >= ahead:
                yield self.wait(in_flight.popleft(), tick)
        while in_flight:
            yield self.wait(in_flight.popleft(), tick)

    def map(self, fn, items, chunksize: int = 1) -> list:
        """[fn(item) for item in items], in chunks of `chunksize` items per task."""
        chunks = [items[i:i + chunksize] for i in range(0, len(items), chunksize)]
        return [r for rs in self.imap(_apply, ((fn, c) for c in chunks), 4 * self.size) for r in rs]

    def died(self) -> WorkerDied:
        """The error of a broken pool: which worker died, how, and what it was preparing."""
        dead = []
        for process in self._processes.values():
            if process.is_alive():
                process.terminate()  # the executor stops the others too; this bounds the joins below
        for pid, process in self._processes.items():
            code = _exit_code(process)
            if code not in (None, 0):
                dead.append((code == -signal.SIGTERM, pid, code))  # the others were terminated after it
        if not dead:
            return WorkerDied("a worker process died; finished work is kept: run the same command again to resume")
        _, pid, code = min(dead)
        how = signal.Signals(-code).name if code < 0 else f"exit status {code}"
        busy = busy_path(self.work, pid) if self.work is not None else None
        what = busy.read_text() if busy is not None and busy.exists() else ""
        doing = f" while preparing {what}" if what else ""
        return WorkerDied(f"worker {pid} died ({how}){doing}; finished work is kept: run the same command again "
                          "to resume")

    def close(self) -> None:
        processes = list(self._processes.values())
        for process in processes:
            if process.is_alive():
                process.terminate()  # a signal or an error: stop at once, unfinished units are redone
        deadline = time.monotonic() + 2  # one wait for all: 16 workers stuck cost 2 s, not 32
        for process in processes:
            # A worker still starting runs the parent's SIGTERM handler, and Python drops the signal once _init
            # has set the default: it lives on, waiting for the call queue's lock that a killed sibling held,
            # and the shutdown below would wait for it forever (seen under load). SIGKILL cannot be dropped.
            process.join(timeout=max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join()
        self.executor.shutdown(wait=True, cancel_futures=True)
        if self.work is not None and self.work.is_dir():
            for note in [*self.work.glob(".busy-*"), *self.work.glob(".held-*")]:
                note.unlink(missing_ok=True)


    def __enter__(self) -> "Pool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Serial:
    """The pool's stand-in for one worker: the same calls, run in this process, in order."""

    size = 1

    def imap(self, fn, items, ahead: int = 1, tick=lambda: None):
        for item in items:
            yield fn(item)
            tick()

    def map(self, fn, items, chunksize: int = 1) -> list:
        return [fn(item) for item in items]

    def close(self) -> None:
        pass

    def __enter__(self) -> "Serial":
        return self

    def __exit__(self, *exc) -> None:
        pass


def pool(workers: int, work: Path | None = None, shared_counter=None) -> Pool | Serial:
    """`workers` processes (a Pool), or this process alone (Serial) for one: callers write one path for both."""
    return Pool(workers, work, shared_counter) if workers > 1 else Serial()


def _apply(args):
    fn, chunk = args
    return [fn(x) for x in chunk]


def _exit_code(process, seconds: float = 5.0):
    """A worker's exit code once it has exited. The executor's own thread may be reaping it at the same time:
    whichever waitpid loses sees no child and leaves the code unset for a moment, so ask again until it is
    there (reading it once named the wrong worker, now and then)."""
    deadline = time.monotonic() + seconds
    while process.exitcode is None and time.monotonic() < deadline:
        process.join(timeout=0.05)
    return process.exitcode
