"""alexnet-train: the paper's AlexNet and recipe, data-parallel over any number of processes (torchrun).

Defaults are the paper's (DESIGN.md section 4): SGD momentum 0.9, weight decay 5e-4, batch 128, lr 0.01
divided by 10 when the validation error stops improving (at most three times), 90 epochs. The batch is
global; a different batch scales the default lr linearly (0.01 x batch / 128, Goyal et al. 2017).

The loop never waits for the GPU per step: losses stay on the device and are read once per log interval,
where non-finite values are found (and named by step), and where ranks agree on stopping after a signal.
RUN/checkpoint.pt is written atomically at every epoch end and on SIGTERM/SIGINT; it holds plain tensors
and Python values (torch.load(weights_only=True)) and every rank's RNG and data position, so --resume
continues with exactly the batches, crops and dropout masks the uninterrupted run would have used.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from . import distributed, evaluate
from .model import AlexNet, AlexNetConfig, place
from .pipeline import PAD_LABEL, Loader, LoaderConfig
from .shards import atomic_write

CHECKPOINT, BEST, LOG, SUMMARY, PLOT = "checkpoint.pt", "best.pt", "log.jsonl", "summary.json", "curves.png"


@dataclass
class TrainConfig:
    """Options of alexnet-train (saved as RUN/config.json and in every checkpoint)."""

    shards: Path
    out: Path
    epochs: int = 90
    batch_size: int = 128  # global, over all ranks
    lr: float | None = None  # default 0.01 * batch_size / 128
    momentum: float = 0.9
    weight_decay: float = 5e-4  # on every parameter, as torch's SGD and the torchvision recipe
    schedule: str = "plateau"  # "plateau" (the paper) or "step"
    patience: int = 3  # plateau: epochs without a better validation top-1 error before dividing by 10
    min_delta: float = 0.001  # plateau: an improvement smaller than this (0.1 point of error) does not count
    step_epochs: int = 30  # step: divide by 10 every this many epochs
    max_drops: int = 3
    variant: str = "paper"
    width: float = 1.0
    model_parallel: bool = False  # the paper's two columns on two devices (this rank's GPU and the next)
    device: str = "auto"
    compile: bool = False
    mean: str = "channel"
    lighting_sigma: float = 0.1
    lighting_form: str = "sqrt"
    threads: int | None = None  # DALI threads per rank (default: every core)
    seed: int = 0
    log_every: int = 50  # steps per log line (and per host-device sync)
    resume: bool = False
    tencrop: bool = True  # ten-crop validation after the last epoch

    def __post_init__(self):
        self.shards, self.out = Path(self.shards), Path(self.out)
        if self.schedule not in ("plateau", "step"):
            raise ValueError(f"schedule must be plateau or step, got {self.schedule!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.log_every < 1:
            raise ValueError("epochs, batch_size and log_every must be at least 1")
        if self.lr is None:
            self.lr = 0.01 * self.batch_size / 128

    def to_json(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()}


class Schedule:
    """The learning rate per epoch: divided by 10 on a validation plateau (the paper) or every step_epochs."""

    def __init__(self, cfg: TrainConfig):
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


def loss_fn(logits, labels):
    """Mean cross-entropy over the real samples; DALI's padding (PAD_LABEL) counts for nothing. Dividing by
    the count on the device (not .mean()) keeps an all-padding batch finite and avoids a host sync."""
    total = F.cross_entropy(logits.float(), labels, ignore_index=PAD_LABEL, reduction="sum")
    return total / (labels != PAD_LABEL).sum().clamp(min=1)


def train_step(model, optimizer, images, labels):
    """One SGD step; returns (loss, top-1 hits) as device tensors."""
    with evaluate.autocast(images.device):
        logits = model(images)
    loss = loss_fn(logits, labels.to(logits.device))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), (logits.detach().argmax(1) == labels.to(logits.device)).sum()


def loader_config(cfg: TrainConfig, world: distributed.World, split: str, **extra) -> LoaderConfig:
    if cfg.batch_size % world.size:
        raise ValueError(f"batch size {cfg.batch_size} does not split evenly over {world.size} ranks")
    return LoaderConfig(cfg.shards, split, cfg.batch_size // world.size, str(world.device), world.rank, world.size,
                        cfg.seed, cfg.mean, cfg.lighting_sigma, cfg.lighting_form, num_threads=cfg.threads,
                        **evaluate.batch_format(world.device), **extra)


def sgd(cfg: TrainConfig, model) -> torch.optim.SGD:
    """The paper's optimizer (momentum and weight decay on every parameter)."""
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _rank_state(loader: Loader, device: torch.device) -> dict:
    """What a rank needs to continue exactly: its data position and its random generators."""
    state = {"loader": loader.state_dict(), "torch_rng": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


class Trainer:
    """Holds the run's state; `fit()` runs the epochs. Only rank 0 prints and writes."""

    def __init__(self, cfg: TrainConfig, on_batch=None):
        self.cfg, self.on_batch = cfg, on_batch
        self.world = world = distributed.setup(cfg.device)
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        if not cfg.resume and (cfg.out / CHECKPOINT).exists():
            raise ValueError(f"{cfg.out} already holds a run; continue it with --resume or choose another --out")
        ckpt = self._load_checkpoint() if cfg.resume else None
        ranks = ckpt["ranks"] if ckpt else None
        if ranks is not None and len(ranks) != world.size:
            self.log(f"note: checkpoint from {len(ranks)} ranks, now {world.size}: data restarts at the epoch start")
            ranks = None
        mine = ranks[world.rank] if ranks else None
        self.train_loader = Loader(loader_config(cfg, world, "train"), True, mine["loader"] if mine else None)
        self.val_loader = Loader(loader_config(cfg, world, "val"), False)
        self.classes = self.train_loader.classes
        self.model_config = AlexNetConfig(len(self.classes), cfg.variant, cfg.width)
        net = AlexNet(self.model_config)
        if ckpt:
            net.load_state_dict(ckpt["model"])
        self.net = place(net, world.device, cfg.model_parallel)
        self.optimizer = sgd(cfg, self.net)
        self.schedule = Schedule(cfg)
        self.epoch, self.step, self.history = 0, 0, []
        self.stopping = False  # set when the ranks agree to stop after a signal
        if ckpt:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.schedule.load_state_dict(ckpt["schedule"])
            self.epoch, self.step, self.history = ckpt["epoch"], ckpt["step"], ckpt["history"]
            if mine:
                torch.set_rng_state(mine["torch_rng"])
                if "cuda_rng" in mine and world.device.type == "cuda":
                    torch.cuda.set_rng_state(mine["cuda_rng"], world.device)
            else:  # a new data stream: continue from the checkpoint's epoch, drawn afresh
                self.train_loader.epoch = self.epoch
        model = self.net
        if world.size > 1:  # a model split over two GPUs takes no device_ids
            single = world.device.type == "cuda" and not cfg.model_parallel
            model = DistributedDataParallel(model, device_ids=[world.device] if single else None)
        self.model = torch.compile(model) if cfg.compile else model
        self.writer = self._tensorboard()
        if world.main:
            cfg.out.mkdir(parents=True, exist_ok=True)
            atomic_write(cfg.out / "config.json", json.dumps(cfg.to_json(), indent=1).encode())

    # ---- I/O (rank 0) ---------------------------------------------------------------------------------

    def log(self, text: str) -> None:
        if self.world.main:
            print(text, flush=True)

    def record(self, kind: str, **fields) -> None:
        """One JSONL line (and TensorBoard scalars) on rank 0."""
        if not self.world.main:
            return
        with open(self.cfg.out / LOG, "a") as f:
            f.write(json.dumps({"kind": kind, **fields}) + "\n")
        if self.writer is not None:
            for k, v in fields.items():
                if isinstance(v, float):
                    self.writer.add_scalar(f"{kind}/{k}", v, self.step)

    def _tensorboard(self):
        if not self.world.main or importlib.util.find_spec("tensorboard") is None:
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(self.cfg.out / "tensorboard"))

    def _load_checkpoint(self) -> dict | None:
        path = self.cfg.out / CHECKPOINT
        if not path.exists():
            self.log(f"{path}: no checkpoint yet; starting from scratch")
            return None
        ckpt = evaluate.read_checkpoint(path)
        shards = json.loads((self.cfg.shards / "dataset.json").read_text())["classes"]
        if ckpt["classes"] != shards:
            raise ValueError(f"{path}: trained on other classes than {self.cfg.shards} has")
        self.log(f"resuming {path}: epoch {ckpt['epoch']}, step {ckpt['step']}")
        log = self.cfg.out / LOG
        if self.world.main and log.exists():  # steps logged after the checkpoint (a crash) will be run again
            lines = [line for line in log.read_text().splitlines() if json.loads(line).get("step", 0) <= ckpt["step"]]
            atomic_write(log, "".join(line + "\n" for line in lines).encode())
        return ckpt

    def grouped_weights(self) -> dict:
        """The weights in AlexNet's (grouped) layout, on the CPU: a checkpoint loads on any machine."""
        net = self.net
        if hasattr(net, "grouped_state_dict"):
            return net.grouped_state_dict()
        return {k: v.detach().cpu() for k, v in net.state_dict().items()}

    def save(self, path: Path, full: bool = True) -> None:
        """All ranks call this (their RNG and data states are gathered); rank 0 writes."""
        ranks = self.world.gather(_rank_state(self.train_loader, self.world.device)) if full else None
        if not self.world.main:
            return
        ckpt = {"model": self.grouped_weights(), "model_config": dataclasses.asdict(self.model_config),
                "config": self.cfg.to_json(), "classes": self.classes, "epoch": self.epoch, "step": self.step,
                "history": self.history}
        if full:
            ckpt.update(optimizer=self.optimizer.state_dict(), schedule=self.schedule.state_dict(), ranks=ranks)
        atomic_write(path, lambda f: torch.save(ckpt, f))  # a crash leaves the previous checkpoint whole

    # ---- the loop -------------------------------------------------------------------------------------

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
        for group in self.optimizer.param_groups:
            group["lr"] = self.schedule.lr
        self.model.train()
        # per step (loss, top-1 hits, real samples) stay on the device until the interval's one host sync
        pending, interval_start, epoch_start, totals = [], self.step, self.step, [0.0, 0.0, 0.0]
        t0, wait, t_epoch = time.perf_counter(), 0.0, time.perf_counter()
        batches = iter(self.train_loader)
        while True:
            t_wait = time.perf_counter()
            batch = next(batches, None)
            wait += time.perf_counter() - t_wait
            if batch is None:
                break
            images, labels = batch
            if self.on_batch is not None:
                self.on_batch(images, labels)
            loss, hit = train_step(self.model, self.optimizer, images, labels)
            pending.append(torch.stack([loss, hit.to(loss), (labels != PAD_LABEL).sum().to(loss)]))
            self.step += 1
            last = self.train_loader.position == len(self.train_loader)
            if len(pending) == self.cfg.log_every or last:
                rows = torch.stack(pending).tolist()  # the host sync
                losses = [r[0] for r in rows]
                bad, signum = self._agree(stop, losses, interval_start + 1)
                if bad >= 0:
                    raise Diverged(f"the loss is not finite at step {bad} (epoch {self.epoch + 1}); stopping. "
                                   f"The last good state is {self.cfg.out / CHECKPOINT}; a lower --lr may help")
                totals = [t + sum(col) for t, col in zip(totals, zip(*rows))]
                dt = time.perf_counter() - t0
                rate = len(rows) * self.cfg.batch_size / dt
                mean = sum(losses) / len(losses)
                self.record("train", epoch=self.epoch + 1, step=self.step, loss=mean, losses=losses,
                            lr=self.schedule.lr, images_per_s=rate, data_wait=wait / dt)
                self.log(f"epoch {self.epoch + 1} step {self.step}  loss {mean:.4f}  lr {self.schedule.lr:.2g}  "
                         f"{rate:,.0f} img/s  data wait {wait / dt:.0%}")
                pending, interval_start, t0, wait = [], self.step, time.perf_counter(), 0.0
                if signum:  # agreed by every rank; at the epoch's last batch, the epoch is finished first
                    stop.signum, self.stopping = signum, True
                    if not last:
                        return None
        loss_sum, hits, seen = totals
        return {"train_loss": loss_sum / max(1, self.step - epoch_start),
                "train_top1_error": 1 - hits / max(1, seen), "seconds": time.perf_counter() - t_epoch}

    def fit(self) -> dict:
        cfg, stop = self.cfg, Stop()
        try:
            self.log(f"training {cfg.variant} AlexNet (width {cfg.width}, {len(self.classes)} classes) on "
                     f"{self.world.size} x {self.world.device}, global batch {cfg.batch_size}, lr {self.schedule.lr:g}")
            while self.epoch < cfg.epochs:
                train = self.train_epoch(stop)
                if train is None:
                    self.save(cfg.out / CHECKPOINT)
                    self.log(f"stopped by signal {stop.signum} at step {self.step}; saved {cfg.out / CHECKPOINT} "
                             "(continue with --resume)")
                    return {"stopped": stop.signum, "step": self.step}
                val = evaluate.errors(evaluate.error_counts(self.model, self.val_loader))
                self.schedule.after_epoch(self.epoch, val["top1_error"])
                self.epoch += 1
                entry = {"epoch": self.epoch, "step": self.step, **train, "val_top1_error": val["top1_error"],
                         "val_top5_error": val["top5_error"], "lr": self.schedule.lr}
                self.history.append(entry)
                self.record("epoch", **entry)
                self.log(f"epoch {self.epoch}: train loss {train['train_loss']:.4f}, val top-1/top-5 error "
                         f"{val['top1_error']:.2%}/{val['top5_error']:.2%} ({train['seconds']:.1f} s)")
                self.save(cfg.out / CHECKPOINT)
                if val["top1_error"] <= min(h["val_top1_error"] for h in self.history):
                    self.save(cfg.out / BEST, full=False)
                if self.stopping:
                    self.log(f"stopped by signal {stop.signum} after epoch {self.epoch}; saved {cfg.out / CHECKPOINT}")
                    return {"stopped": stop.signum, "step": self.step}
            return self.finish()
        finally:
            stop.restore()
            if self.writer is not None:
                self.writer.close()

    def finish(self) -> dict:
        """Ten-crop validation of the final weights, the summary and the plot."""
        summary = {"epochs": self.epoch, "steps": self.step, "center": self.history[-1] if self.history else None}
        if self.cfg.tencrop:
            loader = Loader(loader_config(self.cfg, self.world, "val", tencrop=True), False)
            summary["tencrop"] = evaluate.errors(evaluate.error_counts(self.model, loader, tencrop=True))
            self.record("tencrop", **summary["tencrop"])
            self.log(f"ten-crop: top-1/top-5 error {summary['tencrop']['top1_error']:.2%}/"
                     f"{summary['tencrop']['top5_error']:.2%} over {summary['tencrop']['images']} images")
        if self.world.main:
            from .plot import plot_history

            atomic_write(self.cfg.out / SUMMARY, json.dumps(summary, indent=1).encode())
            plot_history(self.history, self.cfg.out / PLOT)
            self.log(f"plot: {self.cfg.out / PLOT}")
        return summary


def run(cfg: TrainConfig, on_batch=None) -> dict:
    """Train per `cfg` (in this process, as one rank of torchrun's world if launched by it)."""
    trainer = Trainer(cfg, on_batch)
    try:
        return trainer.fit()
    finally:
        trainer.world.close()
