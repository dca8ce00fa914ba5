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
segment, a copy and page faults on both sides; they keep uint8 crops, because float32 crops are 4x the shared
memory; and they never pickle the JPEG bytes back. Crop boxes come from ``common.prepare_chunk``, shared with the
DALI backend, so both cut the same regions.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
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


def decode_rgb(data: bytes) -> torch.Tensor:
    """(3, H, W) uint8 RGB on the CPU, EXIF orientation applied; RuntimeError if the data does not decode."""
    return decode_image(_as_tensor(data), mode=ImageReadMode.RGB, apply_exif_orientation=True)


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
    return decode_rgb(data), left, top


@dataclass
class WorkerOutput:
    """A chunk from a worker: the prepared chunk, and the ring slot holding its crops when decoded on the CPU."""

    prepared: PreparedChunk
    slot: int | None


class ChunkReader(Dataset):
    """Indexed by (sequence number, PlanChunk): reads and checks the chunk's images and, given a ``ring``, decodes
    and crops them into slot ``sequence % len(ring)`` of it.

    The ring, (slots, chunk size, S, S, 3) uint8 in shared memory, is made once per pass, before its worker
    processes start: crops returned as a fresh tensor cost, per chunk, a shared-memory segment, a copy into it and
    page faults on both sides (~0.2 ms per 224 crop on 2 cores). A slot is safe to reuse once the training process
    has normalized its chunk: ``slots`` must exceed the chunks a DataLoader keeps in flight (it asks for the next
    one before handing out the current one).
    """

    def __init__(self, table: SampleTable, spec: CropSpec, ring: torch.Tensor | None) -> None:
        self.table = table
        self.spec = spec
        self.ring = ring
        self.reader = MemberReader(table.paths)

    def __getitem__(self, item: tuple[int, PlanChunk]) -> WorkerOutput:
        sequence, chunk = item
        prepared = prepare_chunk(chunk, self.table, self.reader, self.spec)
        if self.ring is None:
            return WorkerOutput(prepared, None)
        slot = sequence % len(self.ring)
        pixels = self.ring[slot]  # (chunk size, S, S, 3)
        failed: dict[int, str] = {}
        with quiet_codecs():
            self._decode_into(pixels, prepared, failed)
        kept = prepared.drop(failed, "decode_error")
        # The training process needs no JPEG bytes back (about 2 MB less to pickle per chunk of 32).
        return WorkerOutput(replace(kept, encoded=[]), slot)

    @staticmethod
    def _decode_into(pixels: torch.Tensor, prepared: PreparedChunk, failed: dict[int, str]) -> None:
        """Each image of ``prepared`` decoded and cropped into the next row of ``pixels``; those that fail in
        ``failed`` (index -> detail)."""
        boxes = prepared.boxes
        for i, data in enumerate(prepared.encoded):
            width, height = int(boxes.width[i]), int(boxes.height[i])
            try:
                image, left, top = decode_box(data, prepared.infos[i], int(boxes.left[i]), int(boxes.top[i]), width, height)
            except Exception as e:  # noqa: BLE001 - whatever the decoder throws, the sample is skipped
                failed[i] = str(e).splitlines()[-1]
                continue
            crop_resize_into(pixels[i - len(failed)], image, left, top, width, height, bool(boxes.flip[i]))


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

    def _ring(self) -> torch.Tensor | None:
        """A pass's crop slots (see ChunkReader): one more than the DataLoader keeps in flight, and one to spare."""
        if self.on_gpu:
            return None
        slots, size = self.cfg.workers * self.cfg.prefetch_batches + 2, self.cfg.image_size
        _check_shared_memory(slots * self.cfg.batch_size * size * size * 3)
        return torch.empty((slots, self.cfg.batch_size, size, size, 3), dtype=torch.uint8).share_memory_()

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

    def _finish(self, output: WorkerOutput, ring: torch.Tensor | None) -> DecodedChunk:
        prepared = output.prepared
        if output.slot is None:
            with quiet_codecs():
                prepared, pixels = self._decode_on_gpu(prepared)
        else:  # normalizing copies the crops out of the slot, which a worker may then fill again
            pixels = ring[output.slot, : len(prepared)]
        return DecodedChunk(prepared.epoch, prepared.positions, prepared.samples, self.normalize(pixels), prepared.bad)

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
                decoded[i] = decode_rgb(data).to(self.device, non_blocking=True)
            except Exception as e:  # noqa: BLE001 - whatever the decoder throws, the sample is skipped
                failed[i] = str(e).splitlines()[-1]
        boxes = prepared.boxes
        pixels = torch.empty((len(decoded), size, size, 3), dtype=torch.uint8, device=self.device)  # (k, S, S, 3)
        for row, i in enumerate(sorted(decoded)):
            crop_resize_into(pixels[row], decoded[i], int(boxes.left[i]), int(boxes.top[i]), int(boxes.width[i]),
                             int(boxes.height[i]), bool(boxes.flip[i]))
        return prepared.drop(failed, "decode_error"), pixels
