"""``fastpretrain eval``: average precision by hand and against scikit-learn, and the command on a model whose outputs
are known: a resnext_tiny whose pooled features are each picture's normalized colour, so that its logits are a
linear map of the colour, worked out here in float64 for every picture."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

from fastpretrain.cli import main
from fastpretrain.data.config import IMAGENET_MEAN, IMAGENET_STD
from fastpretrain.formats.checkpoint import CheckpointManager, save_file
from fastpretrain.formats.labels import LabelIndex, label_index_path
from fastpretrain.formats.shards import ShardWriter
from fastpretrain.formats.vocab import Vocab, VocabClass
from fastpretrain.train.tasks import class_vocab
from fastpretrain.transfer.evaluate import average_precision, targeted_wnids

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220), "yellow": (240, 210, 20)}
MORE_COLOURS = {**COLOURS, "purple": (140, 40, 170), "cyan": (20, 200, 200), "orange": (250, 140, 20),
                "grey": (128, 128, 128)}
SHIFT = 4.0  # keeps the normalized colour positive through the ReLUs
SIZE = 32


def test_average_precision_by_hand():
    scores = torch.tensor([[0.9, 0.1, 0.3], [0.8, 0.2, 0.2], [0.8, 0.3, 0.1], [0.5, 0.4, 0.0], [0.3, 0.5, 0.5],
                           [0.1, 0.6, 0.4]])
    target = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0], [0, 0, 0], [1, 0, 0], [0, 1, 0]], dtype=torch.bool)
    ap = average_precision(scores, target)
    # class 0: 0.9 a hit (precision 1); the tie at 0.8 is one threshold with one hit of two (precision 2/3 at rank 3);
    # 0.3 a hit at rank 5 (3/5): (1 + 2/3 + 3/5) / 3. Class 1: hits at ranks 1 and 6: (1 + 2/6) / 2. Class 2: none.
    assert ap[0].item() == pytest.approx(34 / 45, abs=1e-12)
    assert ap[1].item() == pytest.approx(2 / 3, abs=1e-12)
    assert ap[2].isnan()


def test_average_precision_matches_scikit_learn(rng):
    metrics = pytest.importorskip("sklearn.metrics")
    scores = np.round(rng.random((60, 9)), 1)  # one decimal: many ties
    target = rng.random((60, 9)) < 0.3
    target[0] = True  # every class has a positive
    ap = average_precision(torch.from_numpy(scores).float(), torch.from_numpy(target))
    expected = [metrics.average_precision_score(target[:, c], scores[:, c]) for c in range(9)]
    np.testing.assert_allclose(ap.numpy(), expected, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# A model whose outputs are known


def features_of(colour) -> np.ndarray:
    """(3,) float64: what the colour model's pooled features hold for a picture of one colour."""
    return (np.asarray(colour) / 255 - IMAGENET_MEAN) / IMAGENET_STD + SHIFT


def colour_model(weight: np.ndarray, bias: np.ndarray) -> nn.Module:
    """torchvision's resnext_tiny wired to pass the first three channels through: conv1 and every block's shortcut
    copy them (the residual branches are zeroed by their last BatchNorm), so the pooled features are the normalized
    colour plus SHIFT, and the logits ``weight (C, 3) @ features + bias``."""
    model = ResNet(Bottleneck, [1, 1, 1, 1], groups=32, width_per_group=2, num_classes=len(bias))

    def pass_three(bn: nn.BatchNorm2d, shift: float) -> None:
        bn.running_mean.zero_()
        bn.running_var.fill_(1 - bn.eps)  # scale exactly 1
        bn.weight.zero_()
        bn.weight[:3] = 1
        bn.bias.zero_()
        bn.bias[:3] = shift

    with torch.no_grad():
        model.conv1.weight.zero_()
        for k in range(3):
            model.conv1.weight[k, k, 3, 3] = 1  # the 7x7 kernel's centre
        pass_three(model.bn1, SHIFT)
        for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
            block = layer[0]
            block.bn3.weight.zero_()
            block.bn3.bias.zero_()
            block.downsample[0].weight.zero_()
            for k in range(3):
                block.downsample[0].weight[k, k, 0, 0] = 1
            pass_three(block.downsample[1], 0.0)
        model.fc.weight.zero_()
        model.fc.weight[:, :3] = torch.from_numpy(weight)
        model.fc.bias.copy_(torch.from_numpy(bias))
    return model.eval()


