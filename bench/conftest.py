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
def side_by_side(device) -> Callable[[Candidates, int], "Comparison"]:
    """``side_by_side(candidates, rounds)``: every candidate timed interleaved, as a ``Comparison``."""
    return lambda candidates, rounds: Comparison(interleaved_samples(candidates, device, rounds))


def interleaved_samples(candidates: Candidates, device: torch.device, rounds: int,
                        warmup: int = 2, settle_s: float = 0.02) -> dict[str, list[float]]:
    """Seconds of one call of each candidate per round (sample k of every candidate is from round k).

    On a shared machine the speed drifts, within a run as between runs (means of one benchmark differed
    by 1.5x here): candidates timed in the same round see the same load. Each timed call follows untimed
    calls of the same candidate for ``settle_s`` (at least one), so that it runs as it would back to
    back: what the candidate before it leaves behind (evicted caches, freed memory the system is still
    reclaiming) slows the next few milliseconds. Measured: a 1.28 ms call took 1.9 ms right after eager
    cross-entropy, 2.7 ms after three untimed calls once, 1.28 ms after 20 ms of them. The order rotates
    every round, so that no candidate always follows the same one.
    """
    runs = {name: timed(function, device) for name, function in candidates.items()}
    for run in runs.values():
        for _ in range(warmup):
            run()
    names = list(runs)
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            run = runs[name]
            settled = time.perf_counter() + settle_s
            run()
            while time.perf_counter() < settled:
                run()
            start = time.perf_counter()
            run()
            samples[name].append(time.perf_counter() - start)
    return samples


class Comparison:
    """Interleaved samples of several candidates, and the statistics to quote from them."""

    def __init__(self, samples: dict[str, list[float]]) -> None:
        self.samples = samples

    def median(self, name: str) -> float:
        """Median seconds per call of ``name``."""
        return statistics.median(self.samples[name])

    def speedup(self, ours: str, baseline: str) -> float:
        """Median over rounds of baseline time / our time in the same round.

        Each round's ratio compares calls made within the same second, so load that comes and goes
        (other jobs on the shared cores) cancels in it; the median drops the rounds a burst split.
        """
        return statistics.median(b / o for b, o in zip(self.samples[baseline], self.samples[ours], strict=True))
