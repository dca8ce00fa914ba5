"""Pretrained weights in, exported weights out. References: torchvision's own ``ResNet`` and ``resnext50_32x4d``,
timm's ``resnext50_32x4d``, safetensors' ``load_file``, onnxruntime's ``InferenceSession`` and hand-written vocabulary
files; outputs compared in float32 with rtol 0 and atol 1e-5 (ONNX included: its measured error here is ~1e-7)."""

from __future__ import annotations

import argparse
import json
import logging
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torchvision
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

from fastpretrain.errors import UserError
from fastpretrain.formats.checkpoint import CheckpointManager, save_file
from fastpretrain.formats.vocab import Vocab, VocabClass
from fastpretrain.models import create_model
from fastpretrain.transfer import export as export_module
from fastpretrain.transfer.export import export, register
from fastpretrain.weights import Weights, load_trunk, read_checkpoint, read_weights

ATOL = 1e-5
CLASSES = [  # index, wnid, lemmas, images
    {"index": 0, "wnid": "n02084071", "lemmas": ["dog", "domestic_dog"], "count": 40},
    {"index": 1, "wnid": "n02121808", "lemmas": ["domestic_cat", "house_cat"], "count": 31},
    {"index": 2, "wnid": "n07753592", "lemmas": ["banana"], "count": 17},
    {"index": 3, "wnid": "n09472597", "lemmas": ["volcano"], "count": 12},
    {"index": 4, "wnid": "n04037443", "lemmas": ["racer", "race_car"], "count": 9},
    {"index": 5, "wnid": "n03063599", "lemmas": ["coffee_mug"], "count": 5},
    {"index": 6, "wnid": "n12620546", "lemmas": ["hip", "rose_hip"], "count": 2},
]
WNIDS = [c["wnid"] for c in CLASSES]
TRUNK_EXCLUDED = {"fc.weight", "fc.bias"}


def tiny_torchvision(num_classes: int) -> ResNet:
    """resnext_tiny built from torchvision alone."""
    return ResNet(Bottleneck, [1, 1, 1, 1], groups=32, width_per_group=2, num_classes=num_classes)


def randomized(model: nn.Module, gen: torch.Generator) -> nn.Module:
    """``model`` in eval mode with random BatchNorm affines and statistics: eval outputs depend on every tensor
    (the zero-initialized last BatchNorm of each block would otherwise hide its residual branch)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                c = module.num_features
                module.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                module.bias.copy_(torch.randn(c, generator=gen) * 0.1)
                module.running_mean.copy_(torch.randn(c, generator=gen) * 0.1)
                module.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
                module.num_batches_tracked.fill_(int(torch.randint(1, 1000, (), generator=gen)))
        model.fc.bias.copy_(torch.randn(model.fc.out_features, generator=gen))
    return model.eval()


def features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The pooled trunk output, (N, 2048), of a torchvision-style ResNet."""
    head, model.fc = model.fc, nn.Identity()
    try:
        with torch.no_grad():
            return model(images)
    finally:
        model.fc = head


def logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(images)


def close(actual, expected) -> None:
    torch.testing.assert_close(torch.as_tensor(actual), expected, rtol=0, atol=ATOL)


@dataclass
class Trained:
    checkpoint: Path
    vocab: Path
    model: nn.Module  # what was saved, eval mode


@pytest.fixture
def trained(tmp_path, gen) -> Trained:
    """A resnext_tiny checkpoint of 7 classes, trained channels-last, with its vocab.json beside it."""
    classes = [VocabClass(**c) for c in CLASSES]
    vocab = Vocab(classes, "concrete-first", Vocab.hash_of(WNIDS, "concrete-first", "3.0"), num_images=100)
    vocab.save(tmp_path / "vocab.json")
    model = randomized(create_model("resnext_tiny", 7), gen).to(memory_format=torch.channels_last)
    save_file(tmp_path / "step-000000010.pt", {
        "arch": "resnext_tiny", "num_classes": 7, "state_dict": model.state_dict(), "optimizer": {}, "step": 10,
        "vocab_hash": vocab.content_hash, "classes": WNIDS,
        "args": {"data": {"vocab": str(tmp_path / "vocab.json"), "image_size": 32}}})
    return Trained(tmp_path / "step-000000010.pt", tmp_path / "vocab.json", model)


