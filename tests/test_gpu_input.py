"""The torch backend's batched path (the GPU input path) against independent references, on the CPU where there is no
GPU: which JPEGs go to nvJPEG (against PIL's own reading of each header), EXIF turns as strides (against PIL's
transposes), the crop kernel (against torchvision's antialiased ``resize`` in float64), finding a bad image in a failed
batched call, the batch thread (order, exceptions, shutdown), and the whole path against the CPU ring path.

The kernel and the batched path run on ``DEVICE``: a GPU where there is one (nvJPEG, the compiled kernel, streams;
bench/gpu_suite.sh runs this file first), else the CPU, the kernel in Triton's interpreter (tests/conftest.py), so the
sizes stay small; one test compiles the kernel for a Hopper GPU (sm_90) in a subprocess, which needs no GPU.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import subprocess
import sys
import textwrap
import threading
import traceback

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from fastpretrain.data.config import DataConfig
from fastpretrain.data.decoders import torch as torch_decoder
from fastpretrain.data.decoders.torch import (Prefetcher, TorchDecoder, decode_batched, filter_taps, normalize_constants,
                                              nvjpeg_refusal, oriented_strides)
from fastpretrain.data.stream import PlanChunk
from test_data_decode import shard_table

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")

CPU = torch.device("cpu")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CUDA = pytest.mark.skipif(DEVICE.type != "cuda", reason="needs CUDA")
EXIF_ORIENTATION = 0x0112
# PIL's ImageOps.exif_transpose, orientation -> transpose: the reference for what each orientation displays.
PIL_TURNS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
             5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
             8: Image.Transpose.ROTATE_90}


def encode(array: np.ndarray, mode: str = "RGB", fmt: str = "JPEG", **options) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).convert(mode).save(out, format=fmt, **options)
    return out.getvalue()


def smooth_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """(H, W, 3) uint8 with large structure and some noise: lossy coding keeps it, crops of it differ."""
    coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR), dtype=np.int16)
    return np.clip(smooth + rng.integers(-12, 13, smooth.shape), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------
# Which JPEGs nvJPEG decodes


def _with_frame_byte(data: bytes, offset_in_frame: int, value: int) -> bytes:
    """``data`` with byte ``offset_in_frame`` of its SOF0 segment's body (after the length) set to ``value``."""
    start = data.index(b"\xff\xc0") + 4
    patched = bytearray(data)
    patched[start + offset_in_frame] = value
    return bytes(patched)


def pil_says_nvjpeg_takes(data: bytes) -> bool:
    """The rule read through PIL's own header parser: baseline, 8 bits, 3 components with ids other than R, G, B,
    no Adobe transform other than YCbCr, chroma at (1, 1) and luma at one of the hardware's four samplings."""
    image = Image.open(io.BytesIO(data))
    ids = [layer[0] for layer in image.layer]
    sampling = [(layer[1], layer[2]) for layer in image.layer]
    return (not image.info.get("progressive") and image.bits == 8 and len(ids) == 3 and ids != [82, 71, 66]
            and image.info.get("adobe_transform") in (None, 1) and sampling[1:] == [(1, 1), (1, 1)]
            and sampling[0] in [(1, 1), (2, 1), (2, 2), (1, 2)])


def test_jpegs_nvjpeg_takes_are_those_pils_header_parser_says(rng):
    image = smooth_image(rng, int(rng.integers(8, 40)), int(rng.integers(8, 40)))
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = int(rng.integers(1, 9))
    plain = encode(image)
    cases = {
        "4:2:0": (plain, None),
        "4:4:4": (encode(image, subsampling=0), None),
        "4:2:2": (encode(image, subsampling=1), None),
        "with EXIF": (encode(image, exif=exif), None),
        "progressive": (encode(image, progressive=True), "progressive"),
        "grayscale": (encode(image, mode="L"), "grayscale"),
        "CMYK": (encode(image, mode="CMYK"), "4 components"),
        "RGB-coded": (encode(image, keep_rgb=True), "Adobe colour transform 0"),
        "RGB component ids": (_with_frame_byte(_with_frame_byte(_with_frame_byte(
            encode(image, subsampling=0), 6, 82), 9, 71), 12, 66), "RGB components"),
        "4:1:1": (_with_frame_byte(plain, 7, 0x41), "chroma sampling (4, 1)"),
    }
    for name, (data, reason) in cases.items():
        refusal = nvjpeg_refusal(data)
        assert (refusal is None) == pil_says_nvjpeg_takes(data), (name, refusal)
        assert refusal is None if reason is None else reason in refusal, (name, refusal)


