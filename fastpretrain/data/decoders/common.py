"""What every backend does the same way: read and check a chunk's images before decoding (``prepare_chunk``),
and finish a decoded crop (``crop_resize_into``, ``Normalizer``, ``CropFinisher``).

``probe_image`` reads only the header with PIL and rejects what would crash or hang a decoder: non-images,
truncated files, formats the decoders lack, and decompression bombs. It finds where the picture ends by walking the
file's structure (JPEG markers, PNG chunks, the RIFF size): bytes after that (a phone's Motion Photo appends a
video to its JPEG) are no sign of damage, and are cut off before decoding. Corrupt data inside a complete JPEG is
not detected here; libjpeg-turbo decodes it with a warning (as PIL does). Crop boxes come from ``boxes``.
"""

from __future__ import annotations

import io
import re
import threading
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from fastpretrain.data.config import DataConfig
from fastpretrain.data.decoders.boxes import Boxes, center_boxes, eval_resize_size, random_resized_boxes, sample_uniforms

# Formats both backends decode (DALI's decoders and torchvision's decode_image): anything else is skipped.
DECODABLE_FORMATS = ("JPEG", "PNG", "WEBP")
_EXIF_ORIENTATION = 0x0112
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


@dataclass(frozen=True)
class ImageInfo:
    """An image's header: ``format`` (one of DECODABLE_FORMATS), its size as displayed (EXIF ``orientation``
    applied: 1 is upright, 5 to 8 swap width and height), and ``length``, the bytes of the picture itself (what
    follows it is not part of it)."""

    format: str
    width: int
    height: int
    length: int
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
        if signed is not None and image_length(data, signed) is None:
            raise BadImage("truncated", f"{signed} data ends early ({len(data)} bytes)") from None
        raise BadImage("not_image", f"{type(e).__name__}: {e}") from None
    if image.format not in DECODABLE_FORMATS:
        raise BadImage("unsupported_format", f"{image.format} image")
    if width < 1 or height < 1:
        raise BadImage("not_image", f"size {width}x{height}")
    if width * height > max_pixels:
        raise BadImage("too_large", f"{width}x{height} is over the limit of {max_pixels} pixels")
    length = image_length(data, image.format)
    if length is None:
        raise BadImage("truncated", f"{image.format} data ends early ({len(data)} bytes)")
    orientation = _orientation(image)
    if orientation in _TRANSPOSING_ORIENTATIONS:
        width, height = height, width
    return ImageInfo(image.format, width, height, length, orientation)


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


def image_length(data: bytes, image_format: str) -> int | None:
    """Where the picture in ``data`` ends (the offset after its last byte), or None when the data ends first."""
    if image_format == "JPEG":
        return _jpeg_length(data)
    if image_format == "PNG":
        return _png_length(data)
    # WEBP: a RIFF container, whose header holds the size of what follows it.
    end = 8 + int.from_bytes(data[4:8], "little")
    return end if len(data) >= end else None


# In entropy-coded data every FF is followed by 00 (a stuffed FF), D0-D7 (a restart marker) or more FF (fill):
# anything else is the marker that ends the scan.
_SCAN_END = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
# TEM, RSTn, SOI: no length field follows; FF 00 outside a scan is stray data, no marker (libjpeg skips it).
_NO_LENGTH = frozenset([0x00, 0x01, *range(0xD0, 0xD9)])
_SOS, _EOI = 0xDA, 0xD9


