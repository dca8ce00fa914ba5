"""Fine-tuning on classes: labeled data as an ImageFolder tree or shards with a ``cls`` member through the same loaders,
mixup against a dense target worked out by hand, and `fastpretrain finetune` end to end (top-1/top-5 each epoch, EMA
weights saved and resumed exactly)."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from fastpretrain.cli import main
from fastpretrain.data import DataConfig, build_eval_loader, build_train_loader
from fastpretrain.data.config import IMAGENET_MEAN, IMAGENET_STD
from fastpretrain.formats.checkpoint import find_latest
from fastpretrain.formats.shards import ShardWriter
from fastpretrain.loss import hashtag_cross_entropy
from fastpretrain.train.tasks import class_vocab
from fastpretrain.train.trainer import mix_batch

CPU = torch.device("cpu")
COLOURS = {"apple": (200, 30, 30), "grass": (30, 170, 50), "sea": (30, 60, 220), "sun": (240, 210, 20)}


def solid_jpeg(rgb, rng) -> bytes:
    size = (int(rng.integers(20, 50)), int(rng.integers(20, 50)))
    out = io.BytesIO()
    Image.new("RGB", size, rgb).save(out, format="JPEG", quality=95)
    return out.getvalue()


def class_of(batch) -> list[str]:
    """Each image's class, from its mean colour."""
    std = torch.tensor(IMAGENET_STD)[:, None, None] * 255
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None] * 255
    shown = (batch.images.float() * std + mean).mean(dim=(2, 3)).numpy()  # (B, 3)
    names = list(COLOURS)
    return [names[int(np.argmin([np.abs(np.array(c) - rgb).sum() for c in COLOURS.values()]))] for rgb in shown]


