"""The trainer's typed configuration: flags merged over a preset, validated once with errors naming the field."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from fastpretrain.errors import UserError

# Flags left unset take TrainConfig's defaults, which are the demo's (sized for a 2-core CPU: under 5 minutes),
# or with --data this preset, the paper's (Mahajan et al. 2018: ResNeXt-101 32x8d, 224 px, SGD with momentum
# 0.9 and weight decay 1e-4, lr 0.1 per 256 images after a linear warm-up, as in Goyal et al.).
PAPER_PRESET = dict(arch="resnext101_32x8d", image_size=224, batch_size=64, epochs=1.0, lr=None, warmup_epochs=0.1,
                    workers=8, log_interval=100)


def flag(field: str) -> str:
    """The command-line flag of a config field, for error messages."""
    return {"image_size": "--img-size", "arch": "--model"}.get(field, "--" + field.replace("_", "-"))


@dataclass
class TrainConfig:
    data: str | None = None  # training shards (folder, glob or brace pattern); None trains on the demo corpus
    vocab: str | None = None  # vocab.json; its folder's labels/ holds the label index unless --labels says otherwise
    label_dir: str | None = None
    val_data: str | None = None
    val_label_dir: str | None = None
    output: str = "runs/train"
    arch: str = "resnext_tiny"
    image_size: int = 64
    batch_size: int = 32  # per process
    epochs: float = 2.0  # ~22k images: precision@1 has plateaued; < 4 min even in float32 on AVX2-only cores
    steps: int | None = None  # overrides epochs when given
    lr: float | None = 0.2  # None: 0.1 x global batch / 256, the linear scaling rule
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.3
    amp: bool = False
    device: str = "auto"
    seed: int = 0
    workers: int = 2
    data_backend: str = "auto"
    loss_backend: str = "auto"
    resample: str = "sqrt"
    resample_t: float | None = None  # the paper's threshold t; None: the most frequent class's share
    log_interval: int = 25
    checkpoint_interval: int = 0  # steps between checkpoints; 0: only at the end
    resume: str | None = None
    demo_images: int = 6000

    def __post_init__(self) -> None:
        for name in ("image_size", "batch_size", "log_interval", "demo_images"):
            if getattr(self, name) <= 0:
                raise UserError(f"{flag(name)} must be positive, got {getattr(self, name)}")
        if self.epochs <= 0 and self.steps is None:
            raise UserError(f"--epochs must be positive, got {self.epochs}")
        if self.steps is not None and self.steps <= 0:
            raise UserError(f"--steps must be positive, got {self.steps}")
        for name in ("workers", "lr", "momentum", "weight_decay", "warmup_epochs", "checkpoint_interval", "seed"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise UserError(f"{flag(name)} must not be negative, got {value}")
        if self.resample_t is not None and self.resample_t <= 0:
            raise UserError(f"--resample-t must be positive, got {self.resample_t}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise UserError(f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        from fastpretrain.models import list_models

        if self.arch not in list_models():  # checked before any data is built, so a typo fails at once
            raise UserError(f"unknown arch {self.arch!r}; choose one of: {', '.join(list_models())}")
        if self.data is not None and self.vocab is None:
            raise UserError("--data needs --vocab (build one with `fastpretrain vocab build`)")
        if Path(self.output).exists() and not Path(self.output).is_dir():
            raise UserError(f"--output {self.output} is a file, not a folder")
        if self.resume is not None and not Path(self.resume).is_file():
            raise UserError(f"--resume: no checkpoint at {self.resume}")

    @classmethod
    def from_flags(cls, flags: dict) -> "TrainConfig":
        """Flags the user left unset (None) keep the demo's defaults without --data, the paper's preset with it."""
        known = {f.name for f in dataclasses.fields(cls)}
        merged = dict(PAPER_PRESET) if flags.get("data") is not None else {}
        merged.update({k: v for k, v in flags.items() if k in known and v is not None})
        return cls(**merged)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
