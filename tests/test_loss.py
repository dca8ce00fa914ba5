"""fastpretrain.loss against the float64 references of tests/reference.py, on fresh random inputs each run.

The torch and cpp backends run every test here (``backend``); the edge cases of the contract (extreme logits,
-inf, rows without labels) run on every registered backend that can run on this machine's device
(``any_backend``: Triton too, under its interpreter without a GPU, at small sizes). The Triton kernel's own
launcher and its GPU behaviour are in test_loss_triton.py.
"""

from __future__ import annotations

import fcntl
import logging
import threading
import time

import pytest
import torch
import torch.nn.functional as F
from reference import (
    LossInputs,
    assert_matches,
    check_against_reference,
    check_logits_at_the_limit,
    dense_target,
    gradient_magnitude,
    loss_magnitude,
    random_batch,
    reference_loss,
    run_loss,
)

from fastpretrain import cpp_extension, loss
from fastpretrain import log as fastpretrain_log
from fastpretrain.loss import BACKENDS, HashtagCrossEntropy, SparseTargets, hashtag_cross_entropy

CPU_BACKENDS = ("torch", "cpp")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ----------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="session")
def cpp_module():
    """The C++ extension, built once per test session (about a minute the first time on 2 cores)."""
    return cpp_extension.load_extension("xent")


@pytest.fixture(params=CPU_BACKENDS)
def backend(request) -> str:
    if request.param == "cpp":
        request.getfixturevalue("cpp_module")
    return request.param


@pytest.fixture(params=sorted(BACKENDS))
def any_backend(request) -> str:
    """Each registered backend that can run float32 logits on DEVICE (skipped, with the reason, where not)."""
    reason = BACKENDS[request.param].cannot_run(torch.zeros(1, 1, device=DEVICE))
    if reason is not None:
        pytest.skip(f"{request.param}: {reason}")
    if request.param == "cpp":
        request.getfixturevalue("cpp_module")
    return request.param


# ----------------------------------------------------------------------------------------------------
# Numbers


