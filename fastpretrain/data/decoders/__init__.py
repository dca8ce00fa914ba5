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


def resolve_data_backend(name: str) -> str:
    """``auto`` -> ``dali`` if nvidia.dali imports, else ``torch`` (the choice and the reason logged once)."""
    if name != "auto":
        return name
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as e:
        log_once(log, logging.INFO, f"data backend: torch (nvidia.dali is not importable: {e})")
        return "torch"
    log_once(log, logging.INFO, f"data backend: dali (nvidia.dali {nvidia.dali.__version__} is importable)")
    return "dali"


def make_decoder(cfg, table, device, dtype, train: bool):
    """The decoder of ``cfg.backend`` (resolved) over ``table``'s shards."""
    module, name = DECODERS[resolve_data_backend(cfg.backend)]
    return getattr(importlib.import_module(module), name)(cfg, table, device, dtype, train)
