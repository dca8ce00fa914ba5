"""``fastpretrain eval``: a training checkpoint's model, head included, on labeled images.

What is measured follows from the checkpoint's task (its ``args``):

- a classifier (``finetune``, task ``classes``): top-1/top-5 on ``--data``, an ImageFolder whose folders are among
  its classes (``DIR/val`` of a ``DIR/train``, ``DIR/val`` tree) or shards with a ``cls`` member;
- a hashtag model (``train``) on tagged shards with their label index (``--labels``, default ``val-labels/`` beside
  the vocabulary): precision@1/@5 against each image's hashtags, the majority-class precision@1, and mAP;
- a hashtag model whose vocabulary was built ``--targeted imagenet1k`` (its ``selection`` says so and its classes are
  ImageNet's 1000 wnids in ImageNet's order) on an ImageFolder named by wnid, as ImageNet's val/ is: top-1/top-5 of
  the hashtag head as it is, without fine-tuning.

mAP is the mean over classes of average precision over the held-out images (scikit-learn's
``average_precision_score``: tied scores are one threshold), over the classes with at least one positive image.
The hashtag metrics hold every held-out image's scores on the host: N x C x 5 bytes (50k images x 17k classes: 4 GB).

The weights evaluated are the EMA's where the checkpoint has one (as the trainer's own evaluation), in the precision
it trained in.
"""

from __future__ import annotations

import argparse
import json
import logging
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fastpretrain.data import DataConfig, build_eval_loader
from fastpretrain.errors import UserError
from fastpretrain.evaluate import accuracy_sums, mean_metrics, multi_hot, precision_at_k
from fastpretrain.formats.files import atomic_write
from fastpretrain.formats.image_folder import is_image_folder
from fastpretrain.formats.vocab import Vocab
from fastpretrain.hashtags.build import TARGETED_WNIDS
from fastpretrain.models import create_model, to_channels_last
from fastpretrain.train.precision import choose_precision
from fastpretrain.train.tasks import class_vocab
from fastpretrain.transfer.probe import resolve_device
from fastpretrain.weights import Weights, load_trunk, read_checkpoint

log = logging.getLogger(__name__)

AP_CHUNK = 1 << 24  # scores ranked per pass (images x classes): bounds the sort's memory
IMAGENET = "imagenet1k"


