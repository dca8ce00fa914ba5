"""Fixtures shared by the benchmarks: the device, fresh seeds, and timing that runs candidates side by side.

Without CUDA, Triton's kernels can only run in its interpreter, which must be switched on before triton
is imported (``import torchvision`` imports it): this runs before any benchmark module.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The device benchmarks run on: CUDA when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def seed() -> int:
    """A fresh seed per benchmark, printed so that a surprising run can be repeated."""
    value = int.from_bytes(os.urandom(4), "little")
    print(f"seed = {value}")
    return value


Candidates = dict[str, Callable[[], object]]


def synchronize(device: torch.device) -> None:
    """Waits for the device's queued work, so that a wall-clock timing covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """``function`` followed by a device synchronisation: what a benchmark should time."""

    def run() -> object:
        result = function()
        synchronize(device)
        return result

    return run


@pytest.fixture
def synchronized(device) -> Callable[[Callable[[], object]], Callable[[], object]]:
    """Wraps a function so that it waits for the device before returning (give it to ``benchmark``)."""
    return lambda function: timed(function, device)


@pytest.fixture
def side_by_side(device) -> Callable[[Candidates, int], dict[str, float]]:
    """``side_by_side(candidates, rounds)``: median seconds per call of each, timed interleaved."""
    return lambda candidates, rounds: interleaved_medians(candidates, device, rounds)


def interleaved_medians(candidates: Candidates, device: torch.device, rounds: int,
                        warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each candidate, timed in turn round after round.

    On a shared machine the speed drifts between runs (means of one benchmark differed by 1.5x here):
    interleaving exposes every candidate to the same drift, so the ratio of medians is what to trust.
    """
    runs = {name: timed(function, device) for name, function in candidates.items()}
    for run in runs.values():
        for _ in range(warmup):
            run()
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}
