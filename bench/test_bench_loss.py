"""Forward + backward of the hashtag loss: our fused kernel against PyTorch's cross-entropy on the same targets.

Floor: the fused kernel does one softmax pass's work (one read of the logits, one exp per element, one write of the
gradient) plus a few operations per label, so it should land near a single ``torch.softmax`` pass, well under eager
cross-entropy with probability targets (several passes and a dense (B, C) target) and under its ``torch.compile``
(fused, but still reading the dense target). In place (the trainer's mode) it writes the gradient over the logits and
allocates nothing. On a GPU the floor is a device-to-device copy of the logits (one read, one write): the ``vs-copy``
row is the fraction of the copy's bandwidth reached.

Baselines: eager ``F.cross_entropy`` on the dense target (built once, outside the timing); ``torch.compile`` of the
same function; on CUDA a copy of the logits, and apex's fused xentropy where apex is installed (it takes one integer
label per row, so it times a single-label kernel, not the same loss).

Every implementation is timed interleaved (``side_by_side``: each call after 20 ms of untimed calls of the same
implementation, the order rotated every round) and each row's ratio is the median over rounds of baseline time / our
time in the same round; ``benchmark`` itself times our in-place path. The short mode runs the paper's shape only.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from fastpretrain.loss import hashtag_cross_entropy

DEVICES = ["cpu", "cuda"]
SHAPES = [pytest.param((256, 17_000), id="256x17000"),  # the paper's head, a CPU batch
          pytest.param((1024, 32_768), id="1024x32768", marks=pytest.mark.full)]
DTYPES = [torch.float32, torch.bfloat16]
OURS = {"inplace": "fused_inplace", "fused": "fused"}  # row label -> implementation
# Rounds of the interleaved comparison: enough for a stable median of 1-300 ms calls, under a minute per case.
ROUNDS, SHORT_ROUNDS = 25, 15


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


def build_step(name: str, problem: Problem) -> Callable[[], object]:
    """One forward + backward of implementation ``name``."""
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
    if name == "compile":
        compiled = torch.compile(_cross_entropy, dynamic=False)
        return lambda: _forward_backward(lambda x: compiled(x, target), problem.logits)
    if name == "apex-single-label":
        from apex.contrib.xentropy import SoftmaxCrossEntropyLoss

        # padding_idx -100: no real label is masked out.
        return lambda: _forward_backward(
            lambda x: SoftmaxCrossEntropyLoss.apply(x, problem.first_label, 0.0, -100, False).mean(), problem.logits)
    if name == "copy":
        destination = torch.empty_like(problem.logits)
        return lambda: destination.copy_(problem.logits)
    raise ValueError(f"unknown implementation {name!r}")


def baselines_here(device: torch.device) -> list[str]:
    names = ["eager", "compile"]
    if device.type == "cuda":
        names.append("copy")
        if importlib.util.find_spec("apex") is not None:
            names.append("apex-single-label")
    return names


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda dtype: str(dtype).removeprefix("torch."))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_forward_backward(benchmark, report, device, seed, side_by_side, synchronized, short, shape, dtype):
    problem = make_problem(shape, dtype, device, seed)
    baselines = baselines_here(device)
    steps = {name: build_step(name, problem) for name in [*OURS.values(), *baselines]}
    comparison = side_by_side(steps, SHORT_ROUNDS if short else ROUNDS)
    case = f"loss/{device.type}/{shape[0]}x{shape[1]}-{str(dtype).removeprefix('torch.')}"
    for label, ours in OURS.items():
        for baseline in baselines:
            report(f"{case}/{label}-vs-{baseline}", comparison.median(ours) * 1e3, comparison.median(baseline) * 1e3,
                   comparison.speedup(ours, baseline), "ms", device.type)
    if device.type == "cuda":
        bytes_moved = 2 * problem.logits.numel() * problem.logits.element_size()  # one read + one write
        benchmark.extra_info["inplace_gb_per_s"] = round(bytes_moved / comparison.median("fused_inplace") / 1e9, 1)
    benchmark.group = case
    benchmark.pedantic(synchronized(steps["fused_inplace"]), rounds=10, warmup_rounds=2, iterations=1)
