"""The GPU suite's measurements (``bench/gpu_suite.sh``): each against its baseline in the same call, in the order of
what matters most, each reported as a row (``report``) of the table the run ends with.

1. The input path (``input/cuda/...`` and ``train/cuda/.../cli-...``), the newest code: decode + crop + normalize of
   generated JPEGs of several sizes through the batched path's ``DeviceBatcher`` against the per-image crops it
   replaced and nvJPEG's decode alone; the loader end to end with 16 workers at several nvJPEG shares against share 0,
   the CPU region decode of every image in the workers; and a short real ``fastpretrain train --amp`` of
   resnext101_32x8d (data-wait share, time to the first step, peak memory). Its shards are generated here without
   WordNet: training reads only the shards, the label index and vocab.json, which ``write_corpus`` writes with the
   classes ``vocab build`` and ``labels`` use, in seconds on 16 cores (carried, they would take most of the device
   tool's 64 MiB).
2. The loss kernel (``loss/cuda/<B>x<C>-<dtype>/...``): correct against float64 first (every configuration timed),
   then its bandwidth against a device-to-device copy measured here, a short sweep over block size and warps against
   today's choice, and the whole call (forward + backward through autograd, the trainer's in-place mode) against eager
   cross-entropy and its ``torch.compile``; kernel-only and whole-call apart. Timed with CUDA events
   (``triton.testing.do_bench``, median), which empties the L2 cache before every call: every read comes from HBM,
   whatever the buffer's size (256 x 17,000 bf16 is 8.7 MB, under the H200's 60 MB of L2).
3. The train step (``train/cuda/<arch>-b<B>/...``), synthetic input, images/s over steps after a warm-up (cuDNN's
   autotuning, ``cudnn.benchmark`` on): a bare loop in fp32 (TF32, as the trainer runs it) and bf16, each in NCHW and
   NHWC (grouped convolutions have been far slower in channels-last on some cuDNN versions: pytorch issues 34977 and
   70954), + ``torch.compile``, + CUDA graphs; the Trainer's own step beside the bare loop.
4. MFU (``mfu/cuda/...``): training FLOPs per image (``torch.utils.flop_counter``, forward + backward) times images/s,
   over a bf16 matrix product's rate measured here.

Steps and batches are timed with CUDA events on CUDA. Sizes are the issue's on CUDA. ``FASTPRETRAIN_GPU_DRY_RUN=1``
(``gpu_suite.sh --dry-run``) runs every step on the CPU, one tiny case each, to check the steps, not to measure:
``torch.compile`` then uses dynamo's ``eager`` backend (inductor's code generation takes minutes on 2 cores), bf16
only where the CPU has it natively (``choose_precision``, as the Trainer: emulated, a tiny step takes seconds), and
the CUDA-graph cases and those of a second model size skip. ``FASTPRETRAIN_GPU_DEADLINE`` (a Unix time) leaves out, with a
line saying so, each case that would end past it, the cases being in the order of what matters most: the suite ends
within its budget with the table of what ran. Without CUDA and outside a dry run the module skips.
"""

from __future__ import annotations

import functools
import io
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fastpretrain.cli import build_parser
from fastpretrain.data import Batch, DataConfig, build_train_loader
from fastpretrain.data.decoders import torch as torch_decoder
from fastpretrain.data.decoders.common import CropSpec, Normalizer, crop_resize_into
from fastpretrain.data.stream import PlanChunk, SampleTable
from fastpretrain.data.synth import make_post
from fastpretrain.formats.labels import LabelIndex, label_index_path
from fastpretrain.formats.shards import ShardWriter, load_index
from fastpretrain.formats.vocab import Vocab, VocabClass
from fastpretrain.loss import hashtag_cross_entropy
from fastpretrain.models import create_model
from fastpretrain.train.precision import choose_precision

