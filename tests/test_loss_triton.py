"""The Triton kernel of the hashtag loss against the float64 references of tests/reference.py: the backend at
sizes the interpreter can run, its launcher's block paths, and its GPU-only behaviour (the contract's edge
cases run on every backend, Triton included, in test_loss.py).

Without CUDA the kernels run on CPU tensors in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before triton is imported), 100-500x slower than on a GPU, so the shapes stay small;
the long rows of large heads take the kernel's two-pass path, which runs here on short rows by lowering
``max_block``. The interpreter does not type-check like the compiler, so one test compiles every kernel
for a Hopper GPU (sm_90) in a subprocess, which needs no GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from reference import (
    assert_matches,
    check_against_reference,
    dense_target,
    gradient_magnitude,
    loss_magnitude,
    random_batch,
    reference_loss,
)

from fastpretrain.loss import BACKENDS, hashtag_cross_entropy

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_cannot_run = BACKENDS["triton"].cannot_run(torch.zeros(1, 1, device=DEVICE))
pytestmark = pytest.mark.skipif(_cannot_run is not None, reason=f"triton backend: {_cannot_run}")
on_cuda = pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA behaviour")


@pytest.fixture(scope="module")
def kernels():
    from fastpretrain.kernels import hashtag_xent

    return hashtag_xent


@pytest.mark.parametrize("shape", [(4, 1), (5, 37), (3, 1000), (2, 4097)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_matches_float64_cross_entropy(gen, shape, dtype, reduction):
    batch = random_batch(gen, *shape, dtype=dtype)
    check_against_reference(batch, "triton", reduction, device=DEVICE)


def test_weighted_targets_int32_indices(gen):
    batch = random_batch(gen, 6, 129, weighted=True, index_dtype=torch.int32)
    check_against_reference(batch, "triton", "sum", device=DEVICE)


def test_incoming_gradient_per_row(gen):
    batch = random_batch(gen, 5, 70)
    grad_output = torch.randn(5, generator=gen, dtype=torch.float64).to(torch.float32)
    grad_output[1] = 1.0  # a row the scaling leaves alone
    check_against_reference(batch, "triton", "none", grad_output=grad_output, device=DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_inplace_mode(gen, dtype):
    batch = random_batch(gen, 4, 300, dtype=dtype)
    logits = batch.logits.clone().to(DEVICE).requires_grad_()
    hidden = logits * 1  # not a leaf, as a model's output
    buffer = hidden.detach()
    out = hashtag_cross_entropy(hidden, batch.labels.to(DEVICE), batch.offsets.to(DEVICE), backend="triton",
                                inplace=True)
    out.backward()
    z, ref = reference_loss(batch, "mean")
    ref.backward()
    assert_matches(out.detach().cpu(), ref.detach(), torch.float32, "loss", loss_magnitude(batch, ref, "mean"))
    assert_matches(buffer.cpu(), z.grad, dtype, "gradient in the logits buffer",
                   gradient_magnitude(batch, "mean", None))


def launch_and_check(gen: torch.Generator, kernels, shape: tuple[int, int], dtype: torch.dtype, weighted: bool,
                     **launch_options) -> None:
    """Runs the launcher on poisoned (NaN) outputs and compares every element with the reference."""
    batch = random_batch(gen, *shape, dtype=dtype, weighted=weighted, max_labels=6)
    row_loss = torch.full((shape[0],), float("nan"), device=DEVICE)
    grad = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    weights = None if batch.weights is None else batch.weights.to(DEVICE)
    kernels.hashtag_xent_forward(batch.logits.to(DEVICE), batch.labels.to(DEVICE), batch.offsets.to(DEVICE), weights,
                                 torch.tensor(0.5, device=DEVICE), row_loss, grad, **launch_options)
    z, ref = reference_loss(batch, "sum")
    ref.backward()
    expected_loss = F.cross_entropy(z.detach(), dense_target(batch), reduction="none")
    assert_matches(row_loss.cpu(), expected_loss, torch.float32, "loss", loss_magnitude(batch, expected_loss, "none"))
    assert_matches(grad.cpu(), z.grad * 0.5, dtype, "gradient", 0.5)


@pytest.mark.parametrize("shape, max_block", [((3, 1000), 256), ((2, 37), 16), ((6, 37), 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("weighted", [False, True], ids=["uniform", "weighted"])
def test_launcher_writes_every_element(gen, kernels, shape, max_block, dtype, weighted):
    launch_and_check(gen, kernels, shape, dtype, weighted, max_block=max_block)


def test_launcher_streams_a_large_row(gen, kernels):
    launch_and_check(gen, kernels, (1, 262_144), torch.float32, weighted=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_scale_rows_skips_rows_scaled_by_one(gen, kernels, dtype):
    grad = torch.randn(5, 3000, generator=gen).to(dtype)
    per_row = torch.randn(5, generator=gen)
    per_row[[0, 3]] = 1.0
    for scale in (per_row, torch.tensor(1.0), torch.tensor(-2.5)):
        scaled = grad.clone().to(DEVICE)
        kernels.scale_rows_(scaled, scale.to(DEVICE))
        scaled = scaled.cpu()
        factor = scale.expand(5)[:, None]  # (5, 1)
        untouched = factor[:, 0] == 1
        assert torch.equal(scaled[untouched], grad[untouched])
        if not untouched.all():
            # One rounding step, not bitwise: the interpreter truncates float32 to bfloat16 (its cast
            # ignores the rounding mode), where a GPU rounds to nearest.
            expected = grad.double() * factor.double()
            assert_matches(scaled[~untouched], expected[~untouched], dtype, f"rows scaled by {scale}")


def test_kernels_compile_for_hopper():
    # In a subprocess without TRITON_INTERPRET: this process's kernels are interpreted functions.
    script = textwrap.dedent(
        """
        import triton
        from triton.backends.compiler import GPUTarget
        from fastpretrain.kernels import hashtag_xent as k

        target = GPUTarget("cuda", 90, 32)
        pointers = {"logits_ptr": "*{dt}", "grad_ptr": "*{dt}", "loss_ptr": "*fp32", "labels_ptr": "*{ix}",
                    "offsets_ptr": "*{ix}", "weights_ptr": "*fp32", "scale_ptr": "*fp32"}
        scalars = {"logits_row_units": "i64", "grad_row_units": "i64", "n_col_units": "i32"}
        flags = ("HAS_WEIGHTS", "WRITE_GRAD", "SINGLE_BLOCK", "BLOCK", "ALIGN")
        variants = [("fp32", "i64", True, True, True, 32768, 8), ("bf16", "i32", False, True, False, k.STREAM_BLOCK, 4),
                    ("fp16", "i64", False, False, True, 1024, 1), ("fp32", "i32", True, False, False, k.STREAM_BLOCK, 16)]
        for dt, ix, weighted, write_grad, single, block, align in variants:
            signature = {name: kind.format(dt=dt, ix=ix) for name, kind in pointers.items()}
            signature.update(scalars)
            signature.update({flag: "constexpr" for flag in flags})
            constants = dict(zip(flags, (weighted, write_grad, single, block, align)))
            source = triton.compiler.ASTSource(fn=k._hashtag_xent_fwd_kernel, signature=signature, constexprs=constants)
            triton.compile(source, target=target, options={"num_warps": k._num_warps(block)})
        for dt in ("fp32", "bf16"):
            signature = {"grad_ptr": f"*{dt}", "grad_row_stride": "i64", "scale_ptr": "*fp32",
                         "scale_stride": "i64", "n_cols": "i32", "BLOCK": "constexpr"}
            source = triton.compiler.ASTSource(fn=k._scale_rows_kernel, signature=signature,
                                               constexprs={"BLOCK": k.SCALE_BLOCK})
            triton.compile(source, target=target, options={"num_warps": 8})
        print("compiled")
        """
    )
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]


def test_strides_in_aligned_units_give_vector_loads_at_17000_classes():
    """17,000 is not a multiple of 16, so Triton never specializes C or the row stride as aligned: passed as is, every
    bf16 logit is its own 2-byte load (ld.global.b16). Passed in units of ALIGN = 8 (what ``alignment`` finds for
    17,000), rows are known 16-byte aligned and the masked tail constant over 8 lanes: 128-bit loads and stores
    (ld.global.v4.b32). Compiled for sm_90 in a subprocess (no GPU needed), the PTX counted."""
    script = textwrap.dedent(
        r"""
        import re
        from collections import Counter
        import triton
        from triton.backends.compiler import GPUTarget
        from fastpretrain.kernels import hashtag_xent as k

        names = list(k._hashtag_xent_fwd_kernel.arg_names)
        signature = {"logits_ptr": "*bf16", "logits_row_units": "i64", "grad_ptr": "*bf16", "grad_row_units": "i64",
                     "loss_ptr": "*fp32", "labels_ptr": "*i64", "offsets_ptr": "*i64", "weights_ptr": "*fp32",
                     "scale_ptr": "*fp32", "n_col_units": "i32", "HAS_WEIGHTS": "constexpr", "WRITE_GRAD": "constexpr",
                     "SINGLE_BLOCK": "constexpr", "BLOCK": "constexpr", "ALIGN": "constexpr"}
        # What the launcher's specialization says of tensors torch allocated: pointers 16-byte aligned.
        attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(names) if name.endswith("_ptr")}
        for align in (1, k.alignment(17000, 17000, 17000)):
            constants = {"HAS_WEIGHTS": False, "WRITE_GRAD": True, "SINGLE_BLOCK": True, "BLOCK": 32768, "ALIGN": align}
            source = triton.compiler.ASTSource(fn=k._hashtag_xent_fwd_kernel, signature=signature, constexprs=constants,
                                               attrs=attrs)
            ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 32}).asm["ptx"]
            counts = Counter(re.findall(r"(?:ld|st)\.global[.a-z0-9]*", ptx))
            print(align, counts["ld.global.b16"], counts["ld.global.v4.b32"], counts["st.global.b16"],
                  counts["st.global.v4.b32"])
        """
    )
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (plain, aligned) = [list(map(int, line.split())) for line in result.stdout.split("\n") if line.strip()]
    assert plain[0] == 1 and aligned[0] == 8
    assert plain[1] > 16 and plain[2] == 0 and plain[3] > 16 and plain[4] == 0  # one 2-byte access per element
    assert aligned[2] > 0 and aligned[4] > 0 and aligned[3] == 0  # 16-byte vectors, no 2-byte stores


@on_cuda
def test_second_backward_raises_on_cuda(gen):
    # The fused backward scales its saved gradient in place on CUDA (no synchronisation to read the factor).
    batch = random_batch(gen, 3, 50)
    logits = batch.logits.to(DEVICE).requires_grad_()
    out = hashtag_cross_entropy(logits, batch.labels.to(DEVICE), batch.offsets.to(DEVICE), reduction="sum",
                                backend="triton")
    out.backward(torch.tensor(2.0, device=DEVICE), retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()


@on_cuda
def test_value_checks_on_cuda_when_asked(monkeypatch):
    logits = torch.zeros(2, 5, device=DEVICE)
    labels = torch.tensor([0, 7], device=DEVICE)
    offsets = torch.tensor([0, 1, 2], device=DEVICE)
    with pytest.raises(ValueError, match=r"labels\[1\] = 7"):
        hashtag_cross_entropy(logits, labels, offsets, validate=True)
    monkeypatch.setenv("FASTPRETRAIN_VALIDATE_LOSS", "1")
    with pytest.raises(ValueError, match=r"labels\[1\] = 7"):
        hashtag_cross_entropy(logits, labels, offsets)


@pytest.mark.parametrize("extents, expected", [((17000, 17000, 17000), 8), ((17000, 17000, 0), 8), ((17001, 17001, 0), 1),
                                               ((32768, 32768, 32768), 16), ((1000, 1024, 1000), 8), ((6, 6, 0), 2)])
def test_alignment_is_the_largest_power_of_two_dividing_every_extent(kernels, extents, expected):
    assert kernels.alignment(*extents) == expected
