"""The checkpoint format (RUN/checkpoint.pt, RUN/best.pt): the only code that writes or reads it.

A `Checkpoint` is a typed object: the weights (CPU tensors, AlexNet's grouped layout, whatever layout they
were trained in), the model's config, the run's options (the recipe), the classes and their names, the
preprocessing the network expects (mean mode, mean_rgb, the mean image's center patch), where the run is
(epoch, step, history) and, in checkpoint.pt only, the training state: optimizer, schedule and every rank's
random generators and data position. best.pt holds no training state: it can be evaluated and used, not
resumed.

On disk it is a dict of plain tensors and Python values, `torch.load(path, weights_only=True)` reads it, and
it appears by an atomic rename (a crash or a full disk leaves the previous file whole). Whatever this
package wrote either loads or is refused with one line naming the file and what it lacks.
"""

from __future__ import annotations

import dataclasses
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import UserError
from .files import atomic_write, write_error

# 3: typed checkpoint with preprocessing and class names; global_batch and final_tencrop options; 4: the data
# position is ours (epoch, global step, global batch), not DALI's reader state, so it resumes on any number of ranks
FORMAT = 4
READABLE = 3  # the oldest format whose weights still load (for evaluation and use, not for --resume)
MODEL_KEYS = ("weights", "model_config", "config", "classes", "class_names", "preprocessing", "epoch", "step",
              "history")
TRAINING_KEYS = ("optimizer", "schedule", "ranks")


@dataclass
class RankState:
    """What one rank needs to continue exactly: its data position and its random generators."""

    loader: dict
    torch_rng: torch.Tensor
    cuda_rng: torch.Tensor | None = None

    @classmethod
    def capture(cls, loader, device: torch.device) -> "RankState":
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return cls(loader.state_dict(), torch.get_rng_state(), cuda)

    def restore_generators(self, device: torch.device) -> None:
        """Put torch's (and this GPU's) generators back where they were: the same dropout masks follow."""
        torch.set_rng_state(self.torch_rng)
        if self.cuda_rng is not None and device.type == "cuda":
            torch.cuda.set_rng_state(self.cuda_rng, device)


@dataclass
class TrainingState:
    optimizer: dict
    schedule: dict
    ranks: list[RankState]


