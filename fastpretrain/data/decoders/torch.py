"""The torch backend: torchvision's decoders, an antialiased resized crop, flip, normalize.

On a CPU device, DataLoader worker processes read, check, decode and crop whole chunks into shared (k, S, S, 3)
uint8 slots; the training process only normalizes. A plain JPEG is decoded in its crop box only
(``decode_box``: libjpeg-turbo through ``csrc/jpeg_region.cpp``, the same pixels as the box of torchvision's full
decode); other images, or every image where the extension cannot be built, through torchvision's ``decode_image``.

On a CUDA device (the batched path) the workers read and check each chunk and sort its images by their headers
(``nvjpeg_refusal``): the baseline 3-component JPEGs that nvJPEG's hardware decoder takes (``NVJPEG_SHARE`` of them)
are packed into one uint8 tensor for it; the rest (progressive, CMYK/YCCK, grayscale, PNG, WebP, ...) the workers
decode and crop on their CPUs. A batch thread in the training process (``Prefetcher``), on its own CUDA stream,
decodes each chunk's JPEGs with one batched nvJPEG call (``decode_batched``: a call that fails is split in halves until
the culprits are alone), cuts, resizes, mirrors and normalizes all of their crops in one Triton kernel
(``crop_resize_normalize``), and writes the workers' crops beside them. The training thread never waits for the
device: its stream waits on an event per chunk (only the batch thread waits, once per nvJPEG call, for nvJPEG's own
stream, as torchvision's decoder does).

Launches per chunk of 256 (counted, not measured): before, nvJPEG's batched call, then per image a channels-last
copy of the box, torchvision's float resize (convert, interpolate, round, convert back) and a store, ~8 eager launches
and a Python ``resize`` each, about 2,000 in all, and one nvJPEG failure sent all 256 through single-image calls
(each waiting for nvJPEG's stream). Now: the nvJPEG call, a concatenation of its planes (2-4 launches), one upload of
the crops' table, one crop kernel, and for the workers' CPU crops an upload, a normalize and an index copy: about 10.

Why it is built this way (the figures are in ``bench/results/``): the region decode skips the IDCT and colour
conversion outside the box, where a full decode spends about half its time; the workers write into a ring of
slots shared once per pass (``ChunkReader``) because a fresh shared tensor per chunk costs a shared-memory
segment, a copy and page faults on both sides (each slot is stamped with its chunk's sequence number, checked when
it is read, so a slot reused too early is an error, never mixed images); they keep uint8 crops, because float32
crops are 4x the shared memory; and they never pickle the JPEG bytes back (the batched path hands them over as one
shared tensor). Crop boxes come from ``common.prepare_chunk``, shared with the DALI backend, so both cut the same
regions.
"""

from __future__ import annotations

import contextlib
import gc
import io
import os
import queue
import signal
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import triton
import triton.language as tl
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

from fastpretrain.cpp_extension import extension_or_none
from fastpretrain.data.config import DataConfig
from fastpretrain.data.decoders.common import CropSpec, ImageInfo, Normalizer, PreparedChunk, crop_resize_into, prepare_chunk
from fastpretrain.data.stream import DecodedChunk, PlanChunk, SampleTable
from fastpretrain.errors import UserError
from fastpretrain.formats.shards import MemberReader

SHARED_MEMORY = Path("/dev/shm")  # where torch's shared tensors live on Linux