DRY = os.environ.get("FASTPRETRAIN_GPU_DRY_RUN") == "1"
CUDA = torch.cuda.is_available() and not DRY
DEVICE = torch.device("cuda" if CUDA else "cpu")
pytestmark = [pytest.mark.skipif(not (CUDA or DRY), reason="the GPU suite: needs CUDA (or FASTPRETRAIN_GPU_DRY_RUN=1)"),
              pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")]

# Each case's size on CUDA, and its one tiny stand-in in a dry run.
LOSS_SHAPES = [(256, 17_000), (1024, 32_768)] if CUDA else [(4, 300)]
LOSS_DTYPES = [torch.bfloat16, torch.float32]
# (block, warps) of the sweep; None, None is today's choice (one whole row on 32 warps: one block per SM).
SWEEP = ([(None, None), (32768, 16), (16384, 16), (8192, 8), (8192, 16), (4096, 8)] if CUDA
         else [(None, None), (64, 4)])  # 300 columns: one block of 512, or the two-pass path
TRAIN_CASES = ([("resnext50_32x4d", 256), ("resnext101_32x8d", 128), ("resnext101_32x8d", 24)] if CUDA
               else [("resnext_tiny", 2)])
IMAGE = 224 if CUDA else 16
CLASSES = 17_000 if CUDA else 50  # the paper's head
WARMUP_STEPS, TIMED_STEPS = (3, 10) if CUDA else (0, 1)
# Small in a dry run: Triton's interpreter runs the crop kernel's filter taps one by one.
JPEG_SIZES = [(320, 240), (500, 375), (1024, 768)] if CUDA else [(24, 18)]
INPUT_BATCH = 256 if CUDA else 2
WORKERS = min(16, os.cpu_count() or 1) if CUDA else 1
LOADER_BATCHES = 16 if CUDA else 1
NVJPEG_SHARES = [0.0, 1.0, 0.5] if CUDA else [0.0, 0.5]  # 0, the CPU baseline, first
CORPUS_IMAGES, CORPUS_DISTINCT, PICTURE = (2048, 512, (500, 375)) if CUDA else (16, 8, (24, 18))
CLI_CASE = TRAIN_CASES[1] if CUDA else TRAIN_CASES[0]  # resnext101_32x8d at 128
CLI_STEPS, CLI_LOG_INTERVAL = (60, 10) if CUDA else (2, 1)
TARGET_IMAGES_PER_S = 8000  # the decode + random-resized-crop + normalize target on an H200
DATA_WAIT_TARGET = 0.02  # and the data-wait share while resnext101_32x8d trains
# Seconds each case takes on an H200, about (cold caches: cuDNN's autotuning, inductor's and Triton's compiles):
# what the deadline is checked against.
COST_S = {"loss": 30, "train": 20, "compile": 120, "decode": 8, "loader": 10, "cli": 70}

# images/s of the cases run, for the rows between them: (arch, batch, variant), or ("loader", workers, share)
RATES: dict[tuple, float] = {}


def need(kind: str) -> None:
    """Skip the case, with the reason, if it would end past the suite's deadline."""
    deadline = os.environ.get("FASTPRETRAIN_GPU_DEADLINE")
    if deadline and not DRY and time.time() + COST_S[kind] > float(deadline):
        pytest.skip(f"left out: {float(deadline) - time.time():.0f} s of the suite's budget left, a {kind} case "
                    f"takes about {COST_S[kind]} s")


def synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def event_time(fn) -> float:
    """Median seconds of one call: CUDA events around each call after emptying L2 (``do_bench``), or the wall clock
    on the CPU."""
    if DEVICE.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    return median_time(fn, repeats=1)


def elapsed(fn) -> float:
    """Seconds from the start of ``fn()`` to the end of the device work it queued: CUDA events on the current stream
    (the host's launches and waits inside count, as they do in training), or the wall clock on the CPU."""
    if DEVICE.type != "cuda":
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def median_time(fn, repeats: int) -> float:
    """Median ``elapsed`` of ``repeats`` calls after one untimed call (none in a dry run, which measures nothing)."""
    if not DRY:
        fn()
        synchronize()
    return statistics.median(elapsed(fn) for _ in range(repeats))


@pytest.fixture(scope="module")
def peaks() -> dict[str, float]:
    """The ceilings measured in this call: a device-to-device copy (GB/s, bytes read + written) over 1 GiB, and a bf16
    8192^3 matrix product (TFLOP/s) on random data (zeros run faster)."""
    side, nbytes = (8192, 2**30) if CUDA else (256, 2**24)
    source = torch.randn(nbytes // 4, device=DEVICE)
    target = torch.empty_like(source)
    copy_s = event_time(lambda: target.copy_(source))
    dtype = torch.bfloat16 if CUDA else torch.float32
    a, b = (torch.randn(side, side, device=DEVICE, dtype=dtype) for _ in range(2))
    matmul_s = event_time(lambda: a @ b)
    found = {"copy_gb_per_s": 2 * nbytes / copy_s / 1e9, "matmul_tflop_per_s": 2 * side**3 / matmul_s / 1e12}
    print(f"\nmeasured ceilings: copy {found['copy_gb_per_s']:.0f} GB/s, matmul {found['matmul_tflop_per_s']:.0f} "
          f"TFLOP/s ({str(dtype).removeprefix('torch.')})")
    return found


def compiled(fn):
    """``torch.compile(fn)``, with dynamo's eager backend in a dry run (see the module docstring)."""
    return torch.compile(fn, dynamic=False, backend="eager" if DRY else "inductor")


@pytest.fixture
def dry_compile(monkeypatch):
    """In a dry run, every ``torch.compile`` (the Trainer's too) with dynamo's eager backend."""
    if DRY:
        monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))


# ----------------------------------------------------------------------------------------------------
# The corpus: photo-like JPEGs in shards, a label index per shard and a vocabulary, without WordNet


