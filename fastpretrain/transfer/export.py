"""Exported weights out: ``fastpretrain export`` writes a training checkpoint's model as files that load without
fastpretrain. Keys and modules are torchvision's ``ResNet``'s (and timm's, which names them the same).

- ``torchvision``: ``torch.save`` of a plain dict of contiguous CPU tensors; ``torch.load(FILE, weights_only=True)``.
- ``safetensors``: the same tensors, with metadata ``arch``, ``num_classes``, ``vocab_hash`` and ``head``
  (``"true"``/``"false"``); ``safetensors.torch.load_file(FILE)``.
- ``onnx``: the model in eval mode; input ``images`` (N, 3, H, W) float32, N, H and W dynamic; output ``logits``
  (N, C), or without the head the pooled trunk features ``features`` (N, 2048). Right after export it is run with
  onnxruntime on other inputs than the export's and compared with PyTorch's outputs: a mismatch is an error, and
  nothing is written. A model over protobuf's 2 GiB (resnext101_32x48d) keeps its weights in ``FILE.data`` beside it.

Without ``--with-head`` a file holds the trunk: every tensor but ``fc.weight`` and ``fc.bias``. Load it for a new
task with ``model.load_state_dict(sd, strict=False)`` into ``torchvision.models.resnext101_32x8d(num_classes=K)``
(or ``ResNet(Bottleneck, layers, groups=32, width_per_group=d, num_classes=K)`` for the trunks torchvision does not
name): the missing keys are exactly ``fc.weight`` and ``fc.bias``, the new head. With ``--with-head`` it holds every
tensor, loads strictly into ``ResNet(..., num_classes=C)`` for the C hashtag classes, and ``FILE.vocab.json`` beside
it says what each logit is (index, wnid, lemmas, image count, and the vocabulary's hash).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from torch import nn

from fastpretrain.errors import UserError
from fastpretrain.formats.files import atomic_write, shared_file_mode
from fastpretrain.formats.vocab import WORDNET_VERSION, Vocab
from fastpretrain.models import create_model
from fastpretrain.weights import HEAD, Weights, check_fits, read_checkpoint

log = logging.getLogger(__name__)

FORMATS = ("torchvision", "safetensors", "onnx")
SIDECAR_FORMAT_VERSION = 1
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")  # torch's exporter needs the first two, the check the third
# Protobuf cannot serialize a message over 2 GiB; above this the weights go to an external data file (64 MiB spare
# for the graph itself, which is a few hundred kB).
ONNX_SINGLE_FILE_BYTES = 2**31 - 2**26
# onnxruntime fuses BatchNorm into the convolutions and sums in another order: float32 rounding (5e-8 measured on
# resnext_tiny's logits, more through 101 layers); a wrong graph is off by the logits' own size.
ONNX_RTOL, ONNX_ATOL = 1e-3, 1e-4
DEFAULT_IMAGE_SIZE = 224  # for checkpoints whose config gives none


def export(checkpoint_path: str | os.PathLike, fmt: str, out: str | os.PathLike, with_head: bool = False) -> list[Path]:
    """Write the model of the training checkpoint at ``checkpoint_path`` to ``out`` in ``fmt`` (one of FORMATS), the
    trunk only unless ``with_head``, which also writes ``OUT.vocab.json``; return the files written. Each file
    appears whole or not at all."""
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    if fmt == "onnx":
        _require_onnx()
    path, checkpoint = read_checkpoint(checkpoint_path)
    weights = Weights(checkpoint["state_dict"], checkpoint.get("arch"), checkpoint.get("classes"),
                      "fastpretrain checkpoint", path)
    num_classes = _num_classes(checkpoint, weights.path)
    with torch.device("meta"):  # the checkpoint checked against its arch's shapes, without building the model
        check_fits(create_model(weights.arch, num_classes), weights, keep_head=True)
    out = Path(out)
    if fmt == "onnx":
        model = create_model(weights.arch, num_classes)
        model.load_state_dict(weights.state_dict)
        written = _export_onnx(model, out, with_head, _image_size(checkpoint))
    else:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in weights.state_dict.items()
                   if with_head or not k.startswith(HEAD)}  # contiguous: channels-last training leaves NHWC strides
        with atomic_write(out) as f:
            if fmt == "torchvision":
                torch.save(tensors, f)
            else:
                metadata = {"arch": weights.arch, "num_classes": str(num_classes),
                            "vocab_hash": checkpoint["vocab_hash"], "head": str(with_head).lower()}
                f.write(safetensors.torch.save(tensors, metadata))
        written = [out]
    if with_head:
        written.append(_write_vocab(checkpoint, out))
    return written


def register(subparsers) -> None:
    """Add the ``export`` command."""
    parser = subparsers.add_parser("export", help="write a checkpoint's model as files torchvision, safetensors or "
                                                  "onnxruntime load without fastpretrain")
    parser.add_argument("--checkpoint", required=True,
                        help="a training checkpoint (RUN/checkpoints/step-*.pt), or a run folder: its newest")
    parser.add_argument("--format", required=True, choices=FORMATS, dest="fmt", help="the file format")
    parser.add_argument("--out", required=True, help="the file to write")
    parser.add_argument("--with-head", action="store_true",
                        help="keep the hashtag head (fc) and write OUT.vocab.json beside it (default: the trunk only)")
    parser.set_defaults(func=run_export)


def run_export(args) -> int:
    for path in export(args.checkpoint, args.fmt, args.out, args.with_head):
        print(f"wrote {path}")
    return 0


def _require_onnx() -> None:
    missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"--format onnx needs {', '.join(missing)}: pip install 'fastpretrain[export]' "
                        f"(or pip install {' '.join(missing)})")


def _num_classes(checkpoint: dict, path: Path) -> int:
    """The checkpoint's class count, once its arch, classes, vocabulary hash and head are there and agree on it."""
    arch, classes, num_classes = checkpoint.get("arch"), checkpoint.get("classes"), checkpoint.get("num_classes")
    head = checkpoint["state_dict"].get(HEAD + "weight")
    if not isinstance(arch, str) or not isinstance(classes, list) or not all(isinstance(c, str) for c in classes) \
            or type(num_classes) is not int or not isinstance(checkpoint.get("vocab_hash"), str) \
            or head is None or head.dim() != 2:
        raise UserError(f"checkpoint {path} lacks its arch, classes, num_classes, vocab_hash or head: not a "
                        "fastpretrain training checkpoint")
    if not num_classes == len(classes) == head.shape[0]:
        raise UserError(f"checkpoint {path} is inconsistent: num_classes {num_classes}, {len(classes)} class wnids, "
                        f"a head of {head.shape[0]}")
    return num_classes


