"""SIGTERM and Ctrl-C to the trainer's process group (its DataLoader workers included) while it writes a checkpoint:
the save is finished, never torn; the run stops within a bounded time (the subprocess timeout: a step and a save take
under a second here) with one line on stderr; no temporary file and no process is left behind. Which checkpoint and
the moment in its write come from the test's seed (FASTPRETRAIN_TEST_SEED replays them)."""

from __future__ import annotations

import os
import signal
import time

from trainer_runs import (
    assert_none_left,
    checkpoints_on_disk,
    descendants,
    end,
    one_line,
    temporary_files,
    train_steps,
    wait_until,
    writing,
)

STEPS, INTERVAL = 40, 3
ARGS = ["--steps", str(STEPS), "--checkpoint-interval", str(INTERVAL)]
STOP_WITHIN = 60  # seconds from the signal to the exit: ample for a step and a checkpoint on a busy 2-core box


def stop_line(signum: int, step: int, run) -> str:
    return (f"fastpretrain: error: stopped by {signal.Signals(signum).name} after step {step}; "
            f"continue with --output {run} --resume auto")


def loader_workers(process) -> set[int]:
    """The trainer's DataLoader workers (``--workers 2``), checked to be in its process group: a signal to the group
    reaches them too."""
    workers = descendants(process.pid)
    assert len(workers) == 2 and {os.getpgid(w) for w in workers} == {process.pid}, workers
    return workers


def test_sigterm_to_the_process_group_during_a_checkpoint_write_lets_it_finish_and_stops_after_the_next_step(
        demo, tmp_path, rng):
    """As SLURM's scancel or ``kill -TERM -- -PGID`` stop a job: every process of the group gets SIGTERM, the loader's
    worker processes too (they leave it to the trainer). The checkpoint being written completes; the step in progress
    when the signal came is finished and saved (the stop is checked between steps), and the run exits 143."""
    run = tmp_path / "run"
    target = INTERVAL * int(rng.integers(1, 4))
    process = demo.start(run, *ARGS, "--workers", "2")
    try:
        wait_until(lambda: writing(run, target), process, poll=0.002)
        workers = loader_workers(process)
        time.sleep(float(rng.uniform(0, 0.05)))
        os.killpg(process.pid, signal.SIGTERM)
        _, err = process.communicate(timeout=STOP_WITHIN)
    finally:
        end(process)
    assert process.returncode == 128 + signal.SIGTERM, err[-3000:]
    states = checkpoints_on_disk(run)
    assert target in states and max(states) == target + 1, sorted(states)
    assert one_line(err) == stop_line(signal.SIGTERM, target + 1, run)
    assert train_steps(run) == list(range(1, target + 2))
    assert temporary_files(run) == []
    assert_none_left(workers)


def test_ctrl_c_twice_during_a_checkpoint_write_finishes_the_save_then_stops_at_once(demo, tmp_path, rng):
    """As a terminal sends Ctrl-C: SIGINT to the whole process group (the trainer and its 2 loader workers), twice,
    20 ms apart, while a checkpoint's payload is written (0.2 s). The second signal is held until the save is whole,
    then ends the run without another step: that checkpoint is the newest, and nothing else is left."""
    run = tmp_path / "run"
    target = INTERVAL * int(rng.integers(1, 4))
    process = demo.start(run, *ARGS, "--workers", "2")
    try:
        wait_until(lambda: writing(run, target), process, poll=0.002)
        workers = loader_workers(process)
        os.killpg(process.pid, signal.SIGINT)
        time.sleep(0.02)
        os.killpg(process.pid, signal.SIGINT)
        _, err = process.communicate(timeout=STOP_WITHIN)
    finally:
        end(process)
    assert process.returncode == 128 + signal.SIGINT, err[-3000:]
    assert one_line(err) == "fastpretrain: interrupted"
    states = checkpoints_on_disk(run)
    assert max(states) == target, sorted(states)
    assert train_steps(run) == list(range(1, target + 1))
    assert temporary_files(run) == []
    assert_none_left(workers)
