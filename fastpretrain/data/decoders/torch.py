"""The torch backend: torchvision's decoders, an antialiased resized crop, flip, normalize.

On a CPU device, DataLoader worker processes read, check, decode and crop whole chunks into shared (k, S, S, 3)
uint8 slots; the training process only normalizes. A plain JPEG is decoded in its crop box only
(``decode_box``: libjpeg-turbo through ``csrc/jpeg_region.cpp``, the same pixels as the box of torchvision's full
decode); other images, or every image where the extension cannot be built, through torchvision's ``decode_image``.
On a CUDA device the workers read and check, and the training process decodes each chunk's JPEGs with one
batched ``decode_jpeg(device="cuda")`` (nvJPEG) and crops on the GPU, so pixels never cross PCIe at full size.

Why it is built this way (the figures are in ``bench/results/``): the region decode skips the IDCT and colour
conversion outside the box, where a full decode spends about half its time; the workers write into a ring of
slots shared once per pass (``ChunkReader``) because a fresh shared tensor per chunk costs a shared-memory
segment, a copy and page faults on both sides (each slot is stamped with its chunk's sequence number, checked when
it is read, so a slot reused too early is an error, never mixed images); they keep uint8 crops, because float32
crops are 4x the shared memory; and they never pickle the JPEG bytes back. Crop boxes come from
``common.prepare_chunk``, shared with the DALI backend, so both cut the same regions.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
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


def apply_orientation(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """(C, H, W) as displayed under EXIF ``orientation`` (1-8), as PIL's ``ImageOps.exif_transpose`` turns it.

    Needed after nvJPEG, which ignores EXIF (the CPU decoder applies it itself).
    """
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-2, -1)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-2, -1)
    if orientation == 6:
        return image.rot90(-1, (-2, -1))
    if orientation == 7:
        return image.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:
        return image.rot90(1, (-2, -1))
    return image


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


@dataclass
class WorkerOutput:
    """A chunk from a worker: the prepared chunk, its sequence number, and the ring slot holding its crops when
    decoded on the CPU."""

    prepared: PreparedChunk
    sequence: int
    slot: int | None


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
    and crops them into slot ``sequence % len(ring)`` of it, stamping the slot with the sequence number.

    The ring, in shared memory, is made once per pass, before its worker processes start: crops returned as a
    fresh tensor cost, per chunk, a shared-memory segment, a copy into it and page faults on both sides (~0.2 ms
    per 224 crop on 2 cores). A slot is safe to reuse once the training process has normalized its chunk; the
    stamps make a slot reused too early an error instead of mixed images.
    """

    def __init__(self, table: SampleTable, spec: CropSpec, ring: CropRing | None) -> None:
        self.table = table
        self.spec = spec
        self.ring = ring
        self.reader = MemberReader(table.paths)

    def __getitem__(self, item: tuple[int, PlanChunk]) -> WorkerOutput:
        sequence, chunk = item
        prepared = prepare_chunk(chunk, self.table, self.reader, self.spec)
        if self.ring is None:
            return WorkerOutput(prepared, sequence, None)
        slot = sequence % len(self.ring)
        failed: dict[int, str] = {}
        self.ring.stamps[slot] = -1
        with quiet_codecs():
            self._decode_into(self.ring.pixels[slot], prepared, failed)  # (chunk size, S, S, 3)
        self.ring.stamps[slot] = sequence
        kept = prepared.drop(failed, "decode_error")
        # The training process needs no JPEG bytes back (about 2 MB less to pickle per chunk of 32).
        return WorkerOutput(replace(kept, encoded=[]), sequence, slot)

    @staticmethod
    def _decode_into(pixels: torch.Tensor, prepared: PreparedChunk, failed: dict[int, str]) -> None:
        """Each image of ``prepared`` decoded and cropped into the next row of ``pixels``; those that fail in
        ``failed`` (index -> detail). Nothing one image does escapes: a worker that raised would end the pass."""
        boxes = prepared.boxes
        for i, data in enumerate(prepared.encoded):
            left, top, width, height = (int(b[i]) for b in (boxes.left, boxes.top, boxes.width, boxes.height))
            try:
                image, left, top = decode_box(data, prepared.infos[i], left, top, width, height)
                crop_resize_into(pixels[i - len(failed)], image, left, top, width, height, bool(boxes.flip[i]))
            except Exception as e:  # noqa: BLE001 - whatever the decoder throws, the sample is skipped
                failed[i] = _last_line(e)


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


def _keep(output: WorkerOutput) -> WorkerOutput:
    return output


