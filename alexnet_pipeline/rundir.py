"""The run directory of alexnet-train, and the only code that writes or reads its files (the checkpoints
through checkpoint.py, which owns their format).

    RUN/config.json      the options of the run (TrainConfig), rewritten at every start
    RUN/checkpoint.pt    everything to continue exactly (written at every epoch end and on SIGTERM/SIGINT)
    RUN/best.pt          the weights of the epoch with the lowest validation top-1 error so far
    RUN/log.jsonl        one line per log interval (every step's loss), per epoch, and the final ten-crop
    RUN/summary.json, RUN/curves.png, RUN/filters.png, RUN/tensorboard/   at the end (TensorBoard as it goes)
    RUN/.lock            held by the run writing here: a second alexnet-train on the same RUN is refused

Every file appears by an atomic rename; a killed write leaves a `.NAME.tmpPID` file that the next start
removes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .checkpoint import Checkpoint
from .config import UserError
from .files import DirectoryLock, atomic_write, remove_partials, write_error

CHECKPOINT, BEST, LOG, SUMMARY, PLOT, CONFIG, FILTERS = ("checkpoint.pt", "best.pt", "log.jsonl", "summary.json",
                                                         "curves.png", "config.json", "filters.png")


def _writable_dir(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise UserError(f"{path}: exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{path}: cannot create the run directory ({e.strerror})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"{path}: not writable")


class RunDir:
    """RUN/ for one run. Rank 0 writes (holding RUN/.lock); every rank may read. Disk errors become
    UserError naming the file."""

    def __init__(self, path: Path, main: bool = True):
        self.path, self.main = Path(path), main
        self.lock = DirectoryLock(self.path, "alexnet-train")

    def file(self, name: str) -> Path:
        return self.path / name

    def start(self, resume: bool) -> Checkpoint | None:
        """Take RUN/ and return the checkpoint to continue from (None: start from scratch).

        A directory holding a checkpoint is refused unless `resume`; `resume` on a directory without one
        starts from scratch, so a preemptible job can always pass it. Files of a run killed before its first
        checkpoint are discarded; temporary files of killed writes are removed."""
        ckpt_path = self.file(CHECKPOINT)
        if not self.main:  # rank 0 has prepared RUN/ (Trainer orders this); the others only read
            return Checkpoint.load(ckpt_path, resumable=True) if resume and ckpt_path.exists() else None
        _writable_dir(self.path)
        self.lock.acquire()
        remove_partials(self.path)
        if ckpt_path.exists() and not resume:
            raise UserError(f"{self.path} already holds a run; continue it with --resume or choose another --out")
        if not ckpt_path.exists():  # whatever a run killed before its first checkpoint logged will be redone
            for name in (LOG, SUMMARY, PLOT, FILTERS):
                self.file(name).unlink(missing_ok=True)
            return None
        ckpt = Checkpoint.load(ckpt_path, resumable=True)
        self.trim_log(ckpt.step)
        return ckpt

    def close(self) -> None:
        self.lock.release()

    def read_log(self) -> list[dict]:
        """The records of RUN/log.jsonl (a line cut short by a kill is passed over)."""
        log = self.file(LOG)
        if not log.exists():
            return []
        records = []
        for line in log.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records

    def trim_log(self, step: int) -> None:
        """Drop log lines for steps after `step` (written after the checkpoint, by a run that then died)."""
        if self.file(LOG).exists():
            keep = [r for r in self.read_log() if r.get("step", 0) <= step]
            self._write(LOG, "".join(json.dumps(r) + "\n" for r in keep).encode())

    def _write(self, name: str, data) -> None:
        try:
            atomic_write(self.file(name), data)
        except OSError as e:
            raise (write_error(self.file(name), e) or e) from None

    def write_json(self, name: str, obj) -> None:
        if self.main:
            self._write(name, json.dumps(obj, indent=1).encode())

    def append_log(self, record: dict) -> None:
        if not self.main:
            return
        try:
            with open(self.file(LOG), "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise (write_error(self.file(LOG), e) or e) from None

    def save(self, name: str, ckpt: Checkpoint) -> None:
        """Write a checkpoint atomically (a crash or a full disk leaves the previous one whole)."""
        if self.main:
            ckpt.save(self.file(name))
