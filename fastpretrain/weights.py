"""Pretrained weights in: ``read_weights`` reads the files users start from, ``load_trunk`` copies them into a model.

Files are told apart by their content, not their names:

- a fastpretrain training checkpoint (``RUN/checkpoints/step-*.pt``): its ``state_dict``, ``arch`` and class wnids;
- a plain ``torch.save(model.state_dict())`` file in either of torch's formats (zip, or the bare pickle stream of
  torch < 1.6 that the 2019 WSL-Images ``resnext101_32x8d_wsl`` files are): torchvision's, WSL-Images' or timm's
  ResNet. timm's ResNet names its tensors exactly as torchvision's does (checked on timm 1.0's ``resnext50_32x4d``:
  the same 320 keys and shapes), so nothing is renamed; the ``module.``, ``_orig_mod.`` and ``model.`` prefixes that
  DDP, ``torch.compile`` and model wrappers put before every key are removed;
- a safetensors file (ours from ``fastpretrain export``, a hub's ``model.safetensors``).

Torch files are read with ``torch.load(weights_only=True)`` only: a file that holds code is refused, never run.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from fastpretrain.errors import UserError
from fastpretrain.formats.checkpoint import FORMAT_VERSION, find_latest
from fastpretrain.models import create_model, list_models

log = logging.getLogger(__name__)

HEAD = "fc."  # torchvision's ResNet classifier: what a new task replaces
_STEP_COUNTER = "num_batches_tracked"  # BatchNorm's; files saved before torch 0.4.1 lack it, and nothing reads it
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")  # DDP, torch.compile, wrappers (Lightning, EMA)
_ZIP_MAGIC = b"PK\x03\x04"  # torch >= 1.6 writes a zip archive
_PICKLE_PROTO = 0x80  # torch < 1.6 wrote a pickle stream, which opens with the PROTO opcode
_SAFETENSORS_HEAD = 9  # a little-endian u64 header length, then the JSON header's "{"
_BLOCK_KEY = re.compile(r"layer([1-4])\.(\d+)\.")


@dataclass
class Weights:
    """Tensors read from ``path``, keyed as torchvision's ``ResNet`` names them."""

    state_dict: dict[str, torch.Tensor]
    arch: str | None  # the registered arch the file says it holds (our checkpoints and exports); None: it does not say
    classes: list[str] | None  # the head's class wnids, from our training checkpoints
    source: str  # "fastpretrain checkpoint" | "state dict" | "safetensors"
    path: Path


def read_weights(path: str | os.PathLike) -> Weights:
    """The weights in ``path``: a training checkpoint, a plain state dict or a safetensors file (see the module's
    docstring). Anything else (a missing file, a pickle with code, not a state dict, a tensor that is not dense, real
    and on the CPU) is a one-line UserError naming the path."""
    path = Path(path)
    if path.is_dir():
        path, state = read_checkpoint(path)
        tensors, arch, classes, source = state["state_dict"], state.get("arch"), state.get("classes"), \
            "fastpretrain checkpoint"
    elif _kind(path) == "safetensors":
        tensors, metadata = _read_safetensors(path)
        arch, classes, source = metadata.get("arch"), None, "safetensors"
    else:
        state = _torch_load(path)
        if isinstance(state, dict) and "format_version" in state:
            state = _checkpoint(state, path)
            tensors, arch, classes, source = (state["state_dict"], state.get("arch"), state.get("classes"),
                                              "fastpretrain checkpoint")
        else:
            tensors, arch, classes, source = state, None, None, "state dict"
    return Weights(_unwrapped(_checked_tensors(tensors, path)), arch, classes, source, path)


def read_checkpoint(spec: str | os.PathLike) -> tuple[Path, dict]:
    """(path, state) of a fastpretrain training checkpoint: the file ``spec``, or the newest checkpoint of a run
    folder (or of its ``checkpoints/`` folder) whose checksum holds, as ``--resume auto`` takes it."""
    path = Path(spec)
    if not path.is_dir():
        return path, load_checkpoint(path)
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    found = find_latest(folder)
    if found is None:
        raise UserError(f"{spec}: no usable checkpoint in {folder}")
    path, state = found  # its format_version checked and taken out by find_latest
    _checked_tensors(_with_state_dict(state, path)["state_dict"], path)
    return path, state


def load_checkpoint(path: str | os.PathLike) -> dict:
    """The fastpretrain training checkpoint at ``path`` (without its ``format_version``), read as data only; a
    one-line UserError for any other file, saying what it is instead."""
    path = Path(path)
    if _kind(path) == "safetensors":
        raise _refused(path, "it is a safetensors file, not a fastpretrain training checkpoint (RUN/checkpoints/"
                             "step-*.pt)")
    state = _torch_load(path)
    if not (isinstance(state, dict) and "format_version" in state):
        raise _refused(path, "it has no format_version: not a fastpretrain training checkpoint (RUN/checkpoints/"
                             "step-*.pt)")
    state = _checkpoint(state, path)
    _checked_tensors(state["state_dict"], path)
    return state


