"""Checkpoint files and the folder of step-numbered ones: plain data only, checksums computed while writing, a
damaged newest checkpoint skipped for the previous one, and failures (full disk, crafted files) as one-line errors.
References: the states as built here, hashlib over the bytes on disk, hand-listed folder contents."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import pathlib
import re
import shutil
import subprocess
import threading
import zipfile

import numpy as np
import pytest
import torch

from fastpretrain.errors import UserError
from fastpretrain.formats import checkpoint, files
from fastpretrain.formats.checkpoint import (
    FORMAT_VERSION,
    CheckpointManager,
    find_latest,
    load_file,
    save_file,
)


def mixed_state(gen: torch.Generator) -> dict:
    """Nested containers of tensors of several dtypes (NaN, -0.0 and a strided view included) and builtins."""
    floats = torch.randn(5, 7, generator=gen)
    floats[0, 0], floats[0, 1] = float("nan"), -0.0
    return {
        "state_dict": {"w": floats, "half": torch.randn(3, 4, generator=gen).half(),
                       "bf16": torch.randn(6, generator=gen).bfloat16(), "f64": torch.randn(2, generator=gen).double(),
                       "strided": torch.randn(4, 6, generator=gen).t()[::2], "scalar": torch.tensor(3.5)},
        "optimizer": {"state": {0: {"momentum_buffer": torch.randn(5, 7, generator=gen)}},
                      "param_groups": [{"lr": 0.1, "params": [0], "nesterov": False, "foreach": None}]},
        "stream": [torch.randint(0, 2**62, (9,), generator=gen), torch.randint(0, 255, (4,), generator=gen,
                   dtype=torch.uint8), torch.rand(5, generator=gen) > 0.5, torch.empty(0, 3)],
        "rng": (7, (1, 2, 3), None), "arch": "resnext_tiny", "epoch": 2,
    }


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


def moved(value, device: str):
    """``value`` with every tensor copied to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device, copy=True)
    if isinstance(value, dict):
        return {key: moved(item, device) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(moved(item, device) for item in value)
    return value


def assert_same(loaded, expected, where="state"):
    """Equal types and structure; tensors equal in dtype, shape and every bit."""
    assert type(loaded) is type(expected), where
    if isinstance(expected, torch.Tensor):
        assert (loaded.dtype, loaded.shape, loaded.device.type) == (expected.dtype, expected.shape, "cpu"), where
        assert loaded.contiguous().view(-1).view(torch.uint8).tolist() == \
            expected.contiguous().view(-1).view(torch.uint8).tolist(), where
    elif isinstance(expected, dict):
        assert list(loaded) == list(expected), where
        for key in expected:
            assert_same(loaded[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(loaded) == len(expected), where
        for i, (a, b) in enumerate(zip(loaded, expected, strict=True)):
            assert_same(a, b, f"{where}[{i}]")
    else:
        assert loaded == expected, where


def blake2b(path: pathlib.Path) -> str:
    return hashlib.blake2b(path.read_bytes(), digest_size=32).hexdigest()


def names(folder: pathlib.Path) -> list[str]:
    return sorted(os.listdir(folder))


@pytest.mark.parametrize("device", DEVICES)
def test_round_trip_is_bitwise_and_the_digest_is_of_the_bytes_on_disk(tmp_path, gen, device):
    state = mixed_state(gen)
    path = tmp_path / "a.pt"
    digest = save_file(path, moved(state, device))
    assert digest == blake2b(path)
    assert_same(load_file(path, digest), state)
    assert names(tmp_path) == ["a.pt"]


def test_manager_writes_a_manifest_that_describes_the_payload(tmp_path, gen):
    manager = CheckpointManager(tmp_path / "checkpoints")
    state = mixed_state(gen)
    manager.save(12, state)
    payload = tmp_path / "checkpoints" / "step-000000012.pt"
    manifest = json.loads(payload.with_suffix(".json").read_text())
    assert manifest == {"format_version": FORMAT_VERSION, "step": 12, "file": "step-000000012.pt",
                        "size": payload.stat().st_size, "blake2b": blake2b(payload)}
    found, loaded = manager.latest()
    assert found == payload
    assert_same(loaded, state)


def test_a_module_state_dict_keeps_its_metadata(tmp_path, gen):
    module = torch.nn.BatchNorm1d(4)
    module.running_mean.copy_(torch.randn(4, generator=gen))
    manager = CheckpointManager(tmp_path, background=True)
    manager.save(1, {"state_dict": module.state_dict()})
    manager.wait()
    loaded = manager.latest()[1]["state_dict"]
    assert loaded._metadata == module.state_dict()._metadata  # BatchNorm's version, which load_state_dict reads
    fresh = torch.nn.BatchNorm1d(4)
    fresh.load_state_dict(loaded)
    assert torch.equal(fresh.running_mean, module.running_mean)


@pytest.mark.parametrize("value, where, kind", [
    ({"a": {"b": [1, np.zeros(3)]}}, "state['a']['b'][1]", "numpy.ndarray"),
    ({"lr": np.float64(0.1)}, "state['lr']", "numpy.float64"),  # a float subclass: would pickle as numpy's
    ({"shape": torch.Size([2])}, "state['shape']", "torch.Size"),
    ({"k": {(1, 2): 3}}, "state['k']", "key of type tuple"),
])
def test_a_value_that_is_not_plain_data_is_refused_before_writing(tmp_path, value, where, kind):
    for save in (lambda: save_file(tmp_path / "a.pt", value), lambda: CheckpointManager(tmp_path / "c").save(1, value),
                 lambda: CheckpointManager(tmp_path / "b", background=True).save(1, value)):
        with pytest.raises(TypeError, match=re.escape(f"checkpoint {where}") + ".*" + kind):
            save()
    assert names(tmp_path) == ["b", "c"] and names(tmp_path / "b") == names(tmp_path / "c") == []


def save_steps(manager: CheckpointManager, steps, gen) -> dict[int, dict]:
    states = {}
    for step in steps:
        states[step] = {"step": step, "w": torch.randn(64 * 1024, generator=gen)}  # the payload's middle is data
        manager.save(step, states[step])
    return states


def flip_middle_byte(payload: pathlib.Path) -> None:
    data = bytearray(payload.read_bytes())
    data[len(data) // 2] ^= 0x10
    payload.write_bytes(bytes(data))


def truncate(payload: pathlib.Path) -> None:
    payload.write_bytes(payload.read_bytes()[:-100])


def garble_manifest(payload: pathlib.Path) -> None:
    payload.with_suffix(".json").write_text('{"format_version": 2, "st')


@pytest.mark.parametrize("damage, reason", [(flip_middle_byte, "checksum does not match"),
                                            (truncate, "bytes, its manifest says"),
                                            (garble_manifest, "manifest cannot be read")])
def test_a_damaged_newest_checkpoint_is_skipped_with_a_warning(tmp_path, gen, caplog, damage, reason):
    manager = CheckpointManager(tmp_path)
    states = save_steps(manager, [1, 2, 3], gen)
    newest = tmp_path / "step-000000003.pt"
    damage(newest)
    with caplog.at_level(logging.WARNING, logger="fastpretrain"):
        found, loaded = manager.latest()
    assert found == tmp_path / "step-000000002.pt"
    assert_same(loaded, states[2])
    warnings = [r.getMessage() for r in caplog.records if r.name.startswith("fastpretrain")]
    assert len(warnings) == 1 and f"checkpoint {newest} is unusable" in warnings[0], warnings
    assert reason in warnings[0] and "trying the previous one" in warnings[0] and "\n" not in warnings[0]


def test_a_flipped_byte_in_the_tensor_data_is_caught_only_by_the_checksum(tmp_path, gen):
    manager = CheckpointManager(tmp_path)
    states = save_steps(manager, [1], gen)
    payload = tmp_path / "step-000000001.pt"
    flip_middle_byte(payload)
    assert not torch.equal(load_file(payload)["w"], states[1]["w"])  # torch's reader does not notice
    manifest = json.loads(payload.with_suffix(".json").read_text())
    with pytest.raises(UserError, match="checksum does not match"):
        load_file(payload, manifest["blake2b"])
    assert manager.latest() is None


def test_a_checkpoint_without_its_manifest_does_not_exist(tmp_path, gen, caplog):
    manager = CheckpointManager(tmp_path)
    states = save_steps(manager, [1, 2, 3], gen)
    (tmp_path / "step-000000003.json").unlink()
    assert manager.steps() == [1, 2]
    with caplog.at_level(logging.WARNING, logger="fastpretrain"):
        found, loaded = find_latest(tmp_path)
    assert found == tmp_path / "step-000000002.pt" and caplog.records == []
    assert_same(loaded, states[2])


def test_only_the_newest_keep_checkpoints_stay(tmp_path, gen):
    manager = CheckpointManager(tmp_path, keep=3)
    save_steps(manager, range(1, 6), gen)
    assert names(tmp_path) == ["step-000000003.json", "step-000000003.pt", "step-000000004.json",
                               "step-000000004.pt", "step-000000005.json", "step-000000005.pt"]
    assert manager.steps() == [3, 4, 5]


def test_a_save_replaces_later_steps_and_payloads_without_manifest(tmp_path, gen):
    """A run resumed from step 3 whose earlier life got to step 5 (and died writing step 6)."""
    manager = CheckpointManager(tmp_path, keep=3)
    save_steps(manager, [3, 4, 5], gen)
    (tmp_path / "step-000000006.pt").write_bytes(b"half a payload")
    states = save_steps(manager, [4], gen)
    assert names(tmp_path) == ["step-000000003.json", "step-000000003.pt", "step-000000004.json",
                               "step-000000004.pt"]
    assert_same(manager.latest()[1], states[4])


def test_stale_temporary_files_are_removed_on_init_and_nothing_else(tmp_path):
    stale = [".step-000000004.pt.k2j3h4.tmp", ".step-000000004.json.a8s7d6.tmp"]
    others = ["notes.txt", ".other.tmp", "step-000000009.pt", "step-x.json"]
    for name in stale + others:
        (tmp_path / name).write_bytes(b"x")
    CheckpointManager(tmp_path)
    assert names(tmp_path) == sorted(others)


def test_find_latest_reads_only(tmp_path):
    assert find_latest(tmp_path / "nothing") is None
    assert not (tmp_path / "nothing").exists()
    assert CheckpointManager(tmp_path / "empty").latest() is None


class Touches:
    """Unpickling this runs ``Path.touch(marker)``: what a crafted checkpoint would do."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def test_a_pickle_that_runs_code_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "crafted.pt"
    torch.save({"format_version": FORMAT_VERSION, "x": Touches(marker)}, path)
    with pytest.raises(UserError) as refused:
        load_file(path)
    message = str(refused.value)
    assert str(path) in message and "not plain data" in message and "not loaded" in message and "\n" not in message
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the file is armed: an unsafe loader would have made the marker
    assert marker.exists()


def write_json(path):
    path.write_text('{"state_dict": {}}')


def write_empty(path):
    path.write_bytes(b"")


def write_plain_zip(path):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("hello.txt", "hi")


def write_directory(path):
    path.mkdir()


def write_nothing(path):
    pass


def write_list(path):
    torch.save([torch.ones(2)], path)


def write_old_format(path):
    torch.save({"format_version": 1, "state_dict": {}}, path)


def write_truncated(path):
    torch.save({"format_version": FORMAT_VERSION, "w": torch.ones(1000)}, path)
    path.write_bytes(path.read_bytes()[:2000])


@pytest.mark.parametrize("write, reason", [
    (write_json, "not a checkpoint"), (write_empty, "empty"), (write_plain_zip, "corrupt"),
    (write_directory, "Is a directory"), (write_nothing, "No such file"), (write_list, "holds a list"),
    (write_old_format, "format_version is 1"), (write_truncated, "truncated"),
])
def test_a_file_that_is_not_a_checkpoint_is_one_line(tmp_path, write, reason):
    path = tmp_path / "given.pt"
    write(path)
    with pytest.raises(UserError) as refused:
        load_file(path)
    message = str(refused.value)
    assert message.startswith(f"cannot load checkpoint {path}: ") and reason in message and "\n" not in message


def test_any_truncation_or_flipped_bit_is_a_user_error_or_loads(tmp_path, gen, rng):
    path = tmp_path / "a.pt"
    save_file(path, mixed_state(gen))
    data = path.read_bytes()
    damaged = tmp_path / "damaged.pt"
    for length in rng.integers(0, len(data), 30):
        damaged.write_bytes(data[:length])
        with pytest.raises(UserError):
            load_file(damaged)
    for position, bit in zip(rng.integers(0, len(data), 100), rng.integers(0, 8, 100), strict=True):
        flipped = bytearray(data)
        flipped[position] ^= 1 << bit
        damaged.write_bytes(bytes(flipped))
        try:
            load_file(damaged)
        except UserError as e:
            assert "\n" not in str(e)


class FillsUp:
    """A file on a disk with ``room`` bytes left: the write that does not fit fails with ENOSPC."""

    def __init__(self, file, room: int) -> None:
        self.file, self.room = file, room

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)


def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, gen, monkeypatch):
    manager = CheckpointManager(tmp_path)
    states = save_steps(manager, [1], gen)

    class FullDisk(files.AtomicFile):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.file = FillsUp(self.file, room=100_000)  # the payload below is about 400 kB

    monkeypatch.setattr(files, "AtomicFile", FullDisk)  # what atomic_write opens
    with pytest.raises(UserError, match=r"cannot write checkpoint .*step-000000002\.pt: No space left on device$"):
        manager.save(2, {"w": torch.randn(100_000, generator=gen)})
    monkeypatch.undo()
    assert names(tmp_path) == ["step-000000001.json", "step-000000001.pt"]
    assert_same(manager.latest()[1], states[1])


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB tmpfs (needs root and the right to mount; skipped otherwise)."""
    folder = tmp_path / "tiny"
    folder.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], check=False,
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


@pytest.mark.parametrize("room, state", [
    (16 * 1024, {"w": torch.ones(512 * 1024)}),  # a write larger than the room left
    (0, {"step": 2}),  # bytes that wait in the file's buffer: flush() fails, and close() after it
], ids=["large", "buffered"])
def test_a_real_full_disk(tiny_disk, room, state):
    manager = CheckpointManager(tiny_disk / "checkpoints")
    manager.save(1, {"step": 1})
    free = os.statvfs(tiny_disk)
    (tiny_disk / "filler").write_bytes(b"x" * (free.f_bavail * free.f_frsize - room))
    with pytest.raises(UserError, match="No space left on device"):
        manager.save(2, state)
    assert names(tiny_disk / "checkpoints") == ["step-000000001.json", "step-000000001.pt"]
    assert manager.latest()[1] == {"step": 1}


@pytest.mark.parametrize("device", DEVICES)
def test_a_background_save_holds_the_values_from_before_save_returned(tmp_path, gen, monkeypatch, device):
    release = threading.Event()
    real_save_file = checkpoint.save_file

    def held_save_file(path, state):  # the thread writes only once the caller has changed everything
        release.wait()
        return real_save_file(path, state)

    monkeypatch.setattr(checkpoint, "save_file", held_save_file)
    manager = CheckpointManager(tmp_path, background=True)
    expected = {"w": torch.randn(100, generator=gen), "nested": [torch.randn(3, generator=gen)], "n": [1, 2]}
    state = moved(expected, device)
    manager.save(1, state)
    state["w"].add_(1)
    state["nested"][0].zero_()
    state["n"].append(3)
    release.set()
    manager.wait()
    assert_same(manager.latest()[1], expected)


def test_a_background_failure_surfaces_on_wait_and_on_the_next_save(tmp_path, monkeypatch):
    def failing_save_file(path, state):
        raise UserError(f"cannot write checkpoint {path}: No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", failing_save_file)
    manager = CheckpointManager(tmp_path, background=True)
    manager.save(1, {"step": 1})
    with pytest.raises(UserError, match="step-000000001.pt: No space left"):
        manager.wait()
    manager.wait()  # said once
    manager.save(2, {"step": 2})
    with pytest.raises(UserError, match="step-000000002.pt: No space left"):
        manager.save(3, {"step": 3})
    assert manager.steps() == []
