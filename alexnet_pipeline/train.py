"""alexnet-train: the paper's AlexNet and recipe, data-parallel over any number of processes (torchrun).

Defaults are the paper's (README, "Fidelity"): SGD with the paper's momentum rule (0.9) and weight decay
5e-4 on weights, a global batch of 128, lr 0.01 divided by 10 when the validation error stops improving (at
most three times), 90 epochs, per-pixel mean, PCA lighting, the paper's init. Another global batch scales
the default lr linearly (0.01 x batch / 128, Goyal et al. 2017). Deviations are named options.

The loop never waits for the GPU per step: each step's [loss, hits, samples] stays on the device and is read
once per log interval, where non-finite losses are found (and named by step) and where ranks agree on
stopping after a signal. The parts come from build.py, RUN/ is rundir.py's, the checkpoint format
checkpoint.py's and the log runlog.py's; a checkpoint holds every rank's RNG and data position, so --resume
continues with exactly the batches, crops and dropout masks the uninterrupted run would use.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import build, distributed, evaluate, storage
from .checkpoint import Checkpoint, RankState, TrainingState, preprocessing
from .clock import StepClock
from .config import UserError, check, option, recipe_fields, to_json
from .optim import MOMENTUM_RULES
from .options import Augmentation, Decoding, Network, Order, Placement, Shards, Stepping
from .rundir import BEST, CHECKPOINT, CONFIG, FILTERS, LOG, PLOT, SUMMARY, RunDir
from .runlog import RunLog
from .shards import class_names, load_manifest, load_stats

__all__ = ["TrainConfig", "Trainer", "run", "BEST", "CHECKPOINT", "LOG", "PLOT", "SUMMARY", "FILTERS"]


def _positive(value) -> str | None:
    return None if value is None or value > 0 else "must be positive"


@dataclass(kw_only=True)
class TrainConfig(Shards, Placement, Augmentation, Order, Decoding, Network, Stepping):
    """Options of alexnet-train (saved as RUN/config.json and in every checkpoint)."""

    out: Path = option(dataclasses.MISSING, "run directory: checkpoints, logs, plots")
    epochs: int = option(90, "epochs to train (the paper: about 90)", minimum=1)
    global_batch: int = option(128, "samples per step over all ranks (the paper: 128); each rank takes its share",
                               minimum=1, recipe=True)
    lr: float | None = option(None, "learning rate (default 0.01 x global-batch / 128: the paper's 0.01 at 128)",
                              validate=_positive, recipe=True)
    momentum: float = option(0.9, "momentum", minimum=0.0, maximum=1.0, recipe=True)
    weight_decay: float = option(5e-4, "weight decay", minimum=0.0, recipe=True)
    decay_biases: bool = option(False, "also decay biases (torch's SGD and the torchvision recipe do; the paper, "
                                "cuda-convnet2 and Caffe do not)", recipe=True)
    momentum_rule: str = option("paper", "paper: lr inside the velocity, so a drop keeps the carried velocity "
                                "(the paper, cuda-convnet2, Caffe); torch: torch.optim.SGD's convention, where a "
                                "drop cuts it tenfold", choices=MOMENTUM_RULES, recipe=True)
    schedule: str = option("plateau", "plateau: divide the lr by 10 when the validation error stops improving "
                           "(the paper); step: every --step-epochs", choices=("plateau", "step"), recipe=True)
    patience: int = option(3, "plateau: epochs without a better validation top-1 error before a drop (the "
                           "paper does not say)", minimum=1, recipe=True)
    min_delta: float = option(0.001, "plateau: a smaller improvement of top-1 error does not count",
                              minimum=0.0, recipe=True)
    step_epochs: int = option(30, "step: divide the lr by 10 every this many epochs", minimum=1, recipe=True)
    max_drops: int = option(3, "lr divisions by 10 at most (the paper: three)", minimum=0, recipe=True)
    model_parallel: bool = option(False, "the paper's two columns on two GPUs (this rank's and the next)",
                                  recipe=True)
    column_devices: str | None = option(None, "with --model-parallel: the two columns' devices, e.g. "
                                        "cuda:0,cuda:0 (default: this rank's GPU and the next)")
    log_every: int = option(50, "steps per log line (and per host-device sync)", minimum=1)
    checkpoint_every: int = option(0, "also save RUN/checkpoint.pt every this many steps, at the first log line "
                                   "after them (0: at each epoch's end only); a run killed without warning "
                                   "loses at most that much", minimum=0)
    resume: bool = option(False, "continue OUT/checkpoint.pt exactly (on an empty OUT: start)")
    final_tencrop: bool = option(True, "ten-crop validation after the last epoch")

    def __post_init__(self):
        check(self)
        self.shards, self.out = storage.location(self.shards), Path(self.out)
        if self.lr is None:
            self.lr = 0.01 * self.global_batch / 128
        if self.column_devices is not None and not self.model_parallel:
            raise UserError("option column_devices: only with --model-parallel")
        if self.model_parallel and self.variant != "paper":
            raise UserError("option model_parallel: splits the paper's two columns; the torchvision variant has one")


RECIPE = recipe_fields(TrainConfig)  # what defines a run: a resume must keep these (the rest: hardware, logging)


class Schedule:
    """The learning rate per epoch: divided by 10 on a validation plateau (the paper) or every step_epochs."""

    def __init__(self, cfg: TrainConfig):
        assert cfg.lr is not None  # TrainConfig derives it from the global batch when not given
        self.cfg, self.lr, self.drops, self.best, self.bad = cfg, cfg.lr, 0, math.inf, 0

    def after_epoch(self, epoch: int, val_error: float) -> None:
        """Update after `epoch` (0-based) ended with `val_error` (top-1)."""
        c = self.cfg
        if val_error < self.best - c.min_delta:
            self.best, self.bad = val_error, 0
        else:
            self.bad += 1
        due = self.bad >= c.patience if c.schedule == "plateau" else (epoch + 1) % c.step_epochs == 0
        if due and self.drops < c.max_drops:
            self.lr, self.drops, self.bad = self.lr / 10, self.drops + 1, 0

    def state_dict(self) -> dict:
        return {"lr": self.lr, "drops": self.drops, "best": self.best, "bad": self.bad}

    def load_state_dict(self, state: dict) -> None:
        self.lr, self.drops, self.best, self.bad = state["lr"], state["drops"], state["best"], state["bad"]


class Stop:
    """SIGTERM/SIGINT set a flag; the loop saves and leaves at the next agreed point."""

    def __init__(self):
        self.signum = 0
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        self.signum = signum

    def restore(self):
        for s, handler in self._old.items():
            signal.signal(s, handler)


class Diverged(RuntimeError):
    """The loss became NaN or infinite; the message names the step."""


class _Totals:
    """An epoch's sums of its steps' [loss, top-1 hits, real samples], from its first step (a resume's first)."""

    def __init__(self, first_step: int):
        self.first_step, self.started = first_step, time.perf_counter()
        self.loss = self.hits = self.seen = 0.0

    def add(self, rows: list[list[float]]) -> None:
        """An interval's rows, summed per column, then added to the epoch's."""
        loss, hits, seen = (sum(column) for column in zip(*rows, strict=True))
        self.loss, self.hits, self.seen = self.loss + loss, self.hits + hits, self.seen + seen

    def seconds(self) -> float:
        return time.perf_counter() - self.started


class Trainer:
    """The run's state; `fit()` runs the epochs. Only rank 0 prints and writes."""

    def __init__(self, cfg: TrainConfig, on_batch=None):
        self.cfg, self.on_batch = cfg, on_batch
        self.world = distributed.setup(cfg.device, cfg.backend)
        self.run = RunDir(cfg.out, self.world.main)
        try:
            self._build(cfg)
        except BaseException:
            self.run.close()  # the lock on RUN/ goes with a run that could not start
            raise

    def _build(self, cfg: TrainConfig) -> None:
        storage.configure(cfg.storage_timeout)
        ckpt = self._start_run()
        manifest = load_manifest(cfg.shards)
        self.classes, self.names = manifest.classes, class_names(manifest)
        self.preprocessing = preprocessing(load_stats(cfg.shards), cfg.mean)
        if ckpt is not None:
            ckpt.check_run(self.classes, to_json(cfg), RECIPE, cfg.shards)
        self.log = RunLog(self.run, self.world.main)
        if ckpt is not None:
            self.log.line(f"resuming {ckpt.path}: epoch {ckpt.epoch}, step {ckpt.step}")
        self.val_loader = build.validation_loader(cfg, self.world)
        self.schedule = Schedule(cfg)
        run = build.start_run(cfg, len(self.classes), self.world, self.schedule, ckpt)
        self.parts, self.train_loader = run.parts, run.train_loader
        self.epoch, self.step, self.history, self.stopping = run.epoch, run.step, run.history, False
        if run.note:
            self.log.line(f"note: {run.note}")
        self.run.write_json(CONFIG, to_json(cfg))

    def _start_run(self) -> Checkpoint | None:
        """Rank 0 prepares RUN/ first (or fails, and every rank raises its error); then the others read."""
        ckpt, error = None, None
        if self.world.main:
            try:
                ckpt = self.run.start(self.cfg.resume)
            except UserError as e:
                error = str(e)
        error = self.world.gather(error)[0]  # also the barrier: RUN/ is ready when this returns
        if error:
            raise UserError(error)
        return ckpt if self.world.main else self.run.start(self.cfg.resume)

    def checkpoint(self, full: bool = True) -> Checkpoint:
        """The run as it stands; `full`: with the training state (every rank calls this: their RNG and data
        states are gathered), else the weights only (best.pt)."""
        training = None
        if full:
            ranks = self.world.gather(RankState.capture(self.train_loader, self.world.device))
            training = TrainingState(self.parts.optimizer.state_dict(), self.schedule.state_dict(), ranks)
        return Checkpoint(weights=self.parts.grouped_weights(), model_config=dataclasses.asdict(self.parts.net.cfg),
                          config=to_json(self.cfg), classes=self.classes, class_names=self.names,
                          preprocessing=self.preprocessing, epoch=self.epoch, step=self.step, history=self.history,
                          training=training)

    def save(self, name: str, full: bool = True) -> None:
        self.run.save(name, self.checkpoint(full))

    # ---- the loop -------------------------------------------------------------------------------------------

    def _agree(self, stop: Stop, losses: list[float], first_step: int) -> tuple[int, int]:
        """(first non-finite step or -1, stop signal or 0), the same on every rank."""
        bad = [i for i, v in enumerate(losses) if not math.isfinite(v)]
        # one MIN reduction agrees on both: the earliest bad step, and (negated) the largest signal number
        flags = torch.tensor([first_step + bad[0] if bad else 2**62, -stop.signum], dtype=torch.int64)
        if self.world.size > 1:
            flags = flags.to(self.world.device)
            torch.distributed.all_reduce(flags, torch.distributed.ReduceOp.MIN)
        first_bad, signum = flags.tolist()
        return (first_bad if first_bad < 2**62 else -1), -signum

    def train_epoch(self, stop: Stop) -> dict | None:
        """One epoch (or the rest of one, after a resume); None if a signal stopped it."""
        cfg, parts = self.cfg, self.parts
        parts.optimizer.set_lr(self.schedule.lr)
        parts.model.train()
        # per step [loss, top-1 hits, real samples] stay on the device until the interval's one host sync
        pending: list[torch.Tensor] = []
        epoch = _Totals(self.step)
        interval_start, t_interval = self.step, time.perf_counter()
        clock = StepClock(self.world.device)
        batches = iter(self.train_loader)
        while True:
            with clock.waiting():
                batch = next(batches, None)
            if batch is None:
                break
            if self.on_batch is not None:
                self.on_batch(*batch)
            with clock.stepping():
                pending.append(parts.step(*batch))
            self.step += 1
            last = self.train_loader.position == len(self.train_loader)
            if len(pending) < cfg.log_every and not last:
                continue
            rows = torch.stack(pending).tolist()  # the interval's one host sync
            losses = [r[0] for r in rows]
            signum = self._check_interval(stop, losses, interval_start + 1)
            epoch.add(rows)
            self._log_interval(clock, losses, len(rows), time.perf_counter() - t_interval, epoch)
            every = cfg.checkpoint_every
            if every and self.step // every > interval_start // every and not last:
                self.save(CHECKPOINT)  # every rank: their data positions and generators are gathered
            pending, interval_start, t_interval = [], self.step, time.perf_counter()
            if signum:  # agreed by every rank; at the epoch's last batch, the epoch is finished first
                stop.signum, self.stopping = signum, True
                if not last:
                    return None
        wait, host_wait = clock.epoch()
        steps, seconds = self.step - epoch.first_step, epoch.seconds()  # the whole epoch, logging included
        return {"train_loss": epoch.loss / max(1, steps), "train_top1_error": 1 - epoch.hits / max(1, epoch.seen),
                "seconds": seconds, "images_per_s": steps * cfg.global_batch / seconds, "data_wait": wait,
                "host_wait": host_wait}

    def _check_interval(self, stop: Stop, losses: list[float], first_step: int) -> int:
        """Diverged if a loss of the interval is not finite (on any rank); the stop signal the ranks agree on."""
        bad, signum = self._agree(stop, losses, first_step)
        if bad >= 0:
            raise Diverged(f"the loss is not finite at step {bad} (epoch {self.epoch + 1}); stopping. "
                           f"The last good state is {self.run.file(CHECKPOINT)}; a lower --lr may help")
        return signum

    def _log_interval(self, clock: StepClock, losses: list[float], steps: int, seconds: float,
                      epoch: "_Totals") -> None:
        wait, host_wait = clock.interval()
        self.log.interval(epoch=self.epoch + 1, epochs=self.cfg.epochs, step=self.step,
                          done=self.train_loader.position, per_epoch=len(self.train_loader), losses=losses,
                          lr=self.schedule.lr, rate=steps * self.cfg.global_batch / seconds, wait=wait,
                          host_wait=host_wait,
                          step_time=epoch.seconds() / max(1, self.step - epoch.first_step))

    def _stopped(self, signum: int, where: str) -> dict:
        self.log.line(f"stopped by signal {signum} {where}; saved {self.run.file(CHECKPOINT)} (continue with --resume)")
        return {"stopped": signum, "step": self.step}

    def fit(self) -> dict:
        cfg, stop = self.cfg, Stop()
        try:
            if self.epoch >= cfg.epochs:
                self.log.line(f"{cfg.out}: finished already ({self.epoch} of {cfg.epochs} epochs); nothing to do "
                              "(a larger --epochs continues it)")
                return {"epochs": self.epoch, "steps": self.step, "finished": True}
            self.log.line(f"training {cfg.variant} AlexNet (width {cfg.width}, {len(self.classes)} classes) on "
                          f"{self.world.size} x {self.world.device}, global batch {cfg.global_batch}, "
                          f"lr {self.schedule.lr:g}")
            while self.epoch < cfg.epochs:
                train = self.train_epoch(stop)
                if train is None:
                    self.save(CHECKPOINT)
                    return self._stopped(stop.signum, f"at step {self.step}")
                self.end_epoch(train)
                if self.stopping:
                    return self._stopped(stop.signum, f"after epoch {self.epoch}")
            return self.finish()
        finally:
            stop.restore()
            self.log.close()

    def end_epoch(self, train: dict) -> None:
        """Validation, the schedule, the epoch's record and the checkpoints."""
        counts = evaluate.error_counts(self.parts.model, self.val_loader, precision=self.cfg.precision)
        val = evaluate.errors(counts)
        self.schedule.after_epoch(self.epoch, val["top1_error"])
        self.epoch += 1
        entry = {"epoch": self.epoch, **train, "val_top1_error": val["top1_error"],
                 "val_top5_error": val["top5_error"], "lr": self.schedule.lr}
        self.history.append({"step": self.step, **entry})
        self.log.record("epoch", self.step, **entry)
        self.log.line(f"epoch {self.epoch}/{self.cfg.epochs}: train loss {train['train_loss']:.4f}, val top-1/top-5 "
                      f"error {val['top1_error']:.2%}/{val['top5_error']:.2%} ({train['seconds']:.1f} s, "
                      f"{train['images_per_s']:,.0f} img/s, data wait {train['data_wait']:.0%})")
        self.save(CHECKPOINT)
        if val["top1_error"] <= min(h["val_top1_error"] for h in self.history):
            self.save(BEST, full=False)

    def finish(self) -> dict:
        """Ten-crop validation of the final weights, the summary and the plots."""
        summary = {"epochs": self.epoch, "steps": self.step, "center": self.history[-1] if self.history else None}
        if self.cfg.final_tencrop:
            loader = build.validation_loader(self.cfg, self.world, tencrop=True)
            counts = evaluate.error_counts(self.parts.model, loader, tencrop=True, precision=self.cfg.precision)
            summary["tencrop"] = t = evaluate.errors(counts)
            self.log.record("tencrop", self.step, **t)
            self.log.line(f"ten-crop: top-1/top-5 error {t['top1_error']:.2%}/{t['top5_error']:.2%} over "
                          f"{t['images']} images")
        if self.world.main:
            from .figures import filters_figure
            from .plot import plot_run

            self.run.write_json(SUMMARY, summary)
            plot_run(self.run.read_log(), self.run.file(PLOT))
            filters_figure(self.parts.grouped_weights()["conv1.weight"], self.run.file(FILTERS))
            self.log.line(f"plots: {self.run.file(PLOT)}, {self.run.file(FILTERS)}")
        return summary


def run(cfg: TrainConfig, on_batch=None) -> dict:
    """Train per `cfg` (in this process, as one rank of torchrun's world if launched by it)."""
    trainer = Trainer(cfg, on_batch)
    try:
        return trainer.fit()
    finally:
        trainer.run.close()
        trainer.world.close()