@pytest.mark.parametrize("shape", [(1, 1), (4, 1), (5, 37), (16, 1000), (3, 17001)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("reduction", loss.REDUCTIONS)
def test_matches_float64_cross_entropy(gen, backend, shape, dtype, reduction):
    batch = random_batch(gen, *shape, dtype=dtype)
    check_against_reference(batch, backend, reduction)


@pytest.mark.parametrize("reduction", loss.REDUCTIONS)
def test_weighted_targets(gen, backend, reduction):
    batch = random_batch(gen, 12, 301, weighted=True)
    check_against_reference(batch, backend, reduction)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_large_head(gen, backend, dtype):
    # The follow-up work's head is about 28,000 classes; the contract goes to 262,144.
    batch = random_batch(gen, 2, 262_144, dtype=dtype, max_labels=6)
    check_against_reference(batch, backend, "mean")


@pytest.mark.parametrize("reduction", loss.REDUCTIONS)
def test_incoming_gradient_scales_the_result(gen, backend, reduction):
    batch = random_batch(gen, 9, 113)
    shape = (9,) if reduction == "none" else ()
    grad_output = torch.randn(shape, generator=gen, dtype=torch.float64).to(torch.float32)
    check_against_reference(batch, backend, reduction, grad_output=grad_output)


def test_int32_indices(gen, backend):
    batch = random_batch(gen, 7, 50, index_dtype=torch.int32)
    check_against_reference(batch, backend, "mean")


def test_repeated_label_counts_twice(backend):
    # Row 0: labels 3, 3, 5 -> target 2/3 on class 3 and 1/3 on class 5; row 1 has no labels.
    logits = torch.tensor([[0.5, -1.0, 2.0, 0.25, 1.5, -0.75], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    labels = torch.tensor([3, 3, 5])
    offsets = torch.tensor([0, 3, 3])
    z = logits.double()
    lse = torch.logsumexp(z[0], dim=0)
    expected_loss = float(lse - (2 / 3 * z[0, 3] + 1 / 3 * z[0, 5]))
    expected_grad = torch.zeros(2, 6, dtype=torch.float64)
    expected_grad[0] = torch.softmax(z[0], dim=0)
    expected_grad[0, 3] -= 2 / 3
    expected_grad[0, 5] -= 1 / 3
    out, grad = run_loss(LossInputs(logits, labels, offsets, None), backend, "mean")
    assert_matches(out, torch.tensor(expected_loss, dtype=torch.float64), torch.float32, "loss")
    assert_matches(grad, expected_grad, torch.float32, "gradient")


def test_rows_without_labels_or_weight(gen, any_backend):
    logits = torch.randn(3, 10, generator=gen)
    labels = torch.tensor([1, 2])
    weights = torch.tensor([0.0, 0.0])  # row 1's labels weigh nothing
    for offsets, w in ((torch.tensor([0, 0, 0, 0]), None), (torch.tensor([0, 0, 2, 2]), weights)):
        batch = LossInputs(logits, labels[: int(offsets[-1])], offsets, None if w is None else w)
        for reduction in loss.REDUCTIONS:
            out, grad = run_loss(batch, any_backend, reduction, device=DEVICE)
            assert bool((out == 0).all()), f"{reduction}: {out}"
            assert bool((grad == 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_extreme_logits(gen, any_backend, dtype):
    # A quarter of the dtype's largest value: logsumexp and its differences still fit in float32.
    batch = random_batch(gen, 8, 97, dtype=torch.float64)
    largest = torch.finfo(dtype).max / 4 if dtype != torch.float16 else torch.finfo(dtype).max
    batch.logits = (torch.sign(batch.logits) * largest * torch.rand(batch.logits.shape, generator=gen,
                                                                     dtype=torch.float64)).to(dtype)
    check_against_reference(batch, any_backend, "none", device=DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_logits_at_the_limit_of_their_dtype(gen, any_backend, dtype):
    check_logits_at_the_limit(gen, any_backend, dtype, 16, 33, device=DEVICE)


def test_minus_inf_on_untargeted_classes(gen, any_backend):
    batch = random_batch(gen, 10, 64)
    target = dense_target(batch)
    masked = (torch.rand(batch.logits.shape, generator=gen) < 0.5) & (target == 0)
    batch.logits = batch.logits.masked_fill(masked, float("-inf"))
    batch.logits[target.sum(dim=1) == 0] = float("-inf")  # whole rows of -inf where nothing is targeted
    check_against_reference(batch, any_backend, "mean", hand_written=True, device=DEVICE)


def test_non_contiguous_logits(gen, backend):
    batch = random_batch(gen, 6, 40)
    batch.logits = batch.logits.t().contiguous().t()  # same values, column-major
    assert not batch.logits.is_contiguous()
    check_against_reference(batch, backend, "sum")


@pytest.mark.parametrize("reduction", loss.REDUCTIONS)
def test_gradcheck_float64(gen, backend, reduction):
    batch = random_batch(gen, 4, 7, dtype=torch.float64, weighted=True)
    logits = batch.logits.detach().requires_grad_()

    def function(x):
        return hashtag_cross_entropy(x, batch.labels, batch.offsets, batch.weights.double(), reduction, backend)

    assert torch.autograd.gradcheck(function, (logits,), eps=1e-6, atol=1e-7)


def test_backward_twice_with_retain_graph(gen, backend):
    batch = random_batch(gen, 5, 30)
    logits = batch.logits.detach().clone().requires_grad_()
    out = hashtag_cross_entropy(logits, batch.labels, batch.offsets, reduction="sum", backend=backend)
    out.backward(torch.tensor(2.0), retain_graph=True)
    first = logits.grad.clone()
    out.backward(torch.tensor(1.0))
    torch.testing.assert_close(logits.grad, first * 1.5)


# ----------------------------------------------------------------------------------------------------
# Every backend, the same numbers


def runnable_backends(logits: torch.Tensor) -> list[str]:
    return [name for name, backend in BACKENDS.items() if backend.cannot_run(logits) is None]


def test_every_registered_backend_agrees(gen, cpp_module):
    batch = random_batch(gen, 5, 37, weighted=True)
    names = runnable_backends(batch.logits)
    assert {"torch", "cpp"} <= set(names)
    results = {name: run_loss(batch, name, "mean") for name in names}
    loss_ref, grad_ref = results["torch"]
    for name, (out, grad) in results.items():
        assert_matches(out, loss_ref.detach().double(), torch.float32, f"{name} vs torch loss",
                       loss_magnitude(batch, loss_ref, "mean"))
        assert_matches(grad, grad_ref.double(), torch.float32, f"{name} vs torch gradient",
                       gradient_magnitude(batch, "mean", None))


# ----------------------------------------------------------------------------------------------------
# Outputs, in-place mode, no-grad


@pytest.mark.parametrize("shape", [(1, 1), (6, 37), (3, 2050)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backend_writes_every_output_element(gen, backend, shape, dtype):
    batch = random_batch(gen, *shape, dtype=dtype)
    targets = SparseTargets(batch.labels, batch.offsets, batch.weights)
    row_loss = torch.full((shape[0],), float("nan"))
    grad = torch.full(shape, float("nan"), dtype=dtype)
    BACKENDS[backend].forward(batch.logits, targets, torch.tensor(0.5), row_loss, grad)
    z, ref = reference_loss(batch, "sum")
    ref.backward()
    expected_loss = F.cross_entropy(z.detach(), dense_target(batch), reduction="none")
    assert_matches(row_loss, expected_loss, torch.float32, "loss", loss_magnitude(batch, expected_loss, "none"))
    assert_matches(grad, z.grad * 0.5, dtype, "gradient", 0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_inplace_writes_the_gradient_into_the_logits(gen, backend, dtype):
    batch = random_batch(gen, 7, 300, dtype=dtype)
    leaf = batch.logits.clone().requires_grad_()
    logits = leaf * 1  # as a model's output: not a leaf
    buffer = logits.detach()  # shares the storage
    passed_upstream = []
    logits.register_hook(passed_upstream.append)
    out = hashtag_cross_entropy(logits, batch.labels, batch.offsets, backend=backend, inplace=True)
    out.backward()
    z, ref = reference_loss(batch, "mean")
    ref.backward()
    assert_matches(out, ref.detach(), torch.float32, "loss", loss_magnitude(batch, ref, "mean"))
    assert_matches(buffer, z.grad, dtype, "gradient in the logits buffer", gradient_magnitude(batch, "mean", None))
    assert passed_upstream[0].data_ptr() == buffer.data_ptr()  # no copy on the way
    assert torch.equal(leaf.grad, buffer)


def test_inplace_breaks_other_saved_uses_loudly(gen, backend):
    batch = random_batch(gen, 4, 20)
    leaf = batch.logits.clone().requires_grad_()
    logits = leaf * 1.0
    other = (logits**2).sum()  # saves the logits for its backward
    out = hashtag_cross_entropy(logits, batch.labels, batch.offsets, backend=backend, inplace=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (out + other).backward()


def test_without_grad_the_logits_stay_untouched(gen, backend):
    batch = random_batch(gen, 5, 60)
    logits = batch.logits.clone().requires_grad_()
    with torch.no_grad():
        out = hashtag_cross_entropy(logits, batch.labels, batch.offsets, backend=backend, inplace=True)
    assert torch.equal(logits.detach(), batch.logits)
    _, ref = reference_loss(batch, "mean")
    assert_matches(out, ref.detach(), torch.float32, "loss", loss_magnitude(batch, ref, "mean"))


def test_module_wrapper(gen, backend):
    batch = random_batch(gen, 6, 50, weighted=True)
    criterion = HashtagCrossEntropy(reduction="sum", backend=backend)
    assert "sum" in repr(criterion)
    out = criterion(batch.logits, batch.labels, batch.offsets, batch.weights)
    _, ref = reference_loss(batch, "sum")
    assert_matches(out, ref.detach(), torch.float32, "module loss", loss_magnitude(batch, ref, "sum"))


# ----------------------------------------------------------------------------------------------------
# Bad input


def _bad_inputs():
    logits = torch.zeros(3, 5)
    labels = torch.tensor([0, 4, 2])
    offsets = torch.tensor([0, 1, 1, 3])
    cases = {
        "logits 1-D": (dict(logits=torch.zeros(5)), r"logits must be a \(B, C\) tensor"),
        "logits int": (dict(logits=torch.zeros(3, 5, dtype=torch.int64)), "logits must be float32"),
        "no classes": (dict(logits=torch.zeros(3, 0), offsets=torch.zeros(4, dtype=torch.long),
                            labels=torch.zeros(0, dtype=torch.long)), "at least one row and one class"),
        "labels float": (dict(labels=labels.float()), "labels must be a 1-D int32/int64"),
        "offsets 2-D": (dict(offsets=offsets[None]), "offsets must be a 1-D"),
        "offsets length": (dict(offsets=torch.tensor([0, 1, 3])), r"offsets must have B \+ 1 = 4 entries"),
        "offsets start": (dict(offsets=torch.tensor([1, 1, 1, 3])), r"offsets must start at 0"),
        "offsets end": (dict(offsets=torch.tensor([0, 1, 1, 2])), r"offsets must end at the number of labels \(3\)"),
        "offsets decrease": (dict(offsets=torch.tensor([0, 2, 1, 3])), r"non-decreasing: offsets\[2\] = 1"),
        "label too large": (dict(labels=torch.tensor([0, 5, 2])), r"labels must lie in \[0, 5\): labels\[1\] = 5"),
        "label negative": (dict(labels=torch.tensor([0, 1, -1])), r"labels\[2\] = -1"),
        "weights negative": (dict(weights=torch.tensor([1.0, -0.5, 1.0])), r"non-negative: weights\[1\] = -0.5"),
        "weights nan": (dict(weights=torch.tensor([1.0, 1.0, float("nan")])), r"weights\[2\] = nan"),
        "weights length": (dict(weights=torch.ones(2)), r"one entry per label \(3\)"),
        "weights int": (dict(weights=torch.ones(3, dtype=torch.int64)), "weights must be a 1-D floating"),
        "weights grad": (dict(weights=torch.ones(3, requires_grad=True)), "no gradient flows to them"),
        "devices": (dict(labels=labels.to("meta")), "must share a device"),
        "reduction": (dict(reduction="avg"), "reduction must be one of"),
        "backend": (dict(backend="cuda"), "backend must be 'auto' or one of"),
    }
    base = dict(logits=logits, labels=labels, offsets=offsets, weights=None, reduction="mean", backend="torch")
    return [pytest.param({**base, **change}, message, id=name) for name, (change, message) in cases.items()]


@pytest.mark.parametrize("arguments, message", _bad_inputs())
def test_bad_input_raises_value_error(arguments, message):
    with pytest.raises(ValueError, match=message):
        hashtag_cross_entropy(**arguments)


def test_backend_that_cannot_run_the_logits():
    meta = torch.zeros(2, 3, device="meta")
    index = torch.zeros(1, dtype=torch.long, device="meta")
    with pytest.raises(ValueError, match="backend 'cpp' cannot run"):
        hashtag_cross_entropy(meta, index, torch.zeros(3, dtype=torch.long, device="meta"), backend="cpp")
    with pytest.raises(ValueError, match=r"backend 'triton' cannot run torch\.float64"):
        hashtag_cross_entropy(torch.zeros(2, 3, dtype=torch.float64), torch.tensor([0]), torch.tensor([0, 1, 1]),
                              backend="triton")


def test_module_rejects_bad_configuration():
    with pytest.raises(ValueError, match="reduction"):
        HashtagCrossEntropy(reduction="avg")
    with pytest.raises(ValueError, match="backend"):
        HashtagCrossEntropy(backend="fast")


def test_value_checks_skip_the_device_read_on_cuda_unless_asked(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.delenv(loss.VALIDATE_ENV, raising=False)
    assert loss._should_check_values(None, torch.device("cpu"))
    assert not loss._should_check_values(None, cuda)
    monkeypatch.setenv(loss.VALIDATE_ENV, "1")
    assert loss._should_check_values(None, cuda)
    assert not loss._should_check_values(False, torch.device("cpu"))


# ----------------------------------------------------------------------------------------------------
# Dispatch and the extension's build


def test_auto_picks_cpp_on_cpu(cpp_module):
    assert loss.resolve_loss_backend("auto", torch.zeros(1, 1)).name == "cpp"


def test_auto_falls_back_to_torch_with_one_warning(gen, monkeypatch, caplog):
    monkeypatch.setattr(cpp_extension, "_modules", {})
    monkeypatch.setattr(cpp_extension, "_failures", {"xent": "cannot build the C++ extension: no compiler"})
    monkeypatch.setattr(fastpretrain_log, "_said", set())
    caplog.set_level(logging.WARNING, logger="fastpretrain")
    batch = random_batch(gen, 4, 11)
    check_against_reference(batch, "auto", "mean")
    check_against_reference(batch, "auto", "mean")
    warned = [r.getMessage() for r in caplog.records if "falling back" in r.getMessage()]
    assert len(warned) == 1 and "no compiler; falling back" in warned[0], warned
    with pytest.raises(cpp_extension.ExtensionUnavailable, match="no compiler"):
        run_loss(batch, "cpp", "mean")


def test_extension_is_built_once_per_process(cpp_module):
    assert cpp_extension.load_extension("xent") is cpp_module
    assert cpp_extension.extension_name("xent").startswith("fastpretrain_xent_")


def test_build_lock_serializes_and_clears_a_stale_torch_lock(tmp_path):
    (tmp_path / "lock").write_text("left by a killed build")
    order: list[str] = []
    with cpp_extension._build_lock(tmp_path):
        assert not (tmp_path / "lock").exists()

        def second_builder():
            with cpp_extension._build_lock(tmp_path):
                order.append("second")

        thread = threading.Thread(target=second_builder)
        thread.start()
        time.sleep(0.2)
        order.append("first")
    thread.join(timeout=10)
    assert order == ["first", "second"]
    with open(tmp_path / "fastpretrain.flock") as handle:  # released: a non-blocking lock succeeds
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
