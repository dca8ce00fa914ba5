"""The training run: build the pieces, step through the stream, log, checkpoint, evaluate.

The step itself is ``train_step``: forward under autocast, the hashtag loss, backward, SGD. Everything else
is set-up and bookkeeping around it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fastpretrain.data import Batch, DataConfig, build_eval_loader, build_train_loader
from fastpretrain.errors import UserError
from fastpretrain.evaluate import evaluate
from fastpretrain.formats.vocab import Vocab
from fastpretrain.loss import HashtagCrossEntropy
from fastpretrain.models import count_parameters, create_model, to_channels_last
from fastpretrain.formats.checkpoint import load_checkpoint, save_checkpoint
from fastpretrain.train.config import TrainConfig
from fastpretrain.train.metrics import MetricsLog, Throughput
from fastpretrain.train.optim import build_optimizer, lr_at, scaled_lr, set_lr
from fastpretrain.train.precision import Precision, choose_precision, resolve_device
from fastpretrain.train.stop import StopOnSignal, Stopped

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Datasets:
    """Where a run's data lives: training shards with their label index, and an optional held-out split."""

    train: str
    label_dir: str
    vocab: str
    val: str | None
    val_label_dir: str | None

    @classmethod
    def resolve(cls, cfg: TrainConfig) -> "Datasets":
        if cfg.data is None:
            from fastpretrain.demo import prepare_demo

            demo = prepare_demo(cfg.demo_images, seed=cfg.seed, workers=max(cfg.workers, 1))
            return cls(str(demo.train), str(demo.label_dir), str(demo.vocab), str(demo.val), str(demo.val_label_dir))
        label_dir = cfg.label_dir or str(Path(cfg.vocab).parent / "labels")
        val_label_dir = cfg.val_label_dir or (str(Path(cfg.vocab).parent / "val-labels") if cfg.val_data else None)
        return cls(cfg.data, label_dir, cfg.vocab, cfg.val_data, val_label_dir)


def train_step(model: nn.Module, loss_fn: nn.Module, optimizer: torch.optim.Optimizer, batch: Batch,
               precision: Precision) -> torch.Tensor:
    with precision.autocast():
        logits = model(batch.images)  # (B, C)
    loss = loss_fn(logits, batch.labels, batch.offsets)  # float32 accumulation whatever the logits' dtype
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def write_run_info(output: Path, cfg: TrainConfig, device: torch.device, precision: Precision) -> None:
    """The resolved config and the environment, so a run folder says how it was made."""
    output.mkdir(parents=True, exist_ok=True)
    (output / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    env = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
           "device": str(device), "dtype": str(precision.dtype),
           "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    (output / "env.json").write_text(json.dumps(env, indent=2) + "\n")


def evaluate_held_out(model: nn.Module, datasets: Datasets, vocab: Vocab, cfg: TrainConfig, device: torch.device,
                      precision: Precision) -> dict:
    """precision@1/@5 on the held-out split, with the baseline of always ranking the most frequent class first."""
    val_cfg = DataConfig(shards=datasets.val, label_dir=datasets.val_label_dir, backend=cfg.data_backend,
                         batch_size=cfg.batch_size, image_size=cfg.image_size, workers=cfg.workers)
    return evaluate(model, build_eval_loader(val_cfg, vocab, device, precision.dtype),
                    majority_class=int(np.argmax(vocab.counts)), autocast=precision.autocast())


def train(cfg: TrainConfig) -> dict:
    """Run training as configured; return the final evaluation (or the last training record without val data)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # each rank would train its own model on its share of shards
        raise UserError("multi-process training (torchrun, WORLD_SIZE > 1) is not supported yet; run one process")
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    precision = choose_precision(device, cfg.amp)
    if precision.notice:
        logger.info(precision.notice)
    datasets = Datasets.resolve(cfg)  # inputs are checked before the run folder is written
    vocab = Vocab.load(datasets.vocab)
    output = Path(cfg.output)
    write_run_info(output, cfg, device, precision)
    model = to_channels_last(create_model(cfg.arch, len(vocab)), device)
    data_cfg = DataConfig(shards=datasets.train, label_dir=datasets.label_dir, backend=cfg.data_backend,
                          batch_size=cfg.batch_size, image_size=cfg.image_size, workers=cfg.workers,
                          seed=cfg.seed, resample=cfg.resample, resample_t=cfg.resample_t)
    loader = build_train_loader(data_cfg, vocab, device, precision.dtype)
    total_steps = cfg.steps or max(1, math.ceil(cfg.epochs * loader.batches_per_epoch))
    warmup_steps = min(round(cfg.warmup_epochs * loader.batches_per_epoch), total_steps // 2)
    peak_lr = cfg.lr if cfg.lr is not None else scaled_lr(cfg.batch_size)
    optimizer = build_optimizer(model, peak_lr, cfg.momentum, cfg.weight_decay)
    # In place: the loss writes its gradient into the logits' buffer (they are not used after the loss)
    loss_fn = HashtagCrossEntropy(backend=cfg.loss_backend, inplace=True)

    step = 0
    if cfg.resume:
        state = load_checkpoint(cfg.resume, vocab.content_hash)
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        loader.load_state_dict(state["data"])
        step = state["step"]

    def checkpoint() -> None:
        save_checkpoint(output / "checkpoint.pt", {
            "arch": cfg.arch, "state_dict": model.state_dict(), "optimizer": optimizer.state_dict(),
            "epoch": loader.epoch, "step": step, "data": loader.state_dict(), "args": cfg.to_dict(),
            "vocab_hash": vocab.content_hash, "classes": [c.wnid for c in vocab.classes]})

    log = MetricsLog(output, total_steps, initial_step=step)
    logger.info(f"training {cfg.arch} ({count_parameters(model) / 1e6:.2f}M parameters) on "
          f"{len(vocab)} hashtag classes, {total_steps} steps of {cfg.batch_size} images "
          f"({loader.samples_per_epoch:.0f} images per epoch after {cfg.resample} resampling), {device}, "
          f"{precision.dtype}")
    batches, meter = iter(loader), Throughput()
    loss_sum, losses = torch.zeros((), device=device), 0
    record: dict = {}
    try:
        with StopOnSignal() as stop:
            while step < total_steps:
                set_lr(optimizer, lr_at(step, total_steps, warmup_steps, peak_lr))
                loss_sum += train_step(model, loss_fn, optimizer, next(batches), precision)
                losses += 1
                step += 1
                meter.add(cfg.batch_size)
                if step % cfg.log_interval == 0 or step == total_steps:
                    # .item() syncs with the device: only here, once per log interval, never per step
                    record = {"event": "train", "step": step, "epoch": loader.epoch, "loss": loss_sum.item() / losses,
                              "lr": optimizer.param_groups[0]["lr"], "images_per_sec": meter.read(),
                              "skipped_samples": loader.skipped}  # per reason; "unlabeled" is by design
                    log.write(record)
                    log.advance(losses, loss=record["loss"], img_s=record["images_per_sec"])
                    loss_sum.zero_()
                    losses = 0
                if cfg.checkpoint_interval and step % cfg.checkpoint_interval == 0:
                    checkpoint()
                if stop.requested:  # a whole step is done: its checkpoint resumes exactly
                    checkpoint()
                    raise Stopped(stop.requested, step, str(output / "checkpoint.pt"))
        checkpoint()
        if datasets.val is not None:
            record = {"event": "eval", "step": step, **evaluate_held_out(model, datasets, vocab, cfg, device, precision)}
            log.write(record)
    finally:
        log.close()
        loader.close()
    return record
