"""The decoding backends, a registry: each turns the stream's PlanChunks into DecodedChunks (normalized crops).

``torch`` (torchvision's decoders; CPU worker processes or nvJPEG on CUDA) and ``dali`` (NVIDIA DALI), both on
top of ``common`` (reading and checking a chunk's images, drawing their crop boxes, finishing a crop). A backend's
module is imported only when it is chosen: DALI is optional.
"""

from __future__ import annotations

import importlib
import logging

from fastpretrain.log import log_once

log = logging.getLogger("fastpretrain.data")

# name -> (module, class): a decoder class takes (cfg, table, device, dtype, train) and has decode(chunks).
DECODERS = {"torch": ("fastpretrain.data.decoders.torch", "TorchDecoder"),
            "dali": ("fastpretrain.data.decoders.dali", "DaliDecoder")}
BACKENDS = ("auto", *DECODERS)


def resolve_data_backend(name: str, device) -> str:
    """``auto`` -> the faster backend where it runs (the choice and the reason logged once): on a CPU the torch
    backend (its worker processes' region decode beats DALI's CPU threads: bench/results/), on a GPU DALI's nvJPEG
    pipeline when nvidia.dali imports, else torch (torchvision's nvJPEG)."""
    if name != "auto":
        return name
    if getattr(device, "type", str(device)) != "cuda":
        log_once(log, logging.INFO, "data backend: torch (fastest on CPUs)")
        return "torch"
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as e:
        log_once(log, logging.INFO, f"data backend: torch (nvidia.dali is not importable: {e})")
        return "torch"
    log_once(log, logging.INFO, f"data backend: dali (nvidia.dali {nvidia.dali.__version__} on the GPU)")
    return "dali"


def make_decoder(cfg, table, device, dtype, train: bool):
    """The decoder of ``cfg.backend`` (resolved for ``device``) over ``table``'s shards."""
    module, name = DECODERS[resolve_data_backend(cfg.backend, device)]
    return getattr(importlib.import_module(module), name)(cfg, table, device, dtype, train)