class TorchDecoder:
    """Turns PlanChunks into DecodedChunks with torchvision (see the module docstring)."""

    def __init__(self, cfg: DataConfig, table: SampleTable, device: torch.device, dtype: torch.dtype, train: bool) -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        self.on_gpu = self.device.type == "cuda"
        self.table = table
        self.spec = CropSpec.from_config(cfg, train)
        if not self.on_gpu:
            region_decoder()  # built (or its absence warned about) here, once, not in each worker process
        self.normalize = Normalizer(cfg, self.device, dtype)

    def _ring(self) -> CropRing | None:
        """A pass's crop slots (see ChunkReader and ring_slots)."""
        if self.on_gpu:
            return None
        slots, size = ring_slots(self.cfg), self.cfg.image_size
        _check_shared_memory(slots * self.cfg.batch_size * size * size * 3)
        return CropRing.make(slots, self.cfg.batch_size, size)

    def decode(self, chunks: Iterator[PlanChunk]) -> Iterator[DecodedChunk]:
        """Decoded chunks in the order of ``chunks`` (each at most ``batch_size`` samples long)."""
        reader = ChunkReader(self.table, self.spec, self._ring())  # its own slots: passes never share them
        numbered = enumerate(chunks)  # the sequence numbers pick the slots
        if self.cfg.workers == 0:
            outputs: Iterator[WorkerOutput] = map(reader.__getitem__, numbered)
        else:
            outputs = iter(DataLoader(
                reader, batch_size=None, sampler=numbered, num_workers=self.cfg.workers,
                collate_fn=_keep, pin_memory=self.on_gpu, prefetch_factor=self.cfg.prefetch_batches,
            ))
        try:
            for output in outputs:
                yield self._finish(output, reader.ring)
        finally:
            # The last reference: the DataLoader iterator shuts its workers down now, not at garbage collection.
            del outputs

    def _finish(self, output: WorkerOutput, ring: CropRing | None) -> DecodedChunk:
        prepared = output.prepared
        if output.slot is None:
            with quiet_codecs():
                prepared, pixels = self._decode_on_gpu(prepared)
            images = self.normalize(pixels)
        else:  # normalizing copies the crops out of the slot, which a worker may then fill again
            images = ring.read(output.slot, output.sequence, len(prepared), self.normalize)
        return DecodedChunk(prepared.epoch, prepared.positions, prepared.samples, images, prepared.bad)

    def _decode_on_gpu(self, prepared: PreparedChunk) -> tuple[PreparedChunk, torch.Tensor]:
        size = self.cfg.image_size
        jpegs = [i for i, info in enumerate(prepared.infos) if info.format == "JPEG"]
        decoded: dict[int, torch.Tensor] = {}
        failed: dict[int, str] = {}
        if jpegs:
            try:
                batch = decode_jpeg([_as_tensor(prepared.encoded[i]) for i in jpegs], mode=ImageReadMode.RGB,
                                    device=self.device)
                decoded.update(zip(jpegs, batch))
            except RuntimeError:  # one bad image fails the whole batched call: nvJPEG again, image by image
                for i in jpegs:
                    try:
                        decoded[i] = decode_jpeg(_as_tensor(prepared.encoded[i]), mode=ImageReadMode.RGB,
                                                 device=self.device)
                    except RuntimeError:
                        pass  # left to the CPU decoder below
        for i, data in enumerate(prepared.encoded):
            if i in decoded:
                decoded[i] = apply_orientation(decoded[i], prepared.infos[i].orientation)
                continue
            try:  # what nvJPEG cannot decode (PNG, WebP, some JPEGs), the CPU decoder may
                decoded[i] = decode_rgb(data, prepared.infos[i].format).to(self.device, non_blocking=True)
            except Exception as e:  # noqa: BLE001 - whatever the decoder throws, the sample is skipped
                failed[i] = _last_line(e)
        boxes = prepared.boxes
        pixels = torch.empty((len(decoded), size, size, 3), dtype=torch.uint8, device=self.device)  # (k, S, S, 3)
        row = 0
        for i in sorted(decoded):
            try:
                crop_resize_into(pixels[row], decoded[i], int(boxes.left[i]), int(boxes.top[i]), int(boxes.width[i]),
                                 int(boxes.height[i]), bool(boxes.flip[i]))
                row += 1
            except Exception as e:  # noqa: BLE001 - as for decoding: the sample is skipped
                failed[i] = _last_line(e)
        return prepared.drop(failed, "decode_error"), pixels[:row]