def check_fits(model: nn.Module, weights: Weights, keep_head: bool = False) -> None:
    """Raise the UserError ``load_trunk`` would, without copying anything (``model`` may be on the meta device)."""
    problem = _first_difference(_selected(model.state_dict(), keep_head), _selected(weights.state_dict, keep_head))
    if problem:
        model_name = _name(model.state_dict())
        raise UserError(f"{weights.path} does not fit the model ({model_name}): {problem}"
                        f"{_looks_like(weights.state_dict, model_name)}")


def load_trunk(model: nn.Module, weights: Weights, keep_head: bool = False) -> None:
    """Copy every tensor of ``weights`` but the head's (``fc.*``; all of them with ``keep_head``) into ``model``.

    The file must hold exactly the model's tensors, shapes and kinds (BatchNorm's step counters may be absent: they
    are left as they are); otherwise nothing is copied and a one-line UserError names the first difference and the
    registered arch the file looks like, so that a wrong ``--model`` is answered with the right one."""
    check_fits(model, weights, keep_head)
    model.load_state_dict(_selected(weights.state_dict, keep_head), strict=False)
    log.info("loaded %s from %s (%s)", "every tensor" if keep_head else "the trunk", weights.path, weights.source)


def _selected(state_dict: dict[str, torch.Tensor], keep_head: bool) -> dict[str, torch.Tensor]:
    return state_dict if keep_head else {k: v for k, v in state_dict.items() if not k.startswith(HEAD)}


def _refused(path: Path, why: str) -> UserError:
    return UserError(f"cannot read weights {path}: {why}")


def _kind(path: Path) -> str:
    """Which reader ``path`` needs, "torch" or "safetensors", from its first bytes."""
    try:
        with open(path, "rb") as f:
            head = f.read(_SAFETENSORS_HEAD)
    except OSError as e:
        raise _refused(path, e.strerror or str(e)) from None
    if not head:
        raise _refused(path, "the file is empty")
    if head.startswith(_ZIP_MAGIC) or head[0] == _PICKLE_PROTO:
        return "torch"
    if len(head) == _SAFETENSORS_HEAD and head[-1:] == b"{":
        return "safetensors"
    raise _refused(path, "it is neither a torch.save file (zip or pickle) nor a safetensors file")