@dataclass
class Checkpoint:
    weights: dict[str, torch.Tensor]
    model_config: dict
    config: dict
    classes: list[str]
    class_names: dict[str, str]
    preprocessing: dict  # {"mean": "pixel"|"channel", "mean_rgb": [3] float64, "mean_patch": [224, 224, 3]}
    epoch: int
    step: int
    history: list[dict] = field(default_factory=list)
    training: TrainingState | None = None
    path: Path | None = None  # where it was read from (for messages); not saved

    # ---- writing ------------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """The file's contents; without a training state (best.pt), the model's keys only."""
        out = {k: getattr(self, k) for k in MODEL_KEYS} | {"format": FORMAT}
        if self.training is not None:
            t = self.training
            out |= {"optimizer": t.optimizer, "schedule": t.schedule,
                    "ranks": [dataclasses.asdict(r) for r in t.ranks]}
        return out

    def save(self, path: Path) -> None:
        """Write atomically. A full or read-only disk is one line (UserError), even where torch reports it as
        a RuntimeError; the previous file stays whole and loadable."""
        path = Path(path)
        data = self.to_dict()
        recorder = _WriteRecorder()
        try:
            atomic_write(path, lambda f: torch.save(data, recorder.wrap(f)))
        except OSError as e:
            raise (write_error(path, e) or e) from None
        except RuntimeError:
            if recorder.error is None:
                raise  # not a write failure: a bug keeps its traceback
            raise (write_error(path, recorder.error) or recorder.error) from None

    # ---- reading ------------------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: Path, resumable: bool = False) -> "Checkpoint":
        """Read and check a checkpoint; UserError naming the file and what is wrong with it. `resumable`
        also requires the training state (what --resume needs)."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: no such checkpoint")
        if path.stat().st_size == 0:
            raise UserError(f"{path}: empty file, not a checkpoint (a disk that filled up?)")
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UserError(f"{path}: not a checkpoint alexnet-train can read ({first})") from None
        if not isinstance(raw, dict) or "format" not in raw:
            raise UserError(f"{path}: not an alexnet-train checkpoint (no format version)")
        if not isinstance(raw["format"], int) or raw["format"] > FORMAT:
            raise UserError(f"{path}: written by a newer alexnet-pipeline (checkpoint format {raw['format']}; this "
                            f"version reads format {FORMAT}); upgrade alexnet-pipeline")
        if raw["format"] < READABLE:
            raise UserError(f"{path}: written by an older alexnet-pipeline (checkpoint format {raw['format']}; this "
                            f"version reads formats {READABLE}-{FORMAT})")
        missing = [k for k in MODEL_KEYS if k not in raw]
        if missing:
            raise UserError(f"{path}: not an alexnet-train checkpoint (it lacks {', '.join(missing)})")
        lacking = [k for k in TRAINING_KEYS if k not in raw]
        if resumable and raw["format"] < FORMAT:
            raise UserError(f"{path}: written by an older alexnet-pipeline (format {raw['format']}), whose data "
                            "position was DALI's reader state; it can be evaluated or used, not resumed; start a new "
                            "--out")
        if resumable and lacking:
            raise UserError(f"{path}: holds the weights only (it lacks {', '.join(lacking)}: a best.pt?); it can "
                            "be evaluated or used, not resumed; resume from the run's checkpoint.pt")
        training = None
        if not lacking:
            training = TrainingState(raw["optimizer"], raw["schedule"], [RankState(**r) for r in raw["ranks"]])
        return cls(**{k: raw[k] for k in MODEL_KEYS}, training=training, path=path)

    def check_run(self, classes: list[str], config: dict, recipe: dict[str, Any], shards: Path | str) -> None:
        """Refuse to continue this checkpoint on other classes or with another recipe. `recipe`: the recipe
        options and their defaults; an option the checkpoint does not record (written before the option
        existed) ran with its default."""
        if self.classes != classes:
            raise UserError(f"{self.path}: trained on other classes than {shards} holds")
        theirs = {name: self.config.get(name, default) for name, default in recipe.items()}
        differ = [f"{n} {theirs[n]!r} -> {config.get(n)!r}" for n in recipe if theirs[n] != config.get(n)]
        if differ:
            raise UserError(f"{self.path}: --resume with another recipe ({'; '.join(differ)}); resume with the "
                            "run's options (see its config.json) or start a new --out")

    def rank_state(self, rank: int, world_size: int) -> RankState | None:
        """This rank's saved generators and data position; None if there is none or the checkpoint came from
        another number of ranks (see loader_state)."""
        ranks = self.training.ranks if self.training else []
        return ranks[rank] if len(ranks) == world_size else None

    def loader_state(self, rank: int, world_size: int) -> dict | None:
        """Where this rank's train loader continues: its own saved state on as many ranks as saved it; on
        another number, the global position every rank had (epoch, step, global batch), without DALI's
        random-operator state (draws="dali" then draws afresh). None without a training state."""
        ranks = self.training.ranks if self.training else []
        if not ranks:
            return None
        if len(ranks) == world_size:
            return ranks[rank].loader
        return {k: v for k, v in ranks[0].loader.items() if k != "dali"}

    def training_state(self) -> TrainingState:
        """The training state; only checkpoint.pt has one (Checkpoint.load(resumable=True) refuses others)."""
        if self.training is None:
            raise UserError(f"{self.path}: holds the weights only; it cannot be resumed")
        return self.training

    def network(self, device: torch.device | str = "cpu"):
        """The trained AlexNet (grouped layout, on `device`, in eval mode)."""
        from .model import AlexNet, AlexNetConfig, place

        net = AlexNet(AlexNetConfig(**self.model_config))
        net.load_state_dict(self.weights)
        return place(net, torch.device(device)).eval()

    def mean_to_subtract(self) -> np.ndarray:
        """What the network was trained to see subtracted: mean_rgb (3,) or the mean image's center 224 patch
        (224, 224, 3), in 0-255 RGB."""
        p = self.preprocessing
        return np.asarray(p["mean_rgb"] if p["mean"] == "channel" else p["mean_patch"], np.float64)


def preprocessing(stats: dict, mean: str) -> dict:
    """The preprocessing a checkpoint records, from the shards' statistics (shards.load_stats)."""
    from .augment import mean_to_subtract

    return {"mean": mean, "mean_rgb": torch.as_tensor(np.asarray(stats["mean_rgb"], np.float64)),
            "mean_patch": torch.as_tensor(mean_to_subtract(stats, "pixel").astype(np.float32))}


class _WriteRecorder:
    """torch.save turns an OSError of the file it writes (a full disk) into a RuntimeError ("unexpected
    pos"); this wrapper keeps the OSError so that it can be reported as what it is."""

    def __init__(self):
        self.error: OSError | None = None

    def wrap(self, f):
        recorder = self

        class Recording:
            def write(self, data):
                try:
                    return f.write(data)
                except OSError as e:
                    recorder.error = e
                    raise

            def flush(self):
                return f.flush()

        return Recording()

