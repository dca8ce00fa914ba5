"""Fixtures shared by the benchmarks, timing that runs candidates side by side, the table that ends a run, the gate.

Reporting: each benchmark times our path beside its baseline in the same run and reports every comparison with the
``report`` fixture, ``report(name, ours, baseline, ratio, unit)``: a row (summarize.py's format) under
``benchmark.extra_info["fastpretrain"]``, which the table, the gate and ``bench/summarize.py`` all read. ``ratio`` is
above 1 when ours is better. The run ends with the table of every row: benchmark, ours, baseline, ratio, floor, device.

Modes: ``--short`` (or FASTPRETRAIN_BENCH_SHORT=1) runs fewer rounds and leaves out the cases marked ``full``;
``--gate`` (or FASTPRETRAIN_BENCH_GATE=1) fails the session (exit 1) with a ``GATE FAIL`` line per benchmark of
``bench/baselines.json`` whose ratio is under its floor or that did not run (one that needs CUDA may be missing where
there is none).

Without CUDA, Triton's kernels can only run in its interpreter, which must be switched on before triton
is imported (``import torchvision`` imports it): this runs before any benchmark module.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

# bench/summarize.py: the rows' format, the table and the gate (pytest puts this folder on sys.path for its conftest).
from summarize import (BASELINES, EXTRA_INFO_KEY, describe_machine, gate_failures, load_baselines, make_row, notes,
                       text_table)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROWS = pytest.StashKey[list]()  # every row reported in this session, in order
GATE = pytest.StashKey[list]()  # the gate's failure lines, once the session has finished
LOAD = pytest.StashKey[float]()  # the 1-minute load average when the session started


def pytest_addoption(parser) -> None:
    group = parser.getgroup("fastpretrain benchmarks")
    group.addoption("--short", action="store_true", default=os.environ.get("FASTPRETRAIN_BENCH_SHORT") == "1",
                    help="fewer rounds, without the cases marked full (env FASTPRETRAIN_BENCH_SHORT=1)")
    group.addoption("--gate", action="store_true", default=os.environ.get("FASTPRETRAIN_BENCH_GATE") == "1",
                    help="fail when a ratio is under its floor in bench/baselines.json (env FASTPRETRAIN_BENCH_GATE=1)")


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "full: a case left out of the short mode (--short)")
    config.stash[ROWS] = []
    config.stash[LOAD] = os.getloadavg()[0]
    if config.getoption("gate"):
        try:
            load_baselines()
        except (OSError, ValueError) as e:
            raise pytest.UsageError(f"--gate: {e}") from None


def pytest_collection_modifyitems(config, items) -> None:
    if not config.getoption("short"):
        return
    left_out = [item for item in items if item.get_closest_marker("full")]
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = [item for item in items if not item.get_closest_marker("full")]


def _cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.processor())


def machine() -> dict:
    """What the ratios depend on: the CPU and its vector ISA (ratios move between AVX2, AVX-512 and AMX), the GPU."""
    from fastpretrain.train.precision import cpu_has_native_bf16

    cuda = torch.cuda.is_available()
    return {"cpu_model": _cpu_model(), "cores": len(os.sched_getaffinity(0)),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "native_bf16": cpu_has_native_bf16(),
            "cuda_device": torch.cuda.get_device_name() if cuda else None, "torch": torch.__version__,
            "python": platform.python_version()}


def _command(config) -> str:
    return " ".join(["pytest", *config.invocation_params.args])


def pytest_benchmark_update_json(config, benchmarks, output_json) -> None:
    """What summarize.py needs beside the rows: the machine, the command, the mode and how loaded the machine was."""
    output_json["fastpretrain"] = {"machine": machine(), "command": _command(config),
                                   "mode": "short" if config.getoption("short") else "full",
                                   "load_average": {"start": round(config.stash[LOAD], 2),
                                                    "end": round(os.getloadavg()[0], 2)}}


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session) -> None:
    config = session.config
    if not config.getoption("gate") or config.option.collectonly:
        return
    config.stash[GATE] = gate_failures(config.stash[ROWS], load_baselines(), torch.cuda.is_available())
    if config.stash[GATE]:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, config) -> None:
    """The table last (after pytest-benchmark's), then the gate's verdict."""
    rows = config.stash[ROWS]
    if rows:
        floors = {name: entry["floor"] for name, entry in load_baselines().items()} if BASELINES.exists() else {}
        terminalreporter.section("fastpretrain: ours against the baseline in the same run (ratio > 1: ours is faster)")
        terminalreporter.line(f"{describe_machine(machine())}; load average {config.stash[LOAD]:.1f} at the start, "
                              f"{os.getloadavg()[0]:.1f} now")
        for line in text_table(rows, floors) + [f"{name}: {note}" for name, note in notes(rows)]:
            terminalreporter.line(line)
    if GATE in config.stash:
        failures = config.stash[GATE]
        for line in failures:
            terminalreporter.line(line, red=True, bold=True)
        if not failures:
            terminalreporter.line(f"GATE OK: every benchmark of {BASELINES.name} ran at or above its floor",
                                  green=True)


@pytest.fixture(scope="session")
def short(pytestconfig) -> bool:
    """The short mode (--short): fewer rounds."""
    return pytestconfig.getoption("short")


@pytest.fixture
def report(benchmark, pytestconfig) -> Callable[..., None]:
    """``report(name, ours, baseline, ratio, unit, device="cpu", note=None)``: one comparison, a table row.

    ``name``: ``suite/device/case/...`` (the key in baselines.json); ``ours`` and ``baseline``: medians in ``unit`` (a
    time per call, ``"ms"``, or a rate, ``"img/s"``); ``ratio``: above 1 when ours is better, the median of the rounds'
    ratios where the candidates ran interleaved; ``note``: a few words printed under the table.
    """
    rows = pytestconfig.stash[ROWS]

    def record(name: str, ours: float, baseline: float, ratio: float, unit: str, device: str = "cpu",
               note: str | None = None) -> None:
        if any(row["benchmark"] == name for row in rows):
            raise ValueError(f"{name} reported twice")
        row = make_row(name, ours, baseline, ratio, unit, device, note)
        benchmark.extra_info.setdefault(EXTRA_INFO_KEY, []).append(row)
        rows.append(row)

    return record


@pytest.fixture
def device(request) -> torch.device:
    """The device of a benchmark parametrized over ``"device"`` (indirect): CUDA cases skip where there is none. The
    CPU for benchmarks that are not parametrized."""
    name = getattr(request, "param", "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    return torch.device(name)


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
def side_by_side(device) -> Callable[..., Comparison]:
    """``side_by_side(candidates, rounds, warmup=2, settle_s=0.02)``: every candidate timed interleaved (see
    ``interleaved_samples``), as a ``Comparison``."""
    return lambda candidates, rounds, **options: Comparison(interleaved_samples(candidates, device, rounds, **options))


def interleaved_samples(candidates: Candidates, device: torch.device, rounds: int,
                        warmup: int = 2, settle_s: float = 0.02) -> dict[str, list[float]]:
    """Seconds of one call of each candidate per round (sample k of every candidate is from round k).

    On a shared machine the speed drifts, within a run as between runs (means of one benchmark differed
    by 1.5x here): candidates timed in the same round see the same load. Each timed call follows untimed
    calls of the same candidate for ``settle_s`` (at least one; none when ``settle_s`` is 0, for calls long
    enough that what came before does not matter), so that it runs as it would back to back: what the
    candidate before it leaves behind (evicted caches, freed memory the system is still reclaiming) slows the
    next few milliseconds. Measured: a 1.28 ms call took 1.9 ms right after eager cross-entropy, 2.7 ms after
    three untimed calls once, 1.28 ms after 20 ms of them. The order rotates every round, so that no candidate
    always follows the same one.
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
            if settle_s > 0:
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
