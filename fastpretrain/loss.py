"""Hashtag softmax cross-entropy: the loss of weakly supervised pretraining on hashtags.

An image with k hashtags has a target spread over them, 1/k each (or by optional per-label weights,
normalized per row), and its loss is the cross-entropy of the softmax against that target:

    loss_i = logsumexp(z_i) - sum_j t_ij z_ij,        d loss_i / d z_i = softmax(z_i) - t_i

The labels come as CSR (``labels[offsets[i]:offsets[i+1]]`` are row i's), so no dense (B, C) target is
ever built. One autograd Function serves every backend: the backend's forward writes each row's loss and,
when a gradient is wanted, the gradient already scaled by the reduction, so the backward only multiplies
it by the incoming gradient, and skips even that when the incoming gradient is 1, as it is for
``loss.backward()``.

Backends (a registry, so tests and benchmarks iterate over what is registered):
  "triton"  kernels/hashtag_xent.py: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1
  "cpp"     csrc/hashtag_xent.cpp, built on first use: CPU tensors
  "torch"   the readable reference below, plain PyTorch, on any device
  "auto"    triton on CUDA, cpp on CPU; falls back to torch (one warning) when those cannot run
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.autograd.function import once_differentiable

from fastpretrain.log import log_once

log = logging.getLogger(__name__)

REDUCTIONS = ("mean", "sum", "none")
LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)
# Checking label ranges and offsets reads them, which on CUDA waits for the device once per step: there
# the checks run only when this variable is "1" (validate the batches where they are built instead).
VALIDATE_ENV = "FASTPRETRAIN_VALIDATE_LOSS"


@dataclass(frozen=True)
class SparseTargets:
    """Row i's labels are ``labels[offsets[i]:offsets[i+1]]``, weighted by ``weights`` (None: 1 each)."""

    labels: torch.Tensor  # (nnz,) int32/int64 class ids
    offsets: torch.Tensor  # (B + 1,) int32/int64
    weights: torch.Tensor | None  # (nnz,) floating, non-negative


# forward(logits, targets, grad_scale, row_loss, grad): writes row_loss (B,) and, when grad is not None,
# grad (B, C) = (softmax - t) * grad_scale; grad may be logits itself (the in-place mode).
BackendForward = Callable[[torch.Tensor, SparseTargets, torch.Tensor, torch.Tensor, torch.Tensor | None], None]


@dataclass(frozen=True)
class LossBackend:
    """One implementation of the fused forward, and which logits it can run."""

    name: str
    forward: BackendForward
    cannot_run: Callable[[torch.Tensor], str | None]  # why it cannot run these logits, or None
    scales_in_place_on_cuda: bool  # its backward scales the saved gradient in place (see _scaled_gradient)


BACKENDS: dict[str, LossBackend] = {}


