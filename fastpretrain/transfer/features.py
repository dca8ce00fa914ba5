"""Pooled trunk features of a labeled split, extracted once and cached on disk for every later probe.

The trunk is the model with ``fc`` replaced by ``nn.Identity()``: the global average pool of layer4, (N, 2048) for
every registered ResNeXt. It runs in eval mode on the evaluation transform (resize to 256/224 of the crop, centre
crop), channels-last, under bf16 autocast where ``choose_precision`` finds bf16 native (GPUs; AMX/AVX-512 BF16 CPUs).

Cache: ``$FASTPRETRAIN_CACHE/features/KEY/`` holds ``features.npy`` (N, D) float16, ``labels.npy`` (N,) int64 and
``meta.json``, written in that order, each atomically; an entry counts only once its ``meta.json`` is there and
repeats the key, so a run killed mid-write leaves nothing that is read. KEY is a blake2b of everything the features
are a function of: the weights file's contents (a content hash, not size and mtime: ``cp -p`` or ``rsync -t`` of
other weights keeps both), the arch, the image size, mean and std, the decoding backend, the dtype the trunk runs
in, ``FORMAT_VERSION`` (bumped whenever extraction changes), and the split: every file's absolute path, size and
mtime in nanoseconds, every sample's key, byte range and label, the class names. A stale entry would need an image
rewritten in place at the same size with its mtime set back to the nanosecond, which no tool does by accident; image
contents are not hashed (ImageNet's 140 GB would cost more than extracting). Hashing the weights reads them once
more: about 1 s per GB.

float16 on disk: pooled features after a ReLU are O(1) to O(10), where float16 keeps 3 significant digits; the probe
holds them in float16 on the device anyway (see probe.py for the measured cost). Loaded with ``allow_pickle=False``
and memory-mapped: ImageNet-1k's 1.28M x 2048 features are 5.2 GB, read by the probe in chunks.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fastpretrain.data import DataConfig, build_eval_loader
from fastpretrain.data.decoders import resolve_data_backend
from fastpretrain.data.loader import EvalLoader
from fastpretrain.errors import UserError
from fastpretrain.formats.files import atomic_write, cache_root
from fastpretrain.formats.vocab import Vocab
from fastpretrain.models import create_model, to_channels_last
from fastpretrain.train.precision import Precision, choose_precision
from fastpretrain.weights import Weights, load_trunk

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_HASH_BLOCK = 8 << 20


@dataclass
class Features:
    """One split's features: ``features`` (N, D) float16 and ``labels`` (N,) int64 of its decodable images, in the
    split's order; ``folder`` the cache entry they are in."""

    features: np.ndarray
    labels: np.ndarray
    folder: Path


def split_features(weights: Weights, arch: str, cfg: DataConfig, vocab: Vocab, device: torch.device) -> Features:
    """The trunk features of the labeled split ``cfg`` (classes named as ``vocab``'s) under ``weights``: from the
    cache when an entry of the same key is there, else extracted on ``device`` and cached."""
    precision = choose_precision(device, amp=True)
    loader = build_eval_loader(cfg, vocab, device, precision.dtype)
    folder = cache_root() / "features" / cache_key(weights.path, arch, cfg, resolve_data_backend(cfg.backend, device),
                                                    precision.dtype, loader, vocab)
    cached = _load(folder)
    if cached is not None:
        log.info("features of %s: %d images from the cache (%s)", cfg.shards, len(cached.labels), folder)
        return cached
    log.info("features of %s: extracting %d images with %s on %s", cfg.shards, len(loader.samples), arch, device)
    features, labels = extract_features(trunk(weights, arch, device), loader, precision)
    _save(folder, features, labels)
    return Features(features, labels, folder)


def trunk(weights: Weights, arch: str, device: torch.device) -> nn.Module:
    """The pooled trunk of ``arch`` with the weights' tensors, in eval mode, channels-last on ``device``."""
    model = create_model(arch, 1)  # the head is replaced: its size does not matter
    load_trunk(model, weights)
    model.fc = nn.Identity()
    return to_channels_last(model, device).eval()


@torch.no_grad()
def extract_features(model: nn.Module, loader: EvalLoader, precision: Precision) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, D) float16, labels (N,) int64) of every image ``loader`` decodes, in its order (a skipped bad
    image leaves no row). UserError when a feature is not finite in float16: the weights are broken."""
    features: np.ndarray | None = None
    labels = np.zeros(len(loader.samples), dtype=np.int64)
    done = np.zeros(len(loader.samples), dtype=bool)
    for batch in loader:
        with precision.autocast():
            out = model(batch.images).float()  # (B, D)
        if features is None:
            features = np.zeros((len(loader.samples), out.shape[1]), dtype=np.float16)
        rows = batch.origin[:, 1]  # each image's place in the loader's sample order
        features[rows] = out.cpu().numpy()
        labels[rows] = batch.labels.cpu().numpy()  # one class per image
        done[rows] = True
    if features is None:
        raise UserError(f"no image of {loader.cfg.shards} could be decoded")
    features, labels = features[done], labels[done]
    if not np.isfinite(features).all():
        raise UserError("the trunk's features are not finite (or beyond float16's 65504): the weights are broken")
    return features, labels


def cache_key(weights_path: Path, arch: str, cfg: DataConfig, backend: str, dtype: torch.dtype,
              loader: EvalLoader, vocab: Vocab) -> str:
    """The name of the cache entry of these features (see the module docstring for what goes in)."""
    digest = hashlib.blake2b(digest_size=16)
    settings = [FORMAT_VERSION, _file_hash(weights_path), arch, cfg.image_size, list(cfg.mean), list(cfg.std),
                backend, str(dtype), vocab.wnids]
    digest.update(json.dumps(settings).encode())
    table = loader.table
    for path in table.paths:
        stat = os.stat(path)
        digest.update(f"{os.path.abspath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    for array in (loader.samples, table.keys, table.image_offset, table.image_size, table.label_offsets,
                  table.labels):
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _file_hash(path: Path) -> str:
    stat = os.stat(path)
    return _hash_of_file(os.path.abspath(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _hash_of_file(path: str, size: int, mtime_ns: int) -> str:
    """Keyed by size and mtime too, so a file rewritten in place is hashed again; once otherwise, since a probe asks
    for each of its splits and the weights of a 32x48d trunk are 3 GB."""
    digest = hashlib.blake2b(digest_size=32)
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _save(folder: Path, features: np.ndarray, labels: np.ndarray) -> None:
    for name, array in (("features.npy", features), ("labels.npy", labels)):
        with atomic_write(folder / name) as f:
            np.save(f, array, allow_pickle=False)
    meta = {"format_version": FORMAT_VERSION, "key": folder.name, "images": len(labels), "dim": features.shape[1]}
    with atomic_write(folder / "meta.json", "w") as f:
        json.dump(meta, f)


def _load(folder: Path) -> Features | None:
    """The entry in ``folder``, or None when it is absent or incomplete (then it is written again)."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        features = np.load(folder / "features.npy", mmap_mode="r", allow_pickle=False)
        labels = np.load(folder / "labels.npy", allow_pickle=False)
    except (OSError, ValueError):
        return None
    if meta.get("key") != folder.name or features.shape != (meta.get("images"), meta.get("dim")) \
            or labels.shape != (meta.get("images"),):
        return None
    return Features(features, labels, folder)
