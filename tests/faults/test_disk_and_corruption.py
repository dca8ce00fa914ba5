"""A disk that fills up while a checkpoint is written, and a newest checkpoint damaged on disk: each is one clear
line, the previous checkpoint stays loadable, and ``--resume auto`` continues from it to the uninterrupted run's
final checkpoint, bit for bit. Both start from a copy of the reference run (conftest.py) as it was at a checkpoint.
The truncation length and the flipped byte come from the test's seed (FASTPRETRAIN_TEST_SEED replays them)."""

from __future__ import annotations

import json
import resource
import shutil
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from trainer_runs import (
    CHECKPOINTS,
    INTERVAL,
    REFERENCE_ARGS,
    STEPS,
    assert_same_bits,
    checkpoints_on_disk,
    one_line,
    temporary_files,
    train_steps,
)

KEPT = STEPS - 2 * INTERVAL  # the reference run's oldest checkpoint: the one a full disk must leave loadable
FULL = KEPT + INTERVAL  # the save that finds the disk full


def payload(run: Path, step: int) -> Path:
    return run / CHECKPOINTS / f"step-{step:09d}.pt"


def assert_resumes_to_the_reference(demo, reference_run, run, resumed: int, lost_after: int) -> str:
    """``--resume auto`` continues from ``resumed`` (the steps after it, up to ``lost_after``, are trained again and
    logged twice) and ends with the reference run's final checkpoint, bit for bit. Returns the run's stderr."""
    result = demo.run(run, *REFERENCE_ARGS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {payload(run, resumed)} at step {resumed}" in result.stdout
    assert train_steps(run) == [*range(1, lost_after + 1), *range(resumed + 1, STEPS + 1)]
    assert temporary_files(run) == []
    final, reference = checkpoints_on_disk(run)[STEPS], checkpoints_on_disk(reference_run)[STEPS]
    assert final["args"]["run"]["output"] == str(run)
    del final["args"], reference["args"]  # they name each run's own folder
    assert_same_bits(final, reference)
    return result.stderr


# ----------------------------------------------------------------------------------------------------
# A full disk


@dataclass
class FullDisk:
    """How a disk is full for one run: the checkpoint folder's place (None: in the run folder), what the run is
    started with, the reason its save fails with, and how room is made afterwards."""

    checkpoints: Path | None
    popen: dict
    reason: str
    make_room: Callable[[], None]


def resize(mount: Path, size: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(mount)], check=True, capture_output=True)


def file_size_limit(limit: int) -> Callable[[], None]:
    """A ``preexec_fn``: no file over ``limit`` bytes, a write past it failing with EFBIG (SIGXFSZ ignored, which
    would kill the process)."""
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.fixture
def tmpfs(tmp_path):
    """A tmpfs of its own (needs root and the right to mount: skipped otherwise), unmounted afterwards."""
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True,
                             text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


@pytest.fixture(params=["tmpfs", "file size limit"])
def full_disk(request, reference_run) -> FullDisk:
    """Room for the checkpoint of KEPT and half another, two ways: a real full disk (checkpoints/ a symlink onto a
    tmpfs, where a write fails with ENOSPC; skipped where nothing can be mounted), and a limit on the size of the
    files the run writes, which works everywhere (RLIMIT_FSIZE: a write fails with EFBIG, through the same code)."""
    size = payload(reference_run, KEPT).stat().st_size
    if request.param == "tmpfs":
        mount = request.getfixturevalue("tmpfs")
        resize(mount, size + size // 2)
        # Room again: for the 3 checkpoints kept, the one being written, and their manifests.
        return FullDisk(mount, {}, "No space left on device", lambda: resize(mount, 5 * size))
    return FullDisk(None, {"preexec_fn": file_size_limit(size // 2)}, "File too large", lambda: None)


def copy_as_of(reference_run: Path, run: Path, step: int, checkpoints: Path | None = None) -> None:
    """``run``: the reference run as it was when it had saved ``step`` (later checkpoints and metrics lines left
    out), its checkpoint folder a symlink onto ``checkpoints`` when given."""
    shutil.copytree(reference_run, run, ignore=shutil.ignore_patterns(CHECKPOINTS, "metrics.jsonl"))
    lines = (reference_run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run / "metrics.jsonl").write_text("".join(line for line in lines if json.loads(line)["step"] <= step))
    if checkpoints is not None:
        (run / CHECKPOINTS).symlink_to(checkpoints, target_is_directory=True)
    (run / CHECKPOINTS).mkdir(exist_ok=True)
    for suffix in (".pt", ".json"):
        shutil.copy(payload(reference_run, step).with_suffix(suffix), run / CHECKPOINTS)


def test_a_full_disk_while_checkpointing_is_one_line_and_resume_continues_from_the_previous_checkpoint(
        demo, reference_run, tmp_path, full_disk):
    """Resumed from KEPT onto a full disk, the run trains to FULL and fails its save there: one line naming the file
    and the reason, exit 2, and the checkpoint folder as it was (no temporary file, no part of FULL's checkpoint, KEPT
    not pruned and loadable). With room again, ``--resume auto`` continues from KEPT."""
    run = tmp_path / "run"
    copy_as_of(reference_run, run, KEPT, full_disk.checkpoints)
    result = demo.run(run, *REFERENCE_ARGS, **full_disk.popen)
    assert result.returncode == 2, result.stderr[-3000:]
    assert one_line(result.stderr) == (f"fastpretrain: error: cannot write checkpoint {payload(run, FULL)}: "
                                       f"{full_disk.reason}")
    assert sorted(p.name for p in (run / CHECKPOINTS).iterdir()) == [f"step-{KEPT:09d}.json", f"step-{KEPT:09d}.pt"]
    assert list(checkpoints_on_disk(run)) == [KEPT]
    assert train_steps(run) == list(range(1, FULL + 1))

    full_disk.make_room()
    assert_resumes_to_the_reference(demo, reference_run, run, KEPT, FULL)


# ----------------------------------------------------------------------------------------------------
# A damaged checkpoint


def damage(path, kind: str, rng) -> str:
    """Truncate ``path`` at a random length or flip a random byte; the reason ``--resume auto`` must give."""
    data = bytearray(path.read_bytes())
    at = int(rng.integers(0, len(data)))
    if kind == "truncated":
        path.write_bytes(data[:at])
        return f"{at} bytes, its manifest says {len(data)}"
    data[at] ^= int(rng.integers(1, 256))
    path.write_bytes(data)
    return "its blake2b checksum does not match its manifest: the file was changed or is corrupt"


def test_corrupted_newest_checkpoints_are_reported_and_the_newest_whole_one_resumed(demo, reference_run, tmp_path,
                                                                                    rng):
    """The reference run's two newest checkpoints damaged, one truncated and one with a byte flipped (which is which
    is drawn): each is caught by its manifest's size or checksum before it is unpickled and said in one warning on
    stderr, and the run resumes from the third (KEPT); it trains the steps after it again, to the same last step."""
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    newest = [STEPS, STEPS - INTERVAL]
    kinds = rng.permutation(["truncated", "one byte flipped"])
    reasons = [damage(payload(run, step), kind, rng) for step, kind in zip(newest, kinds)]
    stderr = assert_resumes_to_the_reference(demo, reference_run, run, KEPT, STEPS)
    assert stderr.splitlines() == [f"checkpoint {payload(run, step)} is unusable ({reason}); trying the previous one"
                                   for step, reason in zip(newest, reasons)]