def register_backend(backend: LossBackend) -> LossBackend:
    """Adds a backend under its name (replacing one of the same name)."""
    BACKENDS[backend.name] = backend
    return backend


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for every logits dtype but float64 (kept for gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------------
# Validation


def check_inputs(logits: torch.Tensor, labels: torch.Tensor, offsets: torch.Tensor,
                 weights: torch.Tensor | None) -> None:
    """Shapes, dtypes and devices (metadata only: never reads the device). Raises ValueError."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"logits must be a (B, C) tensor, got shape {tuple(getattr(logits, 'shape', ()))}")
    if logits.dtype not in LOGIT_DTYPES:
        raise ValueError(f"logits must be float32, bfloat16, float16 or float64, got {logits.dtype}")
    n_rows, n_classes = logits.shape
    if n_rows < 1 or n_classes < 1:
        raise ValueError(f"logits must have at least one row and one class, got shape {tuple(logits.shape)}")
    if labels.dim() != 1 or labels.dtype not in INDEX_DTYPES:
        raise ValueError(f"labels must be a 1-D int32/int64 tensor, got shape {tuple(labels.shape)} {labels.dtype}")
    if offsets.dim() != 1 or offsets.dtype not in INDEX_DTYPES:
        raise ValueError(f"offsets must be a 1-D int32/int64 tensor, got shape {tuple(offsets.shape)} {offsets.dtype}")
    if offsets.numel() != n_rows + 1:
        raise ValueError(f"offsets must have B + 1 = {n_rows + 1} entries for {n_rows} rows of logits, "
                         f"got {offsets.numel()}")
    tensors = {"labels": labels, "offsets": offsets}
    if weights is not None:
        if weights.dim() != 1 or not weights.is_floating_point():
            raise ValueError(f"weights must be a 1-D floating tensor, got shape {tuple(weights.shape)} {weights.dtype}")
        if weights.numel() != labels.numel():
            raise ValueError(f"weights must have one entry per label ({labels.numel()}), got {weights.numel()}")
        if weights.requires_grad:
            raise ValueError("weights are constants of the target: no gradient flows to them (detach them)")
        tensors["weights"] = weights
    for name, tensor in tensors.items():
        if tensor.device != logits.device:
            raise ValueError(f"{name} are on {tensor.device}, logits on {logits.device}: they must share a device")


def _host_values(indices: torch.Tensor) -> np.ndarray:
    """A NumPy view of an integer CPU tensor (of a host copy from any other device)."""
    return (indices if indices.device.type == "cpu" else indices.cpu()).numpy()


def check_target_values(labels: torch.Tensor, offsets: torch.Tensor, num_classes: int,
                        weights: torch.Tensor | None = None) -> None:
    """Offsets form a CSR over labels, labels lie in [0, num_classes), weights are finite and >= 0.

    Reads the values (copies them to the host on CUDA): call it where the batch is built, on the CPU.
    Raises ValueError naming the first problem.
    """
    # Checked as NumPy views of host copies: a handful of PyTorch operations would each cost tens of
    # microseconds per step on the CPU, right after the previous step's kernel has flushed the caches.
    label_values = _host_values(labels)  # (nnz,)
    offset_values = _host_values(offsets)  # (B + 1,)
    nnz = label_values.size
    first, last = int(offset_values[0]), int(offset_values[-1])
    if first != 0:
        raise ValueError(f"offsets must start at 0, got offsets[0] = {first}")
    if last != nnz:
        raise ValueError(f"offsets must end at the number of labels ({nnz}), got offsets[-1] = {last}")
    decreasing = np.flatnonzero(offset_values[1:] < offset_values[:-1])
    if decreasing.size:
        row = int(decreasing[0])
        raise ValueError(f"offsets must be non-decreasing: offsets[{row + 1}] = {int(offset_values[row + 1])} "
                         f"< offsets[{row}] = {int(offset_values[row])}")
    outside = np.flatnonzero((label_values < 0) | (label_values >= num_classes))
    if outside.size:
        j = int(outside[0])
        raise ValueError(f"labels must lie in [0, {num_classes}): labels[{j}] = {int(label_values[j])}")
    if weights is not None:
        # float64 holds every weight dtype exactly (NumPy has no bfloat16).
        weight_values = weights.detach().to(torch.float64).cpu().numpy()  # (nnz,)
        bad = np.flatnonzero(~(np.isfinite(weight_values) & (weight_values >= 0)))
        if bad.size:
            j = int(bad[0])
            raise ValueError(f"weights must be finite and non-negative: weights[{j}] = {float(weight_values[j])}")


def _should_check_values(validate: bool | None, device: torch.device) -> bool:
    if validate is not None:
        return validate
    return device.type == "cpu" or os.environ.get(VALIDATE_ENV) == "1"


# ----------------------------------------------------------------------------------------------------
# The reduction


def label_rows(offsets: torch.Tensor, nnz: int) -> torch.Tensor:
    """(nnz,) int64: the row of each label of a CSR batch (``output_size`` keeps it free of a device sync)."""
    counts = offsets[1:] - offsets[:-1]  # (B,)
    return torch.repeat_interleave(torch.arange(counts.numel(), device=offsets.device), counts, output_size=nnz)


def labeled_rows(targets: SparseTargets, n_rows: int) -> torch.Tensor:
    """(B,) bool: the rows whose labels weigh more than 0 (those the mean averages over). No sync."""
    counts = torch.diff(targets.offsets)  # (B,)
    if targets.weights is None:
        return counts > 0
    # Sums of non-negative weights: > 0 exactly when a weight is, in any order of addition.
    row_of_label = label_rows(targets.offsets, targets.labels.numel())  # (nnz,)
    row_weight = torch.zeros(n_rows, dtype=targets.weights.dtype, device=counts.device)
    return row_weight.index_add_(0, row_of_label, targets.weights) > 0


def reduction_scale(targets: SparseTargets, n_rows: int, reduction: str, dtype: torch.dtype) -> torch.Tensor:
    """() tensor on the targets' device: 1 / (labeled rows, at least 1) for "mean", else 1."""
    device = targets.offsets.device
    if reduction != "mean":
        return torch.ones((), dtype=dtype, device=device)
    # Three operations, each done in place where it can: on the CPU every small one costs tens of
    # microseconds per step, right after the previous step's kernel has flushed the caches.
    return labeled_rows(targets, n_rows).sum(dtype=dtype).clamp_min_(1).reciprocal_()


# ----------------------------------------------------------------------------------------------------
# Backends


def _torch_forward(logits: torch.Tensor, targets: SparseTargets, grad_scale: torch.Tensor,
                   row_loss: torch.Tensor, grad: torch.Tensor | None) -> None:
    """The reference: a dense target and a plain softmax, in the accumulation dtype."""
    n_rows = logits.shape[0]
    acc = accumulation_dtype(logits.dtype)
    tiny = torch.finfo(acc).tiny
    z = logits.to(acc)  # (B, C)
    labels = targets.labels.long()  # (nnz,)
    rows = label_rows(targets.offsets, labels.numel())  # (nnz,)
    w = torch.ones(labels.shape, dtype=acc, device=z.device) if targets.weights is None else targets.weights.to(acc)
    row_weight = torch.zeros(n_rows, dtype=acc, device=z.device).index_add_(0, rows, w)  # (B,)
    labeled = row_weight > 0  # (B,)
    # Summed as t_j * z_j with the weights normalized first: k logits of the dtype's max summed before dividing
    # by k would overflow. A zero weight must not multiply its logit: 0 * -inf would be NaN.
    t = w / row_weight.clamp_min(tiny)[rows]  # (nnz,)
    target_logit = torch.where(w > 0, t * z[rows, labels], 0)  # (nnz,)
    weighted = torch.zeros_like(row_weight).index_add_(0, rows, target_logit)  # (B,)

    # The max is clamped to the finite range so that a row of -inf never computes -inf - -inf.
    row_max = z.max(dim=1, keepdim=True).values.clamp_min(torch.finfo(acc).min)  # (B, 1)
    exp = torch.exp(z - row_max)  # (B, C)
    # Summed in float64: a float32 sum over 262,144 classes drifts past the contract's 1e-5.
    sum_exp = exp.sum(dim=1, keepdim=True, dtype=torch.float64).to(acc)  # (B, 1)
    # (max - target logit) + log-sum: at large logits, max + log-sum would round the log-sum away.
    row_loss.copy_(torch.where(labeled, (row_max[:, 0] - weighted) + torch.log(sum_exp[:, 0]), 0))
    if grad is not None:
        target = torch.zeros_like(z).index_put_((rows, labels), t, accumulate=True)  # (B, C)
        # torch.where, not a product, keeps the 0/0 softmax of an all -inf unlabeled row out.
        grad.copy_(torch.where(labeled[:, None], (exp / sum_exp - target) * grad_scale, 0))


def _torch_cannot_run(logits: torch.Tensor) -> str | None:
    return None


def _cpp_forward(logits: torch.Tensor, targets: SparseTargets, grad_scale: torch.Tensor,
                 row_loss: torch.Tensor, grad: torch.Tensor | None) -> None:
    from fastpretrain.cpp_extension import load_extension

    acc = accumulation_dtype(logits.dtype)
    weights = None if targets.weights is None else targets.weights.to(acc).contiguous()
    load_extension("xent").hashtag_xent_forward(logits, _as_int64(targets.labels), _as_int64(targets.offsets), weights,
                                          float(grad_scale), row_loss, grad)


def _as_int64(indices: torch.Tensor) -> torch.Tensor:
    # Checked here: even a .long() that has nothing to do costs a dispatch, tens of microseconds per step
    # on the CPU right after the previous step's kernel (the targets are already contiguous).
    return indices if indices.dtype == torch.int64 else indices.long()


def _cpp_cannot_run(logits: torch.Tensor) -> str | None:
    if logits.device.type != "cpu":
        return f"it runs on CPU tensors (this build has no {logits.device.type} kernel), use 'triton' or 'auto'"
    return None


def _triton_forward(logits: torch.Tensor, targets: SparseTargets, grad_scale: torch.Tensor,
                    row_loss: torch.Tensor, grad: torch.Tensor | None) -> None:
    from fastpretrain.kernels.hashtag_xent import hashtag_xent_forward

    hashtag_xent_forward(logits, targets.labels, targets.offsets, targets.weights, grad_scale, row_loss, grad)


def _triton_cannot_run(logits: torch.Tensor) -> str | None:
    if logits.dtype == torch.float64:
        return "it takes float32, bfloat16 or float16 logits"
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if logits.is_cuda:
        return None
    if logits.device.type == "cpu":
        from fastpretrain.kernels.hashtag_xent import interpreted

        if interpreted():
            return None
        return "CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 before triton is imported"
    return f"it runs on CUDA tensors, not {logits.device.type}"


register_backend(LossBackend("triton", _triton_forward, _triton_cannot_run, scales_in_place_on_cuda=True))
register_backend(LossBackend("cpp", _cpp_forward, _cpp_cannot_run, scales_in_place_on_cuda=False))
register_backend(LossBackend("torch", _torch_forward, _torch_cannot_run, scales_in_place_on_cuda=False))

def _fallback_to_torch(reason: str) -> LossBackend:
    log_once(log, logging.WARNING, f"hashtag_cross_entropy: {reason}; using the plain PyTorch implementation")
    return BACKENDS["torch"]


def resolve_loss_backend(name: str, logits: torch.Tensor) -> LossBackend:
    """The backend that runs these logits: ``name`` itself (ValueError if it cannot), or auto's choice."""
    if name == "auto":
        if logits.device.type == "cpu":
            from fastpretrain.cpp_extension import extension_or_none

            # extension_or_none warns once by itself when the build fails.
            return BACKENDS["cpp"] if extension_or_none("xent", "the plain PyTorch implementation") is not None else BACKENDS["torch"]
        reason = _triton_cannot_run(logits)
        return BACKENDS["triton"] if reason is None else _fallback_to_torch(f"backend 'triton' cannot run: {reason}")
    if name not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {sorted(BACKENDS)}, got {name!r}")
    backend = BACKENDS[name]
    reason = backend.cannot_run(logits)
    if reason is not None:
        raise ValueError(f"backend {name!r} cannot run {logits.dtype} logits on {logits.device}: {reason}")
    return backend


# ----------------------------------------------------------------------------------------------------
# Autograd


@dataclass(frozen=True)
class _Options:
    reduction: str
    backend: LossBackend
    inplace: bool
    write_grad: bool  # the logits require grad and grad mode is on (inside forward it is always off)


def _multiply_rows(grad: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    # (B, C) times a scalar or one factor per row, in the accumulation dtype, rounded once.
    factor = grad_output.to(accumulation_dtype(grad.dtype))
    factor = factor[:, None] if factor.dim() == 1 else factor
    return (grad.to(factor.dtype) * factor).to(grad.dtype)


def _scaled_gradient(grad: torch.Tensor, grad_output: torch.Tensor, scales_in_place: bool) -> torch.Tensor:
    """The saved gradient times the incoming one.

    On the CPU the incoming gradient is read for free: when it is 1 the saved gradient itself is returned
    (after a backward without ``retain_graph`` autograd has released it, so nothing copies it), else a
    scaled copy; either way the graph can be run backward again (``retain_graph``, gradcheck). On CUDA,
    reading it would wait for the device, so a fused backend scales the saved gradient in place with a
    kernel that reads the factor on the device and skips rows whose factor is 1; that bumps the saved
    gradient's version, so a second backward through the same forward raises autograd's own error.
    """
    if grad.device.type == "cpu":
        # One read for the usual scalar 1 of loss.backward(): each small op costs tens of microseconds
        # right after the kernel has flushed the caches.
        is_one = grad_output.item() == 1 if grad_output.numel() == 1 else bool((grad_output == 1).all())
        return grad if is_one else _multiply_rows(grad, grad_output)
    if not scales_in_place:
        return _multiply_rows(grad, grad_output)
    from fastpretrain.kernels.hashtag_xent import scale_rows_

    scale_rows_(grad, grad_output.to(torch.float32))
    torch.autograd.graph.increment_version(grad)
    return grad


class _HashtagCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: SparseTargets, options: _Options) -> torch.Tensor:
        n_rows = logits.shape[0]
        acc = accumulation_dtype(logits.dtype)
        scale = reduction_scale(targets, n_rows, options.reduction, acc)  # ()
        x = logits.contiguous()  # (B, C)
        grad = None
        if options.write_grad:
            # In place, the gradient overwrites the logits (their only remaining use is this loss).
            grad = x if options.inplace else torch.empty_like(x)
        row_loss = torch.empty(n_rows, dtype=acc, device=logits.device)  # (B,)
        options.backend.forward(x, targets, scale, row_loss, grad)
        if grad is logits:
            # Any other use of these logits saved for backward now fails loudly instead of reading gradient.
            torch.autograd.graph.increment_version(logits)
        # Saved (not kept as an attribute) so that autograd releases it after the backward.
        ctx.save_for_backward(grad)
        ctx.scales_in_place = options.backend.scales_in_place_on_cuda
        if options.reduction == "none":
            return row_loss
        return row_loss.sum() * scale

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return _scaled_gradient(grad, grad_output, ctx.scales_in_place), None, None


# ----------------------------------------------------------------------------------------------------
# Public API


def hashtag_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    offsets: torch.Tensor,
    weights: torch.Tensor | None = None,
    reduction: str = "mean",
    backend: str = "auto",
    *,
    inplace: bool = False,
    validate: bool | None = None,
) -> torch.Tensor:
    """Softmax cross-entropy against targets spread over each row's labels.

    Args:
        logits: (B, C) float32, bfloat16 or float16 (float64 for gradcheck; not on triton), CPU or CUDA.
        labels: (nnz,) int32/int64 class ids; row i's are ``labels[offsets[i]:offsets[i+1]]``.
        offsets: (B + 1,) int32/int64 CSR offsets: ``offsets[0] == 0``, non-decreasing, ``offsets[B] == nnz``.
        weights: optional (nnz,) non-negative label weights; a row's target is its weights normalized to
            sum 1 (1/k each without weights; a repeated label counts twice).
        reduction: "mean" (over rows whose labels weigh more than 0; 0 when none do), "sum", or "none"
            (the (B,) losses; 0 for unlabeled rows).
        backend: "auto", or a registered backend: "triton", "cpp", "torch".
        inplace: write the gradient into the logits' buffer (Liger's trick: logits and gradient never
            coexist); the logits hold the gradient once this returns, when they require grad.
        validate: check label ranges, offsets and weights (reads them): None checks on the CPU, and on
            CUDA only when the environment variable FASTPRETRAIN_VALIDATE_LOSS is "1".

    Returns:
        A float32 scalar (float64 for float64 logits), or (B,) for reduction "none". Its gradient with
        respect to the logits is ``(softmax(z_i) - t_i)`` times the reduction's scale and the incoming
        gradient, in the logits' dtype.

    Raises:
        ValueError: a shape, dtype or device mismatch, labels outside [0, C), offsets that are not a CSR,
            negative weights, an unknown reduction or a backend that cannot run these logits.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    check_inputs(logits, labels, offsets, weights)
    if _should_check_values(validate, logits.device):
        check_target_values(labels, offsets, logits.shape[1], weights)
    chosen = resolve_loss_backend(backend, logits)
    weights = None if weights is None else weights.contiguous()
    targets = SparseTargets(labels.contiguous(), offsets.contiguous(), weights)
    write_grad = logits.requires_grad and torch.is_grad_enabled()
    return _HashtagCrossEntropyFunction.apply(logits, targets, _Options(reduction, chosen, inplace, write_grad))


class HashtagCrossEntropy(nn.Module):
    """``hashtag_cross_entropy`` as a module: ``loss = criterion(logits, labels, offsets, weights=None)``."""

    def __init__(self, reduction: str = "mean", backend: str = "auto", inplace: bool = False) -> None:
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if backend != "auto" and backend not in BACKENDS:
            raise ValueError(f"backend must be 'auto' or one of {sorted(BACKENDS)}, got {backend!r}")
        self.reduction = reduction
        self.backend = backend
        self.inplace = inplace

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, offsets: torch.Tensor,
                weights: torch.Tensor | None = None) -> torch.Tensor:
        return hashtag_cross_entropy(logits, labels, offsets, weights, self.reduction, self.backend,
                                     inplace=self.inplace)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, backend={self.backend!r}, inplace={self.inplace}"
