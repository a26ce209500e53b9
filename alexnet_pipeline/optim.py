"""The paper's optimizer: SGD with momentum, its update rule held exactly across learning-rate changes.

The paper's rule (section 5):  v <- 0.9 v - 0.0005 eps w - eps grad;  w <- w + v.  The learning rate eps is
inside the velocity, so after eps is divided by 10 the velocity already built up keeps its size and decays
over the next steps (cuda-convnet2 and Caffe do the same). torch's SGD keeps b <- m b + grad + wd w and steps
w <- w - eps b: the same updates while eps is constant (v = -eps b), but a tenfold drop in eps cuts the
carried velocity tenfold at once. We run torch's fused SGD kernel (one pass over every parameter; the lr
lives in a device tensor, so a captured CUDA graph sees changes) and, under the paper's rule, rescale b by
eps_old / eps_new whenever eps changes, which keeps v = -eps b and so the paper's updates.

Weight decay applies to weights only by default: the paper's rule decays w, and neither cuda-convnet2 nor
Caffe decays biases (decaying them would also pull the paper's bias-1 init towards 0). Imports only torch.
"""

from __future__ import annotations

import torch

MOMENTUM_RULES = ("paper", "torch")


class PaperSGD:
    """SGD with momentum and weight decay over `named_parameters` (name -> parameter), on one device or
    several. `rule`: "paper" (eps inside the velocity) or "torch" (torch.optim.SGD's convention)."""

    def __init__(self, named_parameters, lr: float, momentum: float = 0.9, weight_decay: float = 5e-4,
                 decay_biases: bool = False, rule: str = "paper"):
        if rule not in MOMENTUM_RULES:
            raise ValueError(f"momentum rule must be one of {MOMENTUM_RULES}, got {rule!r}")
        self.params = {name: p for name, p in named_parameters if p.requires_grad}
        self.rule, self.lr = rule, float(lr)
        decayed = [p for p in self.params.values() if p.ndim > 1 or decay_biases]
        undecayed = [p for p in self.params.values() if not (p.ndim > 1 or decay_biases)]
        devices = {p.device for p in self.params.values()}
        # one device: the fused kernel, lr as a device tensor. Several (the two columns): plain per-tensor
        # updates with a Python lr; that layout is never captured as a graph.
        single = len(devices) == 1
        dtype = next(iter(self.params.values())).dtype
        self._lr_tensor = torch.tensor(self.lr, dtype=dtype, device=devices.pop()) if single else None
        groups = [{"params": decayed, "weight_decay": weight_decay}, {"params": undecayed, "weight_decay": 0.0}]
        lr_arg: torch.Tensor | float = self.lr if self._lr_tensor is None else self._lr_tensor
        self.sgd = torch.optim.SGD([g for g in groups if g["params"]], lr=lr_arg,
                                   momentum=momentum, fused=single, foreach=None if single else False)
        # zero buffers from the start: the first step is then an ordinary one (m * 0 + grad), so the step is
        # the same computation every time, which a CUDA graph needs
        for p in self.params.values():
            self.sgd.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    @property
    def param_groups(self) -> list[dict]:
        return self.sgd.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.sgd.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        self.sgd.step()

    def buffers(self) -> list[torch.Tensor]:
        """The momentum buffers (b above), in parameter order."""
        return [self.sgd.state[p]["momentum_buffer"] for p in self.params.values()]

    def set_lr(self, lr: float) -> None:
        """Change eps; under the paper's rule the velocity carried into the next step is unchanged."""
        lr = float(lr)
        if lr != self.lr and self.rule == "paper":
            with torch.no_grad():
                torch._foreach_mul_(self.buffers(), self.lr / lr)
        self._write_lr(lr)

    def _write_lr(self, lr: float) -> None:
        if self._lr_tensor is not None:
            self._lr_tensor.fill_(lr)
        else:
            for group in self.sgd.param_groups:
                group["lr"] = lr
        self.lr = lr

    def state_dict(self) -> dict:
        """lr, rule, each parameter's weight decay, and the momentum buffers by parameter name on the CPU
        (plain values and tensors: torch.load(weights_only=True) reads it)."""
        decay = {id(p): g["weight_decay"] for g in self.sgd.param_groups for p in g["params"]}
        return {"lr": self.lr, "rule": self.rule,
                "weight_decay": {name: decay[id(p)] for name, p in self.params.items()},
                "momentum": {name: self.sgd.state[p]["momentum_buffer"].detach().cpu()
                             for name, p in self.params.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Momentum buffers and the lr they were saved at (a later set_lr to another lr is then a change)."""
        differ = set(self.params) ^ set(state["momentum"])
        if differ:
            raise ValueError(f"optimizer state does not match the model (parameters {sorted(differ)[:3]} differ)")
        with torch.no_grad():
            for name, p in self.params.items():
                self.sgd.state[p]["momentum_buffer"].copy_(state["momentum"][name])
        self._write_lr(float(state["lr"]))
