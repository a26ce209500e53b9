"""alexnet-train: the paper's AlexNet and recipe, data-parallel over any number of processes (torchrun).

Defaults are the paper's (README, "Fidelity"): SGD with the paper's momentum rule (0.9) and weight decay
5e-4 on weights, batch 128, lr 0.01 divided by 10 when the validation error stops improving (at most three
times), 90 epochs, per-pixel mean, PCA lighting, the paper's init. The batch is global; another batch
scales the default lr linearly (0.01 x batch / 128, Goyal et al. 2017). Deviations are named options.

The loop never waits for the GPU per step: each step's [loss, hits, samples] stays on the device and is read
once per log interval, where non-finite losses are found (and named by step) and where ranks agree on
stopping after a signal. RUN/ is owned by rundir.py; a checkpoint holds every rank's RNG and data position,
so --resume continues with exactly the batches, crops and dropout masks the uninterrupted run would use.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from . import distributed, evaluate
from .config import UserError, check, option, to_json
from .model import INITS, AlexNet, AlexNetConfig, place
from .optim import MOMENTUM_RULES, PaperSGD
from .pipeline import Augmentation, Feed, Loader, LoaderConfig
from .shards import load_manifest
from .rundir import BEST, CHECKPOINT, CONFIG, LOG, PLOT, SUMMARY, RunDir, recipe_differences
from .step import PRECISIONS, TrainStep

__all__ = ["TrainConfig", "Trainer", "run", "BEST", "CHECKPOINT", "LOG", "PLOT", "SUMMARY"]


@dataclass(kw_only=True)
class TrainConfig(Augmentation, Feed, distributed.Placement):
    """Options of alexnet-train (saved as RUN/config.json and in every checkpoint)."""

    shards: Path = option(dataclasses.MISSING, "directory written by alexnet-prep")
    out: Path = option(dataclasses.MISSING, "run directory: checkpoints, logs, plot")
    epochs: int = option(90, "epochs to train (the paper: about 90)", minimum=1)
    batch_size: int = option(128, "global batch over all ranks (the paper: 128)", minimum=1)
    lr: float | None = option(None, "learning rate (default 0.01 x batch-size / 128: the paper's 0.01 at 128)",
                              minimum=0.0)
    momentum: float = option(0.9, "momentum", minimum=0.0)
    weight_decay: float = option(5e-4, "weight decay", minimum=0.0)
    decay_biases: bool = option(False, "also decay biases (torch's SGD and the torchvision recipe do; the paper, "
                                "cuda-convnet2 and Caffe do not)")
    momentum_rule: str = option("paper", "paper: lr inside the velocity, so a drop keeps the carried velocity "
                                "(the paper, cuda-convnet2, Caffe); torch: torch.optim.SGD's convention, where a "
                                "drop cuts it tenfold", choices=MOMENTUM_RULES)
    schedule: str = option("plateau", "plateau: divide the lr by 10 when the validation error stops improving "
                           "(the paper); step: every --step-epochs", choices=("plateau", "step"))
    patience: int = option(3, "plateau: epochs without a better validation top-1 error before a drop (the "
                           "paper does not say)", minimum=1)
    min_delta: float = option(0.001, "plateau: a smaller improvement of top-1 error does not count",
                              minimum=0.0)
    step_epochs: int = option(30, "step: divide the lr by 10 every this many epochs", minimum=1)
    max_drops: int = option(3, "lr divisions by 10 at most (the paper: three)", minimum=0)
    variant: str = option("paper", "paper (two columns, LRN) or torchvision (one column, no LRN)",
                          choices=("paper", "torchvision"))
    width: float = option(1.0, "channel multiplier (quick CPU runs)", minimum=1e-3)
    init: str = option("paper", "paper: N(0, 0.01), biases 1 on conv2/4/5, fc6/7; caffe: bvlc_alexnet's "
                       "(biases 0.1, std 0.005 on fc6/7)", choices=INITS)
    precision: str = option("bf16", "GPU arithmetic: bf16 autocast (rounds inputs to about 0.5-1 unit of 255; "
                            "a deviation) or fp32 (the paper); the CPU always uses fp32", choices=PRECISIONS)
    model_parallel: bool = option(False, "the paper's two columns on two GPUs (this rank's and the next)")
    column_devices: str | None = option(None, "with --model-parallel: the two columns' devices, e.g. "
                                        "cuda:0,cuda:0 (default: this rank's GPU and the next)")
    compile: bool = option(True, "torch.compile the network on GPUs (fuses LRN, activations and layout changes; "
                           "about a minute at start); the CPU runs it eagerly")
    cuda_graph: bool = option(True, "capture the whole step as a CUDA graph (one process on one GPU; DDP and "
                              "model parallelism run eagerly)")
    log_every: int = option(50, "steps per log line (and per host-device sync)", minimum=1)
    resume: bool = option(False, "continue OUT/checkpoint.pt exactly (on an empty OUT: start)")
    tencrop: bool = option(True, "ten-crop validation after the last epoch")

    def __post_init__(self):
        self.shards, self.out = Path(self.shards), Path(self.out)
        if self.lr is None:
            self.lr = 0.01 * self.batch_size / 128
        check(self)
        if self.lr <= 0:
            raise UserError(f"option lr: must be positive; got {self.lr!r}")
        if self.column_devices is not None and not self.model_parallel:
            raise UserError("option column_devices: only with --model-parallel")
        if self.model_parallel and self.variant != "paper":
            raise UserError("option model_parallel: splits the paper's two columns; the torchvision variant has one")


# What defines a run: a resumed run must use the same values (the rest: hardware, logging, length).
RECIPE = ("batch_size", "lr", "momentum", "weight_decay", "decay_biases", "momentum_rule", "schedule", "patience",
          "min_delta", "step_epochs", "max_drops", "variant", "width", "init", "precision", "model_parallel",
          "mean", "lighting_sigma", "lighting_form", "seed", "shuffle_buffer", "shard_shuffle")


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


def loader_config(cfg: TrainConfig, world: distributed.World, split: str, **extra) -> LoaderConfig:
    """This rank's loader: its share of the global batch, the run's augmentation and feed options."""
    if cfg.batch_size % world.size:
        raise UserError(f"option batch_size: {cfg.batch_size} does not split evenly over {world.size} ranks")
    shared = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(Augmentation) + dataclasses.fields(Feed)}
    return LoaderConfig(**shared, shards=cfg.shards, split=split, batch_size=cfg.batch_size // world.size,
                        device=str(world.device), rank=world.rank, world_size=world.size,
                        **evaluate.batch_format(world.device, cfg.precision), **extra)


def optimizer_for(cfg: TrainConfig, net) -> PaperSGD:
    """The run's optimizer over `net` (the network itself, not a wrapper)."""
    return PaperSGD(net.named_parameters(), cfg.lr, cfg.momentum, cfg.weight_decay, cfg.decay_biases,
                    cfg.momentum_rule)


