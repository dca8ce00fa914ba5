"""``fastpretrain train`` (its flags are the config's fields, timm's names where timm has one) and ``report``."""

from __future__ import annotations

import argparse
import dataclasses
import typing

from fastpretrain.train.config import DEFAULT_RECIPE, RECIPES, SECTIONS, dest_of, flag_of, resolve

# What each field does, for --help (defaults and recipes are added from the config itself).
HELP = {
    ("data", "data"): "training shards: a folder, a glob or a brace pattern (default: the demo corpus)",
    ("data", "vocab"): "vocab.json from `fastpretrain vocab build`",
    ("data", "label_dir"): "label index folder (default: labels/ beside vocab.json)",
    ("data", "val_data"): "held-out shards for precision@k at the end",
    ("data", "val_label_dir"): "their label index folder (default: val-labels/ beside vocab.json)",
    ("data", "backend"): "decoding backend (auto: DALI when importable, else torch)",
    ("data", "workers"): "data loading workers per process (torch) or decoding threads (DALI)",
    ("data", "image_size"): "training crop side in pixels",
    ("data", "resample"): "rebalancing of the long tail, as in the paper",
    ("data", "resample_t"): "threshold t of r(h) = max(1, phi(t / f(h))) (default: the most frequent class's share)",
    ("data", "shuffle_buffer"): "a sample leaves the stream within this many places of its shard order",
    ("data", "max_bad_fraction"): "share of bad samples (corrupt, unlabeled index rows, ...) that stops the run",
    ("data", "decode_limit_pixels"): "larger images are skipped as decompression bombs",
    ("data", "prefetch_batches"): "batches prepared ahead per worker",
    ("data", "crop_scale"): "random-resized-crop area range",
    ("data", "crop_ratio"): "random-resized-crop aspect ratio range",
    ("data", "mean"): "normalization mean per channel",
    ("data", "std"): "normalization std per channel",
    ("data", "hw_decoder_load"): "DALI: share of JPEGs for the GPU's hardware decoder",
    ("data", "num_classes"): "classes of shards with a cls member (an ImageFolder's class folders say it)",
    ("data", "demo_images"): "size of the demo corpus",
    ("model", "arch"): "registered architecture",
    ("model", "init"): "start from these weights (our checkpoint or run folder, a torchvision or timm state dict, "
                       "safetensors); the head is new",
    ("model", "loss_backend"): "hashtag loss implementation (auto: triton on CUDA, cpp on CPU)",
    ("model", "compile"): "torch.compile the model (the loss stays eager)",
    ("model", "sync_bn"): "BatchNorm statistics over all devices (default: each device's batch, as the paper)",
    ("optim", "batch_size"): "images per device and micro-batch",
    ("optim", "accum_steps"): "micro-batches per step: global batch = batch size x world size x accum steps",
    ("optim", "epochs"): "passes over the resampled stream",
    ("optim", "steps"): "optimizer steps (overrides --epochs)",
    ("optim", "lr"): "peak learning rate (default: 0.1 x global batch / 256, the linear scaling rule)",
    ("optim", "momentum"): "SGD momentum",
    ("optim", "nesterov"): "Nesterov momentum",
    ("optim", "weight_decay"): "weight decay (none on BatchNorm and biases)",
    ("optim", "sched"): "after the warm-up: cosine to zero, or step (halved at equally spaced steps)",
    ("optim", "lr_halvings"): "halvings of the step schedule",
    ("optim", "warmup_epochs"): "linear warm-up",
    ("optim", "max_nonfinite_steps"): "non-finite steps in a row (skipped) that stop the run",
    ("optim", "grad_compression"): "compress gradient all-reduces (DDP's bf16 hook)",
    ("optim", "head_lr_scale"): "the head's (fc) learning rate as a multiple of --lr (fine-tuning: a fresh head)",
    ("optim", "mixup"): "mixup's alpha: images and targets mixed with the batch's reverse (0: off)",
    ("optim", "ema_decay"): "keep an exponential moving average of the weights and evaluate it (0: off)",
    ("checkpoint", "interval"): "steps between checkpoints, 0: only at the end",
    ("checkpoint", "keep"): "newest checkpoints kept",
    ("checkpoint", "resume"): "continue from a checkpoint file, or `auto`: the newest valid one in --output",
    ("run", "output"): "run folder: metrics.jsonl, checkpoints/, config.json, env.json",
    ("run", "device"): "auto, cpu, cuda or cuda:N (under torchrun: each process's local rank)",
    ("run", "seed"): "seed of the data order, crops and initialization",
    ("run", "amp"): "bf16 autocast where the hardware has native bf16",
    ("run", "deterministic"): "deterministic algorithms: a killed and resumed run equals an uninterrupted one",
    ("run", "cuda_graphs"): "capture forward and backward in a CUDA graph (static shapes; CUDA only)",
    ("run", "log_interval"): "steps between metric lines",
    ("run", "eval_epochs"): "evaluate the held-out split every this many epochs (0: only at the end)",
    ("run", "tensorboard"): "also write the metrics as TensorBoard scalars (needs the tensorboard package)",
    ("run", "dist_timeout"): "seconds a collective waits for a lost peer before the job fails",
}
# Short and alternative spellings users know from timm.
ALIASES = {("data", "workers"): ("-j",), ("model", "arch"): ("--arch",), ("optim", "batch_size"): ("-b",),
           ("optim", "weight_decay"): ("--wd",), ("model", "init"): ("--pretrained",)}


