"""SGD as in the paper (momentum 0.9, weight decay 1e-4), with linear warm-up and cosine decay of the rate."""

from __future__ import annotations

import math

import torch
from torch import nn

BASE_LR_PER_256 = 0.1  # Goyal et al.'s linear scaling rule, which the paper follows


def build_optimizer(model: nn.Module, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    """No weight decay on BatchNorm weights and biases (1-d parameters): decaying them only hurts accuracy."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=False)


def scaled_lr(global_batch: int) -> float:
    return BASE_LR_PER_256 * global_batch / 256


def lr_at(step: int, total_steps: int, warmup_steps: int, peak_lr: float) -> float:
    """Linear warm-up from peak/warmup to peak, then half a cosine down to zero at ``total_steps``."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return 0.5 * peak_lr * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