@contextlib.contextmanager
def quiet_codecs() -> Iterator[None]:
    """Decoding without torchvision's deprecation of its image codecs (0.29 warns on every call, in favour of
    TorchCodec; torchvision's decode_jpeg is the nvJPEG path this backend is built on). Scoped to a chunk: the
    process's own warning filters are left as they were."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                                category=DeprecationWarning)
        yield


def _as_tensor(data: bytes) -> torch.Tensor:
    # A copy: torch wants a writable buffer, and the bytes object is not.
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def decode_rgb(data: bytes, image_format: str) -> torch.Tensor:
    """(3, H, W) uint8 RGB on the CPU, EXIF orientation applied; an exception if the data does not decode.

    PNGs are decoded by PIL: torchvision 0.29's decode_png kills the process (SIGSEGV) on a PNG whose compressed
    data is corrupt, where PIL raises. An animated WebP, which torchvision refuses, gives its first frame through
    PIL, as DALI does.
    """
    if image_format == "PNG":
        return _pil_rgb(data)
    try:
        return decode_image(_as_tensor(data), mode=ImageReadMode.RGB, apply_exif_orientation=True)
    except RuntimeError:
        if image_format != "WEBP":
            raise
        return _pil_rgb(data)


def _pil_rgb(data: bytes) -> torch.Tensor:
    """(3, H, W) uint8 RGB of the first frame, through PIL. 16-bit samples are scaled to 8 bits: PIL does it for
    colour, but its conversion of 16-bit gray ("I;16") to RGB clips at 255, so gray is scaled here."""
    with warnings.catch_warnings(), Image.open(io.BytesIO(data)) as image:
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # probe_image has applied our limit
        if image.mode.startswith("I"):
            gray = (np.asarray(image).astype(np.uint32) >> 8).astype(np.uint8)  # (H, W)
            rgb = np.repeat(gray[..., None], 3, axis=2)
        else:
            rgb = np.array(image.convert("RGB"))  # (H, W, 3), a writable copy
    return torch.from_numpy(rgb).permute(2, 0, 1)


def region_decoder():
    """The C++ region decoder (``csrc/jpeg_region.cpp``), or None after one warning where it cannot be built (it
    needs libjpeg-turbo's headers): then boxes are cut from torchvision's full decode, the same pixels, slower."""
    return extension_or_none("jpeg", "torchvision's full decode for every crop")


def decode_box(data: bytes, info: ImageInfo, left: int, top: int, width: int, height: int) -> tuple[torch.Tensor, int, int]:
    """The pixels to crop a box from on the CPU, (3, H, W) uint8, and the box's (left, top) in them.

    A plain JPEG (upright, not CMYK) is decoded in the box's region only, which equals that box of the full decode;
    anything else (PNG, WebP, CMYK, EXIF-turned) is decoded whole. RuntimeError if the data does not decode.
    """
    jpeg = region_decoder() if info.format == "JPEG" and info.orientation == 1 else None
    if jpeg is not None:
        region = jpeg.decode_region(data, left, top, width, height)  # (h, w, 3); empty: CMYK or YCCK
        if region.numel():
            return region.permute(2, 0, 1), 0, 0
    return decode_rgb(data, info.format), left, top


# ----------------------------------------------------------------------------------------------------
# The batched path: which JPEGs nvJPEG decodes, the decode, and one kernel for every crop

# Start-of-frame markers (C4 is DHT, C8 reserved, CC DAC); the progressive ones among them.
_SOF = frozenset([*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0)])
_PROGRESSIVE = frozenset([0xC2, 0xC6, 0xCA, 0xCE])
_BASELINE, _APP14, _SOS, _EOI = 0xC0, 0xEE, 0xDA, 0xD9
_NO_LENGTH = frozenset([0x01, *range(0xD0, 0xD9)])  # TEM, RSTn, SOI
# Luma sampling (h, v) of the subsamplings nvJPEG's hardware decoder takes, chroma at (1, 1): 4:4:4, 4:2:2, 4:2:0,
# 4:4:0. Others (4:1:1, odd factors) it decodes on its slow path, one image and one stream wait at a time.
_HARDWARE_LUMA_SAMPLING = frozenset([(1, 1), (2, 1), (2, 2), (1, 2)])
_RGB_COMPONENT_IDS = (82, 71, 66)  # "R", "G", "B": libjpeg reads such a frame as RGB, nvJPEG as YCbCr
# The share of the JPEGs nvJPEG takes that it is given on the batched path; the workers decode the rest on their
# CPUs, which otherwise only read and check. The decode, not the crop kernel, should bound the batched path (by the
# work each does), so a split may beat either alone: 1 until a GPU run measures it (bench/test_bench_gpu.py sweeps it).
NVJPEG_SHARE = 1.0


def nvjpeg_refusal(data: bytes) -> str | None:
    """Why this JPEG should go to the CPU decoder instead of nvJPEG, or None for what nvJPEG's batched hardware path
    decodes as libjpeg does: a baseline (SOF0) frame of 8-bit YCbCr in 4:4:4, 4:2:2, 4:2:0 or 4:4:0.

    Read from the marker segments before the frame header (a few hundred bytes): progressive frames (SOF2), which
    nvJPEG decodes one by one on the host; CMYK or YCCK (4 components, or an Adobe APP14 segment whose transform
    says RGB or YCCK); grayscale (1 component); 12-bit, lossless and arithmetic-coded frames; RGB-coded frames.
    """
    pos, size, adobe_transform = 2, len(data), None  # after SOI
    while True:
        pos = data.find(b"\xff", pos)  # libjpeg skips stray bytes before a marker
        while 0 <= pos < size - 1 and data[pos + 1] == 0xFF:  # fill bytes
            pos += 1
        if pos < 0 or pos + 4 > size:
            return "no frame header"
        marker = data[pos + 1]
        if marker in _NO_LENGTH:
            pos += 2
            continue
        if marker in (_SOS, _EOI):
            return "no frame header"
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        body = data[pos + 4 : pos + 2 + length]
        if marker == _APP14 and body[:5] == b"Adobe" and len(body) >= 12:
            adobe_transform = body[11]
        elif marker in _SOF:
            return _frame_refusal(marker, body, adobe_transform)
        pos += 2 + length


def _frame_refusal(marker: int, body: bytes, adobe_transform: int | None) -> str | None:
    """``nvjpeg_refusal`` of a frame header: ``body`` is P, Y, X, Nf, then (id, sampling, table) per component."""
    if marker != _BASELINE:
        return "progressive" if marker in _PROGRESSIVE else f"not baseline (SOF{marker - 0xC0})"
    if len(body) < 6 or (components := body[5]) * 3 + 6 > len(body):
        return "frame header cut short"
    if body[0] != 8:
        return f"{body[0]}-bit samples"
    if components != 3:
        return "grayscale" if components == 1 else f"{components} components (CMYK or YCCK)"
    if adobe_transform not in (None, 1):  # 0: RGB (3 components), 2: YCCK
        return f"Adobe colour transform {adobe_transform}"
    specs = body[6:15]
    if (specs[0], specs[3], specs[6]) == _RGB_COMPONENT_IDS:
        return "RGB components"
    luma, *chroma = [(b >> 4, b & 15) for b in (specs[1], specs[4], specs[7])]
    if luma not in _HARDWARE_LUMA_SAMPLING or chroma != [(1, 1), (1, 1)]:
        return f"chroma sampling {luma}, {chroma[0]}, {chroma[1]}"
    if int.from_bytes(body[1:3], "big") == 0:
        return "height given after the scan (DNL)"
    return None


def oriented_strides(height: int, width: int, orientation: int) -> tuple[int, int, int]:
    """(base, row step, column step), in elements of a (height, width) plane stored row by row, such that pixel
    (y, x) of the picture as displayed under EXIF ``orientation`` is element ``base + y * row + x * column``: the
    turns of PIL's ``ImageOps.exif_transpose`` as strides, so that the crop kernel reads a turned picture without a copy."""
    last_row, last_column = (height - 1) * width, width - 1
    return {1: (0, width, 1), 2: (last_column, width, -1), 3: (last_row + last_column, -width, -1),
            4: (last_row, -width, 1), 5: (0, 1, width), 6: (last_row, 1, -width),
            7: (last_row + last_column, -1, -width), 8: (last_column, -1, width)}[orientation]


def decode_batched(decode: Callable[[list[torch.Tensor]], list[torch.Tensor]],
                   encoded: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """``decode`` (a batched decoder whose call fails whole for one bad image) over ``encoded``, None for each image
    it cannot decode. A failed call is split in halves and each half tried again, so k bad images among n cost at
    most 2 k log2(n) more calls and never a call per good image: each of nvJPEG's batched calls ends by waiting for
    its own stream once (not the device), where a retry image by image waited once per image."""
    if not encoded:
        return []
    try:
        return list(decode(encoded))
    except RuntimeError:
        if len(encoded) == 1:
            return [None]
        half = len(encoded) // 2
        return decode_batched(decode, encoded[:half]) + decode_batched(decode, encoded[half:])


# The crop table: one int64 row per image, these columns.
BASE, CHANNEL_STEP, ROW_STEP, COLUMN_STEP, BOX_WIDTH, BOX_HEIGHT, FLIP, OUT_ROW, TAPS = range(9)
CROP_COLUMNS = 9
# 64 output columns (2 warps) per program: a 224 row is 4 programs; gathers, not arithmetic, bound the kernel, and
# small programs keep every multiprocessor busy. Not tuned on a GPU yet.
CROP_BLOCK, CROP_WARPS = 64, 2


@triton.jit
def _crop_resize_kernel(
    planes_ptr,  # (total,) uint8: every decoded image's three planes, back to back
    table_ptr,  # (n, CROP_COLUMNS) int64, one row per image (the columns above)
    table_stride,  # CROP_COLUMNS
    out_ptr,  # (rows, S, S, 3) float32/bf16: image k written at row table[k, OUT_ROW]
    size,  # S, the output side
    scale_r, scale_g, scale_b, bias_r, bias_g, bias_b,  # normalize: value (0..255) * scale + bias per channel
    BLOCK: tl.constexpr,  # output columns per program
):
    """One output row of one image per program (axis 0: image * S + row; axis 1: blocks of BLOCK columns):
    torch's antialiased bilinear resize of the image's box (the triangle filter widened by the downscale, weights
    normalized, as ``F.interpolate(..., antialias=True)``), rounded to uint8 levels like every other decode path,
    mirrored when FLIP, normalized and stored in the output's dtype. The box's pixel (y, x) is at
    ``BASE + y * ROW_STEP + x * COLUMN_STEP`` (+ c * CHANNEL_STEP): crop offset and EXIF turn folded into strides."""
    program = tl.program_id(0)
    image = program // size
    y = program % size
    entry = table_ptr + image * table_stride
    base = tl.load(entry + 0)  # BASE
    channel_step = tl.load(entry + 1)  # CHANNEL_STEP
    row_step = tl.load(entry + 2)  # ROW_STEP
    column_step = tl.load(entry + 3)  # COLUMN_STEP
    box_w = tl.load(entry + 4).to(tl.int32)  # BOX_WIDTH
    box_h = tl.load(entry + 5).to(tl.int32)  # BOX_HEIGHT
    flip = tl.load(entry + 6)  # FLIP
    out_row = tl.load(entry + 7)  # OUT_ROW
    taps = tl.load(entry + 8).to(tl.int32)  # TAPS: the most source columns one output column reads

    # Rows: the filter's support, centre and first/last source row (torch's _compute_weights_aa: C casts truncate).
    scale_y = box_h.to(tl.float32) / size
    support_y = tl.maximum(scale_y, 1.0)
    center_y = scale_y * (y.to(tl.float32) + 0.5)
    y_lo = tl.maximum((center_y - support_y + 0.5).to(tl.int32), 0)
    y_hi = tl.minimum((center_y + support_y + 0.5).to(tl.int32), box_h)

    columns = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,)
    in_row = columns < size
    scale_x = box_w.to(tl.float32) / size
    support_x = tl.maximum(scale_x, 1.0)
    center_x = scale_x * (columns.to(tl.float32) + 0.5)  # (BLOCK,)
    x_lo = tl.maximum((center_x - support_x + 0.5).to(tl.int32), 0)
    x_hi = tl.minimum((center_x + support_x + 0.5).to(tl.int32), box_w)

    weight_x = tl.zeros([BLOCK], dtype=tl.float32)
    for t in range(taps):
        x = x_lo + t
        weight_x += tl.where(x < x_hi, tl.maximum(1.0 - tl.abs((x.to(tl.float32) - center_x + 0.5) / support_x), 0.0), 0.0)
    weight_y = 0.0
    r = tl.zeros([BLOCK], dtype=tl.float32)
    g = tl.zeros([BLOCK], dtype=tl.float32)
    b = tl.zeros([BLOCK], dtype=tl.float32)
    for source_y in range(y_lo, y_hi):
        wy = tl.maximum(1.0 - tl.abs((source_y - center_y + 0.5) / support_y), 0.0)
        row_ptr = planes_ptr + base + row_step * source_y  # int64: the planes can pass 2**31 bytes
        row_r = tl.zeros([BLOCK], dtype=tl.float32)
        row_g = tl.zeros([BLOCK], dtype=tl.float32)
        row_b = tl.zeros([BLOCK], dtype=tl.float32)
        for t in range(taps):
            x = x_lo + t
            valid = (x < x_hi) & in_row
            wx = tl.where(valid, tl.maximum(1.0 - tl.abs((x.to(tl.float32) - center_x + 0.5) / support_x), 0.0), 0.0)
            pixel = row_ptr + x.to(tl.int64) * column_step
            row_r += wx * tl.load(pixel, mask=valid, other=0).to(tl.float32)
            row_g += wx * tl.load(pixel + channel_step, mask=valid, other=0).to(tl.float32)
            row_b += wx * tl.load(pixel + 2 * channel_step, mask=valid, other=0).to(tl.float32)
        weight_y += wy
        r += wy * row_r
        g += wy * row_g
        b += wy * row_b

    total = tl.maximum(weight_y * weight_x, 1e-20)
    out_column = tl.where(flip != 0, size - 1 - columns, columns)
    out = out_ptr + ((out_row * size + y) * size + out_column.to(tl.int64)) * 3
    # floor(v + 0.5) of v in [0, 255]: the uint8 level the other paths resize to, then normalized.
    r = (tl.minimum(r / total, 255.0) + 0.5).to(tl.int32).to(tl.float32)
    g = (tl.minimum(g / total, 255.0) + 0.5).to(tl.int32).to(tl.float32)
    b = (tl.minimum(b / total, 255.0) + 0.5).to(tl.int32).to(tl.float32)
    tl.store(out, (r * scale_r + bias_r).to(out_ptr.dtype.element_ty), mask=in_row)
    tl.store(out + 1, (g * scale_g + bias_g).to(out_ptr.dtype.element_ty), mask=in_row)
    tl.store(out + 2, (b * scale_b + bias_b).to(out_ptr.dtype.element_ty), mask=in_row)


def filter_taps(box_sides: np.ndarray, size: int) -> np.ndarray:
    """(n,) the most source pixels one output pixel's filter spans, for boxes of ``box_sides`` (n,) resized to
    ``size``: 2 * support + 1, the support being the downscale factor (1 when enlarging)."""
    support = np.maximum(np.asarray(box_sides, dtype=np.float64) / size, 1.0)
    return np.ceil(2 * support).astype(np.int64) + 1


def crop_resize_normalize(planes: torch.Tensor, table: torch.Tensor, out: torch.Tensor, scale: tuple[float, ...],
                          bias: tuple[float, ...]) -> None:
    """Every crop of ``table`` (n, CROP_COLUMNS) int64 cut from ``planes`` (uint8, flat) into its row of ``out``
    (rows, S, S, 3), normalized ``value * scale[c] + bias[c]``: one launch (see ``_crop_resize_kernel``)."""
    n, size = table.shape[0], out.shape[1]
    if n:
        _crop_resize_kernel[(n * size, triton.cdiv(size, CROP_BLOCK))](
            planes, table, table.stride(0), out, size, *scale, *bias, BLOCK=CROP_BLOCK, num_warps=CROP_WARPS)


def normalize_constants(cfg: DataConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(scale, bias) per channel of ``(v - 255 mean) / (255 std)`` as ``v * scale + bias`` (Normalizer's map)."""
    return (tuple(1 / (255 * s) for s in cfg.std), tuple(-m / s for m, s in zip(cfg.mean, cfg.std)))


@dataclass
class DeviceWork:
    """What a worker hands the batch thread for one chunk on the batched path (indices into its PreparedChunk):
    ``nvjpeg`` (j,) the JPEGs left to nvJPEG, their bytes back to back in ``packed`` uint8 ending at ``ends`` (j,);
    ``cropped`` (m,) the images the worker decoded and cropped itself into ``crops`` (m, S, S, 3) uint8; ``failed``
    index -> why, for those that did not decode."""

    nvjpeg: np.ndarray
    packed: torch.Tensor
    ends: np.ndarray
    cropped: np.ndarray
    crops: torch.Tensor
    failed: dict[int, str]

    def encoded(self) -> list[torch.Tensor]:
        """The JPEGs for nvJPEG, as views of ``packed``."""
        starts = np.concatenate([[0], self.ends[:-1]])
        return [self.packed[int(a):int(b)] for a, b in zip(starts, self.ends)]


def nvjpeg_indices(prepared: PreparedChunk, share: float) -> np.ndarray:
    """The images of ``prepared`` to decode with nvJPEG: the JPEGs it takes (``nvjpeg_refusal``), ``share`` of them,
    chosen by plan position (a golden-ratio sequence: the same images in every run and resume)."""
    spread = np.modf(prepared.positions.astype(np.float64) * 0.6180339887498949)[0]  # (k,) in [0, 1)
    return np.array([i for i, (data, info) in enumerate(zip(prepared.encoded, prepared.infos))
                     if info.format == "JPEG" and spread[i] < share and nvjpeg_refusal(data) is None], dtype=np.int64)


class DeviceBatcher:
    """Turns a worker's chunk (``WorkerOutput`` with its ``DeviceWork``) into a DecodedChunk on ``device``, on
    whatever stream is current: one batched nvJPEG call, one crop kernel over its images, the workers' crops
    uploaded and normalized into their rows. Images nvJPEG fails are decoded and cropped here on the CPU."""

    def __init__(self, cfg: DataConfig, device: torch.device, dtype: torch.dtype) -> None:
        self.size = cfg.image_size
        self.device = torch.device(device)
        self.dtype = dtype
        self.scale, self.bias = normalize_constants(cfg)
        self.normalize = Normalizer(cfg, self.device, dtype)

    def decode_jpegs(self, encoded: list[torch.Tensor]) -> list[torch.Tensor]:
        """(3, H, W) uint8 RGB on the device per JPEG, as stored (EXIF ignored): nvJPEG on CUDA."""
        return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device)

    def __call__(self, output: WorkerOutput) -> DecodedChunk:
        prepared, work = output.prepared, output.work
        failed = dict(work.failed)
        encoded = work.encoded()
        planes: dict[int, torch.Tensor] = {}
        late: list[int] = []  # nvJPEG could not: decoded on the CPU here
        for i, image in zip(work.nvjpeg.tolist(), decode_batched(self.decode_jpegs, encoded)):
            if image is not None and _stored_size(prepared.infos[i]) == tuple(image.shape[1:]):
                planes[i] = image
            else:
                late.append(i)
        late_crops = torch.empty((len(late), self.size, self.size, 3), dtype=torch.uint8)
        late_data = {i: bytes(data.numpy()) for i, data in zip(work.nvjpeg.tolist(), encoded) if i in late}
        late_done = _decode_into(late_crops, prepared, late, failed, late_data)
        kept = prepared.drop(failed, "decode_error")
        row_of = {i: r for r, i in enumerate(i for i in range(len(prepared)) if i not in failed)}
        out = torch.empty((len(kept), self.size, self.size, 3), dtype=self.dtype, device=self.device)  # (k, S, S, 3)
        order = sorted(planes)
        table = self._crop_table(prepared, order, [planes[i] for i in order], row_of)
        crop_rows = np.array([row_of[i] for i in [*work.cropped.tolist(), *late_done]], dtype=np.int64)
        table_rows = self._upload(np.concatenate([table.ravel(), crop_rows]))
        if order:
            flat = torch.cat([planes[i].reshape(-1) for i in order])  # (total,) the planes back to back
            crop_resize_normalize(flat, table_rows[: table.size].view(-1, CROP_COLUMNS), out, self.scale, self.bias)
        if len(crop_rows):
            crops = torch.cat([work.crops, late_crops[: len(late_done)]])  # (m, S, S, 3) uint8 on the CPU
            out.index_copy_(0, table_rows[table.size :], self.normalize(self._pinned(crops)))
        return DecodedChunk(kept.epoch, kept.positions, kept.samples, out, kept.bad)

    def _crop_table(self, prepared: PreparedChunk, order: list[int], planes: list[torch.Tensor],
                    row_of: dict[int, int]) -> np.ndarray:
        """(len(order), CROP_COLUMNS) int64: each image's box in the flat planes (see ``_crop_resize_kernel``)."""
        table = np.zeros((len(order), CROP_COLUMNS), dtype=np.int64)
        boxes = prepared.boxes
        offset = 0
        for r, (i, image) in enumerate(zip(order, planes)):
            _, height, width = image.shape
            base, row_step, column_step = oriented_strides(height, width, prepared.infos[i].orientation)
            table[r, BASE] = offset + base + boxes.top[i] * row_step + boxes.left[i] * column_step
            table[r, [CHANNEL_STEP, ROW_STEP, COLUMN_STEP]] = height * width, row_step, column_step
            table[r, [BOX_WIDTH, BOX_HEIGHT, FLIP, OUT_ROW]] = boxes.width[i], boxes.height[i], boxes.flip[i], row_of[i]
            offset += image.numel()
        table[:, TAPS] = filter_taps(table[:, BOX_WIDTH], self.size)
        return table

    def _pinned(self, tensor: torch.Tensor) -> torch.Tensor:
        # Page-locked, so that the upload does not wait for the stream's queued work (from pageable memory it would).
        return tensor.pin_memory() if self.device.type == "cuda" else tensor

    def _upload(self, array: np.ndarray) -> torch.Tensor:
        return self._pinned(torch.from_numpy(array)).to(self.device, non_blocking=True)


def _stored_size(info: ImageInfo) -> tuple[int, int]:
    """(height, width) of the picture as stored, before its EXIF turn."""
    turned = info.orientation in (5, 6, 7, 8)
    return (info.width, info.height) if turned else (info.height, info.width)


# ----------------------------------------------------------------------------------------------------
# The batch thread


_POLL_S = 0.05  # how often a producer blocked on a full queue looks whether it was told to stop


@dataclass
class _Raised:
    error: BaseException


_DONE = object()


class Prefetcher:
    """The items of ``produce()``, made on a background thread at most ``depth`` ahead of the consumer, in order.

    On CUDA the thread queues its work on a stream of its own and records an event after each item; the consumer's
    stream waits on that event (the host never synchronizes), and ``tensors(item)`` are recorded on the consumer's
    stream (``record_stream``), so that the allocator does not give their memory back to the thread's stream while
    the consumer's kernels may still read it. On a CPU there are no streams and no events: the same thread, so that
    the machinery is tested where there is no GPU.

    An exception raised on the thread is raised by the consumer's ``next``, the same object (its traceback starts on
    the thread). ``close()`` (also called at the end of the items or at an exception) stops the thread and waits for
    it; ``produce()``'s iterator is closed on the thread, so what it holds (a DataLoader's workers) ends there.
    """

    def __init__(self, produce: Callable[[], Iterator], depth: int, device: torch.device,
                 tensors: Callable[[object], tuple[torch.Tensor, ...]] = lambda item: ()) -> None:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self._tensors = tensors
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, args=(produce,), name="fastpretrain-batches", daemon=True)
        self._thread.start()

    def _run(self, produce: Callable[[], Iterator]) -> None:
        try:
            with self._on_stream():
                items = produce()
                try:
                    for item in items:
                        event = None
                        if self._stream is not None:
                            event = torch.cuda.Event()
                            event.record(self._stream)
                        if not self._put((item, event)):
                            return
                finally:
                    getattr(items, "close", lambda: None)()
            self._put(_DONE)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            self._put(_Raised(e))

    @contextlib.contextmanager
    def _on_stream(self) -> Iterator[None]:
        if self._stream is None:
            yield
            return
        torch.cuda.set_device(self.device)  # each thread has its own current device: this one starts on device 0
        with torch.cuda.stream(self._stream):
            yield

    def _put(self, entry) -> bool:
        """Queue ``entry``; False once the consumer has closed (it waits for no more)."""
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self):
        if self._closed:
            raise StopIteration
        entry = self._queue.get()  # the thread always ends with _DONE or _Raised unless closed
        if entry is _DONE:
            self.close()
            raise StopIteration
        if isinstance(entry, _Raised):
            self.close()
            raise entry.error
        item, event = entry
        if event is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(event)
            for tensor in self._tensors(item):
                tensor.record_stream(stream)
        return item

    def close(self) -> None:
        """Stop the thread and wait for it (what it had made and not handed out is dropped)."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._thread.join()
        while not self._queue.empty():
            self._queue.get_nowait()


# ----------------------------------------------------------------------------------------------------
# The workers' side and the decoder


@dataclass
class WorkerOutput:
    """A chunk from a worker: the prepared chunk, its sequence number, and where its pixels are: the ring slot
    holding its crops when decoded on the CPU, or on the batched path the ``DeviceWork`` left for the batch thread."""

    prepared: PreparedChunk
    sequence: int
    slot: int | None
    work: DeviceWork | None = None


@dataclass
class CropRing:
    """A pass's crop slots in shared memory: ``pixels`` (slots, chunk size, S, S, 3) uint8, and ``stamps`` (slots,)
    int64, the sequence number of the chunk whose crops each slot holds (-1 while a worker writes it)."""

    pixels: torch.Tensor
    stamps: torch.Tensor

    @classmethod
    def make(cls, slots: int, chunk_size: int, image_size: int) -> CropRing:
        pixels = torch.empty((slots, chunk_size, image_size, image_size, 3), dtype=torch.uint8).share_memory_()
        return cls(pixels, torch.full((slots,), -1, dtype=torch.int64).share_memory_())

    def __len__(self) -> int:
        return len(self.stamps)

    def read(self, slot: int, sequence: int, count: int, normalize: Normalizer) -> torch.Tensor:
        """The first ``count`` crops of ``slot`` normalized, RuntimeError unless they are all of chunk
        ``sequence``: checked before the copy, and after it (a worker may have begun writing the slot meanwhile)."""
        self._check(slot, sequence)
        images = normalize(self.pixels[slot, :count])
        self._check(slot, sequence)
        return images

    def _check(self, slot: int, sequence: int) -> None:
        stamp = int(self.stamps[slot])
        if stamp != sequence:  # a bug, never bad data: slots reused while still in flight would mix images
            holds = "a chunk being written" if stamp < 0 else f"chunk {stamp}"
            raise RuntimeError(f"crop slot {slot} holds {holds}, not chunk {sequence}: more chunks were in flight "
                               f"than the {len(self)} slots of the ring")


def ring_slots(cfg: DataConfig) -> int:
    """Slots of a pass's ring: one more than the DataLoader keeps in flight (``workers x prefetch``: it asks for the
    next chunk before handing out the current one), and one to spare."""
    return cfg.workers * cfg.prefetch_batches + 2


class ChunkReader(Dataset):
    """Indexed by (sequence number, PlanChunk): reads and checks the chunk's images and, given a ``ring``, decodes
    and crops them into slot ``sequence % len(ring)`` of it, stamping the slot with the sequence number; without one
    (the batched path), packs the JPEGs for nvJPEG (``nvjpeg_indices`` with ``nvjpeg_share``) and decodes and crops
    the rest itself (``DeviceWork``).

    The ring, in shared memory, is made once per pass, before its worker processes start: crops returned as a
    fresh tensor cost, per chunk, a shared-memory segment, a copy into it and page faults on both sides (~0.2 ms
    per 224 crop on 2 cores). A slot is safe to reuse once the training process has normalized its chunk; the
    stamps make a slot reused too early an error instead of mixed images.
    """

    def __init__(self, table: SampleTable, spec: CropSpec, ring: CropRing | None,
                 nvjpeg_share: float = NVJPEG_SHARE) -> None:
        self.table = table
        self.spec = spec
        self.ring = ring
        self.nvjpeg_share = nvjpeg_share
        self.reader = MemberReader(table.paths)

    def __getitem__(self, item: tuple[int, PlanChunk]) -> WorkerOutput:
        sequence, chunk = item
        prepared = prepare_chunk(chunk, self.table, self.reader, self.spec)
        if self.ring is None:
            # The bytes travel packed in the DeviceWork; empty ones here keep the chunk's subset and drop working.
            return WorkerOutput(replace(prepared, encoded=[b""] * len(prepared)), sequence, None,
                                self._device_work(prepared))
        slot = sequence % len(self.ring)
        failed: dict[int, str] = {}
        self.ring.stamps[slot] = -1
        with quiet_codecs():
            _decode_into(self.ring.pixels[slot], prepared, range(len(prepared)), failed)  # (chunk size, S, S, 3)
        self.ring.stamps[slot] = sequence
        kept = prepared.drop(failed, "decode_error")
        # The training process needs no JPEG bytes back (about 2 MB less to pickle per chunk of 32).
        return WorkerOutput(replace(kept, encoded=[]), sequence, slot)

    def _device_work(self, prepared: PreparedChunk) -> DeviceWork:
        """No ``quiet_codecs`` here: with no workers this runs on the batch thread (see ``TorchDecoder._batched``)."""
        nvjpeg = nvjpeg_indices(prepared, self.nvjpeg_share)
        lengths = np.array([len(prepared.encoded[i]) for i in nvjpeg], dtype=np.int64)
        packed = np.empty(int(lengths.sum()), dtype=np.uint8)  # one tensor: shared with the batch thread, not pickled
        ends = np.cumsum(lengths)
        for i, end, length in zip(nvjpeg, ends, lengths):
            packed[end - length : end] = np.frombuffer(prepared.encoded[i], dtype=np.uint8)
        rest = sorted(set(range(len(prepared))) - set(nvjpeg.tolist()))
        size = self.spec.image_size
        crops = torch.empty((len(rest), size, size, 3), dtype=torch.uint8)
        failed: dict[int, str] = {}
        cropped = _decode_into(crops, prepared, rest, failed)
        return DeviceWork(nvjpeg, torch.from_numpy(packed), ends, np.array(cropped, dtype=np.int64),
                          crops[: len(cropped)], failed)


def _decode_into(pixels: torch.Tensor, prepared: PreparedChunk, indices, failed: dict[int, str],
                 data_of: dict[int, bytes] | None = None) -> list[int]:
    """Images ``indices`` of ``prepared`` decoded and cropped into the next rows of ``pixels`` (their bytes from
    ``data_of`` where given); those that fail in ``failed`` (index -> detail); the indices written, in row order.
    Nothing one image does escapes: a worker that raised would end the pass."""
    boxes = prepared.boxes
    done = []
    for i in indices:
        data = prepared.encoded[i] if data_of is None else data_of[i]
        left, top, width, height = (int(b[i]) for b in (boxes.left, boxes.top, boxes.width, boxes.height))
        try:
            image, left, top = decode_box(data, prepared.infos[i], left, top, width, height)
            crop_resize_into(pixels[len(done)], image, left, top, width, height, bool(boxes.flip[i]))
            done.append(i)
        except Exception as e:  # noqa: BLE001 - whatever the decoder throws, the sample is skipped
            failed[i] = _last_line(e)
    return done


def _last_line(error: Exception) -> str:
    """What failed, in one line (torch's messages end with it, after their C++ context)."""
    lines = str(error).strip().splitlines()
    return lines[-1] if lines else type(error).__name__


def _check_shared_memory(needed: int) -> None:
    """UserError if /dev/shm has less than ``needed`` bytes free: the ring would be made, and a worker killed by
    SIGBUS when it first wrote past the free space (Docker gives containers 64 MB unless told otherwise)."""
    if not SHARED_MEMORY.is_dir():
        return  # not Linux: torch shares memory another way
    stats = os.statvfs(SHARED_MEMORY)
    free = stats.f_bavail * stats.f_frsize
    if free < needed:
        raise UserError(f"the torch data backend needs {needed / 2**20:.3g} MiB of shared memory for its crops and "
                        f"{SHARED_MEMORY} has {free / 2**20:.3g} MiB free: give it more (docker run --shm-size=...), "
                        "or lower --workers or --batch-size")


def _leave_stop_signals_to_the_trainer(_worker_id: int) -> None:
    """A scheduler's SIGTERM (``scancel``, torchrun stopping its workers) or a Ctrl-C goes to the whole process
    group: the workers ignore it, so that the trainer's handler finishes the step and writes its checkpoint; the
    DataLoader ends them when the pass ends (and they end themselves when the trainer dies)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _keep(output: WorkerOutput) -> WorkerOutput:
    return output


class TorchDecoder:
    """Turns PlanChunks into DecodedChunks with torchvision (see the module docstring). ``batched`` (default: on a
    CUDA device) takes the batched path, which runs on a CPU device too, for tests; ``nvjpeg_share``: see
    NVJPEG_SHARE."""

    def __init__(self, cfg: DataConfig, table: SampleTable, device: torch.device, dtype: torch.dtype, train: bool,
                 batched: bool | None = None, nvjpeg_share: float = NVJPEG_SHARE) -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        self.batched = self.device.type == "cuda" if batched is None else batched
        self.table = table
        self.spec = CropSpec.from_config(cfg, train)
        self.nvjpeg_share = nvjpeg_share
        region_decoder()  # built (or its absence warned about) here, once, not in each worker process
        self.normalize = Normalizer(cfg, self.device, dtype)
        self.batcher = DeviceBatcher(cfg, self.device, dtype) if self.batched else None

    def _ring(self) -> CropRing | None:
        """A pass's crop slots (see ChunkReader and ring_slots)."""
        if self.batched:
            return None
        slots, size = ring_slots(self.cfg), self.cfg.image_size
        _check_shared_memory(slots * self.cfg.batch_size * size * size * 3)
        return CropRing.make(slots, self.cfg.batch_size, size)

    def decode(self, chunks: Iterator[PlanChunk]) -> Iterator[DecodedChunk]:
        """Decoded chunks in the order of ``chunks`` (each at most ``batch_size`` samples long)."""
        if self.batched:
            self._check_batched_shared_memory()
            batches = Prefetcher(lambda: self._batched(chunks), self.cfg.prefetch_batches, self.device,
                                 tensors=lambda chunk: (chunk.images,))
            try:
                yield from batches
            finally:
                batches.close()
            return
        reader = ChunkReader(self.table, self.spec, self._ring())  # its own slots: passes never share them
        outputs = self._outputs(reader, chunks)
        try:
            for output in outputs:
                yield self._finish(output, reader.ring)
        finally:
            # The last reference: the DataLoader iterator shuts its workers down now, not at garbage collection.
            del outputs

    def _check_batched_shared_memory(self) -> None:
        """The batched path's chunks in flight (``workers x prefetch``) each share a tensor of their JPEGs' bytes
        and one of their CPU crops: at most the mean picture plus a crop per image."""
        if self.cfg.workers:
            per_image = float(np.mean(self.table.image_size)) + 3 * self.cfg.image_size**2
            _check_shared_memory(int(self.cfg.workers * self.cfg.prefetch_batches * self.cfg.batch_size * per_image))

    def _batched(self, chunks: Iterator[PlanChunk]) -> Iterator[DecodedChunk]:
        """The batched path, on the batch thread. No ``quiet_codecs`` here: warning filters are process-wide and
        ``catch_warnings`` is not thread-safe (the codecs' DeprecationWarning is hidden by default anyway)."""
        outputs = self._outputs(ChunkReader(self.table, self.spec, None, self.nvjpeg_share), chunks)
        try:
            for output in outputs:
                yield self.batcher(output)
        finally:
            del outputs

    def _outputs(self, reader: ChunkReader, chunks: Iterator[PlanChunk]) -> Iterator[WorkerOutput]:
        numbered = enumerate(chunks)  # the sequence numbers pick the slots
        if self.cfg.workers == 0:
            return map(reader.__getitem__, numbered)
        # Garbage finalized here, not in a forked worker: there a finalizer that joins threads (a DALI pipeline's,
        # left by an unclosed pass) waits forever for threads the child does not have.
        gc.collect()
        return iter(DataLoader(reader, batch_size=None, sampler=numbered, num_workers=self.cfg.workers,
                               collate_fn=_keep, prefetch_factor=self.cfg.prefetch_batches,
                               worker_init_fn=_leave_stop_signals_to_the_trainer))

    def _finish(self, output: WorkerOutput, ring: CropRing) -> DecodedChunk:
        prepared = output.prepared
        # Normalizing copies the crops out of the slot, which a worker may then fill again.
        images = ring.read(output.slot, output.sequence, len(prepared), self.normalize)
        return DecodedChunk(prepared.epoch, prepared.positions, prepared.samples, images, prepared.bad)
