"""``fastpretrain probe``: a linear probe of a frozen trunk, the standard measure of what pretraining learned.

Pooled features of the training and validation splits (``features.py``: extracted once, cached) are standardized with
the training split's mean and standard deviation and held on the device in float16. A multinomial logistic regression,
mean cross-entropy + weight_decay / 2 x ||W||^2 (the bias not decayed), is fitted by full-batch L-BFGS (strong Wolfe
line search, at most ``max_iter`` iterations: a fixed budget), each loss and gradient summed over chunks of
``CHUNK_ROWS`` rows. The weight decay is chosen from ``WEIGHT_DECAYS`` by top-1 (then cross-entropy) on a held-out 10%
of the training features, stratified by class; the grid runs from the strongest decay down, each fit starting from the
one before. The chosen value is refitted on all training features, and top-1/top-5 reported on the validation split.
Nothing is random but the held-out split, drawn from ``seed``; on one device the result is the same every run.

ImageNet-1k (1.28M x 2048 features, 1000 classes) on one GPU: memory 5.2 GB of float16 features, a chunk's float32
copy (0.27 GB) and logits with their gradient (0.26 GB), L-BFGS's 10 pairs of (2048 x 1000) directions (0.16 GB): about
6 GB. Time: a loss and gradient is 2 x 2 x 1.28M x 2048 x 1000 = 10.5 TFLOP, about 40 ms at 250 TFLOP/s of TF32
(float16 features are exact in TF32; the command enables it on CUDA); a fit of 200 iterations takes about 250
evaluations, 10 s, so the grid of 7 and the refit about 1.5 minutes (estimated, not yet run on a GPU). The same code on
a CPU fits the demo's 400 x 2048 features in about a second.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fastpretrain.errors import UserError
from fastpretrain.formats.files import atomic_write

log = logging.getLogger(__name__)

WEIGHT_DECAYS = tuple(10.0**e for e in range(0, -7, -1))  # strongest first: each fit warm-starts the next
HELD_OUT = 0.1
MAX_ITER = 200
CHUNK_ROWS = 32768  # rows per matmul: bounds the float32 copy and the logits whatever the split's size
STD_FLOOR = 1e-6  # a feature constant over the training split (a dead ReLU channel) is only centred
DEFAULT_ARCH = "resnext101_32x8d"  # train's default, for weights that do not name theirs


@dataclass
class ProbeResult:
    top1: float
    top5: float
    weight_decay: float
    held_out_top1: dict[str, float]  # weight decay (as text, for JSON) -> held-out top-1
    train_images: int
    val_images: int
    classes: int


def held_out_split(labels: np.ndarray, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows, held-out rows), both ascending: of each class's n images, share x n rounded half up held out, at
    least one when it has two or more (a class of one image is only fitted)."""
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        count = min(len(rows) - 1, max(1, math.floor(share * len(rows) + 0.5)))
        held.append(rng.permutation(rows)[:count])
    held = np.sort(np.concatenate(held))
    return np.setdiff1d(np.arange(len(labels)), held), held


