"""SIGKILL at a random step and again at a random moment of a checkpoint write: ``--resume auto`` finishes the run,
and in deterministic CPU mode it ends with an uninterrupted run's weights, optimizer state, data position and random
state, bit for bit. No file under a checkpoint's final name is ever half written. What a SIGKILL loses is the steps
since the last checkpoint: the resumed run trains them again, and metrics.jsonl holds their lines twice (with the
same losses). The kill points come from the test's seed (FASTPRETRAIN_TEST_SEED replays them)."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from trainer_runs import (
    CHECKPOINTS,
    INTERVAL,
    REFERENCE_ARGS,
    STEPS,
    Demo,
    assert_same_bits,
    checkpoints_on_disk,
    end,
    read_metrics,
    temporary_files,
    train_steps,
    wait_until,
    writing,
)


def killed(demo: Demo, run: Path, moment, delay: float = 0.0) -> tuple[str, list[int]]:
    """One life of the run (``--resume auto``), SIGKILLed ``delay`` seconds after ``moment()`` holds. Returns its
    stdout and the steps it logged."""
    before = len(train_steps(run))
    process = demo.start(run, *REFERENCE_ARGS)
    try:
        wait_until(moment, process, poll=0.002)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        out, _ = process.communicate(timeout=60)
    finally:
        end(process)
    assert process.returncode == -signal.SIGKILL, "the run ended before it was killed"
    return out, train_steps(run)[before:]


def resumed_line(run: Path, step: int) -> str:
    return f"resumed from {run / CHECKPOINTS / f'step-{step:09d}.pt'} at step {step}"


def test_sigkill_at_random_steps_and_during_a_checkpoint_write_resumes_bit_for_bit(demo, reference_run, tmp_path,
                                                                                    rng):
    run = tmp_path / "killed"
    lives = []  # (first step, last step) each life logged
    # Life 1: killed after a random step past the first checkpoint.
    after = int(rng.integers(INTERVAL + 1, 2 * INTERVAL + 1))
    _, logged = killed(demo, run, lambda: max(train_steps(run), default=0) >= after)
    assert logged == list(range(1, logged[-1] + 1)), logged
    lives.append((1, logged[-1]))
    resumed = max(checkpoints_on_disk(run))

    # Then SIGKILL inside a later checkpoint's write, at a random moment of its 0.2 s; a save left unfinished leaves
    # its temporary file behind (that is the proof the kill landed inside one), else try the next checkpoint.
    landed = False
    while not landed:
        later = list(range(resumed - resumed % INTERVAL + INTERVAL, STEPS + 1, INTERVAL))
        assert later, "no SIGKILL landed inside a checkpoint write"
        target = int(rng.choice(later[:2]))
        stale = set(temporary_files(run))  # life 1 may have been killed inside a save too: not this life's save
        out, logged = killed(demo, run, lambda step=target, stale=stale: writing(run, step, stale),
                             delay=float(rng.uniform(0, 0.05)))
        assert resumed_line(run, resumed) in out
        assert logged == list(range(resumed + 1, logged[-1] + 1)), logged
        lives.append((resumed + 1, logged[-1]))
        landed = bool(set(temporary_files(run)) - stale)
        resumed = max(checkpoints_on_disk(run))  # each payload under its final name whole, manifest or not

    # The last life finishes, and removes what the killed save left.
    result = demo.run(run, *REFERENCE_ARGS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert resumed_line(run, resumed) in result.stdout
    lives.append((resumed + 1, STEPS))
    assert temporary_files(run) == []

    final, reference = checkpoints_on_disk(run)[STEPS], checkpoints_on_disk(reference_run)[STEPS]
    del final["args"], reference["args"]  # they name each run's own folder
    assert_same_bits(final, reference)
    # Every step logged, each life from the checkpoint it resumed from: the steps a kill lost appear twice, with
    # the loss they had the first time, which is the uninterrupted run's.
    metrics = [r for r in read_metrics(run) if r["event"] == "train"]
    assert [r["step"] for r in metrics] == [s for first, last in lives for s in range(first, last + 1)]
    losses = {r["step"]: r["loss"] for r in read_metrics(reference_run) if r["event"] == "train"}
    assert [r["loss"] for r in metrics] == [losses[r["step"]] for r in metrics]
