"""Images per second of the Trainer's step against a minimal hand-written loop of the same model, batch and precision.

``trainer-vs-bare-loop``: ``Trainer.train_step`` (schedule, BatchNorm snapshot, in-place loss, non-finite check,
SGD step, zero_grad) fed one fixed ``Batch`` by replacing ``trainer.loader``, against the loop a newcomer writes:
``model(x)`` under the same autocast, ``hashtag_cross_entropy`` in place, ``backward``, SGD step, ``zero_grad``, on a
copy of the same weights. Floor: the bare loop itself, since both run the same kernels: what the trainer adds per step
is a few small tensor operations and a flag read, so it should stay within a few percent of it (target: ratio 0.95).

``real-shards-vs-fixed-batch``: the same Trainer on the demo corpus through its real loader, against itself fed the
fixed batch, interleaved; the note gives the share of the step spent waiting in ``next(loader)`` (the trainer's
``Meter``). Floor: the fixed batch, which the loader matches when it keeps ahead of the step: on CPUs its workers
share the cores with the step, so what they cost is what the ratio loses; a starving loader shows as data wait. The
workers go on refilling their queue (two batches each) after a call, during the other candidates' calls: at most that
much loading escapes the real candidate's timing.

The three candidates (the trainer on the fixed batch, the bare loop, the trainer on real shards) run a few steps
per call, interleaved round after round; each ratio is the median over rounds of one rate over the other in the same
round. Cases: each registered arch that trains in seconds per step on the device (on CPUs at the demo's 64 px, on CUDA
at the paper's 224 px), with ``--amp`` as the demo runs (bf16 where the hardware has it, else float32: see the note).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from fastpretrain.cli import build_parser
from fastpretrain.data import Batch
from fastpretrain.data.synth import write_demo_corpus
from fastpretrain.hashtags.build import VocabBuildConfig, build_vocab
from fastpretrain.loss import hashtag_cross_entropy
from fastpretrain.models import create_model
from fastpretrain.train.config import resolve
from fastpretrain.train.metrics import Meter
from fastpretrain.train.trainer import Trainer, unwrap
from fastpretrain.train.world import init_world

IMAGES = 2048  # demo posts: epochs of more steps than a run of this benchmark reads, so it rarely turns one over
# (device, arch, steps per timed call): what trains in seconds per step. On CPUs one step per call: a step lasts long
# enough to time, and calls close together see the same load. resnext101 and wider take minutes a step on 2 CPU cores.
CASES = [pytest.param("cpu", "resnext_tiny", 1, id="cpu-resnext_tiny"),
         pytest.param("cpu", "resnext50_32x4d", 1, id="cpu-resnext50_32x4d", marks=pytest.mark.full),
         *(pytest.param("cuda", arch, 10, id=f"cuda-{arch}") for arch in ("resnext_tiny", "resnext50_32x4d",
                                                                              "resnext101_32x8d"))]
SIZE = {"cpu": ["--img-size", "64", "--batch-size", "32"], "cuda": ["--img-size", "224", "--batch-size", "64"]}
ROUNDS, SHORT_ROUNDS = 11, 8
WARMUP = {"cpu": 1, "cuda": 2}  # calls before timing; CUDA also autotunes its convolutions (cudnn.benchmark)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("train-bench")
    write_demo_corpus(root / "train", IMAGES, seed=0, shard_size=512)
    build_vocab(VocabBuildConfig(data=[str(root / "train")], out=str(root / "vocab.json")))  # labels/ beside it
    return {"train": root / "train", "vocab": root / "vocab.json"}


@pytest.fixture
def trainer(corpus, tmp_path, device, arch):
    flags = vars(build_parser().parse_args([
        "train", "--recipe", "demo", "--data", str(corpus["train"]), "--vocab", str(corpus["vocab"]), "--model", arch,
        *SIZE[device.type], "--amp", "--device", device.type, "--steps", "100000", "--output", str(tmp_path / "run")]))
    trainer = Trainer(resolve(flags), init_world(device.type))
    yield trainer
    trainer.close()


def fixed_batch(trainer: Trainer) -> Batch:
    """One batch of the real loader, copied (a loader may reuse its buffers)."""
    batch = next(trainer.loader)
    return Batch(batch.images.clone(memory_format=torch.channels_last), batch.labels.clone(), batch.offsets.clone())


def trainer_steps(trainer: Trainer, loader, steps: int, readings: list[dict], skipped: list[torch.Tensor]):
    """A call of ``steps`` of ``trainer.train_step`` reading ``loader``, as ``Trainer.train`` runs them; each call's
    Meter reading goes to ``readings``, each step's non-finite flag to ``skipped``."""
    global_batch = trainer.global_batch

    def run() -> None:
        real_loader, trainer.loader = trainer.loader, loader
        meter = Meter(trainer.device)
        try:
            for _ in range(steps):
                _, nonfinite = trainer.train_step(meter)
                trainer.step += 1
                meter.step_done(global_batch)
                skipped.append(nonfinite)
        finally:
            trainer.loader = real_loader
        readings.append(meter.read())

    return run