def standardizer(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), std (D,)) in float64 over the rows of ``features``, read a chunk at a time."""
    total = np.zeros(features.shape[1])
    squares = np.zeros(features.shape[1])
    for start in range(0, len(features), CHUNK_ROWS):
        chunk = np.asarray(features[start:start + CHUNK_ROWS], dtype=np.float64)
        total += chunk.sum(0)
        squares += (chunk * chunk).sum(0)
    mean = total / len(features)
    std = np.sqrt(np.maximum(squares / len(features) - mean * mean, 0))
    return mean, np.where(std < STD_FLOOR, 1.0, std)


def to_device(features: np.ndarray, rows: np.ndarray, mean: np.ndarray, std: np.ndarray,
              device: torch.device) -> torch.Tensor:
    """(len(rows), D) float16 on ``device``: ``features[rows]`` standardized, moved a chunk at a time."""
    out = torch.empty(len(rows), features.shape[1], dtype=torch.float16, device=device)
    for start in range(0, len(rows), CHUNK_ROWS):
        chunk = (np.asarray(features[rows[start:start + CHUNK_ROWS]], dtype=np.float64) - mean) / std
        out[start:start + len(chunk)] = torch.from_numpy(chunk.astype(np.float16)).to(device)
    return out


def _chunks(x: torch.Tensor, y: torch.Tensor):
    for start in range(0, len(x), CHUNK_ROWS):
        yield x[start:start + CHUNK_ROWS].float(), y[start:start + CHUNK_ROWS]  # (n, D), (n,)


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float, max_iter: int = MAX_ITER,
                 init: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(W (D, C), b (C,)) float32 minimizing mean cross-entropy of ``x @ W + b`` against ``y`` + weight_decay / 2 x
    ||W||^2, by full-batch L-BFGS from ``init`` (default zeros). ``x`` (N, D) float16 or float32, ``y`` (N,) int64."""
    if init is None:
        weight = torch.zeros(x.shape[1], num_classes, device=x.device)
        bias = torch.zeros(num_classes, device=x.device)
    else:
        weight, bias = (t.detach().clone() for t in init)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, history_size=10,
                                  line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        total = torch.zeros((), device=x.device)
        for xc, yc in _chunks(x, y):
            loss = F.cross_entropy(xc @ weight + bias, yc, reduction="sum") / len(x)
            loss.backward()  # gradients add up over the chunks; only one chunk's graph is alive at a time
            total += loss.detach()
        penalty = weight_decay / 2 * weight.pow(2).sum()
        penalty.backward()
        return total + penalty.detach()

    optimizer.step(closure)
    return weight.detach(), bias.detach()


