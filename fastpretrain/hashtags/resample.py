"""Re-balancing the hashtag long tail by replicating images (Mahajan et al. 2018, after Mikolov et al. 2013).

A class ``h`` with image share ``f(h) = count(h) / num_images`` gets the replication factor
``r(h) = max(1, phi(t / f(h)))``, with ``phi`` the identity (uniform), the square root (sqrt, the default) or
the constant 1 (natural: no resampling). An image's factor is the largest of its classes' factors, and an epoch
emits each image ``floor(r)`` times plus once more with probability ``frac(r)``.

Default ``t``: the share of the most frequent class, ``max_h f(h)``. It is the value at which the modes mean what
their names say for single-label images: the head class keeps ``r = 1`` and each class is emitted about
``count(h) * phi(t / f(h))`` times, i.e. in proportion to ``count`` (natural), to ``sqrt(count)`` (sqrt), or
equally (uniform). The price is epoch length: ``sum(r)`` grows with the tail's depth (a class 10,000 times rarer
than the head is replicated 100 times under sqrt); pass a smaller ``t`` to leave classes with ``f(h) >= t`` at
``r = 1`` and bound it. The loaders report the resulting effective epoch length.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

RESAMPLE_MODES = ("natural", "sqrt", "uniform")

_PHI = {
    "natural": lambda x: np.ones_like(x),
    "sqrt": np.sqrt,
    "uniform": lambda x: x,
}


def default_threshold(counts: np.ndarray, num_images: int) -> float:
    """The default ``t``: the image share of the most frequent class (see the module docstring)."""
    counts = np.asarray(counts)
    if counts.size == 0 or counts.max() <= 0:
        raise ValueError("default_threshold: no class has any image")
    return float(counts.max()) / num_images


def class_replication(
    counts: np.ndarray, num_images: int, mode: str = "sqrt", t: float | None = None
) -> np.ndarray:
    """Per-class replication factors ``r(h) = max(1, phi(t / f(h)))``, (C,) float64.

    ``counts`` (C,) images per class; ``num_images`` the images they were counted over (each may carry several
    classes); ``t`` defaults to :func:`default_threshold`. A class with no image gets 1 (no image carries it).
    """
    if mode not in RESAMPLE_MODES:
        raise ValueError(f"resample mode must be one of {', '.join(RESAMPLE_MODES)}, got {mode!r}")
    counts = np.asarray(counts)
    if counts.ndim != 1 or not np.issubdtype(counts.dtype, np.integer):
        raise ValueError(f"counts must be a 1-D integer array, got shape {counts.shape} dtype {counts.dtype}")
    if int(num_images) < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if counts.size and (counts.min() < 0 or counts.max() > num_images):
        raise ValueError(f"counts must lie in [0, num_images={num_images}]")
    if t is None:
        t = default_threshold(counts, num_images)
    elif not (np.isfinite(t) and t > 0):
        raise ValueError(f"resample t must be a positive number, got {t}")
    present = counts > 0
    share = counts[present].astype(np.float64) / num_images  # (C_present,)
    r = np.ones(counts.shape, dtype=np.float64)  # (C,)
    r[present] = np.maximum(1.0, _PHI[mode](t / share))
    return r


def image_replication(class_r: np.ndarray, labels: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Per-image factors, (n,) float64: the max of ``class_r`` over each image's labels; 0 for an unlabeled image.

    ``labels`` (nnz,) class ids and ``offsets`` (n+1,) CSR offsets, as in a :class:`LabelIndex`.
    """
    class_r = np.asarray(class_r, dtype=np.float64)
    labels = np.asarray(labels)
    offsets = np.asarray(offsets, dtype=np.int64)
    n = len(offsets) - 1
    r = np.zeros(n, dtype=np.float64)  # (n,)
    if n <= 0 or len(labels) == 0:
        return r
    labeled = offsets[1:] > offsets[:-1]  # (n,)
    # reduceat takes segment starts; empty segments are masked out because reduceat returns an element for them.
    r[labeled] = np.maximum.reduceat(class_r[labels], offsets[:-1][labeled])
    return r


def copies(r: np.ndarray, seed: int, epoch: int, keys: Sequence[str]) -> np.ndarray:
    """How many times each image is emitted this epoch, (n,) int64: ``floor(r) + Bernoulli(frac(r))``.

    The Bernoulli draw is a pure function of (seed, epoch, key) through BLAKE2b, never Python's salted ``hash()``,
    so every rank, worker count and resume agrees on it.
    """
    r = np.asarray(r, dtype=np.float64)
    if r.ndim != 1 or len(r) != len(keys):
        raise ValueError(f"copies: {len(keys)} keys for replication factors of shape {r.shape}")
    if not np.all(np.isfinite(r)) or (r.size and r.min() < 0):
        raise ValueError("copies: replication factors must be finite and >= 0")
    whole = np.floor(r)  # (n,)
    fraction = r - whole  # (n,)
    return whole.astype(np.int64) + (uniforms(seed, epoch, keys) < fraction)


def uniforms(seed: int, epoch: int, keys: Sequence[str]) -> np.ndarray:
    """One uniform draw in [0, 1) per key, (n,) float64, a pure function of (seed, epoch, key)."""
    # Hashed to a fixed size because BLAKE2b keys are at most 64 bytes and seeds may be any integer.
    salt = hashlib.blake2b(f"{int(seed)}:{int(epoch)}".encode(), digest_size=32).digest()
    digests = b"".join(hashlib.blake2b(key.encode(), digest_size=8, key=salt).digest() for key in keys)
    words = np.frombuffer(digests, dtype="<u8")  # (n,)
    return (words >> np.uint64(11)).astype(np.float64) * 2.0**-53  # top 53 bits: exact in float64


def epoch_length(r: np.ndarray) -> float:
    """The expected number of samples one epoch emits: ``sum(r)`` (unlabeled images contribute 0)."""
    return float(np.sum(r, dtype=np.float64))