def bare_loop(trainer: Trainer, batch: Batch, steps: int):
    """The hand-written loop: the trainer's arch and starting weights, its precision, the in-place loss, SGD."""
    device, dtype = trainer.device, trainer.precision.dtype
    model = create_model(trainer.cfg.model.arch, len(trainer.vocab)).to(device, memory_format=torch.channels_last)
    model.load_state_dict(unwrap(trainer.model).state_dict())
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}  # what the trainer's SGD uses
    optimizer = torch.optim.SGD(model.parameters(), lr=trainer.schedule(trainer.step), momentum=0.9, weight_decay=1e-4,
                                **fast)

    def run() -> None:
        for _ in range(steps):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                logits = model(batch.images)  # (B, C)
            hashtag_cross_entropy(logits, batch.labels, batch.offsets, inplace=True).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return run


@pytest.mark.parametrize("device, arch, steps", CASES, indirect=["device"])
def test_trainer_step(benchmark, report, short, side_by_side, device, arch, steps, trainer):
    batch = fixed_batch(trainer)
    real_readings, fixed_readings, skipped = [], [], []
    candidates = {"trainer": trainer_steps(trainer, itertools.repeat(batch), steps, fixed_readings, skipped),
                  "bare": bare_loop(trainer, batch, steps),
                  "real": trainer_steps(trainer, trainer.loader, steps, real_readings, skipped)}
    comparison = side_by_side(candidates, SHORT_ROUNDS if short else ROUNDS, warmup=WARMUP[device.type], settle_s=0)
    benchmark.pedantic(candidates["trainer"], rounds=1, iterations=1)
    if torch.stack(skipped).sum().item() > 0:
        # A skipped step does no optimizer update: the trainer would look faster than it is.
        pytest.fail("the trainer skipped non-finite steps during the benchmark")
    images = steps * trainer.global_batch
    rate = {name: images / comparison.median(name) for name in candidates}
    case = f"train/{device.type}/{arch}"
    precision = f"{str(trainer.precision.dtype).removeprefix('torch.')}, {torch.get_num_threads()} intra-op threads"
    report(f"{case}/trainer-vs-bare-loop", rate["trainer"], rate["bare"], comparison.speedup("trainer", "bare"),
           "img/s", device.type, note=precision)
    wait = sorted(reading["data_wait_share"] for reading in real_readings[WARMUP[device.type]:])
    report(f"{case}/real-shards-vs-fixed-batch", rate["real"], rate["trainer"], comparison.speedup("real", "trainer"),
           "img/s", device.type, note=f"data wait {100 * wait[len(wait) // 2]:.1f}% of the step time (median), "
                                      f"{trainer.data_backend} loader, {trainer.cfg.data.workers} workers, {precision}")
    benchmark.extra_info["data_wait_shares"] = [round(share, 4) for share in wait]
