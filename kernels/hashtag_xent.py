"""Fused hashtag softmax cross-entropy in Triton: one program per row, float32 accumulation.

Row i's target spreads its labels' weights (1 each without weights) normalized to sum 1:
``loss_i = logsumexp(z_i) - sum_j t_ij z_ij`` and ``grad_i = (softmax(z_i) - t_i) * scale``, the gradient
written by the forward (into the logits' own buffer in the in-place mode), so the backward only scales it.

Floor: one read of the logits and one write of the gradient (2 * B * C * itemsize bytes). A row of up to
``MAX_BLOCK`` classes is held in registers whole and reaches that floor; a longer row makes two passes
(an online max/sum, then the gradient) over blocks of ``STREAM_BLOCK``, the second read mostly served
from L2. Block and warp numbers: compiled offline for sm_90 (``triton.compile`` with a ``GPUTarget``,
registers read with cuobjdump), a whole row of 32768 over 32 warps takes 64 registers a thread and
spills nothing, while streaming blocks of 32768 spilled (216 bytes of stack) and blocks of 8192 over 16
warps do not. No GPU timing has tuned them yet.

The labels of a row (a handful in practice) are matched against each column block one by one, so a
repeated label counts twice and no dense target ever exists.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

MAX_BLOCK = 32768
STREAM_BLOCK = 8192
SCALE_BLOCK = 4096
# The most negative finite float32: the running max starts here, not at -inf, so that a row of -inf
# logits never computes -inf - (-inf).
FLOAT32_LOWEST = tl.constexpr(-3.4028234663852886e38)


@triton.jit
def _row_gradient_block(x, cols, log_sum, scale, total_weight, labels_ptr, weights_ptr, begin, end,
                        HAS_WEIGHTS: tl.constexpr):
    """(softmax - target) * scale on one block of a row: x (BLOCK,) float32 logits less the row max,
    cols (BLOCK,) their class ids, log_sum the log of the row's sum of exp(x)."""
    g = tl.exp(x - log_sum) * scale
    for j in range(begin, end):
        label = tl.load(labels_ptr + j)
        if HAS_WEIGHTS:
            w = tl.load(weights_ptr + j).to(tl.float32)
        else:
            w = 1.0
        g = tl.where(cols == label, g - w / total_weight * scale, g)
    return g


