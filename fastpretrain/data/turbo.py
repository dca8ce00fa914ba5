"""The turbo backend, for machines without a GPU: libjpeg-turbo decodes only each crop's region, torch resizes,
mirrors and normalizes it, on threads of the training process.

Per 500x375 JPEG to a 224 crop, one core: the region decode (``csrc/jpeg_region.cpp``) ~0.65 ms against ~0.75
for DALI's CPU ``image_slice`` and ~0.9 for torchvision's full ``decode_jpeg``; then the resize (~0.2 ms) and
normalization (~0.1) of ``CropFinisher``, and the header check of ``prepare_chunk`` (~0.07). Each image is one
task on a pool of ``workers`` threads, which run in parallel: the decode and torch's kernels release the GIL.
Chunks are submitted ``prefetch_batches`` ahead of the one handed out.

Everything but plain JPEGs is decoded whole by torchvision (``decode_rgb``) and cropped: PNG and WebP bytes,
CMYK and YCCK JPEGs (libjpeg-turbo has no conversion from them to RGB) and EXIF-rotated JPEGs (their boxes are
in displayed coordinates). On a CUDA device the batch is made on the CPU and copied from pinned memory; the
``dali`` and ``torch`` backends decode on the GPU instead.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from fastpretrain.cpp_extension import ExtensionUnavailable, load_extension
from fastpretrain.data.config import DataConfig
from fastpretrain.data.decode import CropSpec, PreparedChunk, prepare_chunk
from fastpretrain.data.shards import MemberReader
from fastpretrain.data.stream import DecodedChunk, PlanChunk, SampleTable
from fastpretrain.data.torch_loader import CropFinisher, decode_rgb
from fastpretrain.errors import UserError


def jpeg_extension():
    """The region decoder's C++ extension; UserError (one line) saying why if it cannot be built here."""
    try:
        return load_extension("jpeg")
    except ExtensionUnavailable as e:
        raise UserError(f"data backend turbo: {e}") from None


class TurboDecoder:
    """Turns PlanChunks into DecodedChunks (see the module docstring)."""

    def __init__(self, cfg: DataConfig, table: SampleTable, device: torch.device, dtype: torch.dtype, train: bool) -> None:
        self.jpeg = jpeg_extension()
        self.cfg = cfg
        self.table = table
        self.device = torch.device(device)
        self.dtype = dtype
        self.spec = CropSpec.from_config(cfg, train)
        self.reader = MemberReader(table.paths)
        self.finish = CropFinisher(cfg, dtype)

    def decode(self, chunks: Iterator[PlanChunk]) -> Iterator[DecodedChunk]:
        """Decoded chunks in the order of ``chunks``."""
        pool = ThreadPoolExecutor(max(1, self.cfg.workers))
        in_flight: deque[tuple[PreparedChunk, torch.Tensor, list[Future]]] = deque()
        try:
            for chunk in chunks:
                in_flight.append(self._submit(pool, chunk))
                while len(in_flight) > self.cfg.prefetch_batches:
                    yield self._collect(*in_flight.popleft())
            while in_flight:
                yield self._collect(*in_flight.popleft())
        finally:
            pool.shutdown(cancel_futures=True)

    def _submit(self, pool: ThreadPoolExecutor, chunk: PlanChunk):
        prepared = prepare_chunk(chunk, self.table, self.reader, self.spec)
        size = self.cfg.image_size
        out = torch.empty((len(prepared), size, size, 3), dtype=self.dtype,  # (k, S, S, 3)
                          pin_memory=self.device.type == "cuda")
        return prepared, out, [pool.submit(self._one, prepared, i, out[i]) for i in range(len(prepared))]

    def _one(self, prepared: PreparedChunk, i: int, out: torch.Tensor) -> str | None:
        """Image ``i`` of ``prepared`` decoded, cropped and finished into ``out``; why not, if it does not decode."""
        boxes = prepared.boxes
        left, top, width, height = int(boxes.left[i]), int(boxes.top[i]), int(boxes.width[i]), int(boxes.height[i])
        data, info = prepared.encoded[i], prepared.infos[i]
        try:
            image = None
            if info.format == "JPEG" and info.orientation == 1:
                region = self.jpeg.decode_region(data, left, top, width, height)  # (h, w, 3); empty: not for it
                if region.numel():
                    image, left, top = region.permute(2, 0, 1), 0, 0
            if image is None:
                image = decode_rgb(data)  # (3, H, W)
        except Exception as e:  # noqa: BLE001 - whatever the decoder throws, the sample is skipped
            return str(e).splitlines()[-1]
        self.finish(out, image, left, top, width, height, bool(boxes.flip[i]))
        return None

    def _collect(self, prepared: PreparedChunk, out: torch.Tensor, futures: list[Future]) -> DecodedChunk:
        failed = {i: detail for i, future in enumerate(futures) if (detail := future.result()) is not None}
        if failed:
            out = out[[i for i in range(len(prepared)) if i not in failed]]
            prepared = prepared.drop(failed, "decode_error")
        images = out.to(self.device, non_blocking=True)
        return DecodedChunk(prepared.epoch, prepared.positions, prepared.samples, images, prepared.bad)