def _image_size(checkpoint: dict) -> int:
    size = _training_arg(checkpoint, "data", "image_size")
    return size if type(size) is int and size > 0 else DEFAULT_IMAGE_SIZE


def _training_arg(checkpoint: dict, section: str, key: str) -> object:
    """``args[section][key]`` of the checkpoint's resolved config; None where it has none."""
    value = checkpoint.get("args")
    for name in (section, key):
        value = value.get(name) if isinstance(value, dict) else None
    return value


def _export_onnx(model: nn.Module, out: Path, with_head: bool, image_size: int) -> list[Path]:
    """Export, check and then move into place: the exporter writes the model and its external data file itself, by
    name, so both are written to a private folder beside ``out`` and renamed over their targets once checked (the
    data first: the model never appears without its weights)."""
    output = "logits" if with_head else "features"
    model = model.eval()
    if not with_head:
        model.fc = nn.Identity()  # (N, 2048): the globally pooled trunk
    example = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    # The trunk ends in a global average pool, so every batch size and picture size >= 1 px runs.
    dims = {0: torch.export.Dim("batch"), 2: torch.export.Dim("height"), 3: torch.export.Dim("width")}
    program = torch.onnx.export(model, (example,), input_names=["images"], output_names=[output],
                                dynamic_shapes=(dims,), dynamo=True, verbose=False)
    external = sum(t.numel() * t.element_size() for t in model.state_dict().values()) > ONNX_SINGLE_FILE_BYTES
    out.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        staged = folder / out.name
        program.save(staged, external_data=external)
        _check_onnx(staged, model, output, image_size)
        files = sorted(folder.iterdir(), key=lambda p: p == staged)  # the model last
        for file in files:
            os.chmod(file, shared_file_mode())
            os.replace(file, out.parent / file.name)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return [out.parent / file.name for file in reversed(files)]


