"""Mixed-precision choice: bf16 autocast where the hardware runs bf16 natively, float32 elsewhere."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


def cpu_has_native_bf16() -> bool:
    """AMX or AVX-512 BF16. Without them bf16 convolutions are emulated: about 10x slower than float32."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


@dataclass(frozen=True)
class Precision:
    dtype: torch.dtype  # what activations (and the loader's images) are in: bfloat16 under AMP, else float32
    device_type: str
    notice: str | None = None  # why --amp fell back to float32, said once to the user

    @property
    def enabled(self) -> bool:
        return self.dtype != torch.float32

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)


def choose_precision(device: torch.device, amp: bool) -> Precision:
    """bf16 rather than fp16: same range as float32, so no loss scaling and no overflow in a 17k-way softmax."""
    if not amp:
        return Precision(torch.float32, device.type)
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return Precision(torch.float32, "cuda", "--amp: this GPU has no bf16, training in float32")
    if device.type == "cpu" and not cpu_has_native_bf16():
        return Precision(torch.float32, "cpu", "--amp: this CPU has no native bf16 (AMX/AVX-512 BF16); "
                                               "training in float32, which is faster here")
    return Precision(torch.bfloat16, device.type)