def photo_like(index: int, size: tuple[int, int] = (500, 375)) -> bytes:
    """A demo drawing at ``size`` with sensor-like noise: a JPEG that costs about what a photo of that size does."""
    rng = np.random.default_rng(index)
    drawing = Image.open(io.BytesIO(make_post(1, index, image_size=128).jpeg)).resize(size, Image.BILINEAR)
    noisy = np.asarray(drawing, dtype=np.float32) + rng.normal(0, 10, (size[1], size[0], 3))
    out = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(out, format="JPEG", quality=90)
    return out.getvalue()


def photos(count: int, size: tuple[int, int]) -> list[bytes]:
    workers = min(16, os.cpu_count() or 1)
    if workers == 1 or count < 64:
        return [photo_like(i, size) for i in range(count)]
    with Pool(workers) as pool:
        return pool.starmap(photo_like, [(i, size) for i in range(count)])


def write_corpus(folder: Path, images: int = CORPUS_IMAGES, distinct: int = CORPUS_DISTINCT,
                 picture: tuple[int, int] = PICTURE, classes: int = CLASSES) -> Path:
    """``folder``/shards/*.tar of ``images`` photo-like JPEGs of ``picture`` pixels (``distinct`` pictures under their
    own keys: decoding copies costs what distinct pictures cost), each labelled with 1 to 3 of ``classes`` classes in
    ``folder``/labels, and ``folder``/vocab.json: what ``fastpretrain vocab build`` and ``labels`` write, without
    WordNet (the GPU machine has none)."""
    folder = Path(folder)
    (folder / "shards").mkdir(parents=True, exist_ok=True)
    pictures = photos(distinct, picture)
    rng = np.random.default_rng(0)  # the same corpus every time
    wnids = [f"n{9_000_000 + c:08d}" for c in range(classes)]
    vocab_hash = Vocab.hash_of(wnids, "concrete-first", "3.0")
    counts = np.zeros(classes, dtype=np.int64)
    per_shard = 256
    for s, first in enumerate(range(0, images, per_shard)):
        path = folder / "shards" / f"{s:05d}.tar"
        keys, rows = [], []
        with ShardWriter(path) as writer:
            for i in range(first, min(first + per_shard, images)):
                keys.append(f"{i:08d}")
                writer.write(keys[-1], {"jpg": pictures[i % distinct], "json": b"{}"})
                rows.append(sorted(set(rng.integers(0, classes, int(rng.integers(1, 4))).tolist())))
                counts[rows[-1]] += 1
        LabelIndex.from_rows(keys, rows, vocab_hash).save(label_index_path(folder / "labels", path))
    vocab_classes = [VocabClass(c, wnids[c], [f"tag{c}"], int(counts[c])) for c in range(classes)]
    Vocab(vocab_classes, "concrete-first", vocab_hash, images).save(folder / "vocab.json")
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("gpu-corpus"))


# ----------------------------------------------------------------------------------------------------
# 1. The input path


def shard_table(path: Path, images: list[bytes]) -> SampleTable:
    with ShardWriter(path) as writer:
        for i, data in enumerate(images):
            writer.write(f"{i:05d}", {"jpg": data, "json": b"{}"})
    index = load_index(path)
    offset, size = (np.array([members["jpg"][k] for members in index.members], dtype=np.int64) for k in (0, 1))
    n = len(images)
    return SampleTable.of_shard(path, index.keys, offset, size, np.arange(n + 1, dtype=np.int64),
                                np.zeros(n, dtype=np.int32), np.ones(n, dtype=bool))


def per_image_crops(output, cfg: DataConfig, normalize: Normalizer) -> torch.Tensor:
    """The GPU path this replaced: one batched nvJPEG call, then per image a box, torchvision's resize and a store."""
    from torchvision.io import ImageReadMode, decode_jpeg

    prepared, work = output.prepared, output.work
    decoded = decode_jpeg(work.encoded(), mode=ImageReadMode.RGB, device=DEVICE)
    pixels = torch.empty((len(decoded), cfg.image_size, cfg.image_size, 3), dtype=torch.uint8, device=DEVICE)
    boxes = prepared.boxes
    for row, (i, image) in enumerate(zip(work.nvjpeg.tolist(), decoded)):
        crop_resize_into(pixels[row], image, int(boxes.left[i]), int(boxes.top[i]), int(boxes.width[i]),
                         int(boxes.height[i]), bool(boxes.flip[i]))
    return normalize(pixels)


