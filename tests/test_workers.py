"""Prep's workers: a pool that names the worker that died, keeps at most `ahead` tasks in flight and closes
without waiting on a worker that lived through its SIGTERM; workers that never outlive their parent, nor keep
its lock."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import PREP, held_prep

from alexnet_pipeline import files
from alexnet_pipeline.prep import WORK, workers


def _gone(pid: int) -> bool:
    """No such process, or a zombie (its parent died; init reaps it in its own time)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_a_parent_killed_by_any_signal_takes_its_workers_and_its_lock(sample, tmp_path):
    out = tmp_path / "o"
    args = ["--imagenet-root", str(sample[0] / "extracted"), "--out", str(out), "--workers", "2", "--no-progress",
            "--shard-size", "5"]
    proc = held_prep(args, out, "units")
    held = [int(pid) for t in os.listdir(f"/proc/{proc.pid}/task")
            for pid in Path(f"/proc/{proc.pid}/task/{t}/children").read_text().split()]
    assert len(held) == 2 and set(workers.held(out / WORK)) <= set(held)  # both workers, the held one among them
    proc.kill()  # SIGKILL: no handler of the parent runs
    deadline = time.monotonic() + 5
    while not all(_gone(pid) for pid in held) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert all(_gone(pid) for pid in held), "a worker outlived its parent"
    files.DirectoryLock(out, "test").acquire().release()  # the lock went with the parent
    r = subprocess.run(PREP + args, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_a_worker_that_outlived_its_parent_would_not_hold_the_lock(tmp_path):
    """The lock's descriptor is closed in every forked worker (an flock belongs to the open file, which fork
    shares): even a worker that lived on could not block the next prep."""
    lock = files.DirectoryLock(tmp_path, "alexnet-prep").acquire()
    ready, done = os.pipe()
    child = os.fork()
    if child == 0:  # a worker: closes its copy, then lives on while the "parent" lets go of its own
        files.close_inherited_locks()
        os.write(done, b"x")
        time.sleep(5)
        os._exit(0)
    try:
        assert os.read(ready, 1) == b"x"
        os.close(lock._fd)  # the parent's descriptor, as a dead parent's is closed by the kernel
        files._held.discard(lock._fd)
        lock._fd = None
        files.DirectoryLock(tmp_path, "next").acquire().release()
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)


def _deaf_for(seconds: float, ready: Path) -> None:
    """A task that lives through SIGTERM, as a worker still starting does (it runs the parent's handler, and the
    signal is dropped once the worker's own start-up has set the default)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    ready.touch()
    time.sleep(seconds)


def test_closing_the_pool_never_waits_for_a_worker_that_lived_through_its_sigterm(tmp_path):
    ready = tmp_path / "deaf"
    with workers.pool(2, tmp_path) as pool:
        pool.submit(_deaf_for, 60, ready)
        deadline = time.monotonic() + 10
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert ready.exists(), "the task never started"
        pids = [p.pid for p in pool._processes.values()]
        t0 = time.monotonic()
    assert time.monotonic() - t0 < 20, "close() waited for the worker's task"
    assert all(_gone(pid) for pid in pids)


def _killed(ready: Path) -> None:
    workers.note_busy("train/n01440764-0007")
    ready.write_text(str(os.getpid()))
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_worker_killed_by_a_signal_is_the_one_named_not_the_others_stopped_after_it(tmp_path):
    ready = tmp_path / "pid"
    with workers.pool(2, tmp_path) as pool:
        with pytest.raises(workers.WorkerDied) as died:
            pool.wait(pool.submit(_killed, ready))
    assert f"worker {ready.read_text()} died (SIGKILL) while preparing train/n01440764-0007" in str(died.value)


def test_imap_keeps_at_most_ahead_items_in_flight(tmp_path):
    taken: list[int] = []

    def items():
        for k in range(10):
            taken.append(k)
            yield k

    with workers.pool(2, tmp_path) as pool:
        results = pool.imap(abs, items(), ahead=3)
        assert next(results) == 0 and len(taken) == 3  # the archive readers behind `items` must not run ahead
        assert list(results) == list(range(1, 10))
    assert list(workers.Serial().imap(abs, iter(range(4)))) == [0, 1, 2, 3]


def test_one_worker_is_this_process_and_more_are_processes_started_at_once(tmp_path):
    assert isinstance(workers.pool(1, tmp_path), workers.Serial)
    with workers.pool(2, tmp_path) as pool:
        assert isinstance(pool, workers.Pool) and len(pool._processes) == 2
        assert len({pool.wait(pool.submit(os.getpid)) for _ in range(8)} - {os.getpid()}) >= 1


def test_a_workers_note_of_its_unit_is_the_latest_one_alone(tmp_path, monkeypatch):
    """The note a dead worker is named by: a shorter name written after a longer one leaves no tail of it."""
    monkeypatch.setattr(workers, "_work", tmp_path)
    monkeypatch.setattr(workers, "_busy_fd", None)
    workers.note_busy("train/n01440764-0003")
    workers.note_busy("val/7")
    try:
        assert workers.busy_path(tmp_path, os.getpid()).read_text() == "val/7"
    finally:
        os.close(workers._busy_fd)


def test_closing_the_pool_removes_its_workers_notes(tmp_path):
    """A worker's busy note and the test hook's held note are the pool's: gone with it, so a resumed run in the
    same work directory never reads another run's."""
    for note in (workers.busy_path(tmp_path, 123), workers.held_path(tmp_path, 123)):
        note.write_text("train/n01440764-0001")
    with workers.pool(2, tmp_path):
        pass
    assert list(tmp_path.iterdir()) == []


def test_the_held_processes_are_read_from_their_notes_alone(tmp_path):
    for name in (".held-123", ".busy-5", ".held-77", "held-9"):
        (tmp_path / name).write_text("units")
    assert workers.held(tmp_path) == [77, 123]


def test_the_images_done_counter_adds_up_in_a_worker_and_is_optional(monkeypatch):
    import multiprocessing as mp

    monkeypatch.setattr(workers, "counter", None)
    workers.count(5)  # one worker, no progress bar: nothing to add to
    shared = mp.Value("q", 0)
    monkeypatch.setattr(workers, "counter", shared)
    workers.count()
    workers.count(4)
    assert shared.value == 5
