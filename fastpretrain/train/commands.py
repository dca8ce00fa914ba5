"""``fastpretrain train``: flags (timm's names where timm has one), parsed into a TrainConfig, then train()."""

from __future__ import annotations

import argparse

from fastpretrain.data.decoders import BACKENDS as DATA_BACKENDS
from fastpretrain.train.config import PAPER_PRESET, TrainConfig


def _default(name: str) -> str:
    """Flags default to None so that TrainConfig alone holds the defaults; the help shows them."""
    return f"(default: {TrainConfig.__dataclass_fields__[name].default})"


def _preset_help(name: str) -> str:
    return f"(default: {TrainConfig.__dataclass_fields__[name].default} for the demo, {PAPER_PRESET[name]} with --data)"


def run_train(args: argparse.Namespace) -> int:
    from fastpretrain.train.loop import train

    result = train(TrainConfig.from_flags(vars(args)))
    if result.get("event") == "eval":
        print(f"precision@1 {result['precision@1']:.3f}  precision@5 {result['precision@5']:.3f}  "
              f"(always the most frequent class: precision@1 {result['majority_precision@1']:.3f})")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="pretrain a ResNeXt on hashtags (the demo corpus without --data)")
    data = p.add_argument_group("data")
    data.add_argument("--data", help="training shards: a folder, a glob or a brace pattern (default: demo corpus)")
    data.add_argument("--vocab", help="vocab.json from `fastpretrain vocab build`")
    data.add_argument("--labels", dest="label_dir", help="label index folder (default: labels/ beside vocab.json)")
    data.add_argument("--val-data", help="held-out shards for the final precision@k")
    data.add_argument("--val-labels", dest="val_label_dir", help="their label index folder (default: val-labels/ beside vocab.json)")
    data.add_argument("--data-backend", choices=list(DATA_BACKENDS), help=_default("data_backend"))
    data.add_argument("--resample", choices=["natural", "sqrt", "uniform"],
                      help="rebalancing of the long tail, as in the paper " + _default("resample"))
    data.add_argument("--resample-t", type=float, help="the threshold t of r(h) = max(1, phi(t / f(h))) "
                                                       "(default: the share of images of the most frequent class)")
    data.add_argument("-j", "--workers", type=int, help="data loading workers " + _preset_help("workers"))
    data.add_argument("--demo-images", type=int, help="size of the demo corpus " + _default("demo_images"))

    model = p.add_argument_group("model")
    model.add_argument("--model", "--arch", dest="arch", help="registered architecture " + _preset_help("arch"))
    model.add_argument("--img-size", dest="image_size", type=int, help="training crop " + _preset_help("image_size"))
    model.add_argument("--loss-backend", choices=["auto", "triton", "cpp", "torch"], help=_default("loss_backend"))

    opt = p.add_argument_group("optimization")
    opt.add_argument("-b", "--batch-size", type=int, help="images per process " + _preset_help("batch_size"))
    opt.add_argument("--epochs", type=float, help="passes over the resampled stream " + _preset_help("epochs"))
    opt.add_argument("--steps", type=int, help="optimizer steps (overrides --epochs)")
    opt.add_argument("--lr", type=float, help="peak learning rate (default: 0.2 for the demo, 0.1 x batch / 256 with "
                                              "--data: the linear scaling rule)")
    opt.add_argument("--momentum", type=float, help=_default("momentum"))
    opt.add_argument("--weight-decay", "--wd", dest="weight_decay", type=float, help=_default("weight_decay"))
    opt.add_argument("--warmup-epochs", type=float, help="linear warm-up " + _preset_help("warmup_epochs"))
    opt.add_argument("--amp", action="store_true", help="bf16 autocast where the hardware has native bf16")

    run = p.add_argument_group("run")
    run.add_argument("--output", help="run folder: metrics.jsonl, checkpoint.pt, config " + _default("output"))
    run.add_argument("--device", help="auto, cpu, cuda or cuda:N " + _default("device"))
    run.add_argument("--seed", type=int, help=_default("seed"))
    run.add_argument("--log-interval", type=int, help="steps between metric lines " + _preset_help("log_interval"))
    run.add_argument("--checkpoint-interval", type=int, help="steps between checkpoints, 0: only at the end " +
                     _default("checkpoint_interval"))
    run.add_argument("--resume", help="checkpoint to continue from")
    p.set_defaults(func=run_train)
