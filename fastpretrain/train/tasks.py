"""What a run learns and how it is judged: hashtags (pretraining: a vocabulary, label indexes, precision@k) or
classes (fine-tuning: an ImageFolder tree or shards with a ``cls`` member, top-1/top-5 accuracy). The Trainer is the
same for both; a task only says where the labeled data is, what its label space is, and how to evaluate."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from fastpretrain.errors import UserError
from fastpretrain.evaluate import accuracy_sums, evaluation_sums
from fastpretrain.formats.image_folder import is_image_folder, read_image_folder
from fastpretrain.formats.vocab import Vocab, VocabClass
from fastpretrain.train.config import TrainConfig
from fastpretrain.train.world import World

CLASSES_SENSE = "classes"  # a label space of dataset classes, not WordNet hashtag senses


@dataclass(frozen=True)
class Split:
    """Where a split's images are and where their labels are (None: in the data itself)."""

    shards: str
    label_dir: str | None


class HashtagTask:
    """Pretraining on hashtags: ``vocab.json``, a label index per shard, precision@k against the majority class."""

    kind = "hashtags"

    def __init__(self, cfg: TrainConfig, world: World) -> None:
        d = cfg.data
        if d.data is None:
            from fastpretrain.demo import prepare_demo

            def demo():
                return prepare_demo(d.demo_images, seed=cfg.run.seed, workers=max(d.workers, 1))

            paths = demo() if world.is_main else None
            world.gather(None)  # the others wait for rank 0's corpus, then find it
            paths = paths or demo()
            self.train = Split(str(paths.train), str(paths.label_dir))
            self.val = Split(str(paths.val), str(paths.val_label_dir))
            self.vocab = Vocab.load(paths.vocab)
            return
        self.train = Split(d.data, cfg.default_label_dir)
        self.val = Split(d.val_data, cfg.default_val_label_dir) if d.val_data is not None else None
        self.vocab = Vocab.load(d.vocab)

    def evaluation_sums(self, model: nn.Module, batches, autocast: contextlib.AbstractContextManager) -> dict:
        return evaluation_sums(model, batches, majority_class=int(np.argmax(self.vocab.counts)), autocast=autocast)


class ClassificationTask:
    """Fine-tuning on classes. ``--data DIR`` with ``DIR/train`` and ``DIR/val`` ImageFolder trees, or ``--data`` the
    training split (an ImageFolder tree, or shards with a ``cls`` member and ``--num-classes``) and ``--val-data``
    the held-out one. The label space is the training split's classes: sorted folder names, or 0..N-1."""

    kind = "classes"

    def __init__(self, cfg: TrainConfig, world: World) -> None:
        d = cfg.data
        if d.data is None:
            raise UserError("fine-tuning needs --data: an ImageFolder tree (DIR/train, DIR/val) or shards with a "
                            "cls member")
        root = Path(d.data)
        if d.val_data is None and is_image_folder(root / "train") and is_image_folder(root / "val"):
            train, val = str(root / "train"), str(root / "val")
        else:
            train, val = d.data, d.val_data
        self.train = Split(train, None)
        self.val = Split(val, None) if val is not None else None
        if is_image_folder(train):
            folder = read_image_folder(train)
            if d.num_classes is not None and d.num_classes != len(folder.classes):
                raise UserError(f"--num-classes {d.num_classes}: {train} has {len(folder.classes)} class folders")
            names, counts = folder.classes, np.bincount(folder.labels, minlength=len(folder.classes))
        elif d.num_classes is None:
            raise UserError(f"--data {train}: shards with a cls member need --num-classes")
        else:
            names, counts = [str(i) for i in range(d.num_classes)], np.ones(d.num_classes, dtype=np.int64)
        self.vocab = class_vocab(names, counts)

    def evaluation_sums(self, model: nn.Module, batches, autocast: contextlib.AbstractContextManager) -> dict:
        return accuracy_sums(model, batches, autocast=autocast)


def class_vocab(names: list[str], counts: np.ndarray) -> Vocab:
    """A dataset's classes as a label space (class ``i`` is ``names[i]``; its hash names the classes and their order,
    so a checkpoint fine-tuned on other classes is refused on resume)."""
    classes = [VocabClass(i, name, [name], int(n)) for i, (name, n) in enumerate(zip(names, counts))]
    return Vocab(classes, CLASSES_SENSE, Vocab.hash_of(list(names), CLASSES_SENSE, "none"),
                 max(int(np.sum(counts)), int(np.max(counts, initial=1))), wordnet_version="none")


TASKS = {"hashtags": HashtagTask, "classes": ClassificationTask}


def make_task(cfg: TrainConfig, world: World) -> HashtagTask | ClassificationTask:
    return TASKS[cfg.task](cfg, world)
