"""One training step: forward, loss, backward and the optimizer update, on one batch.

On one CUDA device (no DDP, no model parallelism) the whole step is captured once as a CUDA graph and then
replayed: one launch per step instead of several hundred from Python, no allocation and no host sync. The
batch is copied into the graph's input buffers; the learning rate is a device tensor (optim.PaperSGD), so
schedule changes reach the graph; dropout draws new masks on every replay from torch's CUDA generator.

Capturing needs a few eager warm-up steps (cuDNN picks its algorithms, lazy state is created, torch.compile
compiles). They would change the weights and consume random numbers, so the weights, momentum and the CUDA
generator are saved before and restored after: the first real step is the same as without a graph.
Imports only torch.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F

WARMUP_STEPS = 3
PRECISIONS = ("bf16", "fp32")


def autocast(device: torch.device, precision: str = "bf16"):
    """bfloat16 autocast on GPUs unless precision is "fp32"; float32 on the CPU. The autocast cache is off:
    it only helps a weight used twice inside one forward, and CUDA graph capture requires it off."""
    if device.type == "cuda" and precision == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)
    return nullcontext()


def loss_and_counts(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over the real samples, and [top-1 hits, real samples]. Labels < 0 are DALI's
    padding (PAD_LABEL = -100, torch's default ignore_index) and count for nothing. Dividing by the count on
    the device (not .mean()) keeps an all-padding batch finite and needs no host sync."""
    real = (labels >= 0).sum()
    loss = F.cross_entropy(logits.float(), labels, reduction="sum") / real.clamp(min=1)
    hits = (logits.detach().argmax(1) == labels).sum()
    return loss, torch.stack([hits, real])


class TrainStep:
    """`step(images, labels)` -> a device tensor [loss, top-1 hits, real samples] of that batch.

    `model` is what is called (the network, or it inside DDP / torch.compile); `optimizer` a PaperSGD over
    the network's parameters. `graph=True` (one CUDA device only) captures the step on its first call."""

    def __init__(self, model, optimizer, device: torch.device, precision: str = "bf16", graph: bool = False):
        if graph and device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.model, self.optimizer, self.device, self.precision = model, optimizer, device, precision
        self.use_graph = graph
        self.graph: torch.cuda.CUDAGraph | None = None  # captured at the first call
        self._inputs: tuple[torch.Tensor, torch.Tensor] | None = None
        self._row: torch.Tensor | None = None

    def _compute(self, images, labels) -> torch.Tensor:
        with autocast(self.device, self.precision):
            logits = self.model(images)
        loss, counts = loss_and_counts(logits, labels.to(logits.device))
        loss.backward()
        self.optimizer.step()
        return torch.cat([loss.detach()[None], counts.to(loss.dtype)])

    def __call__(self, images, labels) -> torch.Tensor:
        if not self.use_graph:
            self.optimizer.zero_grad(set_to_none=True)
            return self._compute(images, labels)
        if self.graph is None:
            self._capture(images, labels)
        assert self.graph is not None and self._inputs is not None and self._row is not None  # set by _capture
        for buffer, batch in zip(self._inputs, (images, labels), strict=True):
            buffer.copy_(batch, non_blocking=True)
        self.graph.replay()
        return self._row.clone()  # the next replay overwrites the graph's output

    def _capture(self, images, labels) -> None:
        state = [*self.optimizer.params.values(), *self.optimizer.buffers()]
        saved = [t.detach().clone() for t in state]
        rng = torch.cuda.get_rng_state(self.device)
        inputs = self._inputs = (images.clone(), labels.clone())  # clone keeps the layout (channels_last)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self.optimizer.zero_grad(set_to_none=True)
                self._compute(*inputs)
        torch.cuda.current_stream(self.device).wait_stream(side)
        # gradients are allocated inside the graph's memory pool and overwritten (not accumulated) on replay
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        # thread_local: DALI's threads may allocate on the GPU meanwhile; "global" would fail the capture
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self._row = self._compute(*inputs)
        self.graph = graph
        with torch.no_grad():
            for t, s in zip(state, saved, strict=True):
                t.copy_(s)
        torch.cuda.set_rng_state(rng, self.device)