def head(rng, classes: int, rows=None, colours=COLOURS) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """A random head (``rows`` of it; the others far below) and the logits (C,) it gives each colour, drawn again until
    every colour's logits are 0.05 apart and each class's logits over the colours too: no tie decides a result."""
    rows = list(range(classes)) if rows is None else rows
    while True:
        weight, bias = np.zeros((classes, 3)), np.full(classes, -100.0)
        weight[rows] = rng.normal(0, 1, (len(rows), 3))
        bias[rows] = rng.normal(0, 1, len(rows))
        logits = {name: weight @ features_of(c) + bias for name, c in colours.items()}
        table = np.stack(list(logits.values()))[:, rows]  # (colours, rows)
        if min(np.diff(np.sort(table, axis=1), axis=1).min(), np.diff(np.sort(table, axis=0), axis=0).min()) > 0.05:
            return weight.astype(np.float32), bias.astype(np.float32), logits


def write_checkpoint(path, model: nn.Module, classes: list[str], vocab_hash: str, args: dict, ema: nn.Module = None,
                     manager: CheckpointManager | None = None, step: int = 1) -> None:
    state = {"arch": "resnext_tiny", "num_classes": len(classes), "state_dict": model.state_dict(), "step": step,
             "vocab_hash": vocab_hash, "classes": classes,
             "args": {**args, "data": {"image_size": SIZE, **args.get("data", {})}},
             "ema": None if ema is None else {"n_averaged": torch.tensor(3),
                                              **{f"module.{k}": v for k, v in ema.state_dict().items()}}}
    if manager is not None:
        manager.save(step, state)
    else:
        save_file(path, state)


def picture(colour, rng) -> Image.Image:
    return Image.new("RGB", (int(rng.integers(SIZE, 3 * SIZE)), int(rng.integers(SIZE, 3 * SIZE))), colour)


def image_folder(root, colour_of: dict[str, str], rng) -> dict[str, int]:
    """``root/FOLDER/*.png`` in each folder's colour, 1 to 4 pictures each; returns the counts."""
    counts = {}
    for folder, colour in colour_of.items():
        (root / folder).mkdir(parents=True)
        counts[folder] = int(rng.integers(1, 5))
        for i in range(counts[folder]):
            picture(COLOURS[colour], rng).save(root / folder / f"{i}.png")
    return counts


def accuracy(counts: dict[str, int], colour_of: dict[str, str], class_index: dict[str, int], logits) -> tuple:
    """(top1, top5) worked out from each colour's logits."""
    n = sum(counts.values())
    ranks = {f: int((logits[colour_of[f]] > logits[colour_of[f]][class_index[f]]).sum()) for f in counts}
    return (sum(counts[f] for f in counts if ranks[f] == 0) / n, sum(counts[f] for f in counts if ranks[f] < 5) / n)


EVAL = ["eval", "-j", "0", "--data-backend", "torch", "--device", "cpu"]


def one_line_error(capsys, rc: int) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("fastpretrain: error: "), (rc, err)
    return err[0]


# ------------------------------------------------------------------------------------------------
# The command