def _torch_load(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = re.search(r"GLOBAL (\S+)", str(e))
        if refused:
            raise _refused(path, f"it holds code or objects that are not plain data ({refused[1]}), so it was not "
                                 "loaded") from None
        raise _refused(path, f"corrupt ({_first_line(e)})") from None
    except Exception as e:  # noqa: BLE001 - a damaged archive fails anywhere in torch's reader
        raise _refused(path, f"corrupt ({_first_line(e)})") from None


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(path, framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}, f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - safetensors reports a bad header, size or dtype in its own error types
        raise _refused(path, f"corrupt safetensors file ({_first_line(e)})") from None


def _checkpoint(state: dict, path: Path) -> dict:
    """A training checkpoint's dict without its ``format_version``, once its version and ``state_dict`` are ours."""
    state = dict(state)
    version = state.pop("format_version")
    if version != FORMAT_VERSION:
        raise _refused(path, f"a checkpoint of format_version {version!r}; this fastpretrain reads {FORMAT_VERSION}")
    return _with_state_dict(state, path)


def _with_state_dict(state: dict, path: Path) -> dict:
    if not isinstance(state.get("state_dict"), dict):
        raise _refused(path, "a checkpoint without a 'state_dict' dict")
    return state


def _checked_tensors(state: object, path: Path) -> dict[str, torch.Tensor]:
    """``state`` once it is a state dict of dense real CPU tensors keyed by name."""
    if not isinstance(state, dict):
        raise _refused(path, f"it holds a {type(state).__name__}, not a state dict (tensor names to tensors)")
    if not state:
        raise _refused(path, "it holds no tensors")
    for key, value in state.items():
        if not isinstance(key, str):
            raise _refused(path, f"it has a key {key!r} of type {type(key).__name__}: not a state dict")
        if not isinstance(value, torch.Tensor):
            hint = ("; it looks like another trainer's checkpoint: save its 'state_dict' alone with torch.save"
                    if "state_dict" in state else "")
            raise _refused(path, f"{key!r} holds a value of type {type(value).__name__}, not a tensor: not a "
                                 f"state dict{hint}")
        if value.layout != torch.strided or value.is_quantized or value.device.type != "cpu" \
                or value.is_complex() or value.dtype == torch.bool:
            raise _refused(path, f"{key!r} is a {value.layout} {value.dtype} tensor on {value.device.type}"
                                 f"{' (quantized)' if value.is_quantized else ''}: weights are dense real tensors")
    return state


def _unwrapped(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` without the wrapper prefixes that every one of its keys has (``module._orig_mod.`` and the like)."""
    while prefix := next((p for p in _WRAPPER_PREFIXES if all(k.startswith(p) for k in state)), None):
        state = {k.removeprefix(prefix): v for k, v in state.items()}
    return state


def _first_difference(wanted: dict[str, torch.Tensor], given: dict[str, torch.Tensor]) -> str | None:
    """What keeps ``given`` from loading into a model whose state dict is ``wanted``; None when nothing does."""
    missing = [k for k in wanted if k not in given and not k.endswith(_STEP_COUNTER)]
    unexpected = [k for k in given if k not in wanted]
    if missing or unexpected:
        found = ([f"{len(missing)} of the model's tensors missing ({_some(missing)})"] if missing else []) + \
                ([f"{len(unexpected)} tensors the model does not have ({_some(unexpected)})"] if unexpected else [])
        return " and ".join(found)
    for key, source in given.items():
        target = wanted[key]
        if source.shape != target.shape:
            if key.startswith(HEAD) and source.dim() == target.dim():
                return (f"its head has {source.shape[0]} classes and the model's {target.shape[0]} ({key} is "
                        f"{list(source.shape)}, the model's {list(target.shape)}): only the trunk can be loaded")
            return f"{key} is {list(source.shape)} in the file and {list(target.shape)} in the model"
        if source.dtype.is_floating_point != target.dtype.is_floating_point:
            return f"{key} is {source.dtype} in the file and {target.dtype} in the model"
    return None


def _some(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")


@dataclass(frozen=True)
class _Trunk:
    """What tells ResNet trunks apart: blocks per stage, and the groups and width of layer1's 3x3 convolution."""

    blocks: tuple[int, ...]
    groups: int
    width: int  # channels per group (ResNeXt's "d")
    bottleneck: bool

    def __str__(self) -> str:
        kind = "bottleneck" if self.bottleneck else "basic"
        return f"{list(self.blocks)} {kind} blocks per stage, {self.groups}x{self.width}d"


def _trunk(state_dict: dict[str, torch.Tensor]) -> _Trunk | None:
    """The trunk a torchvision-style ResNet state dict holds; None if it holds none."""
    blocks = [0, 0, 0, 0]
    for key in state_dict:
        if match := _BLOCK_KEY.match(key):
            stage = int(match[1]) - 1
            blocks[stage] = max(blocks[stage], int(match[2]) + 1)
    conv = state_dict.get("layer1.0.conv2.weight")  # (groups x width, width, 3, 3)
    if conv is None or conv.dim() != 4 or 0 in blocks:
        return None
    return _Trunk(tuple(blocks), conv.shape[0] // conv.shape[1], conv.shape[1], "layer1.0.conv3.weight" in state_dict)


@cache
def _registered_trunks() -> dict[_Trunk, str]:
    trunks = {}
    for arch in list_models():
        with torch.device("meta"):  # shapes without memory or initialization: the largest has 829M parameters
            trunks[_trunk(create_model(arch, 1).state_dict())] = arch
    return trunks


def _name(state_dict: dict[str, torch.Tensor]) -> str:
    """A model's registered arch, or its trunk in words."""
    trunk = _trunk(state_dict)
    return _registered_trunks().get(trunk) or (str(trunk) if trunk else "not a ResNet")


def _looks_like(state_dict: dict[str, torch.Tensor], model_name: str) -> str:
    """Which registered arch a file's tensors are, in words a user acts on; empty when it is the model's own."""
    trunk = _trunk(state_dict)
    if trunk is None:
        return f"; the file holds no ResNet trunk (its first keys: {_some(list(state_dict))})"
    arch = _registered_trunks().get(trunk)
    if arch == model_name:
        return ""
    if arch is not None:
        return f"; the file holds a {arch} ({trunk}): use --model {arch}"
    return f"; the file holds a ResNet of {trunk}, which no registered arch is ({', '.join(list_models())})"


def _first_line(error: Exception) -> str:
    """The line of a reader's message that says what went wrong (torch's run to paragraphs of advice)."""
    text = str(error).split("WeightsUnpickler error:")[-1]
    line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return f"{type(error).__name__}: {line[:200]}" if line else type(error).__name__
