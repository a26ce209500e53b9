"""The loader a user would otherwise write: a torch DataLoader whose workers read the same tar shards,
decode with PIL (Pillow-SIMD after `make install`) and apply the numpy reference augmentation. It is the
baseline of `alexnet-bench`, takes the DALI loaders' own LoaderConfig (so both read the same options with the
same defaults), and produces tensors of the same shapes and values.
"""

from __future__ import annotations

import io
import random

import numpy as np
import torch
from PIL import Image

from . import augment, shards, storage
from .config import OptionError
from .options import LoaderConfig

SHUFFLE_BUFFER = 4096  # samples, as users pass to webdataset's .shuffle(n)


class ShardDataset(torch.utils.data.IterableDataset):
    """Samples of a split's shards, split across DataLoader workers by shard, with the paper's augmentation
    (train) or the center / ten crops (eval), as `cfg` (the DALI loaders' options) says."""

    def __init__(self, cfg: LoaderConfig, train: bool = True):
        if storage.is_url(cfg.shards):
            raise OptionError(f"{cfg.shards}: the DataLoader baseline reads a local shards directory")
        self.paths = shards.shard_paths(cfg.shards, cfg.split_name)
        self.stats = shards.load_stats(cfg.shards)
        self.mean = augment.mean_to_subtract(self.stats, cfg.mean).astype(np.float32)
        self.train, self.sigma, self.form, self.tencrop = train, cfg.lighting_sigma, cfg.lighting_form, cfg.tencrop
        self.seed, self.buffer, self.epoch = cfg.seed, SHUFFLE_BUFFER, 0

    def _samples(self, paths):
        for path in paths:
            for s in shards.iter_samples(path.read_bytes()):
                yield s.jpeg, s.label

    def _transform(self, jpeg, rng):
        image = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
        if not self.train:
            return augment.ten_crop(image, self.mean) if self.tencrop else augment.augment(image, 16, 16, False,
                                                                                            self.mean)
        x, y, flip, alpha = augment.random_params(rng, self.sigma)
        shift = augment.lighting_shift(alpha, self.stats["eigval"], self.stats["eigvec"], self.form)
        return augment.augment(image, x, y, flip, self.mean, shift)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, workers = (info.id, info.num_workers) if info else (0, 1)
        rng = np.random.default_rng([self.seed, self.epoch, wid])
        paths = self.paths[wid::workers]
        samples = self._samples(paths)
        if self.train:  # the usual shuffle buffer, as webdataset's .shuffle(n)
            pyrng, buf = random.Random(int(rng.integers(1 << 31))), []
            for s in samples:
                buf.append(s)
                if len(buf) >= self.buffer:
                    yield self._pop(buf, pyrng, rng)
            while buf:
                yield self._pop(buf, pyrng, rng)
        else:
            for jpeg, label in samples:
                yield torch.from_numpy(self._transform(jpeg, rng)), label
        self.epoch += 1

    def _pop(self, buf, pyrng, rng):
        i = pyrng.randrange(len(buf))
        buf[i], buf[-1] = buf[-1], buf[i]
        jpeg, label = buf.pop()
        return torch.from_numpy(self._transform(jpeg, rng)), label


def baseline_loader(cfg: LoaderConfig, train: bool = True, workers: int = 2, pin_memory: bool = False,
                    drop_last: bool = False):
    """torch DataLoader over ShardDataset with cfg's split, batch size and augmentation; yields (float32 NCHW
    images, int64 labels) like the DALI loaders. `pin_memory` as pytorch/examples' ImageNet script sets it
    when training on a GPU; `drop_last` for a training step of fixed shape (a CUDA graph)."""
    # forkserver, not fork: the benchmark process also runs DALI's thread pools (and CUDA), and forking a
    # process with live threads can deadlock the children.
    return torch.utils.data.DataLoader(ShardDataset(cfg, train), batch_size=cfg.batch_size, num_workers=workers,
                                       pin_memory=pin_memory,
                                       drop_last=drop_last,
                                       persistent_workers=workers > 0, prefetch_factor=4 if workers else None,
                                       multiprocessing_context="forkserver" if workers else None)