def _check_onnx(path: Path, model: nn.Module, output: str, image_size: int) -> None:
    """Run the exported file with onnxruntime on 3 images (the export traced 2) and compare with PyTorch."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: its warnings are about graph rewrites it made
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    images = torch.randn(3, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(images).numpy()  # (3, C) or (3, 2048)
    (got,) = session.run([output], {"images": images.numpy()})
    if got.shape != expected.shape:
        raise UserError(f"the ONNX export is wrong: onnxruntime gives {output} of shape {list(got.shape)}, PyTorch "
                        f"{list(expected.shape)}; nothing was written")
    error = np.abs(got - expected)
    if not np.all(error <= ONNX_ATOL + ONNX_RTOL * np.abs(expected)):  # a NaN fails too
        raise UserError(f"the ONNX export is wrong: onnxruntime's {output} differ from PyTorch's by up to "
                        f"{np.nanmax(error):.3g}; nothing was written")


def _write_vocab(checkpoint: dict, out: Path) -> Path:
    """``OUT.vocab.json``: what each logit of the exported head means."""
    path = out.with_name(out.name + ".vocab.json")
    vocab_file = _training_arg(checkpoint, "data", "vocab")
    vocab, missing = _training_vocab(vocab_file, checkpoint["vocab_hash"])
    head = {"format": "fastpretrain exported vocabulary", "format_version": SIDECAR_FORMAT_VERSION,
            "arch": checkpoint["arch"], "num_classes": checkpoint["num_classes"],
            "vocab_hash": checkpoint["vocab_hash"]}
    if vocab is not None:
        head |= {"source": f"vocabulary file {vocab_file}", "wordnet_version": vocab.wordnet_version,
                 "sense": vocab.sense, "num_images": vocab.num_images}
        classes = [vars(c) for c in vocab.classes]
    else:
        log.warning("%s: writing the checkpoint's class wnids without lemmas or counts", missing)
        head |= {"source": "the checkpoint's class list", "wordnet_version": WORDNET_VERSION,
                 "note": f"lemmas and counts are absent: {missing}; a wnid is 'n' and the synset's WordNet offset"}
        classes = [{"index": i, "wnid": wnid} for i, wnid in enumerate(checkpoint["classes"])]
    # One line per class keeps a 17k-class file readable, as vocab.json is.
    lines = [f" {json.dumps(key)}: {json.dumps(value)}," for key, value in head.items()]
    body = ",\n".join("  " + json.dumps(c) for c in classes)
    with atomic_write(path, "w") as f:
        f.write("{\n" + "\n".join(lines) + f'\n "classes": [\n{body}\n ]\n}}\n')
    return path


def _training_vocab(vocab_file: object, vocab_hash: str) -> tuple[Vocab | None, str]:
    """The vocabulary the checkpoint was trained with, or None and why it cannot be had."""
    if not isinstance(vocab_file, str):
        return None, "the checkpoint names no vocabulary file"
    if not Path(vocab_file).is_file():
        return None, f"the vocabulary file it was trained with ({vocab_file}) is gone"
    try:
        vocab = Vocab.load(vocab_file)
    except UserError as e:
        return None, str(e)
    if vocab.content_hash != vocab_hash:
        return None, (f"the vocabulary file {vocab_file} has changed since training (hash {vocab.content_hash}, "
                      f"the checkpoint's {vocab_hash})")
    return vocab, ""