def test_a_classifier_is_scored_top1_top5_with_its_ema_weights_from_the_newest_checkpoint(tmp_path, rng, capsys):
    classes = ["apple", "grass", "leaf", "night", "sea", "sky", "sun"]  # sorted, as finetune names them
    colour_of = {"apple": "red", "grass": "green", "sea": "blue", "sun": "yellow"}  # a split without some classes
    counts = image_folder(tmp_path / "data" / "val", colour_of, rng)
    image_folder(tmp_path / "data" / "train", {"apple": "red"}, rng)  # DIR/train + DIR/val: DIR/val is scored
    weight, bias, logits = head(rng, len(classes))
    decoy_weight, decoy_bias, _ = head(rng, len(classes))
    vocab_hash = class_vocab(classes, np.ones(len(classes))).content_hash
    manager = CheckpointManager(tmp_path / "run" / "checkpoints")
    for step in (1, 2):  # the older checkpoint's EMA is a decoy; the newer one's model is the decoy, its EMA not
        write_checkpoint(None, colour_model(decoy_weight, decoy_bias), classes, vocab_hash, {"task": "classes"},
                         ema=colour_model(*((weight, bias) if step == 2 else (decoy_weight, decoy_bias))),
                         manager=manager, step=step)
    rc = main([*EVAL, "--checkpoint", str(tmp_path / "run"), "--data", str(tmp_path / "data"),
               "--output", str(tmp_path / "out")])
    assert rc == 0
    result = json.loads((tmp_path / "out" / "eval.json").read_text())
    top1, top5 = accuracy(counts, colour_of, {c: i for i, c in enumerate(classes)}, logits)
    assert (result["kind"], result["images"]) == ("classes", sum(counts.values()))
    assert result["top1"] == pytest.approx(top1, abs=1e-9) and result["top5"] == pytest.approx(top5, abs=1e-9)
    assert result["checkpoint"].endswith("step-000000002.pt") and result["data"] == str(tmp_path / "data" / "val")
    assert f"top1 {top1:.4f} top5 {top5:.4f}" in capsys.readouterr().out


def hashtag_vocab(tmp_path, wnids: list[str], counts: list[int], targeted: str | None = None) -> tuple[Vocab, str]:
    classes = [VocabClass(i, wnid, [wnid], n) for i, (wnid, n) in enumerate(zip(wnids, counts))]
    vocab = Vocab(classes, "concrete-first", Vocab.hash_of(wnids, "concrete-first", "3.0"), max(counts),
                  selection={"size": None if targeted else len(wnids), "min_count": None if targeted else 1,
                             "targeted": targeted})
    path = tmp_path / "corpus" / "vocab.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    vocab.save(path)
    return vocab, str(path)


def test_a_hashtag_model_gets_precision_at_k_and_map_on_tagged_shards(tmp_path, rng):
    """One picture of each of 8 colours, 1 to 3 random hashtags each: no two pictures tie on any class."""
    wnids = [f"n0{i:07d}" for i in range(7)]
    vocab, vocab_path = hashtag_vocab(tmp_path, wnids, [9, 50, 8, 7, 6, 5, 4])  # class 1 the most frequent
    weight, bias, logits = head(rng, len(wnids), colours=MORE_COLOURS)
    checkpoint = tmp_path / "step-000000001.pt"
    write_checkpoint(checkpoint, colour_model(weight, bias), wnids, vocab.content_hash,
                     {"task": "hashtags", "data": {"vocab": vocab_path}})
    colours = list(MORE_COLOURS)
    tags = {c: rng.choice(len(wnids), int(rng.integers(1, 4)), replace=False).tolist() for c in colours}
    keys = [f"{i:04d}" for i in range(len(colours))]
    with ShardWriter(tmp_path / "val" / "00000.tar") as writer:
        for key, colour in zip(keys, colours):
            out = tmp_path / "picture.png"
            picture(MORE_COLOURS[colour], rng).save(out)
            writer.write(key, {"png": out.read_bytes(), "json": b"{}"})
    LabelIndex.from_rows(keys, [tags[c] for c in colours], vocab.content_hash).save(
        label_index_path(tmp_path / "corpus" / "val-labels", tmp_path / "val" / "00000.tar"))
    rc = main([*EVAL, "--checkpoint", str(checkpoint), "--data", str(tmp_path / "val"), "--output", str(tmp_path)])
    assert rc == 0
    result = json.loads((tmp_path / "eval.json").read_text())

    scores = np.stack([logits[c] for c in colours])  # (N, C) float64
    target = np.zeros_like(scores, dtype=bool)
    for i, c in enumerate(colours):
        target[i, tags[c]] = True
    top = np.argsort(-scores, axis=1)
    expected = {"precision@1": target[np.arange(len(colours)), top[:, 0]].mean(),
                "precision@5": np.take_along_axis(target, top[:, :5], 1).mean(),
                "majority_precision@1": target[:, 1].mean()}
    ap = []
    for c in range(len(wnids)):  # precision at each positive's rank, averaged over the positives
        order = np.argsort(-scores[:, c])
        hit_ranks = np.flatnonzero(target[order, c]) + 1
        if len(hit_ranks):
            ap.append(np.mean(np.arange(1, len(hit_ranks) + 1) / hit_ranks))
    assert result["kind"] == "hashtags" and result["images"] == len(colours)
    for name, value in expected.items():
        assert result[name] == pytest.approx(value, abs=1e-6), name  # float32 means
    assert result["map_classes"] == len(ap) and result["mAP"] == pytest.approx(np.mean(ap), abs=1e-6)


