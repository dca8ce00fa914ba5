"""The command line is an interface users script against: its commands and flags change only on purpose."""

import argparse

import pytest

from fastpretrain.cli import build_parser
from fastpretrain.errors import UserError
from fastpretrain.train.config import PAPER_PRESET, TrainConfig

TRAIN_FLAGS = {
    "--data", "--vocab", "--labels", "--val-data", "--val-labels", "--data-backend", "--resample", "--resample-t", "-j", "--workers",
    "--demo-images", "--model", "--arch", "--img-size", "--loss-backend", "-b", "--batch-size", "--epochs",
    "--steps", "--lr", "--momentum", "--weight-decay", "--wd", "--warmup-epochs", "--amp", "--output", "--device",
    "--seed", "--log-interval", "--checkpoint-interval", "--resume", "-h", "--help",
}


def subcommands(parser):
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_commands_and_train_flags_are_frozen():
    commands = subcommands(build_parser())
    assert set(commands) == {"train", "synth", "data", "vocab"}
    assert set(subcommands(commands["vocab"])) == {"build", "label"}
    assert set(subcommands(commands["data"])) == {"index"}
    flags = {s for a in commands["train"]._actions for s in a.option_strings}
    assert flags == TRAIN_FLAGS


def test_unset_flags_take_the_demo_defaults_or_with_data_the_paper_preset():
    args = vars(build_parser().parse_args(["train", "--amp"]))
    demo = TrainConfig.from_flags(args)
    assert (demo.arch, demo.image_size, demo.amp, demo.data) == ("resnext_tiny", 64, True, None)
    args = vars(build_parser().parse_args(["train", "--data", "x/", "--vocab", "v.json", "-b", "16"]))
    paper = TrainConfig.from_flags(args)
    assert paper.batch_size == 16  # a flag the user gave beats the preset
    assert {k: getattr(paper, k) for k in PAPER_PRESET if k != "batch_size"} == \
        {k: v for k, v in PAPER_PRESET.items() if k != "batch_size"}


@pytest.mark.parametrize("flags, field", [
    (["--img-size", "0"], "--img-size"), (["--steps", "-1"], "--steps"), (["--lr", "-0.1"], "--lr"),
    (["--device", "tpu"], "--device"), (["--data", "x/"], "--vocab"), (["--resume", "/no/such.pt"], "--resume"),
])
def test_config_errors_name_the_flag(flags, field):
    with pytest.raises(UserError, match=field):
        TrainConfig.from_flags(vars(build_parser().parse_args(["train", *flags])))