@pytest.mark.parametrize("jpeg_size", JPEG_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_decode_crop(benchmark, report, tmp_path, jpeg_size):
    """The batch thread's side of the batched path on one chunk the workers prepared: ``DeviceBatcher`` (nvJPEG, one
    crop kernel) against the per-image crops it replaced and nvJPEG's decode alone, to a finished batch."""
    need("decode")
    from torchvision.io import ImageReadMode, decode_jpeg

    distinct = photos(min(64, INPUT_BATCH), jpeg_size)
    table = shard_table(tmp_path / "s.tar", [distinct[i % len(distinct)] for i in range(INPUT_BATCH)])
    cfg = DataConfig(shards=str(tmp_path / "s.tar"), label_dir=None, backend="torch", batch_size=INPUT_BATCH,
                     image_size=IMAGE, seed=1)
    reader = torch_decoder.ChunkReader(table, CropSpec.from_config(cfg, train=True), None)
    output = reader[(0, PlanChunk(0, np.arange(INPUT_BATCH), np.arange(INPUT_BATCH)))]
    assert len(output.work.nvjpeg) == INPUT_BATCH  # every picture is a baseline JPEG: all of it goes to nvJPEG
    dtype = torch.bfloat16
    batcher = torch_decoder.DeviceBatcher(cfg, DEVICE, dtype)
    normalize = Normalizer(cfg, DEVICE, dtype)
    encoded = output.work.encoded()
    candidates = {"batched": lambda: batcher(output),
                  "per-image": lambda: per_image_crops(output, cfg, normalize),
                  "decode-only": lambda: decode_jpeg(encoded, mode=ImageReadMode.RGB, device=DEVICE)}
    repeats = 5 if CUDA else 1
    rate = {name: INPUT_BATCH / median_time(fn, repeats) for name, fn in candidates.items()}
    case = f"input/{DEVICE.type}/crop-{IMAGE}-from-{jpeg_size[0]}x{jpeg_size[1]}"
    verdict = "meets" if rate["batched"] >= TARGET_IMAGES_PER_S else "misses"
    report(f"{case}/batched-vs-per-image", rate["batched"], rate["per-image"], rate["batched"] / rate["per-image"],
           "img/s", DEVICE.type, note=f"batches of {INPUT_BATCH}, bf16: {verdict} the target of {TARGET_IMAGES_PER_S}")
    report(f"{case}/batched-vs-decode-only", rate["batched"], rate["decode-only"],
           rate["batched"] / rate["decode-only"], "img/s", DEVICE.type, note="nvJPEG's decode alone is the ceiling")
    benchmark.pedantic(candidates["batched"], rounds=1, iterations=1)


@pytest.mark.parametrize("share", NVJPEG_SHARES)
def test_loader(benchmark, report, corpus, share):
    """The loader end to end (workers reading, checking and routing, the batch thread decoding and cropping), bf16
    batches on the device, at a share of JPEGs for nvJPEG; 0, the baseline, is the CPU region decode of every image
    in the workers (the batched path on a CPU device too: there the torch backend would take its ring path)."""
    need("loader")
    cfg = DataConfig(shards=str(corpus / "shards"), label_dir=str(corpus / "labels"), backend="torch",
                     batch_size=INPUT_BATCH, image_size=IMAGE, workers=WORKERS, resample="natural", seed=1)
    loader = build_train_loader(cfg, Vocab.load(corpus / "vocab.json"), DEVICE, torch.bfloat16)
    loader.decoder = torch_decoder.TorchDecoder(cfg, loader.table, DEVICE, torch.bfloat16, train=True, batched=True,
                                                nvjpeg_share=share)

    def take() -> None:
        for _ in range(LOADER_BATCHES):
            next(loader)

    try:
        take()  # workers started, their queues full, the first chunks decoded
        synchronize()
        rate = LOADER_BATCHES * INPUT_BATCH / elapsed(take)
        benchmark.pedantic(lambda: next(loader), rounds=1, iterations=1)
    finally:
        loader.close()
    RATES[("loader", WORKERS, share)] = rate
    benchmark.extra_info.update({"images_per_s": round(rate, 1), "nvjpeg_share": share, "workers": WORKERS})
    cpu_only = RATES.get(("loader", WORKERS, 0.0))
    if share != 0.0 and cpu_only is not None:
        report(f"input/{DEVICE.type}/loader-{IMAGE}-w{WORKERS}/nvjpeg-{share:g}-vs-cpu-region", rate, cpu_only,
               rate / cpu_only, "img/s", DEVICE.type, note=f"batches of {INPUT_BATCH}; target {TARGET_IMAGES_PER_S} img/s")


def test_cli_train(benchmark, report, corpus, tmp_path):
    """A short real ``fastpretrain train --amp`` on the corpus (a subprocess, the command as a user runs it) with the
    batched path: images/s against the Trainer on a fixed synthetic batch (``test_train_step_bf16``, later), with the
    data-wait share, the time to the first step (the first metrics line less the steps after the first at the steady
    step time) and peak memory."""
    need("cli")
    arch, batch_size = CLI_CASE
    command = [sys.executable, "-m", "fastpretrain", "train", "--data", str(corpus / "shards"),
               "--vocab", str(corpus / "vocab.json"), "--model", arch, "--batch-size", str(batch_size),
               "--img-size", str(IMAGE), "--amp", "--workers", str(WORKERS), "--steps", str(CLI_STEPS),
               "--log-interval", str(CLI_LOG_INTERVAL), "--data-backend", "torch", "--device", DEVICE.type,
               "--output", str(tmp_path / "run")]
    seen: list[float] = []

    def run() -> None:
        started = time.perf_counter()
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as process:
            tail = []
            for line in process.stdout:
                tail = (tail + [line])[-20:]
                if line.startswith("event=train"):
                    seen.append(time.perf_counter() - started)
        if process.returncode != 0:
            pytest.fail(f"fastpretrain train exited {process.returncode}:\n{''.join(tail)}")

    benchmark.pedantic(run, rounds=1, iterations=1)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [line for line in lines if line["event"] == "train"]
    steady = train[1:] or train  # the first line holds the start: worker start-up, cuDNN's autotuning
    rate = statistics.median(line["images_per_sec"] for line in steady)
    wait = statistics.median(line["data_wait_share"] for line in steady)
    step_time = statistics.median(line["step_time"] for line in steady)
    first_step = seen[0] - (train[0]["step"] - 1) * step_time
    memory = max(line["peak_memory_mb"] for line in train)
    note = (f"data wait {100 * wait:.1f}% (target under {100 * DATA_WAIT_TARGET:g}%), first step after {first_step:.0f} s,"
            f" peak memory {memory / 1024:.1f} GiB, {WORKERS} workers")
    benchmark.extra_info.update({"images_per_s": rate, "data_wait_share": wait, "time_to_first_step_s": first_step,
                                 "peak_memory_mb": memory})
    print(f"\nfastpretrain train {arch} b{batch_size}: {rate:.0f} img/s, {note}")
    RATES[(arch, batch_size, "cli")], NOTES[(arch, batch_size, "cli")] = rate, note
    report_pairs(report, arch, batch_size, "cli")


# ----------------------------------------------------------------------------------------------------
# 2. The loss kernel


@dataclass
class LossProblem:
    logits: torch.Tensor  # (B, C)
    labels: torch.Tensor  # (nnz,) 1..3 per row
    offsets: torch.Tensor  # (B + 1,)
    dense: torch.Tensor  # (B, C) 1/k on each label: eager's and compile's form of the targets

    def reference(self) -> tuple[torch.Tensor, torch.Tensor]:
        """float64 (row losses (B,), gradient of the mean (B, C))."""
        z = self.logits.double()
        target = self.dense.double()
        loss = torch.logsumexp(z, dim=1) - (target * z).sum(dim=1)
        return loss, (torch.softmax(z, dim=1) - target) / z.shape[0]


def loss_problem(shape: tuple[int, int], dtype: torch.dtype, seed: int) -> LossProblem:
    gen = torch.Generator().manual_seed(seed)
    rows, classes = shape
    counts = torch.randint(1, 4, (rows,), generator=gen)
    offsets = torch.zeros(rows + 1, dtype=torch.int64)
    offsets[1:] = counts.cumsum(0)
    labels = torch.randint(0, classes, (int(offsets[-1]),), generator=gen)
    owner = torch.repeat_interleave(torch.arange(rows), counts)
    dense = torch.zeros(rows, classes).index_put_((owner, labels), 1.0 / counts[owner].float(), accumulate=True)
    logits = torch.randn(rows, classes, generator=gen) * 2
    return LossProblem(logits.to(DEVICE, dtype), labels.to(DEVICE), offsets.to(DEVICE), dense.to(DEVICE, dtype))


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm())