def test_an_image_folder_trains_with_its_folders_as_classes(tmp_path, rng):
    counts = {name: int(rng.integers(2, 6)) for name in COLOURS}
    for name, n in counts.items():
        (tmp_path / name).mkdir()
        for i in range(n):
            (tmp_path / name / f"{i}.jpg").write_bytes(solid_jpeg(COLOURS[name], rng))
    (tmp_path / "sea" / "notes.txt").write_text("not an image: not a sample")
    (tmp_path / "sun" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")  # a sample, skipped when decoded
    vocab = class_vocab(sorted(COLOURS), np.ones(4, dtype=np.int64))
    cfg = DataConfig(shards=str(tmp_path), label_dir=None, backend="torch", batch_size=3, image_size=16, workers=0,
                     resample="natural", max_bad_fraction=0.5)
    loader = build_train_loader(cfg, vocab, CPU, torch.float32)
    seen = []
    for _ in range(8):
        batch = next(loader)
        assert batch.offsets.tolist() == [0, 1, 2, 3]  # one class per image
        assert [vocab.wnids[int(c)] for c in batch.labels] == class_of(batch)
        seen += class_of(batch)
    loader.close()
    assert loader.skipped == {"truncated": 1}  # a JPEG signature, no end marker
    every = list(build_eval_loader(cfg, vocab, CPU, torch.float32))
    assert sorted(c for b in every for c in class_of(b)) == sorted(n for n, k in counts.items() for _ in range(k))


def test_shards_with_a_cls_member(tmp_path, rng):
    """cls is the class index as text; a missing, non-integer or out-of-range one is a missing label, counted."""
    names = sorted(COLOURS)
    expected, bad = [], 0
    with ShardWriter(tmp_path / "00000.tar") as writer:
        for i in range(12):
            c = int(rng.integers(0, 4))
            member = {0: str(c).encode(), 1: b" %d\n" % c, 2: b"seven", 3: b"9", 4: None}[i % 5]
            files = {"jpg": solid_jpeg(COLOURS[names[c]], rng)}
            if member is not None:
                files["cls"] = member
            writer.write(f"{i:04d}", files)
            if i % 5 in (0, 1):
                expected.append(names[c])
            else:
                bad += 1
    cfg = DataConfig(shards=str(tmp_path / "00000.tar"), label_dir=None, backend="torch", batch_size=len(expected),
                     image_size=16, workers=0, resample="natural", shuffle_buffer=0, max_bad_fraction=0.9)
    loader = build_eval_loader(cfg, class_vocab(names, np.ones(4, dtype=np.int64)), CPU, torch.float32)
    (batch,) = list(loader)
    assert [names[int(c)] for c in batch.labels] == class_of(batch) == expected
    assert loader.skipped == {"missing_labels": bad}


def test_mixup_is_the_mixed_dense_target(gen):
    """The fused loss on mix_batch's weighted labels equals cross-entropy against lam t_i + (1 - lam) t_(B-1-i) on the
    mixed images, with t the 1/k spread of each row's labels (float64 reference)."""
    batch, classes = 5, 7
    counts = torch.randint(1, 4, (batch,), generator=gen)
    offsets = torch.zeros(batch + 1, dtype=torch.int64)
    offsets[1:] = counts.cumsum(0)
    labels = torch.randint(0, classes, (int(offsets[-1]),), generator=gen)
    images = torch.randn(batch, 3, 4, 4, generator=gen)
    lam = float(torch.rand((), generator=gen))
    mixed, mixed_labels, mixed_offsets, weights = mix_batch(images, labels, offsets, lam)
    torch.testing.assert_close(mixed, lam * images + (1 - lam) * images.flip(0))
    dense = torch.zeros(batch, classes, dtype=torch.float64)
    for row in range(batch):
        for part, source in ((lam, row), (1 - lam, batch - 1 - row)):
            mine = labels[offsets[source]:offsets[source + 1]]
            for c in mine:
                dense[row, c] += part / len(mine)
    logits = torch.randn(batch, classes, generator=gen, dtype=torch.float64)
    expected = torch.nn.functional.cross_entropy(logits, dense, reduction="none")
    got = hashtag_cross_entropy(logits, mixed_labels, mixed_offsets, weights.double(), reduction="none")
    torch.testing.assert_close(got, expected)


@pytest.fixture(scope="module")
def labeled(tmp_path_factory):
    root = tmp_path_factory.mktemp("labeled")
    assert main(["synth", "--labeled", "--out", str(root), "--per-class", "6", "--image-size", "48"]) == 0
    return root


FINETUNE = ["finetune", "--recipe", "finetune-demo", "--model", "resnext_tiny", "--img-size", "32", "-b", "8",
            "--workers", "0", "--data-backend", "torch", "--log-interval", "1"]


def test_finetune_evaluates_top1_and_top5_each_epoch(labeled, tmp_path):
    run = tmp_path / "run"
    assert main([*FINETUNE, "--data", str(labeled), "--epochs", "2", "--output", str(run)]) == 0
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    # 60 images in batches of 8: round(7.5) = 8 steps an epoch, 16 in all; an evaluation after each epoch
    assert [e["step"] for e in evals] == [8, 16] and all(e["images"] == 60 for e in evals)
    assert all(0 <= e["top1"] <= e["top5"] <= 1 for e in evals)
    env = json.loads((run / "env.json").read_text())
    assert env["global_batch"] == 8
    _, state = find_latest(run / "checkpoints")
    assert state["classes"] == sorted(p.name for p in (labeled / "train").iterdir())


def test_finetune_with_mixup_and_ema_resumes_exactly(labeled, tmp_path):
    """The EMA's weights and the mixup draws are part of the run's state: resumed from its step-4 checkpoint, the run
    ends with the weights and averaged weights it reached without stopping."""
    flags = [*FINETUNE, "--data", str(labeled), "--steps", "8", "--mixup", "0.4", "--ema-decay", "0.5", "--seed", "7",
             "--checkpoint-interval", "4", "--deterministic"]
    straight, stopped = tmp_path / "a", tmp_path / "b"
    assert main([*flags, "--output", str(straight)]) == 0
    shutil.copytree(straight, stopped)
    for late in (stopped / "checkpoints").glob("step-000000008.*"):
        late.unlink()  # as if the run had died after step 4's checkpoint
    assert main([*flags, "--output", str(stopped), "--resume", "auto"]) == 0
    (_, a), (_, b) = find_latest(straight / "checkpoints"), find_latest(stopped / "checkpoints")
    assert a["step"] == b["step"] == 8 and a["ema"] is not None
    for key in ("state_dict", "ema"):
        for name, tensor in a[key].items():
            torch.testing.assert_close(b[key][name], tensor, rtol=0, atol=0, msg=f"{key}.{name}")
    assert not torch.equal(a["ema"]["module.fc.weight"], a["state_dict"]["fc.weight"])
