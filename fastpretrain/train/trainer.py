"""The Trainer: builds each component from the config, runs the steps, checkpoints and evaluates.

Components, each with one job: the ``World`` (ranks, device), the data stream (``TrainLoader``: its state is the
slots' places), the model (channels-last, optionally SyncBatchNorm, DDP, torch.compile), the loss, the optimizer
and its ``Schedule``, the ``CheckpointManager``, the ``MetricsLog``. The same code runs in one process or N:
``torchrun`` only changes the World. Everything is built and checked before the run folder is written.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import platform
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fastpretrain.data import DataConfig, build_eval_loader, build_train_loader
from fastpretrain.data.decoders import resolve_data_backend
from fastpretrain.data.loader import merge_states
from fastpretrain.errors import UserError
from fastpretrain.evaluate import mean_metrics
from fastpretrain.formats.checkpoint import CheckpointManager, find_latest, load_file
from fastpretrain.log import setup_logging
from fastpretrain.loss import HashtagCrossEntropy, label_rows, resolve_loss_backend
from fastpretrain.models import count_parameters, create_model
from fastpretrain.train.config import TrainConfig
from fastpretrain.train.metrics import MetricsLog, Meter, peak_memory_mb
from fastpretrain.train.optim import Schedule, build_optimizer, scaled_lr, set_lr
from fastpretrain.train.precision import choose_precision
from fastpretrain.train.stop import StopOnSignal, Stopped
from fastpretrain.train.tasks import Split, make_task
from fastpretrain.train.world import World, init_world

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"  # the run folder's subfolder of step-numbered checkpoints


def data_config(cfg: TrainConfig, split: Split) -> DataConfig:
    d = cfg.data
    return DataConfig(shards=split.shards, label_dir=split.label_dir, backend=d.backend, batch_size=cfg.optim.batch_size,
                      image_size=d.image_size, workers=d.workers, seed=cfg.run.seed, shuffle_buffer=d.shuffle_buffer,
                      resample=d.resample, resample_t=d.resample_t, max_bad_fraction=d.max_bad_fraction,
                      decode_limit_pixels=d.decode_limit_pixels, crop_scale=d.crop_scale, crop_ratio=d.crop_ratio,
                      mean=d.mean, std=d.std, hw_decoder_load=d.hw_decoder_load, prefetch_batches=d.prefetch_batches)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def configure_backends(cfg: TrainConfig, device: torch.device) -> None:
    """cuDNN autotuning for the fixed shapes and TF32 matmuls on GPUs; deterministic algorithms when asked."""
    if cfg.run.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what cuBLAS needs for reproducible results
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def unwrap(model: nn.Module) -> nn.Module:
    """The model itself, under torch.compile's and DDP's wrappers (its state_dict has no prefixes)."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, DistributedDataParallel) else model