@pytest.mark.parametrize("dtype", LOSS_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", LOSS_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_loss_kernel(benchmark, report, peaks, seed, shape, dtype):
    need("loss")
    from fastpretrain.kernels.hashtag_xent import hashtag_xent_forward

    problem = loss_problem(shape, dtype, seed)
    ref_loss, ref_grad = problem.reference()
    rows = shape[0]
    scale = torch.tensor(1 / rows, device=DEVICE)
    row_loss = torch.empty(rows, device=DEVICE)
    # Tolerances of ||out - ref|| / ||ref||: fp32 arithmetic far under 1e-4; the gradient stored in bf16 within 1e-2.
    tolerance = 1e-4 if dtype == torch.float32 else 1e-2
    timing_buffer = problem.logits.clone()  # in place, as the trainer runs it: read the logits, write the gradient
    rates, wrong = {}, []
    for block, warps in SWEEP:
        grad = torch.full_like(problem.logits, float("nan"))  # poisoned: every element must be written
        hashtag_xent_forward(problem.logits, problem.labels, problem.offsets, None, scale, row_loss, grad,
                             block=block, num_warps=warps)
        errors = relative_error(row_loss, ref_loss), relative_error(grad, ref_grad)
        if not all(e <= tolerance for e in errors):  # NaN fails too
            wrong.append(f"block {block} warps {warps}: relative errors {errors[0]:.2g} (loss), {errors[1]:.2g} (grad)")
            continue
        seconds = event_time(functools.partial(hashtag_xent_forward, timing_buffer, problem.labels, problem.offsets,
                                               None, scale, row_loss, timing_buffer, block=block, num_warps=warps))
        rates[(block, warps)] = 2 * timing_buffer.numel() * timing_buffer.element_size() / seconds / 1e9
    case = f"loss/{DEVICE.type}/{shape[0]}x{shape[1]}-{str(dtype).removeprefix('torch.')}"
    if (None, None) in rates:
        default = rates[(None, None)]
        report(f"{case}/kernel-vs-copy", default, peaks["copy_gb_per_s"], default / peaks["copy_gb_per_s"], "GB/s",
               DEVICE.type, note="kernel only, in place, L2 emptied before each call")
        best = max(rates, key=rates.get)
        report(f"{case}/best-sweep-vs-default", rates[best], default, rates[best] / default, "GB/s", DEVICE.type,
               note=f"best block {best[0] or 'default'}, warps {best[1] or 'default'} of {len(rates)} tried")
    benchmark.extra_info["sweep_gb_per_s"] = {f"{b}/{w}": round(r, 1) for (b, w), r in rates.items()}
    benchmark.extra_info["ceilings"] = {k: round(v, 1) for k, v in peaks.items()}

    def call(loss_fn, logits):
        def run():
            x = logits.detach().requires_grad_()
            torch.autograd.grad(loss_fn(x), x)  # forward + backward, the gradient handed back as the trainer's is
        return run

    ours = call(lambda x: hashtag_cross_entropy(x, problem.labels, problem.offsets, inplace=True), timing_buffer)
    eager = call(lambda x: F.cross_entropy(x, problem.dense), problem.logits)
    compiled_loss = compiled(lambda x, target: F.cross_entropy(x, target))
    compile_call = call(lambda x: compiled_loss(x, problem.dense), problem.logits)
    times = {name: event_time(fn) for name, fn in (("ours", ours), ("eager", eager), ("compile", compile_call))}
    kernel = ""
    if (None, None) in rates:
        kernel_ms = 2 * timing_buffer.numel() * timing_buffer.element_size() / rates[(None, None)] / 1e6
        kernel = f", of which the kernel alone {kernel_ms:.3g} ms"
    for name in ("eager", "compile"):
        report(f"{case}/call-vs-{name}", times["ours"] * 1e3, times[name] * 1e3, times[name] / times["ours"], "ms",
               DEVICE.type, note=f"forward + backward through autograd{kernel}")
    benchmark.pedantic(ours, rounds=3, iterations=1)
    if wrong:
        pytest.fail("configurations that compute the wrong loss: " + "; ".join(wrong))


# ----------------------------------------------------------------------------------------------------
# 3-4. The train step and MFU


@dataclass(frozen=True)
class Variant:
    name: str
    runner: str  # "bare" or "trainer"
    bf16: bool
    nhwc: bool
    extra: str = ""  # "", "compile" or "graphs"


VARIANTS = {v.name: v for v in [
    Variant("bare-bf16-nhwc", "bare", True, True), Variant("trainer-bf16-nhwc", "trainer", True, True),
    Variant("bare-bf16-nchw", "bare", True, False), Variant("bare-fp32-nhwc", "bare", False, True),
    Variant("bare-fp32-nchw", "bare", False, False), Variant("bare-bf16-nhwc-graphs", "bare", True, True, "graphs"),
    Variant("trainer-bf16-nhwc-graphs", "trainer", True, True, "graphs"),
    Variant("bare-bf16-nhwc-compile", "bare", True, True, "compile"),
    Variant("trainer-bf16-nhwc-compile", "trainer", True, True, "compile"),
]}
# Rows between variants of a case, reported once both ran: (row, ours, baseline).
VARIANT_ROWS = [("trainer-vs-bare", "trainer-bf16-nhwc", "bare-bf16-nhwc"),
                ("bf16-nhwc-vs-nchw", "bare-bf16-nhwc", "bare-bf16-nchw"),
                ("fp32-nhwc-vs-nchw", "bare-fp32-nhwc", "bare-fp32-nchw"),
                ("bf16-vs-fp32", "bare-bf16-nhwc", "bare-fp32-nhwc"),
                ("graphs-vs-eager", "bare-bf16-nhwc-graphs", "bare-bf16-nhwc"),
                ("trainer-graphs-vs-trainer", "trainer-bf16-nhwc-graphs", "trainer-bf16-nhwc"),
                ("compile-vs-eager", "bare-bf16-nhwc-compile", "bare-bf16-nhwc"),
                ("trainer-compile-vs-trainer", "trainer-bf16-nhwc-compile", "trainer-bf16-nhwc"),
                ("cli-real-shards-vs-synthetic", "cli", "trainer-bf16-nhwc")]
NOTES: dict[tuple, str] = {}  # what a case adds to the notes of its rows, as RATES


def report_pairs(report, arch: str, batch_size: int, name: str) -> None:
    """The rows of VARIANT_ROWS that pair case ``name`` with one that ran before it."""
    for row, ours, baseline in VARIANT_ROWS:
        if name in (ours, baseline) and (arch, batch_size, ours) in RATES and (arch, batch_size, baseline) in RATES:
            a, b = RATES[(arch, batch_size, ours)], RATES[(arch, batch_size, baseline)]
            note = NOTES.get((arch, batch_size, ours), f"{ours} against {baseline}")
            report(f"train/{DEVICE.type}/{arch}-b{batch_size}/{row}", a, b, a / b, "img/s", DEVICE.type, note=note)


def synthetic_batch(batch: int, dtype: torch.dtype, nhwc: bool, seed: int) -> Batch:
    """Random images in the loader's form (its dtype, channels-last) and 1 to 3 random labels each."""
    gen = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 4, (batch,), generator=gen)
    offsets = torch.zeros(batch + 1, dtype=torch.int64)
    offsets[1:] = counts.cumsum(0)
    labels = torch.randint(0, CLASSES, (int(offsets[-1]),), generator=gen)
    images = torch.randn(batch, 3, IMAGE, IMAGE, generator=gen).to(DEVICE, dtype)  # (B, 3, S, S)
    images = images.contiguous(memory_format=torch.channels_last if nhwc else torch.contiguous_format)
    return Batch(images, labels.to(DEVICE), offsets.to(DEVICE))


