"""Labeled images as an ImageFolder tree, torchvision's layout: ``ROOT/CLASS/*.jpg``, one folder per class, classes
in sorted order (class ``i`` is the ``i``-th folder name), files in sorted order within a class. ImageNet's train/ and
val/ trees are such folders, named by wnid."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastpretrain.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")  # what the decoders take (case-insensitive)


@dataclass
class ImageFolder:
    """``classes`` (C,) names; ``files`` (N,) paths; ``labels`` (N,) int64 class ids; ``sizes`` (N,) int64 bytes."""

    root: Path
    classes: list[str]
    files: list[Path]
    labels: np.ndarray
    sizes: np.ndarray


def is_image_folder(path: str | os.PathLike) -> bool:
    """A folder with at least one subfolder and no tar shard of its own: what `--data` means as an ImageFolder."""
    path = Path(path)
    if not path.is_dir():
        return False
    entries = list(path.iterdir())
    return any(e.is_dir() and not e.name.startswith(".") for e in entries) and not any(
        e.suffix == ".tar" for e in entries)


def read_image_folder(root: str | os.PathLike, classes: list[str] | None = None) -> ImageFolder:
    """The images under ``root``; with ``classes`` (a training split's), each folder must be one of them (a held-out
    split may lack some). UserError naming what is wrong: no class folders, an unknown class, no image at all."""
    root = Path(root)
    try:
        folders = sorted(e.name for e in root.iterdir() if e.is_dir() and not e.name.startswith("."))
    except OSError as e:
        raise UserError(f"image folder {root}: {e.strerror or e}") from None
    if not folders:
        raise UserError(f"image folder {root} has no class folders (expected ROOT/CLASS/*.jpg)")
    classes = folders if classes is None else classes
    index = {name: i for i, name in enumerate(classes)}
    unknown = [name for name in folders if name not in index]
    if unknown:
        raise UserError(f"image folder {root}: class folder {unknown[0]!r} is not one of the {len(classes)} training "
                        "classes")
    files, labels, sizes = [], [], []
    for name in folders:
        for entry in sorted(os.scandir(root / name), key=lambda e: e.name):
            if entry.is_file() and Path(entry.name).suffix.lower() in IMAGE_SUFFIXES:
                files.append(Path(entry.path))
                labels.append(index[name])
                sizes.append(entry.stat().st_size)
    if not files:
        raise UserError(f"image folder {root}: no {'/'.join(IMAGE_SUFFIXES)} file in its class folders")
    return ImageFolder(root, list(classes), files, np.asarray(labels, dtype=np.int64), np.asarray(sizes, np.int64))