class RunLock:
    """An exclusive lock on the run folder (``.lock``, held by rank 0 for the run): a second run into the same folder
    stops with a clear error instead of racing the first one's checkpoints. The kernel drops it if the holder dies."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self._file = open(folder / ".lock", "a+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "another process"
            self._file.close()
            raise UserError(f"run folder {folder} is in use by {holder}: give another --output, or wait for it")
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"process {os.getpid()} on {platform.node()}\n")
        self._file.flush()

    def release(self) -> None:
        self._file.close()


def mix_batch(images: torch.Tensor, labels: torch.Tensor, offsets: torch.Tensor, lam: float) -> tuple:
    """Mixup with the batch's reverse: image i becomes lam x_i + (1 - lam) x_(B-1-i), its target lam t_i +
    (1 - lam) t_(B-1-i), as label weights of the fused loss (each row holds both images' labels, weighted lam / k_i and
    (1 - lam) / k_j: a hashtag row's k labels share its part). ``images`` (B, 3, H, W), CSR ``labels`` (nnz,) and
    ``offsets`` (B + 1,) -> mixed images, labels (2 nnz,), offsets (B + 1,), weights (2 nnz,). No host sync."""
    mixed_images = torch.lerp(images.flip(0), images, lam)  # (B, 3, H, W), channels-last kept
    counts = offsets[1:] - offsets[:-1]  # (B,)
    partner_counts = counts.flip(0)
    mixed_offsets = torch.zeros_like(offsets)
    torch.cumsum(counts + partner_counts, 0, out=mixed_offsets[1:])
    total = 2 * labels.numel()
    rows = label_rows(mixed_offsets, total)  # (2 nnz,) the row of each mixed label
    within = torch.arange(total, device=offsets.device) - mixed_offsets[rows]  # its place in the row
    own = within < counts[rows]  # the image's own labels first, then its partner's
    partner = counts.numel() - 1 - rows
    source = torch.where(own, offsets[rows] + within, offsets[partner] + within - counts[rows])
    weights = torch.where(own, lam / counts[rows].clamp_min(1), (1 - lam) / partner_counts[rows].clamp_min(1))
    return mixed_images, labels[source], mixed_offsets, weights.float()


class StatisticsGuard:
    """BatchNorm's running statistics, rebound as views of one flat tensor, so that a step skipped as non-finite puts
    them back in one kernel, with no host synchronization: that step's forward pass has already updated them, and a
    NaN in a running average stays there for good. Made after the model is on its device (moving it re-allocates
    buffers) and before DDP and torch.compile take hold of them."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        stats = [(module, name) for module in model.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)
                 for name in ("running_mean", "running_var") if getattr(module, name, None) is not None]
        self.flat = torch.empty(sum(getattr(m, n).numel() for m, n in stats), device=device)  # (S,) float32
        offset = 0
        for module, name in stats:
            tensor = getattr(module, name)
            view = self.flat[offset: offset + tensor.numel()].view_as(tensor)
            view.copy_(tensor)
            setattr(module, name, view)  # a registered buffer's name: nn.Module keeps it a buffer
            offset += tensor.numel()
        self.saved = torch.empty_like(self.flat)

    def snapshot(self) -> None:
        self.saved.copy_(self.flat)

    def restore_if(self, flag: torch.Tensor) -> None:
        """Put the snapshot back where ``flag`` (a () 0/1 tensor) is 1."""
        self.flat.copy_(torch.where(flag.bool(), self.saved, self.flat))


class GraphedStep:
    """A micro-batch's forward, loss and backward captured once as a CUDA graph, replayed each step from static input
    buffers: one launch instead of hundreds (the paper's 24 images per GPU are launch-bound on an H200). The labels'
    buffer holds the most labels a batch can have; the loss reads only what the offsets point at. The optimizer step
    stays outside the graph (the fused SGD is one launch anyway). Warm-up runs on a side stream, as CUDA graphs
    require, with BatchNorm's statistics put back after it."""

    def __init__(self, trainer: Trainer, batch) -> None:
        table = trainer.loader.table
        capacity = int(np.diff(table.label_offsets).max()) * batch.images.shape[0]
        self.images = batch.images.clone(memory_format=torch.channels_last)
        self.labels = torch.zeros(capacity, dtype=batch.labels.dtype, device=batch.labels.device)
        self.offsets = batch.offsets.clone()
        self._fill(batch)
        trainer.optimizer.zero_grad(set_to_none=False)
        trainer.statistics.snapshot()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                trainer.forward_backward(self.images, self.labels, self.offsets, 1.0)
        torch.cuda.current_stream().wait_stream(side)
        trainer.statistics.restore_if(torch.ones((), device=trainer.device))
        trainer.optimizer.zero_grad(set_to_none=False)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss = trainer.forward_backward(self.images, self.labels, self.offsets, 1.0)

    def _fill(self, batch) -> None:
        if batch.labels.numel() > self.labels.numel():
            raise RuntimeError(f"a batch with {batch.labels.numel()} labels, more than its {self.labels.numel()} slots")
        self.images.copy_(batch.images)
        self.labels[: batch.labels.numel()].copy_(batch.labels)
        self.offsets.copy_(batch.offsets)

    def replay(self, batch) -> torch.Tensor:
        self._fill(batch)
        self.graph.replay()
        return self.loss.clone()


