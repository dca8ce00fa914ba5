"""Run metrics: JSON lines appended to ``metrics.jsonl``, a progress bar, and a throughput meter."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tqdm import tqdm


class MetricsLog:
    """Appends one JSON object per line (a resumed run keeps adding to the same file) and echoes it."""

    def __init__(self, output_dir: Path, total_steps: int, initial_step: int = 0, echo: bool = True):
        output_dir.mkdir(parents=True, exist_ok=True)
        self.path = output_dir / "metrics.jsonl"
        self._file = self.path.open("a", encoding="utf-8")
        self._echo = echo
        # The bar only draws on a terminal; logs and CI get the echoed lines (the learning curve) instead.
        self._bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True,
                         disable=None, file=sys.stderr)

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._echo:
            self._bar.write(" ".join(f"{k}={_short(v)}" for k, v in record.items()), file=sys.stdout)

    def advance(self, steps: int, **postfix) -> None:
        self._bar.update(steps)
        if postfix:
            self._bar.set_postfix({k: _short(v) for k, v in postfix.items()}, refresh=False)

    def close(self) -> None:
        self._bar.close()
        self._file.close()


class Throughput:
    """Images per second since the last reading."""

    def __init__(self):
        self._start, self._images = time.perf_counter(), 0

    def add(self, images: int) -> None:
        self._images += images

    def read(self) -> float:
        now = time.perf_counter()
        rate = self._images / max(now - self._start, 1e-9)
        self._start, self._images = now, 0
        return rate


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ",".join(f"{k}:{v}" for k, v in value.items()) or "none"
    return str(value)
