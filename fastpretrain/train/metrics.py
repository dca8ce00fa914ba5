"""Seeing a run: JSON lines appended to ``metrics.jsonl``, a progress bar, optional TensorBoard scalars, and the
meter of throughput, step time and the share of it spent waiting for data."""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from fastpretrain.errors import UserError


class MetricsLog:
    """Appends one JSON object per line (a resumed run keeps adding to the same file) and echoes it; also draws the
    progress bar and, with ``tensorboard``, writes each number as a TensorBoard scalar. Only rank 0's is ``enabled``."""

    def __init__(self, output_dir: Path, total_steps: int, initial_step: int = 0, enabled: bool = True,
                 tensorboard: bool = False, echo: bool = True):
        self.enabled = enabled
        self._echo = echo
        self._writer = None
        if not enabled:
            return
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
            self._writer = SummaryWriter(str(output_dir / "tensorboard"))
        output_dir.mkdir(parents=True, exist_ok=True)
        self.path = output_dir / "metrics.jsonl"
        self._file = self.path.open("a", encoding="utf-8")
        # The bar only draws on a terminal; logs and CI get the echoed lines (the learning curve) instead.
        self._bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True,
                         disable=None, file=sys.stderr)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._writer is not None:
            for name, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and name != "step":
                    self._writer.add_scalar(f"{record['event']}/{name}", value, record["step"])
            self._writer.flush()
        if self._echo:
            self._bar.write(" ".join(f"{k}={_short(v)}" for k, v in record.items()), file=sys.stdout)

    def advance(self, step: int, **postfix) -> None:
        if not self.enabled:
            return
        self._bar.update(step - self._bar.n)
        self._bar.set_postfix({k: _short(v) for k, v in postfix.items()}, refresh=False)

    def close(self) -> None:
        if not self.enabled:
            return
        self._bar.close()
        self._file.close()
        if self._writer is not None:
            self._writer.close()


class Meter:
    """Images per second, seconds per step and the share of wall time spent in ``next(loader)`` since the last
    reading. Host time only: nothing here waits for the device (on a GPU the step's work is queued, so a slow input
    pipeline shows up as time blocked in ``next``)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._reset(time.perf_counter())

    def _reset(self, now: float) -> None:
        self._start, self._images, self._steps, self._waited = now, 0, 0, 0.0

    def wait_for(self, loader):
        started = time.perf_counter()
        batch = next(loader)
        self._waited += time.perf_counter() - started
        return batch

    def step_done(self, images: int) -> None:
        self._images += images
        self._steps += 1

    def read(self) -> dict[str, float]:
        now = time.perf_counter()
        elapsed = max(now - self._start, 1e-9)
        reading = {"images_per_sec": self._images / elapsed, "step_time": elapsed / max(self._steps, 1),
                   "data_wait_share": min(self._waited / elapsed, 1.0)}
        self._reset(now)
        return reading


def peak_memory_mb(device: torch.device) -> float:
    """The most memory the run has held: allocated on the GPU, or the process's peak resident size on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ",".join(f"{k}:{v}" for k, v in value.items()) or "none"
    return str(value)
