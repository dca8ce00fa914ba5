"""Hostile ``--config`` files through the command line (``fastpretrain.cli.main``, what ``python -m fastpretrain``
runs; one case in a process of its own): each is refused with exit code 2 and one line naming the key or the file,
before the run folder is made. tests/test_cli.py covers the layering on ``resolve``; these are the cases it does
not: a non-finite number in every float field, unknown and nested keys, wrong types, binary and deeply nested
files, a huge nested table."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing

import pytest

from fastpretrain.cli import main
from fastpretrain.train.config import SECTIONS, flag_of

DEEP = 100_000  # nesting levels: far past Python's recursion limit, which tomllib's parser recurses into


def float_fields() -> list[tuple[str, str, int]]:
    """(section, field, how many numbers) of every field that holds floats: a float, or a tuple of them."""
    fields = []
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for item in dataclasses.fields(cls):
            kinds = typing.get_args(hints[item.name]) or (hints[item.name],)
            if typing.get_origin(hints[item.name]) is tuple and set(kinds) == {float}:
                fields.append((section, item.name, len(kinds)))
            elif float in kinds:
                fields.append((section, item.name, 0))
    return fields


def refused(capsys, tmp_path, config: str | bytes) -> str:
    """The one stderr line of ``train --config`` on this content: exit code 2, no run folder. A ``--resume`` file
    that does not exist is the last check a run makes: a config accepted by mistake fails there, not in training."""
    path = tmp_path / "run.toml"
    if isinstance(config, bytes):
        path.write_bytes(config)
    else:
        path.write_text(config)
    code = main(["train", "--config", str(path), "--output", str(tmp_path / "run"), "--resume",
                 str(tmp_path / "none.pt")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("fastpretrain: error: "), (code, err)
    assert not (tmp_path / "run").exists()
    return err[0]


@pytest.mark.parametrize("section, name, count", float_fields(), ids=lambda v: v if isinstance(v, str) else None)
def test_a_non_finite_number_in_any_float_field_is_refused_by_name(capsys, tmp_path, py_rng, section, name, count):
    for text in ("nan", "inf", "-inf"):
        if count:  # one of the numbers, at a random place
            numbers = ["0.5"] * count
            numbers[py_rng.randrange(count)] = text
            value = f"[{', '.join(numbers)}]"
        else:
            value = text
        line = refused(capsys, tmp_path, f"[{section}]\n{name} = {value}\n")
        kind = "finite numbers" if count else "a finite number"
        assert f"{flag_of(section, name)} ({section}.{name}) must be {kind}, got " in line, line
    # A literal too large for a float is infinite too.
    if not count:
        assert "must be a finite number, got inf" in refused(capsys, tmp_path, f"[{section}]\n{name} = 1e400\n")


@pytest.mark.parametrize("config, message", [
    ("[optim]\nsteps = inf\n", "optim.steps (--steps) must be int, got inf"),
    ("[run]\nseed = nan\n", "run.seed (--seed) must be int, got nan"),
    ("[checkpoint]\nkeep_last = 2\n", "unknown key checkpoint.keep_last"),
    ("[data.augment]\nflip = true\n", "unknown key data.augment"),
    ("[optim]\nlr = 0.1\nlr2 = 0.2\n", "unknown key optim.lr2"),
    ("seed = 3\n", "unknown key 'seed' (sections: recipe, data"),
    ("[[run]]\nseed = 3\n", "run must be a table ([run]), got list"),
    ("[run]\nlog_interval = 'often'\n", "run.log_interval (--log-interval) must be int, got 'often'"),
    ('[optim]\nbatch_size = "64"\n', "optim.batch_size (--batch-size) must be int, got '64'"),
    ("[data]\nworkers = true\n", "data.workers (--workers) must be int, got True"),
    ("[data]\nvocab = { path = 'v.json' }\n", "data.vocab (--vocab) must be str, got {'path': 'v.json'}"),
    ("[run]\nseed = 1979-05-27\n", "run.seed (--seed) must be int, got datetime.date(1979, 5, 27)"),
    ("[run]\nseed = 99999999999999999999999999\n", "--seed (run.seed) must lie in [0, 9223372036854775807]"),
    ('recipe = "imagenet"\n', "got 'imagenet'"),
    ("recipe = 3\n", "--recipe must be one of demo, "),
    ("recipe = [1]\n", "--recipe must be one of demo, "),
], ids=lambda v: v.strip().replace("\n", " ")[:40] if "\n" in v else None)
def test_unknown_keys_and_wrong_types_are_refused_by_name(capsys, tmp_path, config, message):
    line = refused(capsys, tmp_path, config)
    assert message in line, line


def test_a_binary_file_is_not_readable_toml(capsys, tmp_path, rng):
    for content in (rng.bytes(4096), b"[optim]\nlr = 0.1\x00\n", "[optim]\nlr = 0.1\n".encode("utf-16")):
        line = refused(capsys, tmp_path, content)
        assert f"--config {tmp_path / 'run.toml'}: not readable TOML: " in line, (content[:20], line)


def test_a_folder_given_as_the_config_file_is_one_line(capsys, tmp_path):
    code = main(["train", "--config", str(tmp_path), "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "Is a directory" in err[0], err


@pytest.mark.parametrize("nested", [
    "[optim]\nlr = " + "[" * DEEP + "]" * DEEP + "\n",
    "[optim]\nlr = " + "{a = " * DEEP + "1" + "}" * DEEP + "\n",
], ids=["arrays", "inline tables"])
def test_a_deeply_nested_value_is_one_line(capsys, tmp_path, nested):
    assert "not readable TOML: maximum recursion depth exceeded" in refused(capsys, tmp_path, nested)


def test_a_huge_nested_table_is_refused_at_its_first_unknown_key(capsys, tmp_path):
    """A table 1000 levels deep by dotted keys, 1000 keys wide. (tomllib walks the header's depth for every key:
    100,000 keys there take 90 s to parse, 1000 take 1 s.)"""
    huge = "[data." + ".".join(["a"] * 1000) + "]\n" + "".join(f"k{i} = {i}\n" for i in range(1000))
    line = refused(capsys, tmp_path, huge)
    assert line == f"fastpretrain: error: --config {tmp_path / 'run.toml'}: unknown key data.a"


def test_a_deeply_nested_file_is_one_line_in_a_process_of_its_own(tmp_path):
    """As users run it: a fresh interpreter's stack, not pytest's."""
    config = tmp_path / "run.toml"
    config.write_text("[optim]\nlr = " + "[" * DEEP + "]" * DEEP + "\n")
    result = subprocess.run([sys.executable, "-m", "fastpretrain", "train", "--config", str(config), "--output",
                             str(tmp_path / "run")], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2
    assert result.stderr == (f"fastpretrain: error: --config {config}: not readable TOML: maximum recursion depth "
                             "exceeded\n")
    assert not (tmp_path / "run").exists()


def test_every_float_field_is_covered():
    """The non-finite test walks the config's own fields: it must find the ones the issue names, and no int."""
    found = {(s, n) for s, n, _ in float_fields()}
    assert {("optim", "lr"), ("optim", "momentum"), ("data", "mean"), ("run", "dist_timeout")} <= found
    assert not found & {("optim", "steps"), ("run", "seed"), ("optim", "batch_size")}
