"""Hashtags made into labels: WordNet canonicalization, vocabulary selection, labeling, resampling.

The files this stage writes (``vocab.json``, label indexes) are in ``fastpretrain.formats``. Names are imported
lazily so that the data path (which only needs ``resample``) never loads nltk or WordNet.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Canonicalizer": "canonical",
    "VocabBuildConfig": "build",
    "VocabBuildSummary": "build",
    "VocabLabelConfig": "build",
    "LabelSummary": "build",
    "build_vocab": "build",
    "write_label_indexes": "build",
    "RESAMPLE_MODES": "resample",
    "class_replication": "resample",
    "image_replication": "resample",
    "copies": "resample",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
