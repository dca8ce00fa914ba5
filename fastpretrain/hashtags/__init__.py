"""Hashtags made into labels: WordNet canonicalization, vocabulary selection, label indexes, resampling.

Names are imported lazily so that the data path (which only needs ``labels`` and ``resample``) never loads
nltk or WordNet.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Canonicalizer": "canonical",
    "Vocab": "vocab",
    "VocabClass": "vocab",
    "VocabBuildConfig": "build",
    "VocabBuildSummary": "build",
    "VocabLabelConfig": "build",
    "LabelSummary": "build",
    "build_vocab": "build",
    "write_label_indexes": "build",
    "LabelIndex": "labels",
    "label_index_path": "labels",
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
