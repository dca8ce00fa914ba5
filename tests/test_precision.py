"""--amp's policy: bf16 autocast only where the hardware has native bf16, float32 with a notice elsewhere."""

import torch

from fastpretrain.train import precision
from fastpretrain.train.precision import choose_precision


def test_no_amp_is_float32_without_notice():
    chosen = choose_precision(torch.device("cpu"), amp=False)
    assert chosen.dtype == torch.float32 and chosen.notice is None and not chosen.enabled


def test_cpu_without_native_bf16_falls_back_to_float32_and_says_so(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    chosen = choose_precision(torch.device("cpu"), amp=True)
    assert chosen.dtype == torch.float32 and "float32" in chosen.notice and "\n" not in chosen.notice
    with chosen.autocast():
        assert torch.nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.float32


def test_cpu_with_native_bf16_autocasts_matmuls(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    chosen = choose_precision(torch.device("cpu"), amp=True)
    assert chosen.dtype == torch.bfloat16 and chosen.notice is None
    with chosen.autocast():
        assert torch.nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.bfloat16
