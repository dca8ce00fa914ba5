"""Crop boxes, drawn from counter-based random numbers keyed by ``(seed, epoch, position in the epoch)``, not inside
the decoders: every backend then cuts the same box from the same image, and a resumed run draws the boxes of the
uninterrupted one. ``random_resized_boxes`` is torchvision's ``RandomResizedCrop.get_params`` (ten tries, then a
centre crop), vectorized over a chunk of samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries this many boxes before a centre crop
_DRAWS = 2 * _ATTEMPTS + 3  # per sample: (area, log ratio) per try, then top, left, flip
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function: a bijective mix of 64-bit counters (numpy uint64 arithmetic wraps)."""
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def sample_uniforms(seed: int, epoch: int, positions: np.ndarray, draws: int = _DRAWS) -> np.ndarray:
    """(n, draws) float64 uniforms in [0, 1), a pure function of (seed, epoch, position)."""
    stream = _splitmix64(np.array([(int(seed) & (2**64 - 1))], dtype=np.uint64) ^ _splitmix64(np.array([epoch], np.uint64)))
    counters = np.asarray(positions, dtype=np.uint64)[:, None] * np.uint64(draws) + np.arange(draws, dtype=np.uint64)
    bits = _splitmix64(counters ^ stream)  # (n, draws)
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


@dataclass
class Boxes:
    """Per-sample crop boxes in the displayed image, (n,) int64 each, and horizontal flips (n,) bool."""

    left: np.ndarray
    top: np.ndarray
    width: np.ndarray
    height: np.ndarray
    flip: np.ndarray

    def select(self, keep: np.ndarray) -> Boxes:
        """The boxes at indices (or mask) ``keep``."""
        return Boxes(self.left[keep], self.top[keep], self.width[keep], self.height[keep], self.flip[keep])


def random_resized_boxes(
    widths: np.ndarray,
    heights: np.ndarray,
    uniforms: np.ndarray,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Boxes:
    """Boxes drawn as torchvision's ``RandomResizedCrop.get_params`` draws them, plus a fair coin for the flip.

    ``widths``, ``heights`` (n,); ``uniforms`` (n, 23) from :func:`sample_uniforms`.
    """
    width = np.asarray(widths, dtype=np.float64)[:, None]  # (n, 1)
    height = np.asarray(heights, dtype=np.float64)[:, None]
    tries = uniforms[:, : 2 * _ATTEMPTS].reshape(-1, _ATTEMPTS, 2)  # (n, 10, 2)
    log_ratio = np.log(ratio)
    target_area = width * height * (scale[0] + (scale[1] - scale[0]) * tries[..., 0])  # (n, 10)
    aspect = np.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * tries[..., 1])  # (n, 10)
    # np.round is round-half-even, like Python's round() in torchvision.
    w = np.round(np.sqrt(target_area * aspect))  # (n, 10)
    h = np.round(np.sqrt(target_area / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)  # (n, 10)
    first = fits.argmax(axis=1)  # (n,): the first try that fits
    rows = np.arange(len(first))
    box_w, box_h = w[rows, first], h[rows, first]  # (n,)

    width, height = width[:, 0], height[:, 0]  # (n,)
    # No try fits: torchvision's fallback, the whole image clamped to the ratio range, centred.
    in_ratio = width / height
    fallback_w = np.where(in_ratio > ratio[1], np.round(height * ratio[1]), width)
    fallback_h = np.where(in_ratio < ratio[0], np.round(width / ratio[0]), height)
    found = fits.any(axis=1)
    box_w = np.where(found, box_w, fallback_w)
    box_h = np.where(found, box_h, fallback_h)
    # torch.randint(0, n + 1) over a fitting box; the fallback is centred.
    top = np.where(found, np.floor(uniforms[:, -3] * (height - box_h + 1)), (height - box_h) // 2)
    left = np.where(found, np.floor(uniforms[:, -2] * (width - box_w + 1)), (width - box_w) // 2)
    flip = uniforms[:, -1] < 0.5
    as_int = lambda a: a.astype(np.int64)  # noqa: E731
    return Boxes(as_int(left), as_int(top), as_int(box_w), as_int(box_h), flip)


def center_boxes(widths: np.ndarray, heights: np.ndarray, image_size: int, resize_size: int) -> Boxes:
    """The region that "resize the shorter side to ``resize_size``, centre-crop ``image_size``" keeps.

    Cropping this box and resizing it to ``image_size`` is that transform up to rounding to whole pixels,
    and lets a decoder decode only the region.
    """
    widths = np.asarray(widths, dtype=np.int64)
    heights = np.asarray(heights, dtype=np.int64)
    shorter = np.minimum(widths, heights)  # (n,)
    side = np.clip(np.round(shorter * image_size / resize_size), 1, shorter).astype(np.int64)
    left = np.round((widths - side) / 2).astype(np.int64)
    top = np.round((heights - side) / 2).astype(np.int64)
    return Boxes(left, top, side, side.copy(), np.zeros(len(side), dtype=bool))


def eval_resize_size(image_size: int) -> int:
    """The eval transform's resize before the centre crop: 256 for 224, in proportion otherwise."""
    return round(image_size * 256 / 224)