def bare_loop(arch: str, batch: Batch, variant: Variant):
    """One step of the loop a newcomer writes: forward under autocast (bf16 where the Trainer would use it:
    ``choose_precision``), the in-place loss, backward, fused SGD; with ``graphs`` the forward, loss and backward
    captured once and replayed (the optimizer outside, as the Trainer)."""
    layout = torch.channels_last if variant.nhwc else torch.contiguous_format
    model = create_model(arch, CLASSES).to(DEVICE, memory_format=layout)
    fast = {"fused": True} if DEVICE.type == "cuda" else {"foreach": True}
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4, **fast)
    forward = compiled(model) if variant.extra == "compile" else model
    precision = choose_precision(DEVICE, variant.bf16)

    def forward_backward() -> torch.Tensor:
        with precision.autocast():
            logits = forward(batch.images)  # (B, C)
        loss = hashtag_cross_entropy(logits, batch.labels, batch.offsets, inplace=True)
        loss.backward()
        return loss.detach()

    if variant.extra != "graphs":
        def step() -> None:
            forward_backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step
    optimizer.zero_grad(set_to_none=False)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # CUDA graphs warm up off the default stream
        for _ in range(3):
            forward_backward()
    torch.cuda.current_stream().wait_stream(side)
    optimizer.zero_grad(set_to_none=False)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        forward_backward()

    def replay() -> None:
        graph.replay()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # the graph's gradients are static tensors
    return replay


