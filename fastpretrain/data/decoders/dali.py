"""The DALI backend: decode only each crop's region, resize, flip and normalize straight to NHWC fp16/fp32.

One pipeline per loader; on a GPU::

    external_source (encoded bytes, crop box, mirror flag, per sample)
      -> fn.decoders.image_slice  (device="mixed": nvJPEG + the hardware JPEG decoder)
      -> fn.resize                (to image_size x image_size, antialiased, linear)
      -> fn.crop_mirror_normalize (mirror, (x - 255 mean) / (255 std), NHWC, fp16 or fp32)

Without a GPU the pipeline stops after ``fn.decoders.image_slice`` (libjpeg-turbo on DALI's CPU threads) and
torch resizes, mirrors and normalizes each crop on threads of its own (``common.CropFinisher``) while
DALI decodes the next batches: torch's vectorized uint8 resampler costs a fraction of DALI's CPU resize.

``image_slice`` with a box decodes only that region, as ``fn.decoders.image_random_crop`` does; the box
comes from ``common.prepare_chunk`` (torchvision's RandomResizedCrop rule, drawn from the sample's position)
instead of DALI's own generator, for two reasons: the torch backend cuts the same boxes, and a resumed run
draws the boxes of the uninterrupted one (DALI's generator state cannot be saved). For the same reasons the
bytes come from our stream (resampling copies, rank split, exact position) through ``external_source``, not
from ``fn.readers.webdataset``; the stream reads them by the offsets of the same ``wds2idx`` index files.

DALI has no bfloat16: for bf16 training the GPU pipeline emits float32 and torch rounds it to bf16 on the device,
once (through fp16 it would be rounded twice); a batch of 256 at 224 is 154 MB instead of 77, ~0.03 ms more of
an H200's memory bandwidth.

The constructor refuses (UserError) batches whose memory in flight would not fit (``batch_memory``): DALI would
otherwise grow its buffers until the machine runs out.

A decode error fails a whole DALI batch. ``probe_image`` rejects what would fail (non-images, truncation,
bombs) before feeding; if a batch still fails, the pipeline is rebuilt and the batch decoded one image at a
time to find the culprit.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import feed_ndarray

from fastpretrain.data.config import DataConfig
from fastpretrain.data.decoders.common import CropFinisher, CropSpec, PreparedChunk, prepare_chunk
from fastpretrain.data.stream import DecodedChunk, PlanChunk, SampleTable
from fastpretrain.errors import UserError
from fastpretrain.formats.shards import MemberReader

log = logging.getLogger("fastpretrain.data")

# nvJPEG buffers preallocated for the largest image expected, so decoding never reallocates mid-run:
# DALI's ResNet-50 training example sizes them for ImageNet's largest image (5980 x 6430).
GPU_DECODER_ARGS = dict(
    device_memory_padding=211_025_920,
    host_memory_padding=140_544_512,
    preallocate_width_hint=5980,
    preallocate_height_hint=6430,
)


def image_pipeline(
    batch_size: int,
    num_threads: int,
    device_id: int | None,
    image_size: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    half: bool,
    hw_decoder_load: float,
    finish: bool | None = None,
):
    """The (unbuilt) DALI pipeline; on a GPU (``device_id`` set) the decode is ``mixed``, else on CPU threads.

    With ``finish`` (default: on a GPU) it goes on to resize, mirror and normalize, ending in normalized
    (B, S, S, 3) images; without, it ends in the crops, uint8 (h, w, 3) each. The tests run the finished graph on
    the CPU, where DALI places the same operators on its CPU backend, so the GPU graph's arguments are exercised.
    """
    on_gpu = device_id is not None
    finish = on_gpu if finish is None else finish
    decoder_args = dict(GPU_DECODER_ARGS, hw_decoder_load=hw_decoder_load) if on_gpu else {}

    # Runs are scheduled ahead by hand (``schedule_run`` per fed batch, ``prefetch`` of them in flight): DALI's own
    # prefetch queue would want that many batches fed before the first run.
    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, prefetch_queue_depth=1,
                  exec_dynamic=True)
    def pipeline():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        anchor = fn.external_source(name="anchor", dtype=types.FLOAT, ndim=1)  # (left, top) in pixels
        shape = fn.external_source(name="shape", dtype=types.FLOAT, ndim=1)  # (width, height)
        images = fn.decoders.image_slice(
            encoded, anchor, shape, device="mixed" if on_gpu else "cpu", output_type=types.RGB,
            normalized_anchor=False, normalized_shape=False, axis_names="WH", **decoder_args,
        )
        if not finish:
            return images
        images = fn.resize(images, size=[image_size, image_size], antialias=True, interp_type=types.INTERP_LINEAR)
        mirror = fn.external_source(name="mirror", dtype=types.INT32, ndim=0)
        return fn.crop_mirror_normalize(
            images, mirror=mirror, mean=[255 * m for m in mean], std=[255 * s for s in std],
            dtype=types.FLOAT16 if half else types.FLOAT, output_layout="HWC",
        )

    return pipeline()


MEMINFO = Path("/proc/meminfo")  # MemAvailable: what the kernel can give without swapping (Linux)


def batch_memory(cfg: DataConfig, table: SampleTable, half: bool) -> int:
    """Bytes the batches in flight take: ``prefetch_batches`` runs, the batch being handed out and the one being
    fed (hence + 2), each ``batch_size`` decoded images (S x S x 3 in DALI's output type: fp16 or float32) and
    their encoded bytes (the shards' mean image)."""
    usable = table.image_size[table.usable]
    encoded = float(usable.mean()) if len(usable) else 0.0
    decoded = cfg.image_size**2 * 3 * (2 if half else 4)
    return int(cfg.batch_size * (decoded + encoded) * (cfg.prefetch_batches + 2))


def _available_memory(device_id: int | None) -> tuple[int, str] | None:
    """(bytes available, where) on the GPU or, without one, in RAM; None where that cannot be told."""
    if device_id is not None:
        return torch.cuda.mem_get_info(device_id)[0], f"GPU {device_id}"
    try:
        lines = MEMINFO.read_text().splitlines()
    except OSError:
        return None
    kib = next((line.split()[1] for line in lines if line.startswith("MemAvailable:")), None)
    return (int(kib) * 1024, "this machine") if kib is not None else None


def _summary(error: Exception) -> str:
    """The line of a DALI error that says what failed (the rest is the pipeline's traceback)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return next((line for line in lines if line.startswith("Failed")), lines[0] if lines else repr(error))


class DaliDecoder:
    """Turns PlanChunks into DecodedChunks with a DALI pipeline (see the module docstring)."""

    def __init__(self, cfg: DataConfig, table: SampleTable, device: torch.device, dtype: torch.dtype, train: bool) -> None:
        self.cfg = cfg
        self.table = table
        self.device = torch.device(device)
        self.dtype = dtype
        self.spec = CropSpec.from_config(cfg, train)
        self.reader = MemberReader(table.paths)
        self.half = dtype == torch.float16
        self.finish = CropFinisher(cfg, dtype)
        self.device_id = None
        if self.device.type == "cuda":
            self.device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
        self._check_memory()

    def _check_memory(self) -> None:
        needed, available = batch_memory(self.cfg, self.table, self.half), _available_memory(self.device_id)
        if available is not None and needed > available[0]:
            cfg = self.cfg
            raise UserError(
                f"the DALI data backend needs about {needed / 2**30:.3g} GiB for its batches in flight "
                f"({cfg.prefetch_batches + 2} batches of {cfg.batch_size} images of {cfg.image_size}x{cfg.image_size}) "
                f"and {available[1]} has {available[0] / 2**30:.3g} GiB available: lower --batch-size or --img-size")

    def _pipeline(self):
        pipe = image_pipeline(self.cfg.batch_size, max(1, self.cfg.workers), self.device_id, self.cfg.image_size,
                              self.cfg.mean, self.cfg.std, self.half, self.cfg.hw_decoder_load)
        pipe.build()
        return pipe

    def decode(self, chunks: Iterator[PlanChunk]) -> Iterator[DecodedChunk]:
        """Decoded chunks in the order of ``chunks``, keeping up to ``prefetch_batches`` runs in flight."""
        pipe = self._pipeline()
        in_flight: deque[PreparedChunk] = deque()  # in order; the non-empty ones are scheduled on ``pipe``
        # On the CPU, torch resizes the crops on as many threads as DALI decodes on: from the training thread
        # alone (~0.5 ms per image with the normalization), that thread would be what limits the rate.
        pool = ThreadPoolExecutor(max(1, self.cfg.workers)) if self.device_id is None else None
        try:
            for chunk in chunks:
                prepared = prepare_chunk(chunk, self.table, self.reader, self.spec)
                if len(prepared):
                    self._schedule(pipe, prepared)
                in_flight.append(prepared)
                while in_flight and (len(in_flight) > self.cfg.prefetch_batches or not len(in_flight[0])):
                    pipe, decoded = self._collect(pipe, in_flight, pool)
                    yield decoded
            while in_flight:
                pipe, decoded = self._collect(pipe, in_flight, pool)
                yield decoded
        finally:
            del pipe
            if pool is not None:
                pool.shutdown()

    def _schedule(self, pipe, prepared: PreparedChunk) -> None:
        boxes = prepared.boxes
        pipe.feed_input("encoded", [np.frombuffer(data, dtype=np.uint8) for data in prepared.encoded])
        pipe.feed_input("anchor", list(np.stack([boxes.left, boxes.top], axis=1).astype(np.float32)))
        pipe.feed_input("shape", list(np.stack([boxes.width, boxes.height], axis=1).astype(np.float32)))
        if self.device_id is not None:
            pipe.feed_input("mirror", list(boxes.flip.astype(np.int32)))
        pipe.schedule_run()

    def _collect(self, pipe, in_flight: deque[PreparedChunk], pool: ThreadPoolExecutor | None):
        """(pipeline, the oldest in-flight chunk decoded); the pipeline is a new one after a decode error."""
        prepared = in_flight.popleft()
        if not len(prepared):
            return pipe, self._decoded(prepared, self._empty())
        try:
            (images,) = pipe.outputs()
            return pipe, self._decoded(prepared, self._to_torch(images, prepared, pool))
        except RuntimeError as e:
            log.info("DALI batch failed (%s); decoding it one image at a time", _summary(e))
        del pipe
        pipe, prepared, images = self._one_by_one(prepared, pool)
        for later in in_flight:  # they were scheduled on the failed pipeline
            if len(later):
                self._schedule(pipe, later)
        return pipe, self._decoded(prepared, images)

    def _one_by_one(self, prepared: PreparedChunk, pool: ThreadPoolExecutor | None):
        pipe = self._pipeline()
        images, failed = [], {}
        for i in range(len(prepared)):
            one = prepared.subset(np.array([i]))
            self._schedule(pipe, one)
            try:
                (out,) = pipe.outputs()
                images.append(self._to_torch(out, one, pool))
            except RuntimeError as e:
                failed[i] = _summary(e)
                del pipe
                pipe = self._pipeline()
        images = torch.cat(images) if images else self._empty()
        return pipe, prepared.drop(failed, "decode_error"), images

    def _empty(self) -> torch.Tensor:
        size = self.cfg.image_size
        return torch.empty((0, size, size, 3), dtype=self.dtype, device=self.device)

    def _to_torch(self, images, prepared: PreparedChunk, pool: ThreadPoolExecutor | None) -> torch.Tensor:
        """DALI's output for ``prepared`` -> (k, S, S, 3) of the training dtype on the device."""
        if pool is not None:
            return self._finish_on_cpu(images, prepared, pool)
        tensor = images.as_tensor()
        out = torch.empty(tensor.shape(), dtype=torch.float16 if self.half else torch.float32, device=self.device)
        feed_ndarray(tensor, out, cuda_stream=torch.cuda.current_stream(self.device))
        return out.to(self.dtype)

    def _finish_on_cpu(self, crops, prepared: PreparedChunk, pool: ThreadPoolExecutor) -> torch.Tensor:
        """The CPU pipeline's crops (k of (h, w, 3) uint8) resized, mirrored and normalized by torch on ``pool``."""
        size = self.cfg.image_size
        out = torch.empty((len(crops), size, size, 3), dtype=self.dtype)  # (k, S, S, 3)

        def finish(i: int) -> None:
            crop = torch.from_numpy(np.asarray(crops[i])).permute(2, 0, 1)  # (3, h, w), a view of DALI's buffer
            self.finish(out[i], crop, 0, 0, crop.shape[2], crop.shape[1], bool(prepared.boxes.flip[i]))

        list(pool.map(finish, range(len(crops))))
        return out

    def _decoded(self, prepared: PreparedChunk, images: torch.Tensor) -> DecodedChunk:
        return DecodedChunk(prepared.epoch, prepared.positions, prepared.samples, images, prepared.bad)