@torch.no_grad()
def scores(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> dict[str, float]:
    """top1, top5 and the mean cross-entropy of the classifier on (``x``, ``y``)."""
    top1 = top5 = loss = 0.0
    for xc, yc in _chunks(x, y):
        logits = xc @ weight + bias  # (n, C)
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == yc[:, None]  # (n, k)
        top1 += hits[:, 0].sum().item()
        top5 += hits.any(1).sum().item()
        loss += F.cross_entropy(logits, yc, reduction="sum").item()
    return {"top1": top1 / len(x), "top5": top5 / len(x), "loss": loss / len(x)}


def fit_probe(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, num_classes: int,
              device: torch.device, seed: int = 0, weight_decays: tuple[float, ...] = WEIGHT_DECAYS,
              max_iter: int = MAX_ITER) -> ProbeResult:
    """The probe (see the module docstring) on features (N, D) and labels (N,) of the training and validation
    splits (numpy, memory-mapped or not)."""
    if len(train_y) < 2 or len(val_y) < 1:
        raise UserError(f"a probe needs two training images and one validation image, got {len(train_y)} and "
                        f"{len(val_y)}")
    mean, std = standardizer(train_x)
    fit_rows, held_rows = held_out_split(train_y, HELD_OUT, seed)
    order = np.concatenate([fit_rows, held_rows])  # the fit rows first: both sets are views of one device tensor
    x = to_device(train_x, order, mean, std, device)  # (N, D) float16
    y = torch.from_numpy(np.asarray(train_y)[order]).to(device)
    fit_x, fit_y, held_x, held_y = x[:len(fit_rows)], y[:len(fit_rows)], x[len(fit_rows):], y[len(fit_rows):]
    held_out, best, params = {}, None, None
    for wd in sorted(weight_decays, reverse=True):
        params = fit_logistic(fit_x, fit_y, num_classes, wd, max_iter, init=params)
        found = scores(held_x, held_y, *params)
        held_out[f"{wd:g}"] = found["top1"]
        log.info("probe: weight decay %g: held-out top-1 %.4f, cross-entropy %.4f", wd, found["top1"], found["loss"])
        if best is None or (found["top1"], -found["loss"]) > (best[1]["top1"], -best[1]["loss"]):
            best = (wd, found, params)
    wd, _, params = best
    params = fit_logistic(x, y, num_classes, wd, max_iter, init=params)
    val = scores(to_device(val_x, np.arange(len(val_y)), mean, std, device),
                 torch.from_numpy(np.asarray(val_y)).to(device), *params)
    return ProbeResult(val["top1"], val["top5"], wd, held_out, len(train_y), len(val_y), num_classes)


# ----------------------------------------------------------------------------------------------------
# The command


def register(subparsers) -> None:
    """Add the ``probe`` command."""
    p = subparsers.add_parser("probe", help="linear probe of a frozen trunk: logistic regression on its pooled "
                                            "features, top-1/top-5 on the validation split",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--pretrained", required=True,
                   help="the trunk's weights: our checkpoint, a torchvision or timm state dict, safetensors")
    p.add_argument("--data", required=True, help="an ImageFolder tree with DIR/train and DIR/val, or the training "
                                                 "split (an ImageFolder, or shards with a cls member)")
    p.add_argument("--val-data", help="the validation split, when --data is the training split")
    p.add_argument("--num-classes", type=int, help="classes of shards with a cls member")
    p.add_argument("--model", "--arch", help="registered arch (default: the one the weights name, else "
                                             f"{DEFAULT_ARCH})")
    p.add_argument("--img-size", type=int, default=224, help="the evaluation crop's side in pixels")
    p.add_argument("-b", "--batch-size", type=int, default=256, help="images per forward pass of the trunk")
    p.add_argument("-j", "--workers", type=int, default=4, help="data loading workers (torch backend)")
    p.add_argument("--data-backend", default="auto", choices=("auto", "dali", "torch"), help="decoding backend")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out split that chooses the weight decay")
    p.add_argument("--output", default="runs/probe", help="folder for probe.json")
    p.set_defaults(func=run_probe)


def run_probe(args: argparse.Namespace) -> int:
    from fastpretrain.transfer.features import split_features
    from fastpretrain.weights import read_weights

    if args.seed < 0:
        raise UserError(f"--seed must not be negative, got {args.seed}")
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output} is a file, not a folder")
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # float16 features are exact in TF32; see the module docstring
    train, val, vocab = labeled_splits(args.data, args.val_data, args.num_classes)
    weights = read_weights(args.pretrained)
    arch = args.model or weights.arch or DEFAULT_ARCH
    found = [split_features(weights, arch, _data_config(args, split), vocab, device) for split in (train, val)]
    result = fit_probe(found[0].features, found[0].labels, found[1].features, found[1].labels, len(vocab), device,
                       args.seed)
    record = {"pretrained": str(args.pretrained), "arch": arch, "image_size": args.img_size, "train": train,
              "val": val, "seed": args.seed, **asdict(result), "feature_cache": [str(f.folder) for f in found]}
    with atomic_write(output / "probe.json", "w") as f:
        json.dump(record, f, indent=2)
    print(f"probe top1 {result.top1:.4f} top5 {result.top5:.4f} (weight decay {result.weight_decay:g}; "
          f"{result.train_images} training, {result.val_images} validation images, {result.classes} classes) -> "
          f"{output / 'probe.json'}")
    return 0


def _data_config(args: argparse.Namespace, shards: str):
    from fastpretrain.data import DataConfig

    return DataConfig(shards=shards, label_dir=None, backend=args.data_backend, batch_size=args.batch_size,
                      image_size=args.img_size, workers=args.workers)


def labeled_splits(data: str, val_data: str | None, num_classes: int | None):
    """(training split, validation split, the training split's classes as a Vocab), as ``finetune`` reads them."""
    from fastpretrain.train.config import DataSection, TrainConfig
    from fastpretrain.train.tasks import ClassificationTask

    task = ClassificationTask(TrainConfig(task="classes", data=DataSection(data=data, val_data=val_data,
                                                                           num_classes=num_classes)), world=None)
    if task.val is None:
        raise UserError(f"--data {data}: no DIR/train and DIR/val ImageFolder trees; give the validation split with "
                        "--val-data")
    return task.train.shards, task.val.shards, task.vocab


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name != "cpu" and not (name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit())):
        raise UserError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if name != "cpu" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    return torch.device(name)