def test_an_imagenet_targeted_head_is_scored_on_wnid_folders_as_it_is(tmp_path, rng, capsys):
    wnids = targeted_wnids("imagenet1k")
    vocab, vocab_path = hashtag_vocab(tmp_path, wnids, [1] * 1000, targeted="imagenet1k")
    rows = sorted(rng.choice(1000, 7, replace=False).tolist())
    weight, bias, logits = head(rng, 1000, rows)
    checkpoint = tmp_path / "step-000000001.pt"
    write_checkpoint(checkpoint, colour_model(weight, bias), wnids, vocab.content_hash,
                     {"task": "hashtags", "data": {"vocab": vocab_path}})
    colour_of = {wnids[rows[i]]: colour for i, colour in enumerate(COLOURS)}  # ImageNet's val/ layout
    counts = image_folder(tmp_path / "val", colour_of, rng)
    rc = main([*EVAL, "--checkpoint", str(checkpoint), "--data", str(tmp_path / "val"), "--output", str(tmp_path)])
    assert rc == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    top1, top5 = accuracy(counts, colour_of, {w: i for i, w in enumerate(wnids)}, logits)
    assert result["kind"] == "imagenet1k" and result["images"] == sum(counts.values())
    assert result["top1"] == pytest.approx(top1, abs=1e-9) and result["top5"] == pytest.approx(top5, abs=1e-9)

    (tmp_path / "val" / "n99999999").mkdir()  # a wnid outside the vocabulary
    picture(COLOURS["red"], rng).save(tmp_path / "val" / "n99999999" / "0.png")
    capsys.readouterr()
    assert "n99999999" in one_line_error(capsys, main([*EVAL, "--checkpoint", str(checkpoint),
                                                       "--data", str(tmp_path / "val")]))


def test_an_image_folder_for_an_untargeted_hashtag_model_or_another_vocabulary_is_one_line(tmp_path, rng, capsys):
    wnids = [f"n0{i:07d}" for i in range(5)]
    vocab, vocab_path = hashtag_vocab(tmp_path, wnids, [5, 4, 3, 2, 1])
    weight, bias, _ = head(rng, 5)
    checkpoint = tmp_path / "step-000000001.pt"
    write_checkpoint(checkpoint, colour_model(weight, bias), wnids, vocab.content_hash, {"task": "hashtags"})
    image_folder(tmp_path / "val", {wnids[0]: "red"}, rng)
    flags = [*EVAL, "--checkpoint", str(checkpoint), "--data", str(tmp_path / "val")]
    assert "--vocab" in one_line_error(capsys, main(flags))  # the checkpoint names none
    assert "--targeted imagenet1k" in one_line_error(capsys, main([*flags, "--vocab", vocab_path]))
    other, other_path = hashtag_vocab(tmp_path / "other", wnids[::-1], [5, 4, 3, 2, 1])
    assert "is not the one" in one_line_error(capsys, main([*flags, "--vocab", other_path]))
    assert "no usable checkpoint" in one_line_error(capsys, main([*EVAL, "--checkpoint", str(tmp_path / "val"),
                                                                  "--data", str(tmp_path / "val")]))