class Trainer:
    """One training run, built from a TrainConfig in a World (see the module docstring)."""

    def __init__(self, cfg: TrainConfig, world: World) -> None:
        self.cfg, self.world = cfg, world
        self.device = world.device
        self.output = Path(cfg.run.output)
        seed_everything(cfg.run.seed)
        configure_backends(cfg, self.device)
        self.precision = choose_precision(self.device, cfg.run.amp)
        self.task = make_task(cfg, world)
        self.vocab = self.task.vocab
        accum = cfg.optim.accum_steps
        self.num_slots = world.world_size * accum
        self.global_batch = cfg.optim.batch_size * self.num_slots
        slots = list(range(world.rank * accum, (world.rank + 1) * accum))
        self.data_backend = resolve_data_backend(cfg.data.backend, self.device)
        self.loader = build_train_loader(data_config(cfg, self.task.train), self.vocab, self.device,
                                         self.precision.dtype, slots, self.num_slots)
        # Built now, so that a held-out split without its label index fails before the first step, not after the last.
        self.val_loader = None
        if self.task.val is not None:
            self.val_loader = build_eval_loader(data_config(cfg, self.task.val), self.vocab, self.device,
                                                self.precision.dtype, world.rank, world.world_size)
        self.model = self._build_model()
        self.graphed: GraphedStep | None = None
        self.ema = None
        if cfg.optim.ema_decay > 0:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            self.ema = AveragedModel(unwrap(self.model), multi_avg_fn=get_ema_multi_avg_fn(cfg.optim.ema_decay),
                                     use_buffers=True)
        self.loss_fn = self._build_loss()
        self.optimizer = build_optimizer(unwrap(self.model), 1.0, cfg.optim.momentum, cfg.optim.weight_decay,
                                         cfg.optim.nesterov, self.device, cfg.optim.head_lr_scale)
        per_epoch = self.loader.batches_per_epoch
        self.total_steps = cfg.optim.steps or max(1, math.ceil(cfg.optim.epochs * per_epoch))
        peak = cfg.optim.lr if cfg.optim.lr is not None else scaled_lr(self.global_batch)
        self.schedule = Schedule(peak, self.total_steps, min(round(cfg.optim.warmup_epochs * per_epoch),
                                                            self.total_steps // 2),
                                 cfg.optim.sched, cfg.optim.lr_halvings)
        self.eval_every = round(cfg.run.eval_epochs * per_epoch) if self.val_loader is not None else 0
        self.step = 0
        self.nonfinite_steps = 0  # skipped steps in all
        self._nonfinite_run = 0  # in a row, up to the last one counted
        self._saved_step = None
        self._resume()
        self.lock = RunLock(self.output) if world.is_main else None  # every check has passed: now the folder is ours
        self.checkpoints = CheckpointManager(self.output / CHECKPOINTS, cfg.checkpoint.keep,
                                             background=self.device.type == "cuda") if world.is_main else None
        self.metrics = MetricsLog(self.output, self.total_steps, self.step, enabled=world.is_main,
                                  tensorboard=cfg.run.tensorboard)
        if world.is_main:
            self._write_run_info()

    # ------------------------------------------------------------------------------------------------
    # Building

    def _build_model(self) -> nn.Module:
        cfg = self.cfg
        model = create_model(cfg.model.arch, len(self.vocab))
        if cfg.model.init is not None:
            from fastpretrain.weights import load_trunk, read_weights

            load_trunk(model, read_weights(cfg.model.init))  # a fresh head: its classes are this task's
            logger.info("initialized the trunk from %s", cfg.model.init)
        if cfg.model.sync_bn:
            if self.device.type != "cuda":
                raise UserError("--sync-bn needs CUDA devices (PyTorch's SyncBatchNorm has no CPU kernel)")
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        # NHWC: cuDNN's fastest layout for mixed-precision convolutions.
        model = model.to(device=self.device, memory_format=torch.channels_last)
        self.statistics = StatisticsGuard(model, self.device)
        if self.world.distributed:
            model = DistributedDataParallel(model, device_ids=[self.device] if self.device.type == "cuda" else None,
                                            gradient_as_bucket_view=True)
            if cfg.optim.grad_compression == "bf16":
                if self.world.backend != "nccl":
                    raise UserError("--grad-compression bf16 needs NCCL (GPUs): gloo has no bf16 all-reduce")
                from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

                model.register_comm_hook(None, default_hooks.bf16_compress_hook)
        if cfg.run.cuda_graphs:
            if self.device.type != "cuda":
                raise UserError("--cuda-graphs needs a CUDA device")
            if self.world.distributed or cfg.optim.accum_steps > 1 or cfg.model.compile:
                raise UserError("--cuda-graphs runs one process without --accum-steps or --compile (for now)")
        if cfg.model.compile:
            model = torch.compile(model)
        return model

    def _build_loss(self) -> HashtagCrossEntropy:
        probe = torch.zeros(1, 1, device=self.device, dtype=self.precision.dtype)
        try:
            resolve_loss_backend(self.cfg.model.loss_backend, probe)
        except ValueError as e:
            raise UserError(f"--loss-backend {self.cfg.model.loss_backend}: {e}") from None
        # In place: the loss writes its gradient into the logits' buffer (they are not used after the loss).
        return HashtagCrossEntropy(backend=self.cfg.model.loss_backend, inplace=True)

    def _write_run_info(self) -> None:
        """The resolved config and the environment, so a run folder says how it was made."""
        self.output.mkdir(parents=True, exist_ok=True)
        (self.output / "config.json").write_text(json.dumps(self.cfg.to_dict(), indent=2) + "\n")
        cuda = self.device.type == "cuda"
        env = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
               "device": str(self.device), "cuda_device": torch.cuda.get_device_name(self.device) if cuda else None,
               "cpu_capability": torch.backends.cpu.get_cpu_capability(), "world_size": self.world.world_size,
               "collective_backend": self.world.backend, "data_backend": self.data_backend,
               "loss_backend": resolve_loss_backend(self.cfg.model.loss_backend, torch.zeros(
                   1, 1, device=self.device, dtype=self.precision.dtype)).name,
               "dtype": str(self.precision.dtype), "global_batch": self.global_batch,
               "host": platform.node()}
        (self.output / "env.json").write_text(json.dumps(env, indent=2) + "\n")

    # ------------------------------------------------------------------------------------------------
    # State

    def state_dict(self) -> dict:
        """Everything a resume needs, as plain tensors and builtins, in timm's keys where timm has one. A collective:
        every process calls it (the data stream's state is gathered from all of them)."""
        data = merge_states(self.world.gather(self.loader.state_dict()))
        return {"arch": self.cfg.model.arch, "num_classes": len(self.vocab),
                "state_dict": unwrap(self.model).state_dict(), "optimizer": self.optimizer.state_dict(),
                "epoch": self.loader.epoch, "step": self.step, "data": data, "args": self.cfg.to_dict(),
                "vocab_hash": self.vocab.content_hash, "classes": self.vocab.wnids,
                "nonfinite_steps": self.nonfinite_steps, "world_size": self.world.world_size,
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "rng": {"torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}}

    def load_state_dict(self, state: dict, source: str) -> None:
        """Continue from ``state``; a checkpoint of another arch, class count or vocabulary is refused in one line."""
        for key, mine, what in (("arch", self.cfg.model.arch, "arch"), ("num_classes", len(self.vocab), "class count"),
                                ("vocab_hash", self.vocab.content_hash, "vocabulary")):
            if key not in state:
                raise UserError(f"{source} has no {key!r}: not a fastpretrain training checkpoint")
            if state[key] != mine:
                raise UserError(f"{source} was trained with another {what} ({state[key]!r}; this run: {mine!r})")
        try:
            unwrap(self.model).load_state_dict(state["state_dict"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.loader.load_state_dict(state["data"])
            if self.ema is not None and state.get("ema") is not None:
                self.ema.load_state_dict(state["ema"])
            self.step = int(state["step"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"{source} does not fit this run: {reason[:300]}") from None
        self.nonfinite_steps = int(state.get("nonfinite_steps", 0))
        torch.set_rng_state(state["rng"]["torch"])
        if self.device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)

    def _resume(self) -> None:
        resume = self.cfg.checkpoint.resume
        if resume is None:
            return
        found = None
        if resume == "auto":  # rank 0 picks the checkpoint (on a shared file system), every rank loads that one
            folder = self.output / CHECKPOINTS
            found = find_latest(folder) if self.world.is_main else None
            path = self.world.gather(str(found[0]) if found else None)[0]
            if path is None:
                if any(folder.glob("step-*")):  # starting afresh would prune them: never without being told
                    raise UserError(f"--resume auto: no checkpoint in {folder} is usable (each is reported above); "
                                    "move them away to start from step 0, or give --resume FILE")
                logger.info("--resume auto: no checkpoint in %s yet, starting from step 0", folder)
                return
        else:
            path = resume
        self.load_state_dict(found[1] if found else load_file(Path(path)), str(path))
        logger.info("resumed from %s at step %d", path, self.step)

    def save_checkpoint(self, stop: StopOnSignal) -> None:
        """The checkpoint of this step (once: a step saved by the interval is not saved again at the end)."""
        if self._saved_step == self.step:
            return
        state = self.state_dict()
        if self.checkpoints is not None:
            with stop.deferred():  # a second signal waits until the file is whole
                self.checkpoints.save(self.step, state)
        self._saved_step = self.step

    # ------------------------------------------------------------------------------------------------
    # The step

    def _no_sync(self, skip: bool) -> contextlib.AbstractContextManager:
        """DDP's gradient all-reduce only on the last micro-batch of a step."""
        ddp = self.model if isinstance(self.model, DistributedDataParallel) else getattr(self.model, "_orig_mod", None)
        return ddp.no_sync() if skip and isinstance(ddp, DistributedDataParallel) else contextlib.nullcontext()

    def train_step(self, meter: Meter) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over ``accum_steps`` micro-batches; (mean loss, 1 if the step was skipped as
        non-finite), both on the device, read by nobody until the next log line."""
        micro = self.cfg.optim.accum_steps
        set_lr(self.optimizer, self.schedule(self.step))
        self.statistics.snapshot()
        loss_sum = torch.zeros((), device=self.device)
        for i in range(micro):
            batch = meter.wait_for(self.loader)
            if self.cfg.run.cuda_graphs:
                self.graphed = self.graphed or GraphedStep(self, batch)
                loss_sum += self.graphed.replay(batch)
                continue
            images, labels, offsets, weights = self._mixed(batch, i)
            with self._no_sync(i < micro - 1):
                loss_sum += self.forward_backward(images, labels, offsets, 1 / micro, weights)
        skipped = self._optimizer_step()
        if self.ema is not None:
            self.ema.update_parameters(unwrap(self.model))
        # The graph's gradients are static tensors: zeroed, not freed.
        self.optimizer.zero_grad(set_to_none=not self.cfg.run.cuda_graphs)
        return loss_sum / micro, skipped

    def forward_backward(self, images: torch.Tensor, labels: torch.Tensor, offsets: torch.Tensor,
                         scale: float, weights: torch.Tensor | None = None) -> torch.Tensor:
        """One micro-batch's forward, loss and backward (its gradient scaled by ``scale``); the loss, detached."""
        with self.precision.autocast():
            logits = self.model(images)  # (B, C)
        loss = self.loss_fn(logits, labels, offsets, weights)  # float32 whatever the logits' dtype
        (loss * scale if scale != 1 else loss).backward()
        return loss.detach()

    def _mixed(self, batch, micro: int) -> tuple:
        """(images, labels, offsets, weights) of the micro-batch, mixed up when ``--mixup`` is on (``mix_batch``), with
        lam ~ Beta(alpha, alpha) drawn from (seed, step, micro-batch): a resumed run mixes as the uninterrupted one."""
        alpha = self.cfg.optim.mixup
        if alpha == 0:
            return batch.images, batch.labels, batch.offsets, None
        rng = np.random.default_rng([self.cfg.run.seed, self.step, micro, 0x6D6978])  # "mix"
        return mix_batch(batch.images, batch.labels, batch.offsets, float(rng.beta(alpha, alpha)))

    def _optimizer_step(self) -> torch.Tensor:
        """The update, unless a gradient is not finite (after the all-reduce, so every rank agrees): then the step is
        skipped, BatchNorm's statistics put back. On CUDA the fused SGD skips it on the device (no host
        synchronization); on a CPU reading the flag costs nothing."""
        grads = [p.grad for p in self.optimizer.param_groups[0]["params"] + self.optimizer.param_groups[1]["params"]
                 if p.grad is not None]
        nonfinite = (~torch.isfinite(torch.nn.utils.get_total_norm(grads))).float()  # () 0 or 1
        self.statistics.restore_if(nonfinite)
        if self.device.type == "cuda":
            self._zero_momentum_on_first_step()
            self.optimizer.found_inf = nonfinite
            self.optimizer.step()
            del self.optimizer.found_inf
        elif not nonfinite.item():
            self.optimizer.step()
        return nonfinite

    def _zero_momentum_on_first_step(self) -> None:
        # Fused SGD starts each momentum buffer from the first gradient, unless that step is skipped: then the buffer
        # stays uninitialized memory. A zero buffer gives the same first step (0.9 x 0 + g = g) and nothing to skip.
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                state = self.optimizer.state[p]
                if "momentum_buffer" not in state and group["momentum"] != 0:
                    state["momentum_buffer"] = torch.zeros_like(p)

    # ------------------------------------------------------------------------------------------------
    # The loop

    def train(self) -> dict:
        """Run to ``total_steps``; return the final evaluation (or the last training record without held-out data)."""
        cfg, world = self.cfg, self.world
        logger.info(f"training {cfg.model.arch} ({count_parameters(unwrap(self.model)) / 1e6:.2f}M parameters) on "
                    f"{len(self.vocab)} {'hashtag ' if self.task.kind == 'hashtags' else ''}classes: {self.total_steps} steps of {self.global_batch} images "
                    f"({cfg.optim.batch_size} x {world.world_size} processes x {cfg.optim.accum_steps} accumulation "
                    f"steps), {self.loader.samples_per_epoch:.0f} images per epoch after {cfg.data.resample} "
                    f"resampling, {self.device}, {self.precision.dtype}, {self.data_backend} data backend")
        if self.precision.notice:
            logger.info(self.precision.notice)
        meter = Meter(self.device)
        losses, flags = [], []
        record: dict = {}
        with StopOnSignal() as stop:
            while self.step < self.total_steps:
                loss, nonfinite = self.train_step(meter)
                self.step += 1
                meter.step_done(self.global_batch)
                losses.append(loss)
                flags.append(nonfinite)
                log_now = self.step % cfg.run.log_interval == 0 or self.step == self.total_steps
                # Reading the flags reads the device: on a GPU only when a line is logged, on a CPU it is free.
                if log_now or self.device.type == "cpu":
                    too_many = self._count_nonfinite(flags)
                    flags = []
                    if too_many:
                        self.save_checkpoint(stop)
                        self._finish_saves()
                        raise UserError(f"{cfg.optim.max_nonfinite_steps} steps in a row had a non-finite loss or "
                                        f"gradient (each skipped), up to step {self.step}: lower --lr or check the "
                                        "data; the checkpoint holds the last finite weights")
                if log_now:
                    record = self._log(losses, meter)
                    losses = []
                if self.eval_every and self.step % self.eval_every == 0 and self.step < self.total_steps:
                    self.metrics.write({"event": "eval", "step": self.step, "epoch": self.loader.epoch,
                                        **self.evaluate()})
                stopping = world.agree(stop.requested is not None) if world.distributed else stop.requested
                if (cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0) or stopping:
                    self.save_checkpoint(stop)
                if stopping:
                    self._finish_saves()
                    raise Stopped(stop.requested or 15, self.step, str(self.output))  # 15: SIGTERM, seen by a peer
            self.save_checkpoint(stop)
            self._finish_saves()
        if self.val_loader is not None:
            record = {"event": "eval", "step": self.step, "epoch": self.loader.epoch, **self.evaluate()}
            self.metrics.write(record)
        return record

    def _count_nonfinite(self, flags: list[torch.Tensor]) -> bool:
        """Add up the skipped steps; True once ``max_nonfinite_steps`` came in a row."""
        worst = 0
        for flag in torch.stack(flags).tolist():
            self.nonfinite_steps += int(flag)
            self._nonfinite_run = self._nonfinite_run + 1 if flag else 0
            worst = max(worst, self._nonfinite_run)
        return worst >= self.cfg.optim.max_nonfinite_steps

    def _log(self, losses: list[torch.Tensor], meter: Meter) -> dict:
        """A metrics line: the mean loss over every process's steps since the last line, throughput, data-wait share,
        memory, and the samples skipped by any process."""
        loss_sum, count = self.world.sum([float(torch.stack(losses).sum()), float(len(losses))])
        found = {k: v for own in self.world.gather(self.loader.skips.own) for k, v in own.items()}
        timing = meter.read()
        record = {"event": "train", "step": self.step, "epoch": self.loader.epoch, "loss": loss_sum / count,
                  "lr": self.optimizer.param_groups[0]["lr"], "images_per_sec": timing["images_per_sec"],
                  "images_per_sec_per_device": timing["images_per_sec"] / self.world.world_size,
                  "world_size": self.world.world_size, "data_wait_share": timing["data_wait_share"],
                  "step_time": timing["step_time"], "peak_memory_mb": peak_memory_mb(self.device),
                  "skipped_samples": self.loader.skips.counts(self.loader.skips.restored | found),
                  "nonfinite_steps": self.nonfinite_steps}
        self.metrics.write(record)
        self.metrics.advance(self.step, loss=record["loss"], lr=record["lr"], img_s=record["images_per_sec"],
                             img_s_dev=record["images_per_sec_per_device"])
        return record

    def _finish_saves(self) -> None:
        if self.checkpoints is not None:
            self.checkpoints.wait()

    def evaluate(self) -> dict:
        """The task's metrics on the held-out split (each process its share, summed), of the averaged weights when
        there is an EMA. The bare module: DDP's forward would broadcast buffers, and ranks' shares differ in length."""
        model = self.ema.module if self.ema is not None else unwrap(self.model)
        sums = self.task.evaluation_sums(model, self.val_loader, self.precision.autocast())
        totals = self.world.sum(list(sums.values()))  # the same names in the same order on every rank
        return mean_metrics(dict(zip(sums, totals)))

    def close(self) -> None:
        self.metrics.close()
        self.loader.close()
        if self.lock is not None:
            self.lock.release()


def train(cfg: TrainConfig) -> dict:
    """Train as configured, in the world torchrun made (or alone); return the final evaluation record (on rank 0;
    the other ranks return an empty one)."""
    world = init_world(cfg.run.device, cfg.run.dist_timeout)
    setup_logging(world.rank)
    trainer = None
    try:
        trainer = Trainer(cfg, world)
        record = trainer.train()
        return record if world.is_main else {}
    finally:
        if trainer is not None:
            trainer.close()
        world.close()