def images(gen: torch.Generator, n: int = 3, h: int = 40, w: int = 36) -> torch.Tensor:
    return torch.randn(n, 3, h, w, generator=gen)


# ------------------------------------------------------------------------------------------------
# Export round trips


def load_exported(fmt: str, path: Path) -> dict:
    if fmt == "torchvision":
        return torch.load(path, weights_only=True)
    return safetensors.torch.load_file(path)


@pytest.mark.parametrize("fmt", ["torchvision", "safetensors"])
def test_exported_head_loads_strictly_into_torchvision_and_gives_our_logits(trained, tmp_path, gen, fmt):
    out = tmp_path / "export" / f"model.{fmt}"
    written = export(trained.checkpoint, fmt, out, with_head=True)
    assert written == [out, tmp_path / "export" / f"model.{fmt}.vocab.json"]
    state = load_exported(fmt, out)
    assert type(state) is dict and all(t.is_contiguous() for t in state.values())
    reference = tiny_torchvision(7)
    reference.load_state_dict(state)  # strict
    x = images(gen)
    close(logits(reference.eval(), x), logits(trained.model, x))
    for key, tensor in trained.model.state_dict().items():
        assert torch.equal(state[key], tensor), key


@pytest.mark.parametrize("fmt", ["torchvision", "safetensors"])
def test_exported_trunk_misses_exactly_the_head_and_gives_our_features(trained, tmp_path, gen, fmt):
    out = tmp_path / f"trunk.{fmt}"
    assert export(trained.checkpoint, fmt, out) == [out]
    reference = tiny_torchvision(11)  # a new task's class count
    result = reference.load_state_dict(load_exported(fmt, out), strict=False)
    assert set(result.missing_keys) == TRUNK_EXCLUDED and result.unexpected_keys == []
    x = images(gen)
    close(features(reference.eval(), x), features(trained.model, x))
    assert not list(tmp_path.glob("*.vocab.json"))


def test_safetensors_metadata(trained, tmp_path):
    for with_head in (False, True):
        out = tmp_path / f"m{with_head}.safetensors"
        export(trained.checkpoint, "safetensors", out, with_head=with_head)
        with safetensors.safe_open(out, framework="pt") as f:
            assert f.metadata() == {"arch": "resnext_tiny", "num_classes": "7", "head": str(with_head).lower(),
                                    "vocab_hash": Vocab.load(trained.vocab).content_hash}


def test_resnext50_export_loads_into_torchvision_resnext50(tmp_path, gen):
    model = randomized(create_model("resnext50_32x4d", 5), gen)
    save_file(tmp_path / "c.pt", {"arch": "resnext50_32x4d", "num_classes": 5, "state_dict": model.state_dict(),
                                  "vocab_hash": "h", "classes": WNIDS[:5], "args": {}})
    export(tmp_path / "c.pt", "torchvision", tmp_path / "r50.pt", with_head=True)
    reference = torchvision.models.resnext50_32x4d(num_classes=5)
    reference.load_state_dict(torch.load(tmp_path / "r50.pt", weights_only=True))
    x = images(gen, 2, 32, 32)
    close(logits(reference.eval(), x), logits(model, x))


