"""The input pipeline: shards -> rank split, shuffle, resampling -> decode + augment (DALI | torch) -> batches.

The heavy pieces (torch, DALI) are imported on first use, so ``fastpretrain.formats.shards`` stays light
for tools that only write or list shards.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__all__ = ["Batch", "DataConfig", "build_eval_loader", "build_train_loader"]

_HOMES = {
    "DataConfig": "fastpretrain.data.config",
    "Batch": "fastpretrain.data.config",
    "build_train_loader": "fastpretrain.data.loader",
    "build_eval_loader": "fastpretrain.data.loader",
}

if TYPE_CHECKING:
    from fastpretrain.data.config import Batch, DataConfig
    from fastpretrain.data.loader import build_eval_loader, build_train_loader


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_HOMES[name]), name)