def average_precision(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(C,) float64: each class's average precision over the rows of ``scores`` (N, C) against ``target`` (N, C)
    bool, sum over thresholds t (the distinct scores, descending) of (recall(t) - recall(t_prev)) x precision(t);
    NaN for a class without a positive."""
    n = scores.shape[0]
    rank = torch.arange(n, device=scores.device)[:, None]  # (N, 1)
    width = max(1, AP_CHUNK // max(n, 1))  # classes per pass
    parts = []
    for start in range(0, scores.shape[1], width):
        part = scores[:, start:start + width]
        order = part.argsort(dim=0, descending=True)  # (N, c)
        ranked = part.gather(0, order)
        hits = target[:, start:start + width].gather(0, order).double()  # (N, c)
        tp = hits.cumsum(0)  # true positives down to each rank
        # A run of tied scores is one threshold: each of its positives counts at the precision of the run's last row.
        last = torch.ones_like(ranked, dtype=torch.bool)
        last[:-1] = ranked[:-1] != ranked[1:]
        end = torch.where(last, rank, n).flip(0).cummin(0).values.flip(0)  # (N, c) the last row of each row's run
        precision = tp.gather(0, end) / (end + 1)
        parts.append((hits * precision).sum(0) / hits.sum(0))
    return torch.cat(parts)


@torch.no_grad()
def hashtag_metrics(model: nn.Module, batches, majority_class: int, autocast) -> dict:
    """precision@1, precision@5, majority_precision@1 (always ranking ``majority_class`` first), mAP over the
    classes with a positive (``map_classes`` of them) and ``images``, over every image ``batches`` yields."""
    scores, targets = [], []
    for batch in batches:
        with autocast:
            logits = model(batch.images).float()  # (B, C)
        scores.append(logits.cpu())
        targets.append(multi_hot(batch.labels, batch.offsets, logits.shape[1]).cpu())
    if not scores:
        raise UserError("no held-out image could be decoded")
    score, target = torch.cat(scores), torch.cat(targets)  # (N, C) float32, bool
    ap = average_precision(score, target)
    present = ~ap.isnan()
    return {"precision@1": precision_at_k(score, target, 1).mean().item(),
            "precision@5": precision_at_k(score, target, 5).mean().item(),
            "majority_precision@1": target[:, majority_class].float().mean().item(),
            "mAP": ap[present].mean().item() if present.any() else float("nan"),
            "map_classes": int(present.sum()), "images": len(score)}


def checkpoint_model(state: dict, path: Path, device: torch.device) -> nn.Module:
    """The checkpoint's model with its head (the EMA's weights where it kept an EMA), eval mode, on ``device``."""
    arch, classes = state.get("arch"), state.get("classes")
    if not isinstance(arch, str) or not isinstance(classes, list) or not isinstance(state.get("args"), dict):
        raise UserError(f"checkpoint {path} lacks its arch, classes or args: not a fastpretrain training checkpoint")
    tensors = state["state_dict"]
    if isinstance(state.get("ema"), dict):
        log.info("evaluating the EMA's weights of %s", path)
        tensors = {k.removeprefix("module."): v for k, v in state["ema"].items() if k.startswith("module.")}
    model = create_model(arch, len(classes))
    load_trunk(model, Weights(tensors, arch, classes, "fastpretrain checkpoint", path), keep_head=True)
    return to_channels_last(model, device).eval()


def targeted_wnids(name: str) -> list[str]:
    """The class list of a ``vocab build --targeted`` vocabulary, in its order."""
    listing = resources.files("fastpretrain.assets").joinpath(TARGETED_WNIDS[name]).read_text()
    return [line.split()[0] for line in listing.splitlines() if line.strip()]


def training_vocab(state: dict, path: Path, given: str | None) -> tuple[Vocab, Path]:
    """The vocabulary the hashtag checkpoint was trained with: ``given``, else the one its args name."""
    vocab_file = given or (state["args"].get("data") or {}).get("vocab")
    if vocab_file is None:
        raise UserError(f"checkpoint {path} names no vocabulary file (a demo run's is vocab.json in "
                        "$FASTPRETRAIN_CACHE/demo/...): give --vocab")
    vocab = Vocab.load(vocab_file)
    if vocab.content_hash != state.get("vocab_hash"):
        raise UserError(f"vocabulary {vocab_file} is not the one checkpoint {path} was trained with (hash "
                        f"{vocab.content_hash}, the checkpoint's {state.get('vocab_hash')})")
    return vocab, Path(vocab_file)


def evaluate(args: argparse.Namespace) -> dict:
    """The metrics of ``args.checkpoint`` on ``args.data`` (see the module docstring), with what was evaluated."""
    device = resolve_device(args.device)
    path, state = read_checkpoint(args.checkpoint)
    model = checkpoint_model(state, path, device)
    train_args = state["args"]
    precision = choose_precision(device, bool((train_args.get("run") or {}).get("amp")))
    image_size = args.img_size or (train_args.get("data") or {}).get("image_size") or 224
    data, label_dir = args.data, None
    if train_args.get("task") == "classes":
        kind = "classes"
        vocab = class_vocab(state["classes"], np.ones(len(state["classes"]), dtype=np.int64))
        if is_image_folder(Path(data) / "train") and is_image_folder(Path(data) / "val"):
            data = str(Path(data) / "val")
    else:
        vocab, vocab_path = training_vocab(state, path, args.vocab)
        if not is_image_folder(data):
            kind, label_dir = "hashtags", args.labels or str(vocab_path.parent / "val-labels")
        elif vocab.selection.get("targeted") == IMAGENET and vocab.wnids == targeted_wnids(IMAGENET):
            kind = IMAGENET
        else:
            raise UserError(f"--data {data} is an ImageFolder, which a hashtag checkpoint is evaluated on only when "
                            f"its vocabulary was built --targeted {IMAGENET}; {vocab_path} was not: give tagged "
                            "shards and --labels")
    cfg = DataConfig(shards=data, label_dir=label_dir, backend=args.data_backend, batch_size=args.batch_size,
                     image_size=image_size, workers=args.workers)
    loader = build_eval_loader(cfg, vocab, device, precision.dtype)
    if kind == "hashtags":
        metrics = hashtag_metrics(model, loader, int(np.argmax(vocab.counts)), precision.autocast())
    else:
        metrics = mean_metrics(accuracy_sums(model, loader, precision.autocast()))
    return {"checkpoint": str(path), "kind": kind, "data": data, "labels": label_dir, "image_size": image_size,
            "skipped": loader.skipped, **metrics}


def register(subparsers) -> None:
    """Add the ``eval`` command."""
    p = subparsers.add_parser("eval", help="a checkpoint's model on labeled images: top-1/top-5 for a classifier, "
                                           "precision@k and mAP for hashtags, ImageNet top-1 of a targeted head",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a training checkpoint, or a run folder (its newest)")
    p.add_argument("--data", required=True, help="an ImageFolder, shards with a cls member, or tagged shards")
    p.add_argument("--labels", help="label index folder of tagged shards (default: val-labels/ beside the vocabulary)")
    p.add_argument("--vocab", help="the vocabulary of a hashtag checkpoint (default: the one its training named)")
    p.add_argument("--img-size", type=int, help="evaluation crop side (default: the training's)")
    p.add_argument("-b", "--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument("-j", "--workers", type=int, default=4, help="data loading workers (torch backend)")
    p.add_argument("--data-backend", default="auto", choices=("auto", "dali", "torch"), help="decoding backend")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--output", help="folder to write eval.json into (default: print only)")
    p.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    if args.output is not None and Path(args.output).exists() and not Path(args.output).is_dir():
        raise UserError(f"--output {args.output} is a file, not a folder")
    result = evaluate(args)
    if args.output is not None:
        with atomic_write(Path(args.output) / "eval.json", "w") as f:
            json.dump(result, f, indent=2)
    names = ("top1", "top5") if result["kind"] != "hashtags" else \
        ("precision@1", "precision@5", "majority_precision@1", "mAP")
    print(" ".join(f"{name} {result[name]:.4f}" for name in names) + f" ({result['images']} images, {result['kind']})")
    return 0
