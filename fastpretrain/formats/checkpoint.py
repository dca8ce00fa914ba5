"""Checkpoints in the layout timm and torchvision users know (``state_dict``, ``optimizer``, ``epoch``, ``arch``,
``args``), plus what an exact resume needs: the step, the data stream's position and the vocabulary's hash.

Saves are atomic (write a temporary file, fsync, rename), so a job killed mid-save leaves the last good one.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fastpretrain.errors import UserError
from fastpretrain.formats.files import atomic_write

FORMAT_VERSION = 1


def save_checkpoint(path: Path, state: dict) -> None:
    with atomic_write(path, durable=True) as f:
        torch.save({"format_version": FORMAT_VERSION, **state}, f)


def load_checkpoint(path: str | Path, vocab_hash: str | None = None) -> dict:
    """Load a checkpoint on the CPU; refuse one written for another vocabulary (its head means other classes)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError) as e:
        raise UserError(f"cannot read checkpoint {path}: {e}") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path} is not a fastpretrain checkpoint of format {FORMAT_VERSION}")
    if vocab_hash is not None and state.get("vocab_hash") != vocab_hash:
        raise UserError(f"{path} was trained on another vocabulary (hash {state.get('vocab_hash')}, now {vocab_hash})")
    return state
