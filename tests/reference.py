"""Independent float64 references for the hashtag loss, shared by every backend's tests (test_loss.py for all of
them, test_loss_triton.py for the Triton kernel's own launcher and its GPU behaviour).

References: ``F.cross_entropy`` with probability targets on a dense target filled by a Python loop over the CSR,
and a hand-written log-softmax (for -inf logits, where the former computes 0 * -inf). Tolerances are per dtype:
float32 to 1e-5 relative, bf16/fp16 to one rounding step, plus an allowance for the terms that cancel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastpretrain.loss import hashtag_cross_entropy

HALF_DTYPES = (torch.bfloat16, torch.float16)
FLOAT32_EPS = torch.finfo(torch.float32).eps


@dataclass
class LossInputs:
    logits: torch.Tensor  # (B, C)
    labels: torch.Tensor  # (nnz,)
    offsets: torch.Tensor  # (B + 1,)
    weights: torch.Tensor | None  # (nnz,)


def random_batch(gen: torch.Generator, n_rows: int, n_classes: int, *, dtype: torch.dtype = torch.float32,
                 weighted: bool = False, max_labels: int = 4, logit_scale: float = 3.0,
                 index_dtype: torch.dtype = torch.int64) -> LossInputs:
    """Rows with 0..max_labels labels (some empty, some with a repeated label), logits ~ N(0, scale^2)."""
    counts = torch.randint(0, max_labels + 1, (n_rows,), generator=gen)
    offsets = torch.zeros(n_rows + 1, dtype=torch.int64)
    offsets[1:] = counts.cumsum(0)
    labels = torch.randint(0, n_classes, (int(offsets[-1]),), generator=gen)
    for row in range(n_rows):
        begin, end = int(offsets[row]), int(offsets[row + 1])
        if end - begin >= 2 and torch.rand((), generator=gen) < 0.5:
            labels[begin + 1] = labels[begin]
    weights = None
    if weighted:
        weights = torch.rand(labels.shape, generator=gen, dtype=torch.float64) * 2
        weights[torch.rand(labels.shape, generator=gen) < 0.2] = 0.0
        weights = weights.to(torch.float32)
    logits = (torch.randn(n_rows, n_classes, generator=gen, dtype=torch.float64) * logit_scale).to(dtype)
    return LossInputs(logits, labels.to(index_dtype), offsets.to(index_dtype), weights)


def dense_target(batch: LossInputs) -> torch.Tensor:
    """(B, C) float64 target, filled label by label: weights normalized per row, zero rows stay zero."""
    n_rows, n_classes = batch.logits.shape
    target = torch.zeros(n_rows, n_classes, dtype=torch.float64)
    for row in range(n_rows):
        for j in range(int(batch.offsets[row]), int(batch.offsets[row + 1])):
            weight = 1.0 if batch.weights is None else float(batch.weights[j])
            target[row, int(batch.labels[j])] += weight
        total = float(target[row].sum())
        if total > 0:
            target[row] /= total
    return target


def reduce_reference(row_losses: torch.Tensor, target: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return row_losses
    if reduction == "sum":
        return row_losses.sum()
    labeled = int((target.sum(dim=1) > 0).sum())
    return row_losses.sum() / max(labeled, 1)


def reference_loss(batch: LossInputs, reduction: str, *, hand_written: bool = False) -> torch.Tensor:
    """float64 loss with autograd: F.cross_entropy on the dense target, or a hand-written log-softmax.

    F.cross_entropy with probability targets gives a zero target row loss 0 and gradient 0, as the
    contract wants; the hand-written one sums over targeted classes only, so -inf logits elsewhere are safe.
    """
    z = batch.logits.detach().double().requires_grad_()
    target = dense_target(batch)
    if hand_written:
        labeled = target.sum(dim=1, keepdim=True) > 0  # (B, 1)
        # Unlabeled rows (possibly all -inf) are replaced before any arithmetic, so no NaN reaches the gradient.
        zs = torch.where(labeled, z, 0)  # (B, C)
        row_max = zs.max(dim=1, keepdim=True).values.detach()
        lse = (row_max + torch.log(torch.exp(zs - row_max).sum(dim=1, keepdim=True)))[:, 0]  # (B,)
        targeted = target > 0
        target_term = (target * torch.where(targeted, zs, 0)).sum(dim=1)  # (B,)
        row_losses = torch.where(labeled[:, 0], lse - target_term, 0)
    else:
        row_losses = F.cross_entropy(z, target, reduction="none")
    return z, reduce_reference(row_losses, target, reduction)


def ulp(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` at each of the float64 ``values`` (its subnormal spacing near 0)."""
    info = torch.finfo(dtype)
    mantissa_bits = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}[dtype]
    _, exponent = torch.frexp(values.abs())  # |v| = m * 2^e, m in [0.5, 1)
    spacing = torch.pow(2.0, (exponent - 1 - mantissa_bits).double())
    return spacing.clamp_min(info.tiny * 2.0 ** -mantissa_bits)


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str,
                   magnitude: float | None = None) -> None:
    """float32 (and float64): within 1e-5 relative, or 4 float32 epsilons of ``magnitude``, the size of
    the terms that cancel (p and t in a gradient, logsumexp and the target logit in a loss; default: the
    largest expected value). bf16/fp16: within one rounding step of the dtype, plus that allowance."""
    actual = actual.detach().double()
    assert torch.isfinite(actual).all(), f"{what}: non-finite values {actual[~torch.isfinite(actual)][:5]}"
    if magnitude is None:
        magnitude = float(expected.abs().max()) if expected.numel() else 0.0
    floor = 4 * FLOAT32_EPS * magnitude
    if dtype in HALF_DTYPES:
        error = (actual - expected).abs()
        allowed = ulp(expected, dtype) + floor
        worst = int(torch.argmax(error - allowed))
        assert bool((error <= allowed).all()), (
            f"{what}: {actual.flatten()[worst]} vs {expected.flatten()[worst]}, more than one {dtype} step")
    else:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=floor, msg=lambda m: f"{what}: {m}")