def _rank_state(loader: Loader, device: torch.device) -> dict:
    """What a rank needs to continue exactly: its data position and its random generators."""
    state = {"loader": loader.state_dict(), "torch_rng": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


class Trainer:
    """The run's state; `fit()` runs the epochs. Only rank 0 prints and writes.

    `net` is the network itself (AlexNet, or its two columns), whose weights and momentum are saved;
    `model` is what the step calls: `net`, or `net` inside DDP and/or torch.compile."""

    def __init__(self, cfg: TrainConfig, on_batch=None):
        self.cfg, self.on_batch = cfg, on_batch
        self.world = distributed.setup(cfg.device, cfg.backend)
        self.run = RunDir(cfg.out, self.world.main)
        ckpt = self._start_run()
        if ckpt is not None:
            self._check_resumable(ckpt)
        self.epoch, self.step, self.history, self.stopping = 0, 0, [], False
        self._build_data(ckpt)
        self._build_model(ckpt)
        self.run.write_json(CONFIG, to_json(cfg))
        self.writer = self._tensorboard()

    # ---- construction -----------------------------------------------------------------------------------

    def _start_run(self) -> dict | None:
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

    def _check_resumable(self, ckpt: dict) -> None:
        """The checkpoint must be of these shards' classes and of this recipe."""
        path = self.run.file(CHECKPOINT)
        classes = load_manifest(self.cfg.shards)["classes"]
        if ckpt["classes"] != classes:
            raise UserError(f"{path}: trained on other classes than {self.cfg.shards} holds")
        differ = recipe_differences(ckpt["config"], to_json(self.cfg), RECIPE)
        if differ:
            raise UserError(f"{path}: --resume with another recipe ({'; '.join(differ)}); resume with the run's "
                            f"options (see {self.run.file(CONFIG)}) or start a new --out")
        self.log(f"resuming {path}: epoch {ckpt['epoch']}, step {ckpt['step']}")

    def _build_data(self, ckpt: dict | None) -> None:
        cfg, world = self.cfg, self.world
        ranks = ckpt["ranks"] if ckpt else None
        if ranks is not None and len(ranks) != world.size:
            self.log(f"note: checkpoint from {len(ranks)} ranks, now {world.size}: data restarts at the epoch start")
            ranks = None
        self.rank_state = ranks[world.rank] if ranks else None
        state = self.rank_state["loader"] if self.rank_state else None
        self.train_loader = Loader(loader_config(cfg, world, "train"), True, state)
        self.val_loader = Loader(loader_config(cfg, world, "val"), False)
        self.classes = self.train_loader.classes
        if ckpt and not self.rank_state:  # a new data stream: continue from the checkpoint's epoch, drawn afresh
            self.train_loader.epoch = ckpt["epoch"]

    def _build_model(self, ckpt: dict | None) -> None:
        cfg, world = self.cfg, self.world
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.model_config = AlexNetConfig(len(self.classes), cfg.variant, cfg.width, init=cfg.init)
        net = AlexNet(self.model_config)
        if ckpt:
            net.load_state_dict(ckpt["model"])
        columns = cfg.column_devices.split(",") if cfg.column_devices else None
        if cfg.model_parallel and columns is None and world.device.type == "cuda" and \
                torch.cuda.device_count() < world.device.index + 2:
            raise UserError(f"option model_parallel: needs a second GPU after {world.device} (torch sees "
                            f"{torch.cuda.device_count()}); --column-devices cuda:0,cuda:0 puts both columns on one")
        self.net = place(net, world.device, cfg.model_parallel, columns)
        self.optimizer = optimizer_for(cfg, self.net)
        self.schedule = Schedule(cfg)
        if ckpt:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.schedule.load_state_dict(ckpt["schedule"])
            self.epoch, self.step, self.history = ckpt["epoch"], ckpt["step"], ckpt["history"]
            if self.rank_state:
                torch.set_rng_state(self.rank_state["torch_rng"])
                if "cuda_rng" in self.rank_state and world.device.type == "cuda":
                    torch.cuda.set_rng_state(self.rank_state["cuda_rng"], world.device)
        model = self.net
        if world.size > 1:  # a model split over two GPUs takes no device_ids
            single = world.device.type == "cuda" and not cfg.model_parallel
            model = DistributedDataParallel(model, device_ids=[world.device] if single else None)
        self.model = torch.compile(model) if cfg.compile and world.device.type == "cuda" else model
        graph = cfg.cuda_graph and world.device.type == "cuda" and world.size == 1 and not cfg.model_parallel
        self.train_step = TrainStep(self.model, self.optimizer, world.device, cfg.precision, graph=graph)

    def _tensorboard(self):
        if not self.world.main or importlib.util.find_spec("tensorboard") is None:
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(self.run.file("tensorboard")))

    # ---- output (rank 0) ----------------------------------------------------------------------------------

    def log(self, text: str) -> None:
        if self.world.main:
            print(text, flush=True)

    def record(self, kind: str, **fields) -> None:
        """One JSONL line (and TensorBoard scalars) on rank 0."""
        self.run.append_log({"kind": kind, **fields})
        if self.writer is not None:
            for k, v in fields.items():
                if isinstance(v, float):
                    self.writer.add_scalar(f"{kind}/{k}", v, self.step)

    def grouped_weights(self) -> dict:
        """The weights in AlexNet's (grouped) layout, on the CPU: a checkpoint loads on any machine."""
        if hasattr(self.net, "grouped_state_dict"):
            return self.net.grouped_state_dict()
        return {k: v.detach().cpu() for k, v in self.net.state_dict().items()}

    def save(self, name: str, full: bool = True) -> None:
        """All ranks call this (their RNG and data states are gathered); rank 0 writes."""
        ranks = self.world.gather(_rank_state(self.train_loader, self.world.device)) if full else None
        if not self.world.main:
            return
        ckpt = {"model": self.grouped_weights(), "model_config": dataclasses.asdict(self.model_config),
                "config": to_json(self.cfg), "classes": self.classes, "epoch": self.epoch, "step": self.step,
                "history": self.history}
        if full:
            ckpt.update(optimizer=self.optimizer.state_dict(), schedule=self.schedule.state_dict(), ranks=ranks)
        self.run.save(name, ckpt)

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
        self.optimizer.set_lr(self.schedule.lr)
        self.model.train()
        # per step [loss, top-1 hits, real samples] stay on the device until the interval's one host sync
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
            pending.append(self.train_step(images, labels))
            self.step += 1
            last = self.train_loader.position == len(self.train_loader)
            if len(pending) == self.cfg.log_every or last:
                rows = torch.stack(pending).tolist()  # the host sync
                losses = [r[0] for r in rows]
                bad, signum = self._agree(stop, losses, interval_start + 1)
                if bad >= 0:
                    raise Diverged(f"the loss is not finite at step {bad} (epoch {self.epoch + 1}); stopping. "
                                   f"The last good state is {self.run.file(CHECKPOINT)}; a lower --lr may help")
                totals = [t + sum(col) for t, col in zip(totals, zip(*rows))]
                dt = time.perf_counter() - t0
                rate = len(rows) * self.cfg.batch_size / dt
                self._report(losses, rate, wait / dt, epoch_start, time.perf_counter() - t_epoch)
                pending, interval_start, t0, wait = [], self.step, time.perf_counter(), 0.0
                if signum:  # agreed by every rank; at the epoch's last batch, the epoch is finished first
                    stop.signum, self.stopping = signum, True
                    if not last:
                        return None
        loss_sum, hits, seen = totals
        return {"train_loss": loss_sum / max(1, self.step - epoch_start),
                "train_top1_error": 1 - hits / max(1, seen), "seconds": time.perf_counter() - t_epoch}

    def _report(self, losses: list[float], rate: float, wait: float, epoch_start: int, elapsed: float) -> None:
        """The interval's log line and record: where the run is, how fast, and how long the rest will take."""
        cfg, per_epoch = self.cfg, len(self.train_loader)
        done = self.train_loader.position
        started_at = self.step - epoch_start  # steps of this epoch run in this process
        step_time = elapsed / max(1, started_at)
        epoch_eta = (per_epoch - done) * step_time
        run_eta = epoch_eta + (cfg.epochs - self.epoch - 1) * per_epoch * step_time
        mean = sum(losses) / len(losses)
        self.record("train", epoch=self.epoch + 1, step=self.step, loss=mean, losses=losses, lr=self.schedule.lr,
                    images_per_s=rate, data_wait=wait, eta_epoch_s=epoch_eta, eta_run_s=run_eta)
        self.log(f"epoch {self.epoch + 1}/{cfg.epochs} step {done}/{per_epoch} ({self.step} total)  loss {mean:.4f}  "
                 f"lr {self.schedule.lr:.2g}  {rate:,.0f} img/s  data wait {wait:.0%}  "
                 f"ETA epoch {_duration(epoch_eta)}, run {_duration(run_eta)}")

    def fit(self) -> dict:
        cfg, stop = self.cfg, Stop()
        try:
            if self.epoch >= cfg.epochs:
                self.log(f"{cfg.out}: finished already ({self.epoch} of {cfg.epochs} epochs); nothing to do "
                         "(a larger --epochs continues it)")
                return {"epochs": self.epoch, "steps": self.step, "finished": True}
            self.log(f"training {cfg.variant} AlexNet (width {cfg.width}, {len(self.classes)} classes) on "
                     f"{self.world.size} x {self.world.device}, global batch {cfg.batch_size}, lr {self.schedule.lr:g}")
            while self.epoch < cfg.epochs:
                train = self.train_epoch(stop)
                if train is None:
                    self.save(CHECKPOINT)
                    self.log(f"stopped by signal {stop.signum} at step {self.step}; saved {self.run.file(CHECKPOINT)} "
                             "(continue with --resume)")
                    return {"stopped": stop.signum, "step": self.step}
                val = evaluate.errors(evaluate.error_counts(self.model, self.val_loader, precision=cfg.precision))
                self.schedule.after_epoch(self.epoch, val["top1_error"])
                self.epoch += 1
                entry = {"epoch": self.epoch, "step": self.step, **train, "val_top1_error": val["top1_error"],
                         "val_top5_error": val["top5_error"], "lr": self.schedule.lr}
                self.history.append(entry)
                self.record("epoch", **entry)
                self.log(f"epoch {self.epoch}/{cfg.epochs}: train loss {train['train_loss']:.4f}, val top-1/top-5 "
                         f"error {val['top1_error']:.2%}/{val['top5_error']:.2%} ({train['seconds']:.1f} s)")
                self.save(CHECKPOINT)
                if val["top1_error"] <= min(h["val_top1_error"] for h in self.history):
                    self.save(BEST, full=False)
                if self.stopping:
                    self.log(f"stopped by signal {stop.signum} after epoch {self.epoch}; "
                             f"saved {self.run.file(CHECKPOINT)}")
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
            counts = evaluate.error_counts(self.model, loader, tencrop=True, precision=self.cfg.precision)
            summary["tencrop"] = evaluate.errors(counts)
            self.record("tencrop", step=self.step, **summary["tencrop"])
            self.log(f"ten-crop: top-1/top-5 error {summary['tencrop']['top1_error']:.2%}/"
                     f"{summary['tencrop']['top5_error']:.2%} over {summary['tencrop']['images']} images")
        if self.world.main:
            from .plot import plot_run

            self.run.write_json(SUMMARY, summary)
            plot_run(self.run.read_log(), self.run.file(PLOT))
            self.log(f"plot: {self.run.file(PLOT)}")
        return summary


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def run(cfg: TrainConfig, on_batch=None) -> dict:
    """Train per `cfg` (in this process, as one rank of torchrun's world if launched by it)."""
    trainer = Trainer(cfg, on_batch)
    try:
        return trainer.fit()
    finally:
        trainer.world.close()