@dataclass
class FixedBatches:
    """One batch, endlessly, in the place of the Trainer's loader (``GraphedStep`` sizes its label buffer from the
    loader's ``table``)."""

    batch: Batch
    table: SampleTable

    def __iter__(self) -> FixedBatches:
        return self

    def __next__(self) -> Batch:
        return self.batch


def trainer_loop(arch: str, batch_size: int, variant: Variant, corpus: Path, output: Path, seed: int):
    """The Trainer's own step (``train_step``: schedule, BatchNorm snapshot, non-finite check, fused SGD) fed one
    synthetic batch in place of its loader; (step, close)."""
    from fastpretrain.train.config import resolve
    from fastpretrain.train.metrics import Meter
    from fastpretrain.train.trainer import Trainer
    from fastpretrain.train.world import init_world

    flags = ["train", "--data", str(corpus / "shards"), "--vocab", str(corpus / "vocab.json"), "--model", arch,
             "--img-size", str(IMAGE), "--batch-size", str(batch_size), "--device", DEVICE.type, "--steps", "100000",
             "--output", str(output), "--workers", "0", "--data-backend", "torch"]
    flags += ["--amp"] if variant.bf16 else []
    flags += {"compile": ["--compile"], "graphs": ["--cuda-graphs"]}.get(variant.extra, [])
    trainer = Trainer(resolve(vars(build_parser().parse_args(flags))), init_world(DEVICE.type))
    fixed = synthetic_batch(batch_size, trainer.precision.dtype, True, seed)
    trainer.loader, real_loader = FixedBatches(fixed, trainer.loader.table), trainer.loader
    meter = Meter(trainer.device)

    def step() -> None:
        trainer.train_step(meter)
        trainer.step += 1
        meter.step_done(trainer.global_batch)

    def close() -> None:
        trainer.loader = real_loader
        trainer.close()

    return step, close


