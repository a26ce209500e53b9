"""alexnet-prep, the offline tool: ImageNet as people have it -> shuffled WebDataset shards, index and
statistics (command.py; its modules are in docs/design.md's table). Torch-free and DALI-free, and it needs
nothing of training's: its modules import only each other and the shared ones (config, options, files,
storage, shards, verified, image, progress, classnames). The rest of the package uses it through the names
below, and the pool (prep.workers) that `alexnet-prep --verify` shares.
"""

from .command import WORK, Interrupted, OutOfFiles, PrepConfig, PrepError, PrepReport, order_key, run
from .workers import WorkerDied

__all__ = ["WORK", "Interrupted", "OutOfFiles", "PrepConfig", "PrepError", "PrepReport", "WorkerDied", "order_key",
           "run"]
