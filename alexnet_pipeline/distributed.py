"""The process group: one process alone, or one of many under torchrun (one or several machines).

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them this is a world of one. By default GPUs use NCCL
and the CPU gloo; gloo also serves ranks that share one GPU, which NCCL refuses. `main` (rank 0) does all
printing and writing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import UserError
from .options import default_threads, resolve_device


@dataclass
class World:
    rank: int
    size: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def gather(self, obj) -> list:
        """Every rank's `obj` (picklable), on every rank."""
        if self.size == 1:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def setup(device: str = "auto", backend: str = "auto") -> World:
    """Join torchrun's process group if launched by it; pick this rank's device."""
    size, rank, local = (int(os.environ.get(k, d)) for k, d in (("WORLD_SIZE", 1), ("RANK", 0), ("LOCAL_RANK", 0)))
    dev = resolve_device(device, local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend == "nccl" and dev.type != "cuda":
        raise UserError("option backend: nccl needs GPUs; use gloo (or auto) on the CPU")
    if size > 1 and not dist.is_initialized():
        dist.init_process_group(backend, device_id=dev if backend == "nccl" else None)
    if dev.type == "cpu" and size > 1:
        # ranks on one machine share its cores; oversubscribed threads make every rank slower
        torch.set_num_threads(default_threads())
    return World(rank, size, local, dev)
