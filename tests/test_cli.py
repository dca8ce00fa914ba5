"""The command line and the config file are interfaces users script against: commands, flags, TOML keys and how
layers merge change only on purpose; every bad value is a one-line error naming its flag or key."""

import argparse
import dataclasses

import pytest

from fastpretrain.cli import build_parser
from fastpretrain.errors import UserError
from fastpretrain.train.config import RECIPES, SECTIONS, TrainConfig, resolve

TRAIN_FLAGS = {
    "--config", "--recipe",
    "--data", "--vocab", "--labels", "--val-data", "--val-labels", "--data-backend", "-j", "--workers", "--img-size",
    "--resample", "--resample-t", "--shuffle-buffer", "--max-bad-fraction", "--decode-limit-pixels",
    "--prefetch-batches", "--scale", "--ratio", "--mean", "--std", "--hw-decoder-load", "--num-classes",
    "--demo-images", "--model", "--arch", "--init", "--pretrained", "--loss-backend", "--compile", "--no-compile",
    "--sync-bn", "--no-sync-bn",
    "-b", "--batch-size", "--accum-steps", "--epochs", "--steps", "--lr", "--momentum", "--nesterov", "--no-nesterov",
    "--weight-decay", "--wd", "--sched", "--lr-halvings", "--warmup-epochs", "--max-nonfinite-steps",
    "--grad-compression", "--head-lr-scale", "--mixup", "--ema-decay",
    "--checkpoint-interval", "--checkpoint-keep", "--resume",
    "--output", "--device", "--seed", "--amp", "--no-amp", "--deterministic", "--no-deterministic", "--cuda-graphs",
    "--no-cuda-graphs", "--log-interval", "--eval-epochs", "--tensorboard", "--no-tensorboard", "--dist-timeout",
    "-h", "--help",
}


def subcommands(parser):
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def flags(*argv: str) -> dict:
    return vars(build_parser().parse_args(["train", *argv]))


def test_commands_and_train_flags_are_frozen():
    commands = subcommands(build_parser())
    assert set(commands) == {"train", "finetune", "eval", "probe", "export", "dedup", "synth", "data", "vocab", "report"}
    assert set(subcommands(commands["vocab"])) == {"build", "label"}
    assert set(subcommands(commands["data"])) == {"index"}
    for command in ("train", "finetune"):  # one config, two tasks
        assert {s for a in commands[command]._actions for s in a.option_strings} == TRAIN_FLAGS


def test_without_data_the_demo_recipe_with_data_the_defaults_and_flags_win():
    demo = resolve(flags("--amp"))
    assert (demo.recipe, demo.model.arch, demo.data.image_size, demo.run.amp, demo.data.data) == \
        ("demo", "resnext_tiny", 64, True, None)
    own = resolve(flags("--data", "x/", "--vocab", "v.json", "-b", "16"))
    assert own.recipe is None and own.optim.batch_size == 16  # a flag the user gave beats the defaults
    defaults = TrainConfig()
    assert (own.model.arch, own.data.image_size, own.optim.lr, own.optim.sched) == \
        (defaults.model.arch, defaults.data.image_size, None, "cosine")


def test_the_paper_recipe_is_a_named_layer():
    paper = resolve(flags("--data", "x/", "--vocab", "v.json", "--recipe", "wsl2018"))
    for section, values in RECIPES["wsl2018"].items():
        assert {k: getattr(getattr(paper, section), k) for k in values} == values
    assert paper.optim.nesterov and paper.optim.sched == "step" and paper.optim.batch_size == 24


def test_toml_layer_sits_between_the_recipe_and_the_flags(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('recipe = "wsl2018"\n[data]\ndata = "x/"\nvocab = "v.json"\nworkers = 3\n'
                      '[optim]\nbatch_size = 48\nlr = 1\n[run]\namp = true\n')
    cfg = resolve(flags("--config", str(config), "--workers", "5"))
    assert cfg.recipe == "wsl2018" and cfg.optim.nesterov  # the recipe named in the file
    assert cfg.optim.batch_size == 48 and cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)  # file over recipe
    assert cfg.data.workers == 5 and cfg.run.amp  # flag over file


