"""A 2-process torchrun job (gloo, one thread each on the 2 cores) with one worker SIGKILLed mid-run: with
``--max-restarts`` torchrun starts the group again and ``--resume auto`` continues from the newest checkpoint to the
end; without, the job exits non-zero within ``--dist-timeout`` (the survivor's collective fails, nothing hangs).
Either way no process is left behind. When the worker dies (and which, without restarts) comes from the test's
seed."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

from trainer_runs import (
    CHECKPOINTS,
    assert_none_left,
    checkpoints_on_disk,
    children,
    end,
    temporary_files,
    train_steps,
    wait_until,
)

STEPS, INTERVAL, DIST_TIMEOUT = 12, 3, 20
ARGS = ["--steps", str(STEPS), "--checkpoint-interval", str(INTERVAL), "--resume", "auto", "--seed", "5"]
TORCHRUN = ("-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2")


def workers_by_rank(agent: int) -> dict[int, int]:
    """torchrun's worker processes, {rank: pid}, read from its children's environments (RANK, set by torchrun)."""
    ranks = {}
    for child in children(agent):
        try:
            environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        rank = next((int(v[5:]) for v in environ if v.startswith(b"RANK=")), None)
        if rank is not None:  # None: forked, not yet running the worker's program
            ranks[rank] = child
    return ranks


def newest_manifest(run: Path) -> int:
    return max((int(p.stem[5:]) for p in (run / CHECKPOINTS).glob("step-*.json")), default=0)


def test_a_killed_rank_0_is_restarted_from_the_newest_checkpoint_with_max_restarts(demo, tmp_path, rng):
    """Rank 0, the one that holds the run folder's lock and writes the checkpoints; its successor comes up last, as
    on a slower node (held stopped for 3 s while rank 1 starts), so the restarted rank 1 waits for it to join (a
    long collective timeout). This is the case where a restarted rank used to read the dead rank 0's address from
    torchrun's store, which outlives the attempts ("Gloo connectFullMesh failed ... Connection refused", a third to
    half of the tries)."""
    run = tmp_path / "run"
    process = demo.start(run, *ARGS, "--dist-timeout", "60", launcher=(*TORCHRUN, "--max-restarts", "1"))
    seen: set[int] = set()
    try:
        after = int(rng.integers(INTERVAL + 1, 2 * INTERVAL + 3))
        wait_until(lambda: max(train_steps(run), default=0) >= after and newest_manifest(run), process, timeout=240)
        first = workers_by_rank(process.pid)
        seen |= set(first.values())
        os.kill(first[0], signal.SIGKILL)
        # The new rank 0 comes up last, as on a slower node: held stopped before it gets to join.
        rank0 = wait_until(lambda: (new := workers_by_rank(process.pid).get(0)) != first[0] and new, process,
                           poll=0.01)
        os.kill(rank0, signal.SIGSTOP)
        # The first group is gone: its last logged step, and the newest checkpoint it wrote whole.
        lost_after, newest = max(train_steps(run)), newest_manifest(run)
        time.sleep(3)
        os.kill(rank0, signal.SIGCONT)
        seen |= set(workers_by_rank(process.pid).values())
        out, err = process.communicate(timeout=240)
    finally:
        end(process)
    assert process.returncode == 0, err[-3000:]
    resumes = re.findall(r"^resumed from (\S+) at step (\d+)$", out, re.MULTILINE)
    assert len(resumes) == 1, out[-3000:]  # the restarted group's rank 0
    path, resumed = resumes[0][0], int(resumes[0][1])
    assert path == str(run / CHECKPOINTS / f"step-{newest:09d}.pt") and resumed == newest, (path, resumed, newest)
    # The restart shows in the metrics: the steps after the checkpoint it resumed from are logged again.
    assert train_steps(run) == [*range(1, lost_after + 1), *range(resumed + 1, STEPS + 1)]
    final = checkpoints_on_disk(run)[STEPS]
    assert final["world_size"] == 2 and final["step"] == STEPS
    assert temporary_files(run) == []
    assert_none_left(seen)


def test_without_restarts_a_killed_worker_fails_the_job_within_the_collective_timeout(demo, tmp_path, rng):
    run = tmp_path / "run"
    process = demo.start(run, *ARGS, "--dist-timeout", str(DIST_TIMEOUT), launcher=TORCHRUN)  # no --max-restarts: 0
    try:
        after = int(rng.integers(2, 2 * INTERVAL + 1))
        wait_until(lambda: max(train_steps(run), default=0) >= after, process, timeout=240)
        workers = workers_by_rank(process.pid)
        os.kill(workers[int(rng.integers(0, 2))], signal.SIGKILL)
        # The bound: the collective timeout and the launcher's shutdown; a hang would run into it.
        process.communicate(timeout=DIST_TIMEOUT + 30)
    finally:
        end(process)
    assert process.returncode != 0
    assert_none_left(set(workers.values()))
    checkpoints_on_disk(run)  # what was saved before the kill is whole
