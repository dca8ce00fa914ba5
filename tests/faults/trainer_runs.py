"""What the trainer's fault tests share: tiny runs of the real CLI in subprocesses (on the demo corpus of
conftest.py's ``demo`` fixture), and the checks every fault ends with: each checkpoint on disk whole, no temporary
file, no process left behind.

A run reads the demo corpus through ``--data`` (with the demo recipe), so it has no held-out split and no final
evaluation: about 5 s of start-up and 0.25 s per step on the shared 2-core box, a 40 MB checkpoint written in 0.2 s.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from fastpretrain.formats.checkpoint import load_file

DEMO_IMAGES = 600
CHECKPOINTS = "checkpoints"
# The reference run: 16 deterministic steps, a checkpoint every 4 (8, 12 and 16 are kept). Faults in the middle of
# the same run must end with its final checkpoint, bit for bit.
STEPS, INTERVAL = 16, 4
REFERENCE_ARGS = ["--steps", str(STEPS), "--checkpoint-interval", str(INTERVAL), "--deterministic", "--seed", "5",
                  "--resume", "auto"]


@dataclass(frozen=True)
class Demo:
    """How to start a tiny training run: the environment (the shared corpus cache, one thread per process: two
    processes share two cores) and the flags that make it tiny."""

    env: dict[str, str]
    flags: list[str]

    def command(self, run: Path, *args: str, launcher: tuple[str, ...] = ()) -> list[str]:
        """``python [launcher...] -m fastpretrain train`` with the tiny flags, ``--output run`` and ``args``."""
        return [sys.executable, *launcher, "-m", "fastpretrain", "train", *self.flags, "--output", str(run), *args]

    def start(self, run: Path, *args: str, launcher: tuple[str, ...] = (), **popen) -> subprocess.Popen:
        """The run in a session of its own (so that a signal to its group reaches only it), output piped."""
        return subprocess.Popen(self.command(run, *args, launcher=launcher), env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True, **popen)

    def run(self, run: Path, *args: str, timeout: float = 180, **popen) -> subprocess.CompletedProcess:
        """The run to its end; one that is not done within ``timeout`` seconds fails the test, and is ended."""
        process = self.start(run, *args, **popen)
        try:
            out, err = process.communicate(timeout=timeout)
        finally:
            end(process)
        return subprocess.CompletedProcess(process.args, process.returncode, out, err)


# ----------------------------------------------------------------------------------------------------
# Watching a run


def wait_until(condition: Callable[[], object], process: subprocess.Popen, timeout: float = 120,
               poll: float = 0.05) -> object:
    """``condition()``'s first true value, polled while ``process`` runs; fails (with the run's stderr) if it ends
    or the time runs out, and then the run is ended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        if process.poll() is not None:
            _, err = process.communicate(timeout=30)
            pytest.fail(f"the run ended (exit {process.returncode}) before the awaited moment: {err[-2000:]}")
        time.sleep(poll)
    end(process)
    pytest.fail(f"the awaited moment did not come within {timeout} s: {process.communicate()[1][-2000:]}")


def train_steps(run: Path) -> list[int]:
    """The steps of metrics.jsonl's train lines, in the order logged (a resumed run appends)."""
    return [r["step"] for r in read_metrics(run) if r["event"] == "train"]


def read_metrics(run: Path) -> list[dict]:
    """metrics.jsonl's complete lines (a line being written while a test polls may not be whole yet)."""
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().split("\n")[:-1]] if path.exists() else []


def temporary_files(run: Path) -> list[str]:
    """AtomicFile's temporary files in the checkpoint folder (a save in flight, or one a SIGKILL interrupted)."""
    folder = run / CHECKPOINTS
    return sorted(p.name for p in folder.glob(".*.tmp")) if folder.is_dir() else []


def writing(run: Path, step: int, stale: Collection[str] = ()) -> bool:
    """Whether the payload of ``step``'s checkpoint is being written right now: a temporary file of it that is not
    one of ``stale`` (what an earlier, killed life left, until this one's checkpoint manager deletes it)."""
    return any(name.startswith(f".step-{step:09d}.pt.") and name not in stale for name in temporary_files(run))


def children(pid: int) -> set[int]:
    """The processes ``pid`` started that still exist (none once it is gone)."""
    found = set()
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for task in tasks:
        try:
            found.update(map(int, Path(f"/proc/{pid}/task/{task}/children").read_text().split()))
        except OSError:  # a thread that ended meanwhile
            continue
    return found


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (torchrun's workers sit in sessions of their own: found as children)."""
    found, todo = set(), [pid]
    while todo:
        for child in children(todo.pop()) - found:
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"  # a zombie has ended; only its exit status waits to be read


def assert_none_left(pids: set[int], grace: float = 15) -> None:
    """None of ``pids`` runs any more (a DataLoader worker may take a moment to see its parent gone)."""
    deadline = time.monotonic() + grace
    while (left := {p for p in pids if alive(p)}) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"processes left behind: {sorted(left)}"


def end(process: subprocess.Popen) -> None:
    """Teardown: SIGKILL whatever is left of a run (all of it, when a failed test left it running): its process group
    (the trainer and its loader workers, also once orphaned), and each process it started with the group it leads
    (torchrun's workers lead their own). Then its pipes are read to the end, within a bounded time."""
    started = descendants(process.pid) if process.poll() is None else set()  # a pid once reaped is not ours
    with contextlib.suppress(ProcessLookupError):  # an empty group
        os.killpg(process.pid, signal.SIGKILL)  # the run leads its group (start_new_session)
    for pid in started:
        for kill in (os.killpg, os.kill):
            with contextlib.suppress(ProcessLookupError):  # gone, or not a group's leader
                kill(pid, signal.SIGKILL)
    process.communicate(timeout=60)


# ----------------------------------------------------------------------------------------------------
# What a run leaves


def checkpoints_on_disk(run: Path) -> dict[int, dict]:
    """The checkpoints of a run, each checked: every ``step-*.pt`` under its final name is whole (it loads), and
    the ones with a manifest match the manifest's size and checksum. Returns {step: state} of those with one."""
    folder = run / CHECKPOINTS
    states = {}
    for payload in sorted(folder.glob("step-*.pt")):
        manifest = payload.with_suffix(".json")
        if manifest.exists():
            record = json.loads(manifest.read_text())
            assert record["size"] == payload.stat().st_size, payload
            states[int(record["step"])] = load_file(payload, record["blake2b"])
        else:
            load_file(payload)  # renamed into place whole, its manifest not yet written: ignored, but not half
    return states


def assert_same_bits(a, b, where: str = "state") -> None:
    """Equal structure and values; tensors equal in dtype, shape and every byte (rtol = atol = 0, -0.0 != 0.0)."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), where
        assert torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8)), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            assert_same_bits(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_bits(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def one_line(stderr: str) -> str:
    """The single line a run that failed or stopped writes to stderr."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]