@triton.jit
def _hashtag_xent_fwd_kernel(
    logits_ptr,  # (B, C) float32/bf16/fp16, unit column stride
    logits_row_units,  # the row stride in units of ALIGN elements
    grad_ptr,  # (B, C) like logits, written when WRITE_GRAD (may be logits_ptr itself: in-place mode)
    grad_row_units,
    loss_ptr,  # (B,) float32, written: each row's loss (0 for a row whose labels weigh 0)
    labels_ptr,  # (nnz,) int32/int64 class ids
    offsets_ptr,  # (B + 1,) int32/int64 CSR offsets into labels
    weights_ptr,  # (nnz,) float weights, read when HAS_WEIGHTS
    scale_ptr,  # () float32: the reduction's scale of the gradient (1 / labeled rows for a mean)
    n_col_units,  # C in units of ALIGN elements
    HAS_WEIGHTS: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr,  # the whole row fits in one BLOCK: one read of the logits
    BLOCK: tl.constexpr,
    ALIGN: tl.constexpr,  # elements that divide C and both row strides (a power of two up to 16)
):
    # Strides and C arrive in units of ALIGN and are multiplied back here, so that Triton knows every row starts
    # ALIGN elements aligned and the tail mask is constant over ALIGN lanes: a C of 17,000 (not a multiple of 16, so
    # never specialized as aligned) then gets 16-byte vector loads instead of one 2-byte load per element.
    n_cols = n_col_units * ALIGN
    row = tl.program_id(0).to(tl.int64)
    x_row = logits_ptr + row * (logits_row_units * ALIGN)
    g_row = grad_ptr + row * (grad_row_units * ALIGN)
    begin = tl.load(offsets_ptr + row).to(tl.int64)
    end = tl.load(offsets_ptr + row + 1).to(tl.int64)
    cols = tl.arange(0, BLOCK)

    # Target logits first: in the in-place mode the gradient overwrites them. Summed as t_j * z_j with the
    # weights normalized first, so that no partial sum leaves the logits' range (k logits of the dtype's max
    # summed before dividing by k would overflow). A zero weight reads its logit as 0, so that a -inf logit it
    # points at cannot make 0 * -inf.
    if HAS_WEIGHTS:
        total_weight = 0.0
        for j in range(begin, end):
            total_weight += tl.load(weights_ptr + j).to(tl.float32)
    else:
        total_weight = (end - begin).to(tl.float32)
    target_logit = 0.0
    for j in range(begin, end):
        z = tl.load(x_row + tl.load(labels_ptr + j)).to(tl.float32)
        if HAS_WEIGHTS:
            w = tl.load(weights_ptr + j).to(tl.float32)
            target_logit += w / total_weight * tl.where(w > 0, z, 0.0)
        else:
            target_logit += z / total_weight

    scale = tl.load(scale_ptr)
    row_loss = total_weight * 0.0
    if total_weight > 0:
        if SINGLE_BLOCK:
            mask = cols < n_cols
            x = tl.load(x_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
            row_max = tl.maximum(tl.max(x, axis=0), FLOAT32_LOWEST)
            log_sum = tl.log(tl.sum(tl.exp(x - row_max), axis=0))
            if WRITE_GRAD:
                g = _row_gradient_block(x - row_max, cols, log_sum, scale, total_weight, labels_ptr,
                                        weights_ptr, begin, end, HAS_WEIGHTS)
                tl.store(g_row + cols, g.to(grad_ptr.dtype.element_ty), mask=mask)
        else:
            # Online logsumexp: rescale the running sum whenever the running max grows.
            row_max = FLOAT32_LOWEST
            sum_exp = 0.0
            for start in range(0, n_cols, BLOCK):
                block_cols = start + cols
                x = tl.load(x_row + block_cols, mask=block_cols < n_cols, other=float("-inf")).to(tl.float32)
                new_max = tl.maximum(row_max, tl.max(x, axis=0))
                sum_exp = sum_exp * tl.exp(row_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
                row_max = new_max
            log_sum = tl.log(sum_exp)
            if WRITE_GRAD:
                for start in range(0, n_cols, BLOCK):
                    block_cols = start + cols
                    mask = block_cols < n_cols
                    x = tl.load(x_row + block_cols, mask=mask, other=float("-inf")).to(tl.float32)
                    g = _row_gradient_block(x - row_max, block_cols, log_sum, scale, total_weight, labels_ptr,
                                            weights_ptr, begin, end, HAS_WEIGHTS)
                    tl.store(g_row + block_cols, g.to(grad_ptr.dtype.element_ty), mask=mask)
        # (max - target logit) + log-sum: at large logits, max + log-sum would round the log-sum away.
        row_loss = (row_max - target_logit) + log_sum
    else:
        if WRITE_GRAD:
            for start in range(0, n_cols, BLOCK):
                block_cols = start + cols
                zeros = tl.zeros([BLOCK], dtype=tl.float32)
                tl.store(g_row + block_cols, zeros.to(grad_ptr.dtype.element_ty), mask=block_cols < n_cols)
    tl.store(loss_ptr + row, row_loss)


@triton.jit
def _scale_rows_kernel(
    grad_ptr,  # (B, C) float32/bf16/fp16, scaled in place
    grad_row_stride,
    scale_ptr,  # row i's scale at scale_ptr + i * scale_stride (stride 0: one scale for all rows)
    scale_stride,
    n_cols,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    scale = tl.load(scale_ptr + row * scale_stride).to(tl.float32)
    # A loss's incoming gradient is 1 unless something (AMP's loss scaling) multiplies it: skip the pass.
    if scale != 1.0:
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        ptrs = grad_ptr + row * grad_row_stride + cols
        g = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(ptrs, (g * scale).to(grad_ptr.dtype.element_ty), mask=mask)


def interpreted() -> bool:
    """True when Triton runs these kernels in its CPU interpreter (TRITON_INTERPRET=1 before import)."""
    return isinstance(_hashtag_xent_fwd_kernel, InterpretedFunction)


def alignment(*extents: int) -> int:
    """The largest power of two up to 16 that divides every extent (0 divides by anything)."""
    align = 16
    while align > 1 and any(extent % align for extent in extents):
        align //= 2
    return align


def _num_warps(block: int) -> int:
    # 16 elements a thread (32 for a whole row of 32768), at least 4 warps: see the register counts above.
    return max(4, min(32, block // 512))


def hashtag_xent_forward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    offsets: torch.Tensor,
    weights: torch.Tensor | None,
    grad_scale: torch.Tensor,
    row_loss: torch.Tensor,
    grad: torch.Tensor | None,
    max_block: int = MAX_BLOCK,
    block: int | None = None,
    num_warps: int | None = None,
) -> None:
    """Writes each row's loss into ``row_loss`` and, when ``grad`` is given, ``(softmax - t) * grad_scale``.

    ``logits`` (B, C) with unit column stride; ``labels`` (nnz,), ``offsets`` (B + 1,) int32/int64;
    ``weights`` (nnz,) or None; ``grad_scale`` a 0-dim float32 tensor; ``row_loss`` (B,) float32;
    ``grad`` (B, C) like logits (it may be ``logits`` itself) or None. ``max_block`` caps the columns held
    whole in one block (smaller values exercise the two-pass path on small rows). ``block`` (a power of two;
    the whole row in one block when it covers the row, else the two-pass path) and ``num_warps`` override the
    choice made here, for the GPU suite's sweep (bench/test_bench_gpu.py).
    """
    n_rows, n_cols = logits.shape
    whole_row = triton.next_power_of_2(n_cols)
    if block is None:
        block = whole_row if whole_row <= max_block else min(STREAM_BLOCK, max_block)
    block = min(block, whole_row)
    grad_stride = 0 if grad is None else grad.stride(0)
    align = alignment(n_cols, logits.stride(0), grad_stride)
    _hashtag_xent_fwd_kernel[(n_rows,)](
        logits,
        logits.stride(0) // align,
        logits if grad is None else grad,
        grad_stride // align,
        row_loss,
        labels,
        offsets,
        labels if weights is None else weights,
        grad_scale,
        n_cols // align,
        HAS_WEIGHTS=weights is not None,
        WRITE_GRAD=grad is not None,
        SINGLE_BLOCK=block == whole_row,
        BLOCK=block,
        ALIGN=align,
        num_warps=_num_warps(block) if num_warps is None else num_warps,
    )


def scale_rows_(grad: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Multiplies row i of ``grad`` (B, C) in place by ``scale`` (a 0-dim tensor, or one per row), in float32.

    Rows whose scale is exactly 1 are not touched, and the scale is read on the device: no synchronisation.
    """
    n_rows, n_cols = grad.shape
    scale_stride = 0 if scale.dim() == 0 else scale.stride(0)
    grid = (n_rows, triton.cdiv(n_cols, SCALE_BLOCK))
    _scale_rows_kernel[grid](grad, grad.stride(0), scale, scale_stride, n_cols, BLOCK=SCALE_BLOCK, num_warps=8)
    return grad