def _default_text(section: str, name: str) -> str:
    default = next(f.default for f in dataclasses.fields(SECTIONS[section]) if f.name == name)
    recipes = [f"{recipe}: {layer[section][name]}" for recipe, layer in RECIPES.items()
               if name in layer.get(section, {})]
    return f" (default: {default}" + (f"; {', '.join(recipes)}" if recipes else "") + ")"


def _add_field(group, section: str, name: str, hint) -> None:
    names = (*ALIASES.get((section, name), ()), flag_of(section, name))
    options = {"dest": dest_of(section, name), "default": None,
               "help": HELP[(section, name)] + _default_text(section, name)}
    kinds = [k for k in typing.get_args(hint) or (hint,) if k is not type(None)]
    if typing.get_origin(hint) is tuple:
        options.update(nargs=len(typing.get_args(hint)), type=float, metavar="X")
    elif kinds == [bool]:
        options["action"] = argparse.BooleanOptionalAction
    else:
        options.update(type=kinds[0], metavar=name.upper())
    group.add_argument(*names, **options)


COMMANDS = {  # command -> (task, help)
    "train": ("hashtags", "pretrain a ResNeXt on hashtags (the demo corpus without --data)"),
    "finetune": ("classes", "fine-tune a pretrained trunk on labeled classes (ImageFolder or cls shards)"),
}


def register(subparsers) -> None:
    for command, (task, help_text) in COMMANDS.items():
        p = subparsers.add_parser(command, help=help_text)
        p.add_argument("--config", help="a TOML file of [data], [model], [optim], [checkpoint], [run] fields; flags win")
        p.add_argument("--recipe", choices=list(RECIPES),
                       help=f"a named set of defaults (default: {DEFAULT_RECIPE[task]}" +
                       (" without --data)" if task == "hashtags" else ")"))
        for section, cls in SECTIONS.items():
            group = p.add_argument_group(section)
            hints = typing.get_type_hints(cls)
            for item in dataclasses.fields(cls):
                _add_field(group, section, item.name, hints[item.name])
        p.set_defaults(func=run_train, task=task)


def run_train(args: argparse.Namespace) -> int:
    from fastpretrain.train.trainer import train

    result = train(resolve(vars(args), args.task))
    if result.get("event") == "eval":
        print(" ".join(f"{name} {value:.3f}" for name, value in result.items()
                       if name not in ("event", "step", "epoch", "images")) + f" ({result['images']} held-out images)")
    return 0
