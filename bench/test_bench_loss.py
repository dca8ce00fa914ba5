"""Forward + backward of the hashtag loss: our fused kernel against PyTorch's cross-entropy on the same targets.

Floor and predicted gain, written before optimizing (the issue's numbers at (256, 17000) float32 on the
2-core machine): PyTorch eager with probability targets 33 ms, its ``torch.compile`` 17 ms, one
``torch.softmax`` pass 4 ms. The fused kernel does one softmax pass's work (one read of the logits, one
exp per element, one write of the gradient) plus a few operations per label, so it should land near the
softmax pass: about 7x faster than eager and 3-4x faster than compile (targets: 5x and 2x). On a GPU the
floor is a device-to-device copy of the logits (one read, one write): the target is 85% of its bandwidth
at B x C >= 64M elements, and 5x eager.

Each (shape, dtype) is one pytest-benchmark group holding every implementation. The fused benchmark also
times all of them interleaved in the same run (a shared machine drifts between runs) and records the
speedups in ``extra_info``, with, on CUDA, its effective bandwidth (one logits read + one gradient write
over its time) as a fraction of a measured copy's.

Baselines: eager ``F.cross_entropy`` on the dense target (built once, outside the timing); ``torch.compile``
of the same function; apex's fused xentropy where apex is installed (CUDA only; it takes one integer label
per row, so it times a single-label fused kernel, not the same loss).

Measured on the 2-core machine (2026-11-29, both cores shared with other jobs, interleaved medians,
speedup of fused / fused_inplace): 256x17000 float32 vs eager 5.6x / 11.8x, vs compile 5.3x / 11.2x;
bfloat16 6.1x / 10.1x and 6.6x / 10.9x; 1024x32768 float32 4.3x / 12.7x and 2.4x / 7.1x; bfloat16
5.0x / 10.9x and 3.3x / 7.2x. Without the in-place mode each call allocates a fresh gradient: at 128 MiB
glibc maps it anew every time (32,768 page faults, about half of the 1024x32768 float32 time here;
THP_MEM_ALLOC_ENABLE=1 cut that to 576 faults and 57 to 28 ms for an allocate-and-fill).

Run: ``.venv/bin/python -m pytest bench/test_bench_loss.py --benchmark-only``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from fastpretrain.loss import hashtag_cross_entropy

SHAPES = [(256, 17_000), (1024, 32_768)]
DTYPES = [torch.float32, torch.bfloat16]
IMPLEMENTATIONS = ["fused", "fused_inplace", "eager", "compiled", "apex"]
# Rounds of the interleaved comparison: enough for a stable median of 5-100 ms calls, under a minute each.
COMPARISON_ROUNDS = 15


@dataclass
class Problem:
    logits: torch.Tensor  # (B, C)
    labels: torch.Tensor  # (nnz,) CSR labels, 1..3 per row
    offsets: torch.Tensor  # (B + 1,)
    dense_target: torch.Tensor  # (B, C): the baselines' form of the same targets, 1/k on each label
    first_label: torch.Tensor  # (B,): one label per row, for apex's single-label kernel


def make_problem(shape: tuple[int, int], dtype: torch.dtype, device: torch.device, seed: int) -> Problem:
    gen = torch.Generator().manual_seed(seed)
    n_rows, n_classes = shape
    counts = torch.randint(1, 4, (n_rows,), generator=gen)  # (B,)
    offsets = torch.zeros(n_rows + 1, dtype=torch.int64)
    offsets[1:] = counts.cumsum(0)
    labels = torch.randint(0, n_classes, (int(offsets[-1]),), generator=gen)  # (nnz,)
    rows = torch.repeat_interleave(torch.arange(n_rows), counts)  # (nnz,)
    dense = torch.zeros(n_rows, n_classes).index_put_((rows, labels), 1.0 / counts[rows].float(), accumulate=True)
    logits = torch.randn(n_rows, n_classes, generator=gen) * 2
    return Problem(logits.to(device, dtype), labels.to(device), offsets.to(device), dense.to(device, dtype),
                   labels[offsets[:-1]].to(device))


def _cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, target)


def _forward_backward(loss: Callable[[torch.Tensor], torch.Tensor], logits: torch.Tensor) -> None:
    # autograd.grad, not backward(): every candidate hands its gradient back the same way, no .grad copy.
    x = logits.detach().requires_grad_()
    torch.autograd.grad(loss(x), x)


def build_step(name: str, problem: Problem) -> Callable[[], None]:
    """One forward + backward of implementation ``name`` (skips when it is unavailable here)."""
    labels, offsets, target = problem.labels, problem.offsets, problem.dense_target
    if name == "fused":
        return lambda: _forward_backward(lambda x: hashtag_cross_entropy(x, labels, offsets), problem.logits)
    if name == "fused_inplace":
        # The trainer's mode: the gradient overwrites the logits. Each call reads the previous call's
        # gradient as its logits (values in [-1, 1]); the kernel's work does not depend on the values.
        buffer = problem.logits.clone()
        return lambda: _forward_backward(lambda x: hashtag_cross_entropy(x, labels, offsets, inplace=True), buffer)
    if name == "eager":
        return lambda: _forward_backward(lambda x: _cross_entropy(x, target), problem.logits)
    if name == "compiled":
        compiled = torch.compile(_cross_entropy, dynamic=False)
        return lambda: _forward_backward(lambda x: compiled(x, target), problem.logits)
    if name == "apex":
        if problem.logits.device.type != "cuda" or importlib.util.find_spec("apex") is None:
            pytest.skip("apex's xentropy needs apex and CUDA")
        from apex.contrib.xentropy import SoftmaxCrossEntropyLoss

        # padding_idx -100: no real label is masked out.
        return lambda: _forward_backward(
            lambda x: SoftmaxCrossEntropyLoss.apply(x, problem.first_label, 0.0, -100, False).mean(), problem.logits)
    raise ValueError(f"unknown implementation {name!r}")


def record_comparison(benchmark, problem: Problem, side_by_side, device: torch.device) -> None:
    """Times every available implementation interleaved with the fused one; records the ratios."""
    candidates = {name: build_step(name, problem) for name in ("fused", "fused_inplace", "eager", "compiled")}
    if device.type == "cuda":
        source = problem.logits
        destination = torch.empty_like(source)
        candidates["copy"] = lambda: destination.copy_(source)
        if importlib.util.find_spec("apex") is not None:
            candidates["apex"] = build_step("apex", problem)
    medians = side_by_side(candidates, COMPARISON_ROUNDS)
    benchmark.extra_info["median_ms"] = {name: round(seconds * 1e3, 3) for name, seconds in medians.items()}
    for ours in ("fused", "fused_inplace"):
        for name, seconds in medians.items():
            if name not in ("fused", "fused_inplace", "copy"):
                benchmark.extra_info[f"{ours}_speedup_vs_{name}"] = round(seconds / medians[ours], 2)
    if "copy" in medians:
        bytes_moved = 2 * problem.logits.numel() * problem.logits.element_size()  # one read + one write
        for ours in ("fused", "fused_inplace"):
            benchmark.extra_info[f"{ours}_gb_per_s"] = round(bytes_moved / medians[ours] / 1e9, 1)
            benchmark.extra_info[f"{ours}_fraction_of_copy_bandwidth"] = round(medians["copy"] / medians[ours], 3)
    print(f"\n{benchmark.group}: {benchmark.extra_info}")


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: f"{shape[0]}x{shape[1]}")
def test_forward_backward(benchmark, device, seed, side_by_side, synchronized, shape, dtype, implementation):
    problem = make_problem(shape, dtype, device, seed)
    step = build_step(implementation, problem)
    benchmark.group = f"hashtag xent fwd+bwd {shape[0]}x{shape[1]} {str(dtype).removeprefix('torch.')} {device.type}"
    benchmark.extra_info["implementation"] = implementation
    if implementation == "fused":
        record_comparison(benchmark, problem, side_by_side, device)
    benchmark.pedantic(synchronized(step), rounds=10, warmup_rounds=2, iterations=1)
