"""torchrun worlds on this machine: 2 gloo processes stand in for a node of 2 GPUs.

(a) a 2-process run and a 1-process run accumulating the same two micro-batches per step end with the same weights
    and the same loss curve; (c) a run stopped on 2 processes resumes on 1 and finishes (that the remaining samples
    of the epoch are each read exactly once is shown sample by sample in test_data_loaders.py, at the loader level).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fastpretrain.formats.checkpoint import find_latest

QUICK = ["--demo-images", "600", "--batch-size", "6", "--img-size", "32", "--workers", "0", "--data-backend", "torch",
         "--log-interval", "1", "--seed", "5"]


@pytest.fixture(scope="module")
def env(shared_cache):
    """Each process one thread (two processes on two cores); the session's demo corpus cache."""
    return {**os.environ, "FASTPRETRAIN_CACHE": str(shared_cache), "OMP_NUM_THREADS": "1"}


def torchrun(nproc: int, *args: str, env: dict, **popen) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "fastpretrain", "train", *QUICK, *args]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def single(*args: str, env: dict) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "fastpretrain", "train", *QUICK, *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def train_losses(run) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["event"] == "train"}


def test_two_processes_equal_one_process_accumulating_their_two_batches(tmp_path, env):
    """DDP's averaged gradient of two micro-batches is the accumulated gradient of the same two micro-batches: the
    data stream deals them to slot 0 and slot 1 either way. Parameters within 1e-5 (summation order differs), loss
    curves equal within float32 rounding; BatchNorm's running statistics differ by design (DDP keeps rank 0's)."""
    two, one = tmp_path / "two", tmp_path / "one"
    run = torchrun(2, "--steps", "6", "--output", str(two), env=env)
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, err[-3000:]
    assert [line.startswith("precision@1 ") for line in out.splitlines()].count(True) == 1  # only rank 0 speaks
    result = single("--steps", "6", "--accum-steps", "2", "--output", str(one), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    (_, a), (_, b) = find_latest(two / "checkpoints"), find_latest(one / "checkpoints")
    assert a["step"] == b["step"] == 6 and a["world_size"] == 2 and b["world_size"] == 1
    for name, tensor in a["state_dict"].items():
        if "running_" not in name and "num_batches" not in name:
            torch.testing.assert_close(b["state_dict"][name], tensor, rtol=1e-5, atol=1e-5, msg=name)
    losses_two, losses_one = train_losses(two), train_losses(one)
    assert list(losses_two) == list(losses_one) == list(range(1, 7))
    for step in losses_two:
        assert losses_two[step] == pytest.approx(losses_one[step], rel=1e-5), step
    environment = json.loads((two / "env.json").read_text())
    assert environment["world_size"] == 2 and environment["collective_backend"] == "gloo"


def test_stopped_on_two_processes_resumed_on_one(tmp_path, env):
    """SIGTERM to torchrun while it trains: every rank stops after the same step, rank 0 checkpoints, and the run
    continues on one process (another world size: the epoch's rest is dealt to the new slots) to the end."""
    out_dir = tmp_path / "run"
    run = torchrun(2, "--steps", "40", "--output", str(out_dir), env=env, start_new_session=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (out_dir / "metrics.jsonl").exists():
        time.sleep(0.2)
    while time.monotonic() < deadline and len(train_losses(out_dir)) < 4:
        time.sleep(0.2)
    os.killpg(run.pid, signal.SIGTERM)  # as a scheduler stops the job: the launcher and its workers
    _, err = run.communicate(timeout=120)
    assert run.returncode != 0
    found = find_latest(out_dir / "checkpoints")
    assert found is not None, err[-3000:]
    stopped_at = found[1]["step"]
    assert 4 <= stopped_at < 40 and found[1]["world_size"] == 2
    result = single("--steps", "40", "--output", str(out_dir), "--resume", "auto", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    _, final = find_latest(out_dir / "checkpoints")
    assert final["step"] == 40 and final["world_size"] == 1
    assert f"resumed from {found[0]} at step {stopped_at}" in result.stdout
    assert sorted(train_losses(out_dir)) == list(range(1, 41))