def test_onnx_with_head_runs_in_onnxruntime_with_any_batch_and_size(trained, tmp_path, gen):
    import onnxruntime

    out = tmp_path / "model.onnx"
    assert export(trained.checkpoint, "onnx", out, with_head=True) == [out, tmp_path / "model.onnx.vocab.json"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # the staging folder is gone
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (inp,), (outp,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.type, inp.shape[1], outp.name, outp.shape[1]) == ("images", "tensor(float)", 3, "logits", 7)
    for x in (images(gen, 3, 40, 36), images(gen, 1, 64, 48)):
        close(session.run(["logits"], {"images": x.numpy()})[0], logits(trained.model, x))


def test_onnx_trunk_gives_features_and_keeps_large_weights_beside_it(trained, tmp_path, gen, monkeypatch):
    import onnxruntime

    monkeypatch.setattr(export_module, "ONNX_SINGLE_FILE_BYTES", 0)  # as resnext101_32x48d's 3.3 GB would
    out = tmp_path / "trunk.onnx"
    assert export(trained.checkpoint, "onnx", out) == [out, tmp_path / "trunk.onnx.data"]
    assert out.stat().st_size < (tmp_path / "trunk.onnx.data").stat().st_size
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = images(gen, 2, 33, 47)
    (got,) = session.run(["features"], {"images": x.numpy()})
    assert got.shape == (2, 2048)
    close(got, features(trained.model, x))


def test_onnx_mismatch_is_an_error_and_writes_nothing(trained, tmp_path, monkeypatch):
    monkeypatch.setattr(export_module, "ONNX_ATOL", -1.0)  # no difference, not even 0, is within tolerance
    with pytest.raises(UserError, match="ONNX export is wrong: onnxruntime's logits differ .* nothing was written"):
        export(trained.checkpoint, "onnx", tmp_path / "out" / "model.onnx", with_head=True)
    assert list((tmp_path / "out").iterdir()) == []


def test_onnx_without_its_packages_names_the_install(trained, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(UserError, match=r"needs onnxruntime: pip install 'fastpretrain\[export\]'"):
        export(trained.checkpoint, "onnx", tmp_path / "m.onnx")


# ------------------------------------------------------------------------------------------------
# The vocabulary beside an exported head


def test_vocab_sidecar_holds_the_training_vocabulary(trained, tmp_path):
    (_, sidecar) = export(trained.checkpoint, "torchvision", tmp_path / "m.pt", with_head=True)
    body = json.loads(sidecar.read_text())
    assert body["classes"] == CLASSES
    assert (body["vocab_hash"], body["num_classes"], body["arch"]) == (Vocab.load(trained.vocab).content_hash, 7,
                                                                       "resnext_tiny")
    assert (body["sense"], body["wordnet_version"], body["num_images"]) == ("concrete-first", "3.0", 100)
    assert "note" not in body
    assert len(sidecar.read_text().splitlines()) == len(body) + 3 + 7  # braces, "classes", "]" and a line per class


@pytest.mark.parametrize("damage", ["gone", "changed"])
def test_vocab_sidecar_falls_back_to_the_checkpoints_wnids(trained, tmp_path, caplog, damage):
    if damage == "gone":
        trained.vocab.unlink()
    else:
        other = [VocabClass(**{**c, "index": i}) for i, c in enumerate(reversed(CLASSES))]
        Vocab(other, "concrete-first", Vocab.hash_of([c.wnid for c in other], "concrete-first", "3.0"), 100).save(
            trained.vocab)
    with caplog.at_level(logging.WARNING, logger="fastpretrain"):
        (_, sidecar) = export(trained.checkpoint, "safetensors", tmp_path / "m.safetensors", with_head=True)
    body = json.loads(sidecar.read_text())
    assert body["classes"] == [{"index": i, "wnid": w} for i, w in enumerate(WNIDS)]
    assert damage in body["note"] and "lemmas and counts are absent" in body["note"]
    assert damage in caplog.text


# ------------------------------------------------------------------------------------------------
# Weights in


@pytest.mark.parametrize("arch, torchvision_model", [("resnext_tiny", tiny_torchvision),
                                                     ("resnext50_32x4d", torchvision.models.resnext50_32x4d)])
def test_torchvision_state_dict_gives_torchvision_outputs(tmp_path, gen, arch, torchvision_model):
    reference = randomized(torchvision_model(num_classes=6), gen)
    torch.save(reference.state_dict(), tmp_path / "tv.pth")
    weights = read_weights(tmp_path / "tv.pth")
    assert (weights.source, weights.arch, weights.classes) == ("state dict", None, None)
    model = create_model(arch, 6)
    load_trunk(model, weights, keep_head=True)
    x = images(gen, 2, 32, 32)
    close(logits(model.eval(), x), logits(reference, x))


def test_trunk_only_keeps_the_models_head(tmp_path, gen):
    reference = randomized(tiny_torchvision(1000), gen)  # an ImageNet head, as the WSL-Images files have
    model = create_model("resnext_tiny", 4)
    head = {k: v.clone() for k, v in model.fc.state_dict().items()}
    load_trunk(model, Weights(reference.state_dict(), None, None, "state dict", tmp_path / "x.pt"))
    assert all(torch.equal(model.fc.state_dict()[k], v) for k, v in head.items())
    x = images(gen, 2, 32, 32)
    close(features(model.eval(), x), features(reference, x))


def test_timm_resnext50_state_dict_gives_timms_outputs(tmp_path, gen):
    import timm

    reference = randomized(timm.create_model("resnext50_32x4d", pretrained=False, num_classes=9), gen)
    torch.save(reference.state_dict(), tmp_path / "pytorch_model.bin")
    model = create_model("resnext50_32x4d", 9)
    load_trunk(model, read_weights(tmp_path / "pytorch_model.bin"), keep_head=True)
    x = images(gen, 2, 32, 32)
    close(logits(model.eval(), x), logits(reference, x))


class _Named(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model


WRAPPERS = {
    "DataParallel": nn.DataParallel,  # module.
    "torch.compile": torch.compile,  # _orig_mod. (state_dict does not compile anything)
    "DataParallel(compile)": lambda m: nn.DataParallel(torch.compile(m)),  # module._orig_mod.
    "attribute model": _Named,  # model.
}


@pytest.mark.parametrize("wrapper", sorted(WRAPPERS))
def test_wrapper_prefixes_are_removed(tmp_path, gen, wrapper):
    reference = randomized(tiny_torchvision(3), gen)
    wrapped = WRAPPERS[wrapper](reference).state_dict()
    assert set(wrapped) != set(reference.state_dict())
    torch.save(wrapped, tmp_path / "w.pt")
    weights = read_weights(tmp_path / "w.pt")
    assert list(weights.state_dict) == list(reference.state_dict())
    model = create_model("resnext_tiny", 3)
    load_trunk(model, weights, keep_head=True)
    x = images(gen, 1, 32, 32)
    close(logits(model.eval(), x), logits(reference, x))


def test_old_torch_pickle_format_and_missing_step_counters_load(tmp_path, gen):
    """The 2019 WSL-Images files are torch.save's pickle format of torch < 1.6; older files lack the counters."""
    reference = randomized(tiny_torchvision(3), gen)
    state = {k: v for k, v in reference.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    assert (tmp_path / "old.pth").read_bytes()[:1] == b"\x80"  # a pickle stream, not a zip archive
    model = create_model("resnext_tiny", 3)
    load_trunk(model, read_weights(tmp_path / "old.pth"), keep_head=True)
    x = images(gen, 1, 32, 32)
    close(logits(model.eval(), x), logits(reference, x))


def test_safetensors_and_our_checkpoint_are_read_with_what_they_say(trained, tmp_path, gen):
    export(trained.checkpoint, "safetensors", tmp_path / "t.safetensors")
    from_export = read_weights(tmp_path / "t.safetensors")
    assert (from_export.source, from_export.arch, from_export.classes) == ("safetensors", "resnext_tiny", None)
    from_checkpoint = read_weights(trained.checkpoint)
    assert (from_checkpoint.source, from_checkpoint.arch, from_checkpoint.classes) == (
        "fastpretrain checkpoint", "resnext_tiny", WNIDS)
    model = create_model("resnext_tiny", 2)
    load_trunk(model, from_export)
    x = images(gen, 2, 32, 32)
    close(features(model.eval(), x), features(trained.model, x))


# ------------------------------------------------------------------------------------------------
# Refusals: one line each


def refused(call, *args, match: str, **kwargs) -> str:
    with pytest.raises(UserError, match=match) as info:
        call(*args, **kwargs)
    assert "\n" not in str(info.value) and type(info.value) is UserError
    return str(info.value)


def weights_of(model: nn.Module) -> Weights:
    return Weights(model.state_dict(), None, None, "state dict", Path("given.pt"))


def test_wrong_arch_is_refused_naming_the_right_one():
    tiny = create_model("resnext_tiny", 5)
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    with torch.device("meta"):  # shapes are all the check reads
        r50 = torchvision.models.resnext50_32x4d(num_classes=5)
        r101 = torchvision.models.resnext101_32x8d(num_classes=5)
    # 216: resnext50's 12 blocks beyond the tiny one's 4, each of 3 convolutions and 3 BatchNorms of 5 tensors
    refused(load_trunk, tiny, weights_of(r50),
            match=r"^given.pt does not fit the model \(resnext_tiny\): 216 tensors the model does not have .*; "
                  r"the file holds a resnext50_32x4d \(\[3, 4, 6, 3\] bottleneck blocks per stage, 32x4d\): "
                  r"use --model resnext50_32x4d$")
    assert all(torch.equal(tiny.state_dict()[k], v) for k, v in before.items())
    with torch.device("meta"):
        model = create_model("resnext101_32x4d", 5)
    refused(load_trunk, model, weights_of(r101), match=r"\(resnext101_32x4d\): layer1.0.conv1.weight is "
            r"\[256, 64, 1, 1\] in the file and \[128, 64, 1, 1\] in the model; .* use --model resnext101_32x8d$")


def test_unknown_trunks_and_heads_are_refused():
    model = create_model("resnext_tiny", 5)
    refused(load_trunk, model, weights_of(torchvision.models.resnet18()),
            match=r"the file holds a ResNet of \[2, 2, 2, 2\] basic blocks per stage, 1x64d, which no registered "
                  r"arch is \(resnext101_32x16d, .*resnext_tiny\)$")
    refused(load_trunk, model, weights_of(nn.Sequential(nn.Linear(2, 2))),
            match=r"holds no ResNet trunk \(its first keys: 0.weight, 0.bias\)$")
    refused(load_trunk, model, weights_of(tiny_torchvision(7)), keep_head=True,
            match=r"its head has 7 classes and the model's 5 .*only the trunk can be loaded$")
    load_trunk(model, weights_of(tiny_torchvision(7)))  # without the head it fits


class _WouldRunCode:
    """Unpickling this creates a file: what a crafted checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_crafted_pickles_are_refused_without_running(tmp_path, writer):
    marker = tmp_path / "ran"
    payload = {"conv1.weight": _WouldRunCode(marker)}
    with open(tmp_path / "evil.pt", "wb") as f:
        torch.save(payload, f) if writer == "torch.save" else pickle.dump(payload, f, protocol=2)
    for call in (read_weights, read_checkpoint):
        refused(call, tmp_path / "evil.pt", match=r"holds code or objects that are not plain data \(io.open\)")
    assert not marker.exists()
    if writer == "pickle.dump":  # the payload is live: a plain unpickle runs it
        with open(tmp_path / "evil.pt", "rb") as f:
            pickle.load(f)
        assert marker.exists()


def _write(path: Path, content) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    return path


BAD_FILES = {
    "empty": (b"", "the file is empty"),
    "text": (b"conv1.weight = [1, 2, 3]", "neither a torch.save file"),
    "a list": ([torch.zeros(2)], "holds a list, not a state dict"),
    "no tensors": ({}, "holds no tensors"),
    "another trainer's checkpoint": ({"epoch": 3, "state_dict": {"w": torch.zeros(1)}},
                                     "'epoch' holds a value of type int, not a tensor: not a state dict; it looks "
                                     "like another trainer's checkpoint"),
    "complex": ({"w": torch.zeros(2, dtype=torch.complex64)}, "'w' is a torch.strided torch.complex64 tensor"),
    "bool": ({"w": torch.zeros(2, dtype=torch.bool)}, "'w' is a torch.strided torch.bool tensor"),
    "sparse": ({"w": torch.eye(3).to_sparse()}, "'w' is a torch.sparse_coo torch.float32 tensor"),
    "integer keys": ({0: torch.zeros(1)}, "a key 0 of type int"),
    "old checkpoint": ({"format_version": 1, "state_dict": {}}, "a checkpoint of format_version 1; this"),
    "truncated": (None, r"corrupt \("),
    "bad safetensors": (b"\x10\x00\x00\x00\x00\x00\x00\x00{\"w\": 1", r"corrupt safetensors file"),
}


@pytest.mark.filterwarnings("ignore:Validating sparse tensor invariants")
@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_files_that_are_not_weights_are_refused_in_one_line(tmp_path, case):
    content, message = BAD_FILES[case]
    if case == "truncated":
        content = _write(tmp_path / "whole.pt", {"w": torch.zeros(1000)}).read_bytes()[:-300]
    path = _write(tmp_path / "bad.pt", content)
    text = refused(read_weights, path, match=message)
    assert text.startswith(f"cannot read weights {path}: ")


def test_missing_file_is_refused():
    refused(read_weights, "/nonexistent/w.pt", match=r"cannot read weights /nonexistent/w.pt: No such file")


def test_export_refuses_what_is_not_a_training_checkpoint(trained, tmp_path):
    torch.save(trained.model.state_dict(), tmp_path / "plain.pt")
    refused(export, tmp_path / "plain.pt", "torchvision", tmp_path / "o.pt",
            match="no format_version: not a fastpretrain training checkpoint")
    safetensors.torch.save_file({"w": torch.zeros(1)}, tmp_path / "w.safetensors")
    refused(export, tmp_path / "w.safetensors", "onnx", tmp_path / "o.onnx", match="is a safetensors file")
    refused(export, trained.checkpoint, "tflite", tmp_path / "o", match="unknown export format 'tflite'")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["plain.pt", "w.safetensors", "step-000000010.pt", "vocab.json"])


def test_export_command_prints_what_it_wrote(trained, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "cli.pt"
    args = parser.parse_args(["export", "--checkpoint", str(trained.checkpoint), "--format", "torchvision",
                              "--out", str(out), "--with-head"])
    assert args.func(args) == 0
    assert capsys.readouterr().out.splitlines() == [f"wrote {out}", f"wrote {out}.vocab.json"]


def test_a_run_folder_gives_its_newest_whole_checkpoint(trained, tmp_path, gen, caplog):
    """``--pretrained RUN``, ``eval --checkpoint RUN`` and ``export --checkpoint RUN`` take what ``--resume auto``
    would: the newest checkpoint whose checksum holds."""
    run = tmp_path / "run"
    manager = CheckpointManager(run / "checkpoints", keep=3, background=False)
    state = torch.load(trained.checkpoint, weights_only=True)
    del state["format_version"]
    older = {k: v + 1 for k, v in state["state_dict"].items()}
    manager.save(20, {**state, "step": 20, "state_dict": older})
    manager.save(30, {**state, "step": 30})
    for spec in (run, run / "checkpoints"):
        path, found = read_checkpoint(spec)
        assert path == run / "checkpoints" / "step-000000030.pt" and found["step"] == 30
        torch.testing.assert_close(read_weights(spec).state_dict, state["state_dict"], rtol=0, atol=0)
    newest = run / "checkpoints" / "step-000000030.pt"
    damaged = bytearray(newest.read_bytes())
    damaged[int(torch.randint(len(damaged), (), generator=gen))] ^= 0xFF
    newest.write_bytes(bytes(damaged))
    with caplog.at_level(logging.WARNING):
        path, found = read_checkpoint(run)
    assert found["step"] == 20 and "step-000000030.pt is unusable" in caplog.text
    torch.testing.assert_close(read_weights(run).state_dict, older, rtol=0, atol=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no usable checkpoint"):
        read_checkpoint(tmp_path / "empty")
