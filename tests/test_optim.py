"""The paper's SGD set-up and the learning-rate schedules, against the formulas written out by hand."""

import math

import pytest
import torch

from fastpretrain.models import create_model
from fastpretrain.train.optim import Schedule, build_optimizer, scaled_lr, set_lr


def test_linear_scaling_rule():
    assert scaled_lr(256) == 0.1 and scaled_lr(8064) == 0.1 * 8064 / 256


def test_warmup_then_cosine():
    peak, total, warmup = 0.4, 100, 10
    lr = Schedule(peak, total, warmup)
    assert lr(0) == peak * 1 / 10
    assert lr(9) == peak
    assert math.isclose(lr(55), peak * 0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert lr(total) == 0.0
    lrs = [lr(s) for s in range(warmup, total)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_warmup_then_halving_at_equally_spaced_steps():
    """The paper's schedule: after the warm-up, 13 halvings cut the remaining 140 steps into 14 stretches of 10."""
    lr = Schedule(1.6, 150, 10, kind="step", halvings=13)
    assert [lr(s) for s in (0, 4, 9)] == [0.16, 0.8, 1.6]
    for stretch in range(14):
        first, last = 10 + 10 * stretch, 19 + 10 * stretch
        assert lr(first) == lr(last) == 1.6 * 0.5**stretch, stretch
    assert lr(150) == lr(10_000) == 1.6 * 0.5**13  # never more than 13 halvings


def test_no_weight_decay_on_batchnorm_and_bias():
    model = create_model("resnext_tiny", 5)
    opt = build_optimizer(model, lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=True)
    decayed, plain = opt.param_groups
    bn_and_bias = {id(p) for m in model.modules() for p in m.parameters(recurse=False)
                   if isinstance(m, torch.nn.BatchNorm2d) or p is getattr(m, "bias", None)}
    assert {id(p) for p in plain["params"]} == bn_and_bias and plain["weight_decay"] == 0.0
    assert decayed["weight_decay"] == 1e-4 and decayed["nesterov"] and decayed["foreach"]
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))


def test_the_head_learns_at_its_scale_of_the_schedule(rng):
    model = create_model("resnext_tiny", 5)
    scale = float(rng.uniform(2, 20))
    opt = build_optimizer(model, lr=0.1, momentum=0.9, weight_decay=1e-4, head_lr_scale=scale)
    lr = float(rng.uniform(0.01, 1))
    set_lr(opt, lr)
    lrs = {id(p): (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        expected_lr = lr * scale if name.startswith("fc.") else lr
        assert lrs[id(p)] == pytest.approx((expected_lr, 0.0 if p.ndim <= 1 else 1e-4), rel=1e-12), name
    assert len(lrs) == len(list(model.parameters()))


def test_one_step_is_nesterov_sgd_by_hand(gen):
    """Two steps of our SGD on one weight and one bias, against the update written out: v = mu v + g + wd w;
    w -= lr (g + wd w + mu v) with Nesterov; no decay on the bias."""
    layer = torch.nn.Linear(3, 1)
    w0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    opt = build_optimizer(layer, lr=0.5, momentum=0.9, weight_decay=0.1, nesterov=True)
    grads = [(torch.randn(1, 3, generator=gen), torch.randn(1, generator=gen)) for _ in range(2)]
    w, b, vw, vb = w0.double(), b0.double(), 0.0, 0.0
    for gw, gb in grads:
        layer.weight.grad, layer.bias.grad = gw.clone(), gb.clone()
        opt.step()
        dw, db = gw.double() + 0.1 * w, gb.double()
        vw, vb = 0.9 * vw + dw, 0.9 * vb + db
        w, b = w - 0.5 * (dw + 0.9 * vw), b - 0.5 * (db + 0.9 * vb)
    torch.testing.assert_close(layer.weight.detach().double(), w, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.bias.detach().double(), b, rtol=1e-6, atol=1e-6)
