"""What every backend does the same way: check an image's bytes before decoding, and draw its crop box.

``probe_image`` reads only the header (about 20 us with PIL) and rejects what would crash or hang a
decoder: non-images, truncated files, formats the decoders lack, and decompression bombs. Corrupt data
inside a complete JPEG is not detected here; libjpeg-turbo decodes it with a warning (as PIL does).

Crop boxes are drawn here, not inside the decoders, from counter-based random numbers keyed by
``(seed, epoch, position in the epoch)``: both backends then cut the same box from the same image, and a
resumed run draws the boxes of the uninterrupted one. ``random_resized_boxes`` is torchvision's
``RandomResizedCrop.get_params`` (ten tries, then a centre crop), vectorized over a chunk of samples.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

# Formats both backends decode (DALI's decoders and torchvision's decode_image): anything else is skipped.
DECODABLE_FORMATS = ("JPEG", "PNG", "WEBP")
_EXIF_ORIENTATION = 0x0112
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


@dataclass(frozen=True)
class ImageInfo:
    """An image's header: ``format`` (one of DECODABLE_FORMATS), its size as displayed (EXIF ``orientation``
    applied: 1 is upright, 5 to 8 swap width and height)."""

    format: str
    width: int
    height: int
    orientation: int = 1


class BadImage(Exception):
    """An image no backend should try to decode; ``reason`` is the skip counter's name."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def probe_image(data: bytes, max_pixels: int) -> ImageInfo:
    """The header of ``data``, or BadImage with the reason it must be skipped.

    Reasons: ``not_image``, ``unsupported_format``, ``too_large`` (more than ``max_pixels``), ``truncated``.
    """
    try:
        with warnings.catch_warnings():
            # PIL warns (and errors at twice its limit) about bombs itself; ours is the limit that counts.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
    except Image.DecompressionBombError as e:
        raise BadImage("too_large", str(e)) from None
    except Exception as e:  # noqa: BLE001 - a parser fed arbitrary bytes fails in arbitrary ways
        # A file cut inside its headers fails to open: call it truncated if its signature says what it was.
        signed = _signature_format(data)
        if signed is not None and not _is_complete(data, signed):
            raise BadImage("truncated", f"{signed} data ends early ({len(data)} bytes)") from None
        raise BadImage("not_image", f"{type(e).__name__}: {e}") from None
    if image.format not in DECODABLE_FORMATS:
        raise BadImage("unsupported_format", f"{image.format} image")
    if width < 1 or height < 1:
        raise BadImage("not_image", f"size {width}x{height}")
    if width * height > max_pixels:
        raise BadImage("too_large", f"{width}x{height} is over the limit of {max_pixels} pixels")
    if not _is_complete(data, image.format):
        raise BadImage("truncated", f"{image.format} data ends early ({len(data)} bytes)")
    orientation = _orientation(image)
    if orientation in _TRANSPOSING_ORIENTATIONS:
        width, height = height, width
    return ImageInfo(image.format, width, height, orientation)


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation of a JPEG, 1 (upright) when absent or malformed, as the decoders take it."""
    if image.format != "JPEG":
        return 1
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - broken EXIF does not make a broken picture
        return 1
    return orientation if orientation in range(1, 9) else 1


def _signature_format(data: bytes) -> str | None:
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _is_complete(data: bytes, image_format: str) -> bool:
    if image_format == "JPEG":
        # Entropy-coded data never holds FF D9 (FF is stuffed), so the end-of-image marker must come after
        # the start of the last scan. An EXIF thumbnail's own EOI lies before the first scan. Searched from
        # both ends (no scan after the last EOI, a scan before it), not over the whole entropy-coded data.
        end = data.rfind(b"\xff\xd9")
        return end >= 0 and data.find(b"\xff\xda", end) < 0 and data.find(b"\xff\xda", 0, end) >= 0
    if image_format == "PNG":
        return data.rfind(b"IEND", max(0, len(data) - 64)) >= 0
    # WEBP: a RIFF container, whose header holds the size of what follows it.
    return len(data) >= 8 + int.from_bytes(data[4:8], "little")


# ----------------------------------------------------------------------------------------------------
# Crop boxes

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


# ----------------------------------------------------------------------------------------------------
# Reading a chunk: the part of decoding both backends share


@dataclass
class PreparedChunk:
    """A chunk's images read and checked: the good ones' ``positions``, ``samples`` (k,), ``encoded`` bytes,
    headers (``infos``) and crop ``boxes``; the rest in ``bad`` as (sample, reason, detail)."""

    epoch: int
    positions: np.ndarray
    samples: np.ndarray
    encoded: list[bytes]
    infos: list[ImageInfo]
    boxes: Boxes
    bad: list[tuple[int, str, str]]

    def __len__(self) -> int:
        return len(self.samples)

    def subset(self, keep: np.ndarray) -> PreparedChunk:
        """The images at indices ``keep`` (k',), with this chunk's ``bad`` list."""
        return PreparedChunk(self.epoch, self.positions[keep], self.samples[keep], [self.encoded[i] for i in keep],
                             [self.infos[i] for i in keep], self.boxes.select(keep), self.bad)

    def drop(self, failed: dict[int, str], reason: str) -> PreparedChunk:
        """This chunk without its images at indices ``failed`` (index -> detail), moved to ``bad`` as ``reason``."""
        if not failed:
            return self
        kept = self.subset(np.array([i for i in range(len(self)) if i not in failed], dtype=np.int64))
        kept.bad = self.bad + [(int(self.samples[i]), reason, detail) for i, detail in failed.items()]
        return kept


@dataclass(frozen=True)
class CropSpec:
    """How a loader crops: random-resized (``train``) or centre, to ``image_size`` squares."""

    train: bool
    image_size: int
    seed: int
    scale: tuple[float, float]
    ratio: tuple[float, float]
    max_pixels: int

    @classmethod
    def from_config(cls, cfg, train: bool) -> CropSpec:
        """The crop of a DataConfig's train (``train=True``) or eval loader."""
        return cls(train, cfg.image_size, cfg.seed, tuple(cfg.crop_scale), tuple(cfg.crop_ratio), cfg.decode_limit_pixels)


def prepare_chunk(chunk, table, reader, spec: CropSpec) -> PreparedChunk:
    """Read a PlanChunk's images (``reader``: a MemberReader over ``table.paths``), check them, draw their boxes."""
    keep, encoded, infos, bad = [], [], [], []
    for i, sample in enumerate(chunk.samples):
        try:
            data = reader.read(int(table.shard_of[sample]), int(table.image_offset[sample]), int(table.image_size[sample]))
            info = probe_image(data, spec.max_pixels)
        except OSError as e:
            bad.append((int(sample), "read_error", str(e)))
            continue
        except BadImage as e:
            bad.append((int(sample), e.reason, str(e)))
            continue
        keep.append(i)
        encoded.append(data)
        infos.append(info)
    keep = np.asarray(keep, dtype=np.int64)
    widths = np.array([info.width for info in infos], dtype=np.int64)  # (k,)
    heights = np.array([info.height for info in infos], dtype=np.int64)
    positions = chunk.positions[keep]
    if spec.train:
        uniforms = sample_uniforms(spec.seed, chunk.epoch, positions)
        boxes = random_resized_boxes(widths, heights, uniforms, spec.scale, spec.ratio)
    else:
        boxes = center_boxes(widths, heights, spec.image_size, eval_resize_size(spec.image_size))
    return PreparedChunk(chunk.epoch, positions, chunk.samples[keep], encoded, infos, boxes, bad)