def test_headers_nvjpeg_refuses_without_a_picture_to_parse():
    sof = lambda marker, body: b"\xff" + bytes([marker]) + (len(body) + 2).to_bytes(2, "big") + body  # noqa: E731
    ycbcr = bytes([1, 0x22, 0, 2, 0x11, 1, 3, 0x11, 1])
    cases = {
        b"\xff\xd8" + sof(0xC1, b"\x08\x00\x10\x00\x10\x03" + ycbcr): "not baseline (SOF1)",
        b"\xff\xd8" + sof(0xC3, b"\x08\x00\x10\x00\x10\x03" + ycbcr): "not baseline (SOF3)",
        b"\xff\xd8" + sof(0xC0, b"\x0c\x00\x10\x00\x10\x03" + ycbcr): "12-bit samples",
        b"\xff\xd8" + sof(0xC0, b"\x08\x00\x00\x00\x10\x03" + ycbcr): "DNL",
        b"\xff\xd8" + sof(0xC0, b"\x08\x00\x10\x00\x10\x03" + ycbcr[:4]): "cut short",
        b"\xff\xd8\xff\xda\x00\x02": "no frame header",
        b"\xff\xd8\x00\x00": "no frame header",
    }
    for data, reason in cases.items():
        assert reason in (nvjpeg_refusal(data) or ""), data
    # Fill bytes and stray bytes before a marker are skipped, as libjpeg skips them.
    assert nvjpeg_refusal(b"\xff\xd8\x00\xff\xff" + sof(0xC0, b"\x08\x00\x10\x00\x10\x03" + ycbcr)) is None


# ----------------------------------------------------------------------------------------------------
# EXIF turns as strides, and the crop kernel


@pytest.mark.parametrize("orientation", range(1, 9))
def test_oriented_strides_read_the_picture_as_pil_turns_it(rng, orientation):
    height, width = int(rng.integers(1, 9)), int(rng.integers(1, 9))
    stored = rng.integers(0, 256, (height, width), dtype=np.uint8)
    shown = Image.fromarray(stored)
    if orientation != 1:
        shown = shown.transpose(PIL_TURNS[orientation])
    shown = np.asarray(shown)  # (Hd, Wd)
    base, row, column = oriented_strides(height, width, orientation)
    ys, xs = np.meshgrid(np.arange(shown.shape[0]), np.arange(shown.shape[1]), indexing="ij")
    np.testing.assert_array_equal(stored.ravel()[base + ys * row + xs * column], shown)