def _jpeg_length(data: bytes) -> int | None:
    """The end of the EOI marker that ends the image: marker segments are skipped by their lengths (an EXIF
    thumbnail's own EOI lies inside one), each scan's entropy-coded data up to the marker that ends it, as libjpeg
    reads them; an EOI with no scan before it ends no image.

    Data ending in EOI whose first scan has begun is taken whole, without walking the entropy-coded data: the
    regex's pass over it costs 60-80 us per 70 KB photo (7% of the torch backend's CPU per image), the segments
    before it about 1 us. The shortcut only keeps a tail that itself ends in FF D9, which the decoders ignore.
    """
    pos, scanned, size = 2, False, len(data)  # after SOI
    while True:
        pos = data.find(b"\xff", pos)  # libjpeg skips stray bytes before a marker (with a warning)
        if pos < 0:
            return None
        while pos < size and data[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= size:
            return None
        marker = data[pos]
        pos += 1
        if marker == _EOI:
            return pos if scanned else None
        if marker in _NO_LENGTH:
            continue
        if pos + 2 > size:
            return None
        pos += int.from_bytes(data[pos : pos + 2], "big")  # the length counts itself, not the marker
        if marker == _SOS:
            if not scanned and pos <= size - 2 and data.endswith(b"\xff\xd9"):
                return size
            scanned = True
            end = _SCAN_END.search(data, pos)
            if end is None:
                return None
            pos = end.start()


def _png_length(data: bytes) -> int | None:
    """The end of the IEND chunk, walking the chunks (length, type, data, CRC) from the signature."""
    pos, size = 8, len(data)
    while pos + 12 <= size:
        length, kind = int.from_bytes(data[pos : pos + 4], "big"), data[pos + 4 : pos + 8]
        pos += 12 + length
        if kind == b"IEND":
            return pos if pos <= size else None
    return None


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
        # Without what follows the picture: a Motion Photo's video is most of its bytes, none of them decoded.
        encoded.append(data[: info.length] if info.length < len(data) else data)
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


# ----------------------------------------------------------------------------------------------------
# Finishing a crop: resize, mirror, normalize


def crop_resize_into(out: torch.Tensor, image: torch.Tensor, left: int, top: int, width: int, height: int,
                     flip: bool) -> None:
    """The box of ``image`` (3, H, W) uint8 resized into ``out`` (S, S, 3) uint8, antialiased bilinear (torchvision's
    RandomResizedCrop), mirrored if ``flip``."""
    size = out.shape[0]
    # Channels-last contiguous (a copy of the box only, or nothing when it already is): torch's vectorized uint8
    # antialiased resampler wants it, and then returns channels-last, so the HWC store below is a plain copy. On a
    # strided view of the box it falls back and returns NCHW (0.42 ms with the store, 0.24 this way).
    hwc_box = image.permute(1, 2, 0)[top: top + height, left: left + width]  # (h, w, 3)
    box = hwc_box.unsqueeze(0).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)  # (1, 3, h, w)
    if box.device.type == "cpu":
        resized = F.interpolate(box, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    else:  # CUDA has no uint8 antialiased kernel: torchvision resizes in float and rounds back (0.03 ms slower)
        resized = TF.resize(box, [size, size], antialias=True)  # (1, 3, S, S)
    hwc = resized[0].permute(1, 2, 0)  # (S, S, 3)
    out.copy_(hwc.flip(1) if flip else hwc)


class Normalizer:
    """(k, S, S, 3) uint8 pixels -> ``(x - 255 mean) / (255 std)`` (k, S, S, 3) in ``dtype`` on ``device``."""

    def __init__(self, cfg: DataConfig, device: torch.device, dtype: torch.dtype) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        # x * scale + bias over whole pixel rows, (S * 3,): broadcasting a (3,) vector over NHWC's last dim runs
        # 4-5x slower on a CPU (measured: 0.49 vs 0.10 ms per 224px image).
        std = torch.tensor(cfg.std, dtype=torch.float64) * 255
        mean = torch.tensor(cfg.mean, dtype=torch.float64) * 255
        self.scale_row = (1 / std).repeat(cfg.image_size).float().to(self.device)
        self.bias_row = (-mean / std).repeat(cfg.image_size).float().to(self.device)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        k, size = pixels.shape[0], pixels.shape[1]
        rows = pixels.to(self.device, non_blocking=True).view(k, size, size * 3).float()  # (k, S, S * 3)
        torch.addcmul(self.bias_row, rows, self.scale_row, out=rows)
        return rows.view(k, size, size, 3).to(self.dtype)

    def one_into(self, out: torch.Tensor, pixels: torch.Tensor) -> None:
        """One image's (S, S, 3) uint8 ``pixels`` normalized into ``out`` (S, S, 3) of ``dtype``, all on the device."""
        size = pixels.shape[0]
        rows = pixels.view(size, size * 3)  # (S, S * 3)
        if out.dtype == torch.float32:  # in place in ``out``: no float temporary to allocate
            target = out.view(size, size * 3)
            target.copy_(rows)
            torch.addcmul(self.bias_row, target, self.scale_row, out=target)
        else:  # float32 arithmetic, one rounding to ``dtype``
            out.view(size, size * 3).copy_(torch.addcmul(self.bias_row, rows.float(), self.scale_row))


class CropFinisher:
    """Resizes, mirrors and normalizes one crop into its slot of a CPU batch, on whichever thread calls it.

    Each thread resizes into its own reused uint8 image and normalizes it into the batch while it is still in
    cache: a uint8 batch normalized afterwards on the training thread cost that thread ~0.15-0.5 ms per image
    (a cold pass, and the page faults of a fresh float temporary), as much as the resize itself.
    """

    def __init__(self, cfg: DataConfig, dtype: torch.dtype) -> None:
        self.size = cfg.image_size
        self.normalize = Normalizer(cfg, torch.device("cpu"), dtype)
        self._per_thread = threading.local()

    def __call__(self, out: torch.Tensor, image: torch.Tensor, left: int, top: int, width: int, height: int,
                 flip: bool) -> None:
        """The box of ``image`` (3, H, W) uint8 into ``out`` (S, S, 3) of the batch's dtype."""
        pixels = getattr(self._per_thread, "pixels", None)
        if pixels is None:
            pixels = self._per_thread.pixels = torch.empty((self.size, self.size, 3), dtype=torch.uint8)
        crop_resize_into(pixels, image, left, top, width, height, flip)
        self.normalize.one_into(out, pixels)