@functools.cache
def training_flops_per_image(arch: str) -> float:
    """FLOPs of one image's forward and backward (``torch.utils.flop_counter``: convolutions and matrix products)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = create_model(arch, CLASSES).to(DEVICE)
    images = torch.randn(2, 3, IMAGE, IMAGE, device=DEVICE)
    with FlopCounterMode(display=False) as counter:
        model(images).sum().backward()
    return counter.get_total_flops() / 2


def run_variant(benchmark, report, peaks, corpus, tmp_path, seed, arch: str, batch_size: int, name: str) -> None:
    variant = VARIANTS[name]
    if variant.extra == "graphs" and DEVICE.type != "cuda":
        pytest.skip("CUDA graphs need CUDA")
    need("compile" if variant.extra == "compile" else "train")
    torch.backends.cudnn.benchmark = True  # what the Trainer sets; its fixed shapes pay for the autotuning once
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # fp32 as the Trainer runs it
    close = lambda: None  # noqa: E731
    if variant.runner == "trainer":
        step, close = trainer_loop(arch, batch_size, variant, corpus, tmp_path / "run", seed)
    else:
        dtype = choose_precision(DEVICE, variant.bf16).dtype
        step = bare_loop(arch, synthetic_batch(batch_size, dtype, variant.nhwc, seed), variant)
    seconds = []

    def timed_steps() -> None:
        seconds.append(elapsed(lambda: [step() for _ in range(TIMED_STEPS)]))

    try:
        for _ in range(WARMUP_STEPS):
            step()
        synchronize()
        benchmark.pedantic(timed_steps, rounds=1, iterations=1)
    finally:
        close()
    rate = TIMED_STEPS * batch_size / seconds[0]
    RATES[(arch, batch_size, name)] = rate
    report_pairs(report, arch, batch_size, name)
    if variant.bf16:
        achieved = training_flops_per_image(arch) * rate / 1e12
        report(f"mfu/{DEVICE.type}/{arch}-b{batch_size}/{name}", achieved, peaks["matmul_tflop_per_s"],
               achieved / peaks["matmul_tflop_per_s"], "TFLOP/s", DEVICE.type,
               note=f"{training_flops_per_image(arch) / 1e9:.1f} GFLOP per image (forward + backward), over the bf16 "
                    "matrix product measured here")
    benchmark.extra_info.update({"images_per_s": round(rate, 1), "variant": name})
    if DEVICE.type == "cuda":
        benchmark.extra_info["peak_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _train_params(names: list[str], cases=TRAIN_CASES) -> list:
    return [pytest.param(arch, batch, name, id=f"{arch}-b{batch}-{name}") for arch, batch in cases for name in names]


@pytest.mark.parametrize("arch, batch_size, name", _train_params(["bare-bf16-nhwc", "trainer-bf16-nhwc"]))
def test_train_step_bf16(benchmark, report, peaks, corpus, tmp_path, seed, arch, batch_size, name):
    run_variant(benchmark, report, peaks, corpus, tmp_path, seed, arch, batch_size, name)


# ----------------------------------------------------------------------------------------------------
# 3 again: the variants that cost more, last


@pytest.mark.parametrize("arch, batch_size, name", _train_params(["bare-bf16-nchw"]) + _train_params(
    ["bare-fp32-nhwc", "bare-fp32-nchw"], TRAIN_CASES[:1]))
def test_train_step_layouts(benchmark, report, peaks, corpus, tmp_path, seed, arch, batch_size, name):
    run_variant(benchmark, report, peaks, corpus, tmp_path, seed, arch, batch_size, name)


@pytest.mark.parametrize("arch, batch_size, name",
                         _train_params(["bare-bf16-nhwc-graphs", "trainer-bf16-nhwc-graphs"], TRAIN_CASES[::-1]))
def test_train_step_cuda_graphs(benchmark, report, peaks, corpus, tmp_path, seed, arch, batch_size, name):
    run_variant(benchmark, report, peaks, corpus, tmp_path, seed, arch, batch_size, name)


@pytest.mark.parametrize("arch, batch_size, name",
                         _train_params(["bare-bf16-nhwc-compile", "trainer-bf16-nhwc-compile"], TRAIN_CASES[:1]))
def test_train_step_compile(benchmark, report, peaks, corpus, tmp_path, seed, dry_compile, arch, batch_size, name):
    run_variant(benchmark, report, peaks, corpus, tmp_path, seed, arch, batch_size, name)


@pytest.mark.parametrize("arch, batch_size, name", _train_params(["bare-fp32-nhwc", "bare-fp32-nchw"], TRAIN_CASES[1:2]))
def test_train_step_fp32_large(benchmark, report, peaks, corpus, tmp_path, seed, arch, batch_size, name):
    run_variant(benchmark, report, peaks, corpus, tmp_path, seed, arch, batch_size, name)