def run_loss(batch: LossInputs, backend: str, reduction: str, grad_output: torch.Tensor | None = None,
             device: torch.device | str = "cpu", **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, gradient of the logits) from hashtag_cross_entropy on ``device``, brought back to the CPU."""
    logits = batch.logits.detach().clone().to(device).requires_grad_()
    weights = None if batch.weights is None else batch.weights.to(device)
    out = hashtag_cross_entropy(logits, batch.labels.to(device), batch.offsets.to(device), weights, reduction,
                                backend, **kwargs)
    out.backward(torch.ones_like(out) if grad_output is None else grad_output.to(device))
    return out.detach().cpu(), logits.grad.cpu()


def check_against_reference(batch: LossInputs, backend: str, reduction: str, *, hand_written: bool = False,
                            grad_output: torch.Tensor | None = None, device: torch.device | str = "cpu",
                            **kwargs) -> None:
    out, grad = run_loss(batch, backend, reduction, grad_output, device, **kwargs)
    z, ref = reference_loss(batch, reduction, hand_written=hand_written)
    ref.backward(torch.ones_like(ref) if grad_output is None else grad_output.double())
    expected_dtype = torch.float64 if batch.logits.dtype == torch.float64 else torch.float32
    assert out.dtype == expected_dtype and out.shape == ref.shape
    assert grad.dtype == batch.logits.dtype
    assert_matches(out, ref.detach(), torch.float32, f"{backend} loss", loss_magnitude(batch, ref, reduction))
    assert_matches(grad, z.grad, batch.logits.dtype, f"{backend} gradient",
                   gradient_magnitude(batch, reduction, grad_output))


def loss_magnitude(batch: LossInputs, expected: torch.Tensor, reduction: str) -> float:
    # Each row's loss is a difference of terms as large as its largest logit; a sum adds B of them.
    finite = batch.logits.double().nan_to_num(neginf=0.0)
    rows = batch.logits.shape[0] if reduction == "sum" else 1
    return float(expected.detach().abs().max()) + rows * float(finite.abs().max())


def gradient_magnitude(batch: LossInputs, reduction: str, grad_output: torch.Tensor | None) -> float:
    # p and t are at most 1, times the reduction's scale and the incoming gradient.
    scale = 1.0
    if reduction == "mean":
        scale = 1.0 / max(1, int((dense_target(batch).sum(dim=1) > 0).sum()))
    incoming = 1.0 if grad_output is None else float(grad_output.abs().max())
    return scale * incoming


def check_logits_at_the_limit(gen: torch.Generator, backend: str, dtype: torch.dtype, n_rows: int, n_classes: int,
                              device: torch.device | str = "cpu") -> None:
    """Logits of +-max: a row's exact loss can pass float32's range (about 2 max where a -max class is targeted
    beside a +max one), which no float32 output holds. The loss is then +inf and only then; never NaN; the
    gradient (softmax - target, within [-1, 1]) is always finite and right."""
    batch = random_batch(gen, n_rows, n_classes, dtype=torch.float64)
    batch.logits = (torch.sign(batch.logits) * torch.finfo(dtype).max).to(dtype)
    out, grad = run_loss(batch, backend, "none", device=device)
    z, ref = reference_loss(batch, "none")
    ref.sum().backward()
    representable = ref.detach() <= torch.finfo(torch.float32).max  # (B,)
    assert not out.isnan().any() and bool((out[~representable] == float("inf")).all())
    assert_matches(out[representable], ref.detach()[representable], torch.float32, f"{backend} loss")
    assert_matches(grad, z.grad, dtype, f"{backend} gradient", 1.0)
