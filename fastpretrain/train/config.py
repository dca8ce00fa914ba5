"""The trainer's configuration: one typed section per component, merged from layers, validated once.

Layers, each over the one before: the defaults below (training on your own data: ResNeXt-101 32x8d, 224 px, SGD,
linear warm-up and cosine), a named recipe (``demo``, the default without data; ``wsl2018``, the paper's), a TOML
file (``--config run.toml``), the command line's flags. Every field has a flag; in a TOML file the same field is
``[section] field = value``. Unknown keys, wrong types and non-finite numbers are errors naming the key.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from fastpretrain.errors import UserError

MAX_SEED = 2**63 - 1  # seeds go into numpy's and torch's generators and into checkpoints as int64


@dataclass
class DataSection:
    data: str | None = None  # training shards (folder, glob or brace pattern); None: the demo corpus
    vocab: str | None = None  # vocab.json; its folder's labels/ holds the label index unless label_dir says otherwise
    label_dir: str | None = None
    val_data: str | None = None
    val_label_dir: str | None = None
    backend: str = "auto"
    workers: int = 8
    image_size: int = 224
    resample: str = "sqrt"
    resample_t: float | None = None  # the paper's threshold t; None: the most frequent class's share
    shuffle_buffer: int = 1024
    max_bad_fraction: float = 0.01
    decode_limit_pixels: int = 100_000_000
    prefetch_batches: int = 2
    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop's area range (timm's --scale)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # and aspect ratio range (timm's --ratio)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    hw_decoder_load: float = 0.65  # the share of JPEGs DALI gives the GPU's hardware decoder
    num_classes: int | None = None  # fine-tuning on shards with a cls member (an ImageFolder's folders say it)
    demo_images: int = 6000


@dataclass
class ModelSection:
    arch: str = "resnext101_32x8d"
    init: str | None = None  # weights to start from: ours, torchvision's or timm's (the head is fresh)
    loss_backend: str = "auto"
    compile: bool = False  # torch.compile of the model (the loss stays eager: it writes into its input)
    sync_bn: bool = False  # BatchNorm statistics over the whole world instead of each device's batch


@dataclass
class OptimSection:
    batch_size: int = 64  # per device and micro-batch
    accum_steps: int = 1  # micro-batches per optimizer step: global batch = batch_size x world size x accum_steps
    epochs: float = 1.0  # passes over the resampled stream
    steps: int | None = None  # optimizer steps; overrides epochs
    lr: float | None = None  # peak; None: 0.1 x global batch / 256 (Goyal et al.'s linear scaling rule)
    head_lr_scale: float = 1.0  # the head's (fc) learning rate as a multiple of lr
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    sched: str = "cosine"  # cosine | step (halved lr_halvings times at equally spaced steps)
    lr_halvings: int = 13
    warmup_epochs: float = 0.1
    max_nonfinite_steps: int = 10  # this many non-finite steps in a row stop the run
    mixup: float = 0.0  # alpha of mixup's Beta(alpha, alpha) (0: off): images and their targets mixed with a flip
    ema_decay: float = 0.0  # weight EMA (0: off); evaluation then uses the averaged weights
    grad_compression: str = "none"  # none | bf16: DDP's bf16 compression hook on gradient all-reduces


@dataclass
class CheckpointSection:
    interval: int = 1000  # steps between checkpoints (and one at the end); 0: only at the end
    keep: int = 3  # newest checkpoints kept
    resume: str | None = None  # a checkpoint file, or "auto": the newest valid one in the run folder, if any


@dataclass
class RunSection:
    output: str = "runs/train"
    device: str = "auto"
    seed: int = 0
    amp: bool = False  # bf16 autocast where the hardware runs bf16 natively
    deterministic: bool = False
    cuda_graphs: bool = False
    log_interval: int = 100
    eval_epochs: float = 0.0  # evaluate the held-out split every this many epochs (0: only at the end)
    tensorboard: bool = False
    dist_timeout: float = 1800.0  # seconds a collective may wait for a peer before the job fails


SECTIONS = {"data": DataSection, "model": ModelSection, "optim": OptimSection, "checkpoint": CheckpointSection,
            "run": RunSection}

# Named layers over the defaults. demo: sized for a 2-core CPU (under 5 minutes). wsl2018: Mahajan et al. 2018, sec. 2
# and 4.1: SGD with Nesterov momentum 0.9, weight decay 1e-4, 24 images per GPU, lr 0.1 per 256 images after a
# linear warm-up, halved 13 times at equally spaced steps (see the README for what is uncertain).
RECIPES: dict[str, dict[str, dict]] = {
    "demo": {"data": {"image_size": 64, "workers": 2}, "model": {"arch": "resnext_tiny"},
             "optim": {"batch_size": 32, "epochs": 2.0, "lr": 0.2, "warmup_epochs": 0.3},
             "checkpoint": {"interval": 0}, "run": {"log_interval": 25}},
    "wsl2018": {"model": {"arch": "resnext101_32x8d"},
                "optim": {"batch_size": 24, "nesterov": True, "sched": "step", "lr_halvings": 13,
                          "warmup_epochs": 0.05}},
    # Fine-tuning (see the README for where each number comes from). Every one: classes as they come (no
    # resampling), evaluated each epoch.
    "finetune-demo": {"data": {"image_size": 64, "workers": 2, "resample": "natural", "crop_scale": (0.35, 1.0)},
                      "model": {"arch": "resnext_tiny"},
                      "optim": {"batch_size": 16, "epochs": 6.0, "lr": 0.01, "head_lr_scale": 50.0,
                                "warmup_epochs": 0.3},
                      "checkpoint": {"interval": 0}, "run": {"log_interval": 10, "eval_epochs": 1.0}},
    "finetune-wsl2018": {"data": {"resample": "natural"},
                         "optim": {"batch_size": 32, "epochs": 30.0, "lr": None, "nesterov": True,
                                   "warmup_epochs": 1.0},
                         "run": {"eval_epochs": 1.0}},
    "finetune-swag": {"data": {"resample": "natural", "image_size": 384},
                      "optim": {"batch_size": 32, "epochs": 10.0, "nesterov": True, "warmup_epochs": 0.5,
                                "mixup": 0.1, "ema_decay": 0.9999, "weight_decay": 0.0},
                      "run": {"eval_epochs": 1.0}},
}
# The recipe a command takes when none is named: the demo (without data) for train, the paper's for finetune.
DEFAULT_RECIPE = {"hashtags": "demo", "classes": "finetune-wsl2018"}

CHOICES = {
    ("data", "backend"): ("auto", "dali", "torch"),
    ("data", "resample"): ("natural", "sqrt", "uniform"),
    ("model", "loss_backend"): ("auto", "triton", "cpp", "torch"),
    ("optim", "sched"): ("cosine", "step"),
    ("optim", "grad_compression"): ("none", "bf16"),
}

# The flag of each field whose flag is not "--" + its name with dashes (timm's names where timm has one).
FLAG_NAMES = {("data", "data"): "--data", ("data", "label_dir"): "--labels", ("data", "val_label_dir"): "--val-labels",
              ("data", "backend"): "--data-backend", ("data", "workers"): "--workers",
              ("data", "image_size"): "--img-size", ("data", "crop_scale"): "--scale", ("data", "crop_ratio"): "--ratio",
              ("model", "arch"): "--model", ("model", "init"): "--init", ("run", "eval_epochs"): "--eval-epochs",
              ("checkpoint", "interval"): "--checkpoint-interval", ("checkpoint", "keep"): "--checkpoint-keep",
              ("checkpoint", "resume"): "--resume"}


def flag_of(section: str, name: str) -> str:
    return FLAG_NAMES.get((section, name), "--" + name.replace("_", "-"))


def dest_of(section: str, name: str) -> str:
    """The argparse destination of a field: unique across sections."""
    return f"{section}__{name}"


@dataclass
class TrainConfig:
    task: str = "hashtags"  # hashtags (`train`) or classes (`finetune`): set by the command
    recipe: str | None = None
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    optim: OptimSection = field(default_factory=OptimSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    run: RunSection = field(default_factory=RunSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def default_label_dir(self) -> str:
        return self.data.label_dir or str(Path(self.data.vocab).parent / "labels")

    @property
    def default_val_label_dir(self) -> str | None:
        if self.data.val_data is None:
            return None
        return self.data.val_label_dir or str(Path(self.data.vocab).parent / "val-labels")


# ----------------------------------------------------------------------------------------------------
# Reading the layers


def read_toml(path: str) -> dict[str, dict]:
    """A config file as {section: {field: value}} (plus "recipe"); UserError naming the file and what is wrong."""
    try:
        with open(path, "rb") as f:
            body = tomllib.load(f)
    except FileNotFoundError:
        raise UserError(f"--config: no such file {path}") from None
    except (OSError, tomllib.TOMLDecodeError, RecursionError, UnicodeDecodeError) as e:
        raise UserError(f"--config {path}: not readable TOML: {e}") from None
    layer: dict[str, dict] = {}
    for key, value in body.items():
        if key == "recipe":
            layer["recipe"] = value
        elif key in SECTIONS and isinstance(value, dict):
            known = {f.name for f in dataclasses.fields(SECTIONS[key])}
            for name in value:
                if name not in known:
                    raise UserError(f"--config {path}: unknown key {key}.{name}")
            layer[key] = dict(value)
        elif key in SECTIONS:
            raise UserError(f"--config {path}: {key} must be a table ([{key}]), got {type(value).__name__}")
        else:
            raise UserError(f"--config {path}: unknown key {key!r} (sections: recipe, {', '.join(SECTIONS)})")
    return layer


def flags_layer(flags: dict) -> dict[str, dict]:
    """The fields the user set on the command line (argparse leaves the others None)."""
    layer: dict[str, dict] = {}
    for dest, value in flags.items():
        if value is not None and "__" in dest:
            section, name = dest.split("__", 1)
            layer.setdefault(section, {})[name] = value
    if flags.get("recipe") is not None:
        layer["recipe"] = flags["recipe"]
    return layer


def resolve(flags: dict, task: str = "hashtags") -> TrainConfig:
    """Defaults < recipe < ``--config`` file < flags, checked (UserError naming the key)."""
    file_layer = read_toml(flags["config"]) if flags.get("config") else {}
    flag_layer = flags_layer(flags)
    recipe = flag_layer.get("recipe", file_layer.get("recipe"))
    has_data = ("data" in flag_layer.get("data", {})) or ("data" in file_layer.get("data", {}))
    if recipe is None and (task == "classes" or not has_data):
        recipe = DEFAULT_RECIPE[task]
    if recipe is not None and (not isinstance(recipe, str) or recipe not in RECIPES):
        raise UserError(f"--recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")
    merged: dict[str, dict] = {section: {} for section in SECTIONS}
    for layer in (RECIPES.get(recipe, {}), file_layer, flag_layer):
        for section in SECTIONS:
            merged[section].update(layer.get(section, {}))
    sections = {name: build_section(name, values) for name, values in merged.items()}
    config = TrainConfig(task=task, recipe=recipe, **sections)
    validate(config)
    return config


def build_section(section: str, values: dict):
    cls = SECTIONS[section]
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        values[name] = _checked_type(section, name, value, hints[name])
    return cls(**values)


def _checked_type(section: str, name: str, value, hint):
    """``value`` as the field's type (an int where a float goes), or UserError naming the key."""
    if typing.get_origin(hint) is tuple:
        items = typing.get_args(hint)
        if isinstance(value, (list, tuple)) and len(value) == len(items):
            return tuple(_checked_type(section, name, v, item) for v, item in zip(value, items))
        raise UserError(f"{section}.{name} ({flag_of(section, name)}) must be {len(items)} numbers, got {value!r}")
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in allowed:
        return None
    for kind in allowed:
        if kind is bool and isinstance(value, bool):
            return value
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind is str and isinstance(value, str):
            return value
    wanted = " or ".join(k.__name__ for k in allowed if k is not type(None))
    raise UserError(f"{section}.{name} ({flag_of(section, name)}) must be {wanted}, got {value!r}")