def _levels(out: torch.Tensor, cfg: DataConfig) -> torch.Tensor:
    """Normalized (..., 3) back to float64 levels 0..255."""
    std, mean = torch.tensor(cfg.std, dtype=torch.float64), torch.tensor(cfg.mean, dtype=torch.float64)
    return out.double() * std * 255 + mean * 255


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_crop_kernel_is_torchs_antialiased_resize_rounded_to_levels(rng, dtype):
    """Random pictures, turns, boxes (shrunk up to 3x, enlarged up to 12x) and flips, against torchvision's
    antialiased bilinear ``resize`` (what the per-image GPU path called) of the turned box in float64: each level within
    half a level of the exact value (it is rounded to a level, as every decode path does), plus bf16's rounding of the
    normalized value. Rows the table does not name stay as they were (NaN)."""
    size = int(rng.integers(8, 13))  # DataConfig's smallest is 8
    cfg = DataConfig(shards="unused", label_dir=None, image_size=size)
    scale, bias = normalize_constants(cfg)
    images, table, expected, offset = [], [], {}, 0
    count = 3
    rows = rng.permutation(count + 1)[:count]  # one row left unwritten
    for k in range(count):
        height, width = (int(v) for v in rng.integers(2, 3 * size, 2))
        stored = torch.from_numpy(rng.integers(0, 256, (3, height, width), dtype=np.uint8))
        orientation = int(rng.integers(1, 9))
        shown = torch.from_numpy(np.stack([np.asarray(Image.fromarray(p.numpy()).transpose(PIL_TURNS[orientation]))
                                           if orientation != 1 else p.numpy() for p in stored]))  # (3, Hd, Wd)
        shown_h, shown_w = shown.shape[1:]
        box_w, box_h = int(rng.integers(1, shown_w + 1)), int(rng.integers(1, shown_h + 1))
        left, top = int(rng.integers(0, shown_w - box_w + 1)), int(rng.integers(0, shown_h - box_h + 1))
        flip = bool(rng.integers(0, 2))
        base, row, column = oriented_strides(height, width, orientation)
        table.append([offset + base + top * row + left * column, height * width, row, column, box_w, box_h, flip,
                      rows[k], 0])
        offset += stored.numel()
        images.append(stored)
        box = shown[:, top : top + box_h, left : left + box_w].double()  # (3, h, w)
        exact = TF.resize(box, [size, size], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        expected[int(rows[k])] = (exact.flip(-1) if flip else exact).permute(1, 2, 0)  # (S, S, 3) levels
    table = np.array(table, dtype=np.int64)
    table[:, -1] = filter_taps(table[:, 4], size)
    out = torch.full((count + 1, size, size, 3), float("nan"), dtype=dtype, device=DEVICE)
    torch_decoder.crop_resize_normalize(torch.cat([i.reshape(-1) for i in images]).to(DEVICE),
                                        torch.from_numpy(table).to(DEVICE), out, scale, bias)
    out = out.cpu()
    # bf16 keeps 8 significant bits: normalized values lie within +-2.7, where its spacing is 2^-6, 0.91 levels at the
    # largest std (0.229 x 255). Compiled, Triton rounds to the nearest (half of that); its interpreter truncates
    # (measured: 1 + 2^-7 - 2^-10 becomes 1), a whole spacing.
    slack = 1e-3 if dtype == torch.float32 else 2**-6 * 255 * max(cfg.std)
    for row, exact in expected.items():
        levels = _levels(out[row], cfg)
        assert (levels - exact.clamp(0, 255)).abs().max() <= 0.5 + slack, row
    missing = sorted(set(range(count + 1)) - set(expected))
    assert torch.isnan(out[missing].float()).all()


def test_crop_kernel_compiles_for_hopper():
    # In a subprocess without TRITON_INTERPRET: this process's kernels are interpreted functions.
    script = textwrap.dedent(
        """
        import triton
        from triton.backends.compiler import GPUTarget
        from fastpretrain.data.decoders import torch as t

        for dtype in ("fp32", "bf16"):
            signature = {"planes_ptr": "*u8", "table_ptr": "*i64", "table_stride": "i32", "out_ptr": f"*{dtype}",
                         "size": "i32", **{name: "fp32" for name in ("scale_r", "scale_g", "scale_b", "bias_r",
                                                                    "bias_g", "bias_b")}, "BLOCK": "constexpr"}
            source = triton.compiler.ASTSource(fn=t._crop_resize_kernel, signature=signature,
                                               constexprs={"BLOCK": t.CROP_BLOCK})
            triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": t.CROP_WARPS})
        print("compiled")
        """
    )
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], check=False, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]


# ----------------------------------------------------------------------------------------------------
# A failed batched call


def test_a_failed_batched_call_finds_its_bad_images_in_few_calls(rng):
    n = int(rng.integers(1, 200))
    bad = set(rng.choice(n, size=int(rng.integers(0, min(n, 5) + 1)), replace=False).tolist())
    calls = []

    def decode(items):
        calls.append(len(items))
        if any(int(item) in bad for item in items):
            raise RuntimeError("Error while decoding JPEG images")
        return [item * 2 for item in items]

    results = decode_batched(decode, [torch.tensor(i) for i in range(n)])
    assert [None if r is None else int(r) for r in results] == [None if i in bad else 2 * i for i in range(n)]
    # Each bad image costs at most two calls per halving: 1 + 2 k ceil(log2 n) in all, and 1 when none is bad.
    assert len(calls) <= 1 + 2 * len(bad) * max(1, math.ceil(math.log2(n)))
    assert sum(calls) <= n * (1 + max(1, math.ceil(math.log2(n))))  # no image decoded once per call
    if not bad:
        assert calls == [n]


# ----------------------------------------------------------------------------------------------------
# The batch thread, on the CPU (no streams)


def _threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "fastpretrain-batches"]


def test_prefetcher_keeps_the_order_and_stays_within_its_depth(rng):
    count, depth = int(rng.integers(1, 40)), int(rng.integers(1, 4))
    made = []

    def produce():
        for i in range(count):
            made.append(i)
            yield i

    seen = []
    for item in Prefetcher(produce, depth, CPU):
        assert len(made) <= item + 1 + depth + 1  # the queue's depth, and the one the thread holds
        seen.append(item)
    assert seen == list(range(count))
    assert not _threads()


