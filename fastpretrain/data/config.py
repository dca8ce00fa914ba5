"""The data pipeline's settings and its output: ``DataConfig`` (validated on construction) and ``Batch``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fastpretrain.data.decoders import BACKENDS
from fastpretrain.errors import UserError

if TYPE_CHECKING:
    import torch

RESAMPLE_MODES = ("natural", "sqrt", "uniform")  # fastpretrain.hashtags.resample's, without importing it here
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class DataConfig:
    """Where the images and labels are and how to turn them into batches.

    ``shards``: WebDataset shards (a folder, glob, brace pattern or list), or an ImageFolder tree. ``label_dir``: the
    folder of their label indexes (hashtags: one per shard, from ``vocab build``/``vocab label``); None when the labels
    are in the data itself: an ImageFolder's class folders, or each sample's ``cls`` member.

    ``workers``: DataLoader worker processes for the torch backend (0 decodes in the training process),
    decoding threads for DALI (at least 1). ``prefetch_batches``: batches prepared ahead, per worker for the
    torch backend (DataLoader's ``prefetch_factor``), runs in flight for DALI. ``shuffle_buffer``: each sample
    leaves the stream within this many positions of where reading the shards in order would put it (0 or 1: no
    shuffling inside shards). ``max_bad_fraction``: the share of bad samples (corrupt, missing labels, ...) that
    stops the run. ``decode_limit_pixels``: larger images are skipped as decompression bombs.
    """

    shards: str | list[str]
    label_dir: str | None
    backend: str = "auto"
    batch_size: int = 256
    image_size: int = 224
    workers: int = 4
    seed: int = 0
    shuffle_buffer: int = 1024
    resample: str = "sqrt"
    resample_t: float | None = None
    max_bad_fraction: float = 0.01
    decode_limit_pixels: int = 100_000_000
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # nvJPEG's share of JPEGs for the hardware decoder (A100/H100 class GPUs); DALI's default, tuned on A100.
    hw_decoder_load: float = 0.65
    prefetch_batches: int = 2

    def __post_init__(self) -> None:
        if isinstance(self.shards, str):
            if not self.shards.strip():
                raise UserError("data.shards: empty")
        elif not self.shards or not all(isinstance(s, str) and s.strip() for s in self.shards):
            raise UserError("data.shards: give a folder, glob, brace pattern, or a non-empty list of them")
        if self.label_dir is not None and not str(self.label_dir).strip():
            raise UserError("data.label_dir: empty")
        if self.backend not in BACKENDS:
            raise UserError(f"data.backend: must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.resample not in RESAMPLE_MODES:
            raise UserError(f"data.resample: must be one of {', '.join(RESAMPLE_MODES)}, got {self.resample!r}")
        _at_least("batch_size", self.batch_size, 1)
        _at_least("image_size", self.image_size, 8)
        _at_least("workers", self.workers, 0)
        _at_least("shuffle_buffer", self.shuffle_buffer, 0)
        _at_least("decode_limit_pixels", self.decode_limit_pixels, 1)
        _at_least("prefetch_batches", self.prefetch_batches, 1)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise UserError(f"data.seed: must be an integer, got {self.seed!r}")
        if self.resample_t is not None and not (math.isfinite(self.resample_t) and self.resample_t > 0):
            raise UserError(f"data.resample_t: must be a positive number, got {self.resample_t}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise UserError(f"data.max_bad_fraction: must lie in [0, 1], got {self.max_bad_fraction}")
        if not 0.0 <= self.hw_decoder_load <= 1.0:
            raise UserError(f"data.hw_decoder_load: must lie in [0, 1], got {self.hw_decoder_load}")
        low, high = self.crop_scale
        if not 0.0 < low <= high <= 1.0:
            raise UserError(f"data.crop_scale: need 0 < low <= high <= 1, got {self.crop_scale}")
        low, high = self.crop_ratio
        if not 0.0 < low <= high:
            raise UserError(f"data.crop_ratio: need 0 < low <= high, got {self.crop_ratio}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise UserError("data.mean, data.std: three values each, std positive")


def _at_least(name: str, value: object, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise UserError(f"data.{name}: must be an integer >= {low}, got {value!r}")


@dataclass
class Batch:
    """One training step's input, all on the training device.

    ``images`` (B, 3, H, W) in channels-last memory and the training dtype; ``labels`` (nnz,) int64 class ids
    and ``offsets`` (B + 1,) int64: sample i's labels are ``labels[offsets[i]:offsets[i + 1]]``. ``origin`` (B, 2)
    int64 on the host: each image's (epoch, plan position), which names it in the stream (a sample repeated by
    resampling appears at several positions).
    """

    images: torch.Tensor
    labels: torch.Tensor
    offsets: torch.Tensor
    origin: np.ndarray | None = None
