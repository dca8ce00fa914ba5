"""Metrics: hashtag prediction's precision@k against an image's hashtags and the majority-class baseline;
classification's top-1 and top-5 accuracy."""

from __future__ import annotations

import contextlib
from typing import Iterable

import torch
from torch import nn

from fastpretrain.loss import label_rows


def multi_hot(labels: torch.Tensor, offsets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, C) bool: row i is True at the classes ``labels[offsets[i]:offsets[i+1]]`` (CSR)."""
    rows = label_rows(offsets, labels.numel())  # (nnz,)
    target = torch.zeros(offsets.numel() - 1, num_classes, dtype=torch.bool, device=labels.device)
    target[rows, labels.long()] = True
    return target


def precision_at_k(logits: torch.Tensor, target: torch.Tensor, k: int) -> torch.Tensor:
    """(B,) float: the share of each row's k highest-scoring classes that are among its hashtags."""
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices  # (B, k)
    return target.gather(1, top).float().sum(1) / k


METRICS = ("precision@1", "precision@5", "majority_precision@1")


@torch.no_grad()
def evaluation_sums(model: nn.Module, batches: Iterable, majority_class: int,
                    autocast: contextlib.AbstractContextManager | None = None) -> dict[str, float]:
    """Sums over every image with at least one hashtag of its precision@1 and @5 and of the precision@1 of always
    ranking ``majority_class`` (the most frequent training class) first, and ``images``, their number: sums, so that
    the shares of several processes add up (``mean_metrics`` turns them into means)."""
    was_training = model.training
    model.eval()
    sums = dict.fromkeys(METRICS, 0.0) | {"images": 0.0}
    for batch in batches:
        with autocast or contextlib.nullcontext():
            logits = model(batch.images)  # (B, C)
        target = multi_hot(batch.labels, batch.offsets, logits.shape[1])
        labeled = target.any(1)  # rows without hashtags carry no signal for precision
        logits, target = logits[labeled].float(), target[labeled]
        sums["precision@1"] += precision_at_k(logits, target, 1).sum().item()
        sums["precision@5"] += precision_at_k(logits, target, 5).sum().item()
        sums["majority_precision@1"] += target[:, majority_class].sum().item()
        sums["images"] += int(labeled.sum())
    model.train(was_training)
    return sums


def mean_metrics(sums: dict[str, float]) -> dict:
    """The means of ``evaluation_sums`` or ``accuracy_sums`` (0 without images), and the number of images."""
    images = int(sums["images"])
    return {name: total / max(images, 1) for name, total in sums.items() if name != "images"} | {"images": images}


def evaluate(model: nn.Module, batches: Iterable, majority_class: int,
             autocast: contextlib.AbstractContextManager | None = None) -> dict:
    """Mean precision@1 and @5 over every image with at least one hashtag, and the majority-class baseline."""
    return mean_metrics(evaluation_sums(model, batches, majority_class, autocast))


CLASS_METRICS = ("top1", "top5")


@torch.no_grad()
def accuracy_sums(model: nn.Module, batches: Iterable,
                  autocast: contextlib.AbstractContextManager | None = None) -> dict[str, float]:
    """Sums of top-1 and top-5 hits over single-label images (a batch's labels: one class per image), and
    ``images``: sums, so that the shares of several processes add up (``mean_metrics`` makes them means)."""
    was_training = model.training
    model.eval()
    sums = dict.fromkeys(CLASS_METRICS, 0.0) | {"images": 0.0}
    for batch in batches:
        with autocast or contextlib.nullcontext():
            logits = model(batch.images).float()  # (B, C)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (B, k)
        hits = top == batch.labels[:, None]  # (B, k)
        sums["top1"] += hits[:, 0].sum().item()
        sums["top5"] += hits.any(1).sum().item()
        sums["images"] += len(batch.labels)
    model.train(was_training)
    return sums
