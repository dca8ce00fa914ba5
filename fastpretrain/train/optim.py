"""SGD as in the paper (momentum 0.9, weight decay 1e-4 but none on BatchNorm and biases), and the learning-rate
schedules: a linear warm-up, then cosine to zero or halving at equally spaced steps (the paper's)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from fastpretrain.weights import HEAD

BASE_LR_PER_256 = 0.1  # Goyal et al.'s linear scaling rule, which the paper follows


def build_optimizer(model: nn.Module, lr: float, momentum: float, weight_decay: float, nesterov: bool = False,
                    device: torch.device | None = None, head_lr_scale: float = 1.0) -> torch.optim.SGD:
    """No weight decay on BatchNorm weights and biases (1-d parameters): decaying them only hurts accuracy. The
    head's (``fc``) parameters learn at ``head_lr_scale`` x the rate of the rest (``set_lr`` keeps the ratio): a fresh
    head on a pretrained trunk, whose pooled features are small and sparse, learns too slowly at the rate that does
    not wreck the trunk.

    On CUDA the fused SGD (one kernel for all parameters; it also skips a step on the device when told a gradient is
    non-finite, with no host synchronization); elsewhere the foreach one (a few vectorized loops, not one per tensor).
    """
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}  # (lr scale, weight decay) -> parameters
    for name, param in model.named_parameters():
        if param.requires_grad:
            scale = head_lr_scale if name.startswith(HEAD) else 1.0
            groups.setdefault((scale, 0.0 if param.ndim <= 1 else weight_decay), []).append(param)
    fused = device is not None and device.type == "cuda"
    return torch.optim.SGD([{"params": params, "lr_scale": scale, "weight_decay": decay, "lr": lr * scale}
                            for (scale, decay), params in sorted(groups.items(), key=lambda g: (g[0][0], -g[0][1]))],
                           lr=lr, momentum=momentum, nesterov=nesterov,
                           **({"fused": True} if fused else {"foreach": True}))


def scaled_lr(global_batch: int) -> float:
    return BASE_LR_PER_256 * global_batch / 256


@dataclass(frozen=True)
class Schedule:
    """The learning rate of each step: linear warm-up from ``peak / warmup_steps`` to ``peak``, then ``cosine``
    (half a cosine to zero at ``total_steps``) or ``step`` (halved ``halvings`` times at equally spaced steps, so the
    rest of the run is ``halvings + 1`` equal stretches). Its state is the step: nothing to save."""

    peak: float
    total_steps: int
    warmup_steps: int
    kind: str = "cosine"
    halvings: int = 13

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.peak * (step + 1) / self.warmup_steps
        progress = min((step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1), 1.0)
        if self.kind == "step":
            return self.peak * 0.5 ** min(math.floor(progress * (self.halvings + 1)), self.halvings)
        return 0.5 * self.peak * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