def test_an_exception_on_the_thread_is_raised_to_the_consumer_as_it_was(rng):
    fail_at = int(rng.integers(0, 5))
    error = ValueError("a chunk that breaks")

    def produce():
        for i in range(10):
            if i == fail_at:
                raise error
            yield i

    got = []
    with pytest.raises(ValueError) as caught:
        got.extend(Prefetcher(produce, 2, CPU))
    assert caught.value is error and got == list(range(fail_at))
    assert "produce" in [frame.name for frame in traceback.extract_tb(caught.value.__traceback__)]  # the thread's frames
    assert not _threads()


def test_a_consumer_that_stops_early_ends_the_thread_and_closes_the_producer_there():
    closed_on = []

    def produce():
        try:
            i = 0
            while True:  # endless, like the training stream
                yield i
                i += 1
        finally:
            closed_on.append(threading.current_thread().name)

    batches = Prefetcher(produce, 2, CPU)
    assert [next(batches), next(batches)] == [0, 1]
    batches.close()
    assert closed_on == ["fastpretrain-batches"] and not _threads()
    with pytest.raises(StopIteration):
        next(batches)


# ----------------------------------------------------------------------------------------------------
# The whole batched path against the CPU ring path


# The kinds of picture odd_corpus makes, in turn; those nvJPEG's hardware decoder is given.
KINDS = ("4:2:0", "EXIF-turned", "progressive", "grayscale", "CMYK", "PNG", "4:4:4")
NVJPEG_KINDS = {"4:2:0", "EXIF-turned", "4:4:4"}


def odd_corpus(rng: np.random.Generator) -> tuple[list[bytes], set[int], int]:
    """Pictures of every kind the router tells apart (KINDS in turn), one of them replaced by a corrupt 4:2:0 JPEG:
    (images, indices of the bad, how many good ones are of NVJPEG_KINDS)."""
    images, bad = [], set()
    count = 8
    for i in range(count):  # small against the 12 px crops: the interpreter runs the kernel's filter taps one by one
        h, w = (int(v) for v in rng.integers(10, 24, 2))
        picture = smooth_image(rng, h, w)
        exif = Image.Exif()
        exif[EXIF_ORIENTATION] = int(rng.integers(1, 9))
        kind = i % len(KINDS)
        images.append([encode(picture, quality=95), encode(picture, exif=exif, quality=95),
                       encode(picture, progressive=True, quality=95), encode(picture, mode="L"),
                       encode(picture, mode="CMYK", quality=95), encode(picture, fmt="PNG"),
                       encode(picture, subsampling=0, quality=95)][kind])
    corrupt = int(rng.integers(0, len(images)))
    # Huffman code counts summing past 256: every decoder stops at the table ("Bogus Huffman table definition"),
    # which the header probe, reading only up to the frame header, never parses.
    data = bytearray(encode(smooth_image(rng, 16, 16), quality=95))
    table = data.index(b"\xff\xc4")
    data[table + 5 : table + 21] = b"\xff" * 16
    images[corrupt] = bytes(data)
    bad.add(corrupt)
    return images, bad, sum(KINDS[i % len(KINDS)] in NVJPEG_KINDS for i in range(count) if i != corrupt)


def decode_all(decoder: TorchDecoder, count: int, size: int) -> list:
    chunks = [PlanChunk(0, np.arange(a, min(a + size, count)), np.arange(a, min(a + size, count)))
              for a in range(0, count, size)]
    return list(decoder.decode(iter(chunks)))