@pytest.mark.parametrize("text, message", [
    ("[optim]\nlrr = 0.1\n", "unknown key optim.lrr"),
    ("[optimizer]\nlr = 0.1\n", "unknown key 'optimizer'"),
    ("optim = 3\n", "optim must be a table"),
    ('[optim]\nlr = "fast"\n', "optim.lr (--lr) must be float"),
    ("[optim]\nbatch_size = 2.5\n", "optim.batch_size (--batch-size) must be int"),
    ("[run]\namp = 1\n", "run.amp (--amp) must be bool"),
    ("[optim]\nlr = nan\n", "--lr (optim.lr) must be a finite number"),
    ("[optim]\nepochs = inf\n", "--epochs (optim.epochs) must be a finite number"),
    ("[data]\nscale = [0.1]\n", "unknown key data.scale"),
    ("[data]\ncrop_scale = [0.1]\n", "data.crop_scale (--scale) must be 2 numbers"),
    ("[data]\ncrop_scale = [0.1, inf]\n", "--scale (data.crop_scale) must be finite numbers"),
    ("[optim\n", "not readable TOML"),
    ('recipe = "imagenet"\n', "--recipe must be one of"),
])
def test_config_file_errors_name_the_key(tmp_path, text, message):
    config = tmp_path / "run.toml"
    config.write_text(text)
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        resolve(flags("--config", str(config)))


def test_a_missing_or_binary_config_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        resolve(flags("--config", str(tmp_path / "none.toml")))
    (tmp_path / "bin.toml").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(UserError, match="not readable TOML"):
        resolve(flags("--config", str(tmp_path / "bin.toml")))


@pytest.mark.parametrize("argv, flag", [
    (["--img-size", "0"], "--img-size"), (["--img-size", "100000"], "--img-size"), (["--steps", "-1"], "--steps"),
    (["--lr", "-0.1"], "--lr"), (["--lr", "nan"], "--lr"), (["--lr", "inf"], "--lr"), (["--momentum", "nan"], "--momentum"),
    (["--momentum", "1.5"], "--momentum"), (["--weight-decay", "inf"], "--weight-decay"), (["--epochs", "inf"], "--epochs"),
    (["--epochs", "nan"], "--epochs"), (["--warmup-epochs", "nan"], "--warmup-epochs"), (["--seed", str(2**70)], "--seed"),
    (["--seed", "-1"], "--seed"), (["-b", "1"], "BatchNorm needs two images"), (["--device", "tpu"], "--device"),
    (["--data", "x/"], "--vocab"), (["--resume", "/no/such.pt"], "--resume"), (["--arch", "resnet9000"], "--model"),
    (["--accum-steps", "0"], "--accum-steps"), (["--checkpoint-keep", "0"], "--checkpoint-keep"),
    (["--resample-t", "0"], "--resample-t"), (["--max-bad-fraction", "2"], "--max-bad-fraction"),
    (["--scale", "0.5", "0.2"], "--scale"), (["--dist-timeout", "0"], "--dist-timeout"),
    (["--val-data", "v/"], "--val-data needs --data"), (["--nesterov", "--momentum", "0"], "--nesterov"),
])
def test_config_errors_name_the_flag(argv, flag):
    with pytest.raises(UserError, match=flag):
        resolve(flags(*argv))


def test_every_field_has_a_flag_and_help():
    options = {a.dest: a for a in subcommands(build_parser())["train"]._actions}
    for section, cls in SECTIONS.items():
        for item in dataclasses.fields(cls):
            action = options[f"{section}__{item.name}"]
            assert action.help and "default:" in action.help, (section, item.name)
