"""Model registry: ResNeXt trunks with a hashtag head, named as in the paper (32xCd: 32 groups, C channels each).

Each entry point is a tiny function registered under its own name (timm's habit), so tests and benchmarks
iterate over every registered model. All are torchvision's ``ResNet`` class with grouped bottlenecks; the
final ``fc`` is the hashtag classifier (17k classes in the paper, 1.5k ImageNet-targeted, 1k for ImageNet).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

from fastpretrain.errors import UserError

_REGISTRY: dict[str, Callable[[int], nn.Module]] = {}


def register_model(fn: Callable[[int], nn.Module]) -> Callable[[int], nn.Module]:
    _REGISTRY[fn.__name__] = fn
    return fn


def _resnext(layers: list[int], width_per_group: int, num_classes: int) -> ResNet:
    # zero_init_residual: each block starts as identity, which the paper's large-batch recipe (Goyal et al.) relies on.
    return ResNet(Bottleneck, layers, num_classes=num_classes, groups=32, width_per_group=width_per_group,
                  zero_init_residual=True)


@register_model
def resnext_tiny(num_classes: int) -> ResNet:
    """One block per stage, 32x2d: the demo's trunk, sized for a CPU (about 65 images/s at 64x64 on 2 cores)."""
    return _resnext([1, 1, 1, 1], 2, num_classes)


@register_model
def resnext50_32x4d(num_classes: int) -> ResNet:
    return _resnext([3, 4, 6, 3], 4, num_classes)


@register_model
def resnext101_32x4d(num_classes: int) -> ResNet:
    return _resnext([3, 4, 23, 3], 4, num_classes)


@register_model
def resnext101_32x8d(num_classes: int) -> ResNet:
    return _resnext([3, 4, 23, 3], 8, num_classes)


@register_model
def resnext101_32x16d(num_classes: int) -> ResNet:
    return _resnext([3, 4, 23, 3], 16, num_classes)


@register_model
def resnext101_32x32d(num_classes: int) -> ResNet:
    return _resnext([3, 4, 23, 3], 32, num_classes)


@register_model
def resnext101_32x48d(num_classes: int) -> ResNet:
    """The paper's largest trunk (829M parameters, 85.4% ImageNet top-1 after transfer)."""
    return _resnext([3, 4, 23, 3], 48, num_classes)


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(arch: str, num_classes: int) -> nn.Module:
    """Build a registered model; an unknown name is a user error listing the known ones."""
    if arch not in _REGISTRY:
        raise UserError(f"unknown arch {arch!r}; choose one of: {', '.join(list_models())}")
    if num_classes < 1:
        raise UserError(f"a model needs at least one class, got {num_classes}")
    return _REGISTRY[arch](num_classes)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def to_channels_last(model: nn.Module, device: torch.device) -> nn.Module:
    """Move to the device in NHWC memory format: cuDNN's fastest layout for mixed-precision convolutions."""
    return model.to(device=device, memory_format=torch.channels_last)