# ----------------------------------------------------------------------------------------------------
# Checking the values


def _fail(section: str, name: str, problem: str, value) -> None:
    raise UserError(f"{flag_of(section, name)} ({section}.{name}) {problem}, got {value!r}")


def validate(config: TrainConfig) -> None:
    """Every value in range, with a one-line UserError naming the flag (and TOML key) of the first that is not."""
    for section in SECTIONS:
        values = getattr(config, section)
        for item in dataclasses.fields(values):
            value = getattr(values, item.name)
            numbers = value if isinstance(value, tuple) else (value,)
            if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
                _fail(section, item.name, "must be finite numbers" if isinstance(value, tuple) else
                      "must be a finite number", value)
            choices = CHOICES.get((section, item.name))
            if choices is not None and value not in choices:
                _fail(section, item.name, f"must be one of {', '.join(choices)}", value)
    d, m, o, c, r = config.data, config.model, config.optim, config.checkpoint, config.run
    for section, name, low, high in (
        ("data", "image_size", 16, 4096), ("data", "workers", 0, 1024), ("data", "shuffle_buffer", 0, 2**31),
        ("data", "decode_limit_pixels", 1, 2**40), ("data", "prefetch_batches", 1, 1024),
        ("data", "demo_images", 1, 10**7),
        ("optim", "accum_steps", 1, 2**20), ("optim", "lr_halvings", 0, 60), ("optim", "max_nonfinite_steps", 1, 2**31),
        ("data", "num_classes", 1, 10**7),
        ("checkpoint", "interval", 0, 2**62), ("checkpoint", "keep", 1, 10**6),
        ("run", "seed", 0, MAX_SEED), ("run", "log_interval", 1, 2**62),
    ):
        value = getattr(getattr(config, section), name)
        if value is not None and not low <= value <= high:
            _fail(section, name, f"must lie in [{low}, {high}]", value)
    if o.batch_size < 2:  # train-mode BatchNorm divides by the batch's variance: one image has none
        _fail("optim", "batch_size", "must be at least 2 (BatchNorm needs two images per device to normalize)",
              o.batch_size)
    if o.steps is not None and o.steps < 1:
        _fail("optim", "steps", "must be positive", o.steps)
    if o.epochs <= 0 and o.steps is None:
        _fail("optim", "epochs", "must be positive", o.epochs)
    for name, value in (("lr", o.lr), ("weight_decay", o.weight_decay), ("warmup_epochs", o.warmup_epochs)):
        if value is not None and value < 0:
            _fail("optim", name, "must not be negative", value)
    if not 0 <= o.momentum < 1:
        _fail("optim", "momentum", "must lie in [0, 1)", o.momentum)
    if o.nesterov and o.momentum == 0:
        _fail("optim", "nesterov", "needs a momentum above 0", o.nesterov)
    if d.resample_t is not None and d.resample_t <= 0:
        _fail("data", "resample_t", "must be positive", d.resample_t)
    if not o.head_lr_scale > 0:
        _fail("optim", "head_lr_scale", "must be positive", o.head_lr_scale)
    if o.mixup < 0:
        _fail("optim", "mixup", "must not be negative", o.mixup)
    if not 0 <= o.ema_decay < 1:
        _fail("optim", "ema_decay", "must lie in [0, 1)", o.ema_decay)
    if r.eval_epochs < 0:
        _fail("run", "eval_epochs", "must not be negative", r.eval_epochs)
    if m.init is not None and not Path(m.init).exists():
        raise UserError(f"--init: no weights file or run folder at {m.init}")
    if not 0 <= d.max_bad_fraction <= 1:
        _fail("data", "max_bad_fraction", "must lie in [0, 1]", d.max_bad_fraction)
    if not 0 < d.crop_scale[0] <= d.crop_scale[1] <= 1:
        _fail("data", "crop_scale", "needs 0 < low <= high <= 1", d.crop_scale)
    if not 0 < d.crop_ratio[0] <= d.crop_ratio[1]:
        _fail("data", "crop_ratio", "needs 0 < low <= high", d.crop_ratio)
    if min(d.std) <= 0:
        _fail("data", "std", "must be positive", d.std)
    if not 0 <= d.hw_decoder_load <= 1:
        _fail("data", "hw_decoder_load", "must lie in [0, 1]", d.hw_decoder_load)
    if r.dist_timeout <= 0:
        _fail("run", "dist_timeout", "must be positive", r.dist_timeout)
    if r.device not in ("auto", "cpu", "cuda") and not (r.device.startswith("cuda:") and r.device[5:].isdigit()):
        _fail("run", "device", "must be auto, cpu, cuda or cuda:N", r.device)
    from fastpretrain.models import list_models

    if m.arch not in list_models():  # checked before any data is built, so a typo fails at once
        _fail("model", "arch", f"must be a registered arch ({', '.join(list_models())})", m.arch)
    if config.task == "hashtags" and d.data is not None and d.vocab is None:
        raise UserError("--data needs --vocab (build one with `fastpretrain vocab build`)")
    if d.val_data is not None and d.data is None:
        raise UserError("--val-data needs --data (the demo corpus brings its own held-out split)")
    if Path(r.output).exists() and not Path(r.output).is_dir():
        raise UserError(f"--output {r.output} is a file, not a folder")
    if c.resume not in (None, "auto") and not Path(c.resume).is_file():
        raise UserError(f"--resume: no checkpoint file at {c.resume} (give a file, or `auto`)")
