"""The run directory of alexnet-train, and the only code that writes or reads its files.

    RUN/config.json      the options of the run (TrainConfig), rewritten at every start
    RUN/checkpoint.pt    everything to continue exactly: weights, optimizer, schedule, history, every rank's
                         RNG and data position (written at every epoch end and on SIGTERM/SIGINT)
    RUN/best.pt          the weights of the epoch with the lowest validation top-1 error so far
    RUN/log.jsonl        one line per log interval (every step's loss), per epoch, and the final ten-crop
    RUN/summary.json, RUN/curves.png, RUN/tensorboard/   at the end of the run (TensorBoard as it goes)

Checkpoints hold plain tensors and Python values only (torch.load(weights_only=True) reads them), weights
on the CPU in the grouped layout, so they load on any machine and in any layout. Every file appears by an
atomic rename; a killed write leaves a `.NAME.tmpPID` file that the next start removes.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
from pathlib import Path

import torch

from .config import UserError
from .shards import atomic_write, remove_partials

CHECKPOINT, BEST, LOG, SUMMARY, PLOT, CONFIG = ("checkpoint.pt", "best.pt", "log.jsonl", "summary.json",
                                                "curves.png", "config.json")
REQUIRED = ("model", "model_config", "config", "classes", "epoch", "step")
FORMAT = 2  # 2: optimizer state by parameter name (PaperSGD), recipe options in the config


def read_checkpoint(path: Path) -> dict:
    """A checkpoint (or best.pt) written by alexnet-train; UserError naming the file if it is anything else."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: empty file, not a checkpoint (a disk that filled up?)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{path}: not a checkpoint alexnet-train can read ({first})") from None
    missing = set(REQUIRED) - set(ckpt if isinstance(ckpt, dict) else ())
    if missing:
        raise UserError(f"{path}: not an alexnet-train checkpoint (missing {', '.join(sorted(missing))})")
    if ckpt.get("format", 1) != FORMAT:
        raise UserError(f"{path}: written by another version of alexnet-train (format {ckpt.get('format', 1)}, "
                        f"this one reads {FORMAT})")
    return ckpt


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
    """RUN/ for one run. Rank 0 writes; every rank may read. Disk errors become UserError naming the file."""

    def __init__(self, path: Path, main: bool = True):
        self.path, self.main = Path(path), main

    def file(self, name: str) -> Path:
        return self.path / name

    def start(self, resume: bool) -> dict | None:
        """Prepare RUN/ and return the checkpoint to continue from (None: start from scratch).

        A directory holding a checkpoint is refused unless `resume`; `resume` on a directory without one
        starts from scratch, so a preemptible job can always pass it. Files of a run killed before its first
        checkpoint are discarded; temporary files of killed writes are removed."""
        ckpt_path = self.file(CHECKPOINT)
        if not self.main:  # rank 0 has prepared RUN/ (Trainer orders this); the others only read
            return read_checkpoint(ckpt_path) if resume and ckpt_path.exists() else None
        _writable_dir(self.path)
        remove_partials(self.path)
        if ckpt_path.exists() and not resume:
            raise UserError(f"{self.path} already holds a run; continue it with --resume or choose another --out")
        if not ckpt_path.exists():  # whatever a run killed before its first checkpoint logged will be redone
            for name in (LOG, SUMMARY, PLOT):
                self.file(name).unlink(missing_ok=True)
            return None
        ckpt = read_checkpoint(ckpt_path)
        self.trim_log(ckpt["step"])
        return ckpt

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
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
                raise UserError(f"{self.file(name)}: cannot write ({e.strerror}); the previous version is intact")
            raise

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
            raise UserError(f"{self.file(LOG)}: cannot write ({e.strerror})") from None

    def save(self, name: str, ckpt: dict) -> None:
        """Write a checkpoint atomically (a crash leaves the previous one whole)."""
        if self.main:
            self._write(name, lambda f: torch.save({**ckpt, "format": FORMAT}, f))


def recipe_differences(saved: dict, current: dict, names) -> list[str]:
    """'name: saved -> current' for each recipe option that differs between two configs (as JSON)."""
    return [f"{n} {saved.get(n)!r} -> {current.get(n)!r}" for n in names if saved.get(n) != current.get(n)]