@contextlib.contextmanager
def no_host_sync():
    """On CUDA, any host synchronization through torch raises (``set_sync_debug_mode``) inside the block."""
    if DEVICE.type != "cuda":
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize("share", [1.0, 0.0])
def test_batched_path_gives_the_ring_paths_samples_and_pixels(tmp_path, rng, workers, share):
    """The same samples in the same order, the same bad ones, and crops close to the CPU ring path's; ``share`` 0
    sends every JPEG to the workers' CPU decoder, 1 all those of NVJPEG_KINDS to the batched decoder (torchvision's
    ``decode_jpeg``: nvJPEG on CUDA), the corrupt one too, which it fails. On the CPU (libjpeg-turbo, the interpreted
    kernel) within 2 levels: the ring path's uint8 resize rounds between its two passes. On CUDA (nvJPEG, the compiled
    kernel, no host synchronization allowed while the chunks are made and handed over) within 3 levels on average:
    nvJPEG's IDCT and chroma upsampling differ from libjpeg-turbo's, most at sharp colour edges."""
    images, bad, nvjpeg_kinds = odd_corpus(rng)
    table = shard_table(tmp_path / "s.tar", images)
    cfg = DataConfig(shards=str(tmp_path / "s.tar"), label_dir=None, backend="torch", batch_size=5, image_size=12,
                     workers=workers, seed=int(rng.integers(0, 2**31)))
    ring = decode_all(TorchDecoder(cfg, table, CPU, torch.float32, train=True, batched=False), len(images), 5)
    batched_decoder = TorchDecoder(cfg, table, DEVICE, torch.float32, train=True, batched=True, nvjpeg_share=share)
    decoded_by_batch = []
    decode_jpegs = batched_decoder.batcher.decode_jpegs

    def counting(encoded: list[torch.Tensor]) -> list[torch.Tensor]:
        decoded = decode_jpegs(encoded)
        decoded_by_batch.append(len(decoded))
        return decoded

    batched_decoder.batcher.decode_jpegs = counting
    with no_host_sync():
        batched = decode_all(batched_decoder, len(images), 5)
    assert sum(decoded_by_batch) == (nvjpeg_kinds if share == 1.0 else 0)
    assert len(batched) == len(ring)
    for ours, theirs in zip(batched, ring):
        assert ours.samples.tolist() == theirs.samples.tolist()
        assert [(s, r) for s, r, _ in ours.bad] == [(s, r) for s, r, _ in theirs.bad]
        difference = (_levels(ours.images.cpu(), cfg) - _levels(theirs.images, cfg)).abs()
        if DEVICE.type == "cpu" or share == 0.0:  # share 0: the same CPU decode and resize on both sides
            assert difference.max() <= 2 + 1e-3
        else:
            assert difference.mean() <= 3 and difference.max() <= 48
    assert {s for chunk in batched for s, reason, _ in chunk.bad if reason == "decode_error"} == bad
    assert not _threads()


def test_a_picture_the_batched_decoder_gives_at_another_size_is_cropped_on_the_cpu(tmp_path, rng):
    """The crop table takes its strides from the decoded planes and its boxes from the header: where the two sizes
    differ (the kernel would read outside the planes) the picture is decoded and cropped on the CPU, exactly as the
    ring path crops it (not through the kernel, whose crops differ from the ring path's by up to 2 levels)."""
    images = [encode(smooth_image(rng, 16, 20), quality=95) for _ in range(3)]
    table = shard_table(tmp_path / "s.tar", images)
    cfg = DataConfig(shards=str(tmp_path / "s.tar"), label_dir=None, backend="torch", batch_size=3, image_size=8,
                     workers=0, seed=int(rng.integers(0, 2**31)))
    ring = decode_all(TorchDecoder(cfg, table, CPU, torch.float32, train=True, batched=False), len(images), 3)
    batched_decoder = TorchDecoder(cfg, table, DEVICE, torch.float32, train=True, batched=True)
    decode_jpegs = batched_decoder.batcher.decode_jpegs
    batched_decoder.batcher.decode_jpegs = lambda encoded: [image[:, 1:] for image in decode_jpegs(encoded)]
    [batched] = decode_all(batched_decoder, len(images), 3)
    assert batched.samples.tolist() == ring[0].samples.tolist() and not batched.bad
    torch.testing.assert_close(batched.images.cpu(), ring[0].images, rtol=0, atol=1e-5)


def test_a_batched_pass_left_early_leaves_no_thread(tmp_path, rng):
    images = [encode(smooth_image(rng, 8, 8)) for _ in range(12)]
    table = shard_table(tmp_path / "s.tar", images)
    cfg = DataConfig(shards=str(tmp_path / "s.tar"), label_dir=None, backend="torch", batch_size=3, image_size=8,
                     workers=1)
    chunks = (PlanChunk(0, np.arange(a, a + 3), np.arange(a, a + 3)) for a in range(0, 12, 3))
    decoded = TorchDecoder(cfg, table, DEVICE, torch.float32, train=True, batched=True).decode(chunks)
    assert next(decoded).images.shape == (3, 8, 8, 3)
    decoded.close()
    assert not _threads()


# ----------------------------------------------------------------------------------------------------
# On a GPU: the thread's stream


@CUDA
def test_prefetcher_on_cuda_hands_over_finished_work_through_events():
    """Each item is filled on the thread's stream after the GPU spun there for ~25 ms; the consumer reads it on its own
    stream right away: without the event wait it would read the memory before the fill."""
    device = torch.device("cuda")

    def produce():
        for i in range(4):
            x = torch.empty(1 << 20, device=device)
            torch.cuda._sleep(50_000_000)  # clock cycles
            x.fill_(float(i))
            yield x

    for i, x in enumerate(Prefetcher(produce, 2, device, tensors=lambda item: (item,))):
        assert torch.cuda.current_stream() == torch.cuda.default_stream()
        assert float(x.sum()) == float(i) * (1 << 20)
