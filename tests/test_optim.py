"""The paper's SGD set-up and the warm-up + cosine schedule, against the formulas written out by hand."""

import math

import torch

from fastpretrain.models import create_model
from fastpretrain.train.optim import build_optimizer, lr_at, scaled_lr


def test_linear_scaling_rule():
    assert scaled_lr(256) == 0.1 and scaled_lr(8064) == 0.1 * 8064 / 256


def test_warmup_then_cosine():
    peak, total, warmup = 0.4, 100, 10
    assert lr_at(0, total, warmup, peak) == peak * 1 / 10
    assert lr_at(9, total, warmup, peak) == peak
    assert math.isclose(lr_at(55, total, warmup, peak), peak * 0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert lr_at(total, total, warmup, peak) == 0.0
    lrs = [lr_at(s, total, warmup, peak) for s in range(warmup, total)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_no_weight_decay_on_batchnorm_and_bias():
    model = create_model("resnext_tiny", 5)
    opt = build_optimizer(model, lr=0.1, momentum=0.9, weight_decay=1e-4)
    decayed, plain = opt.param_groups
    bn_and_bias = {id(p) for m in model.modules() for p in m.parameters(recurse=False)
                   if isinstance(m, torch.nn.BatchNorm2d) or p is getattr(m, "bias", None)}
    assert {id(p) for p in plain["params"]} == bn_and_bias and plain["weight_decay"] == 0.0
    assert decayed["weight_decay"] == 1e-4
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))
