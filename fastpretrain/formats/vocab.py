"""The hashtag vocabulary file, ``vocab.json``: its classes (index, wnid, lemmas, image count) and the content hash
that checkpoints and label indexes record. ``fastpretrain.hashtags.build`` makes one from posts.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fastpretrain.errors import UserError
from fastpretrain.formats.files import atomic_write

FORMAT_VERSION = 1
WORDNET_VERSION = "3.0"  # ImageNet's wnids are WordNet 3.0 offsets; another version would give other ids


@dataclass
class VocabClass:
    """One class: its index (the label id), WordNet synset id, lemma names, and how many images carry it."""

    index: int
    wnid: str
    lemmas: list[str]
    count: int


@dataclass
class Vocab:
    """The classes and what they were counted over; ``content_hash`` names what the class ids mean."""

    classes: list[VocabClass]
    sense: str
    content_hash: str
    num_images: int  # posts kept: with at least one kept hashtag
    wordnet_version: str = WORDNET_VERSION
    selection: dict = field(default_factory=dict)  # size, min_count, targeted
    stats: dict = field(default_factory=dict)  # posts seen / kept / dropped, raw hashtags, skipped by reason

    @staticmethod
    def hash_of(wnids: list[str], sense: str, wordnet_version: str) -> str:
        """Hash of what label ids mean (class order, synsets, sense rule, WordNet), not of the counts."""
        meaning = json.dumps([FORMAT_VERSION, wordnet_version, sense, wnids])
        return hashlib.blake2b(meaning.encode(), digest_size=16).hexdigest()

    def __len__(self) -> int:
        return len(self.classes)

    @property
    def counts(self) -> np.ndarray:
        """Images per class, (C,) int64, by class index."""
        return np.array([c.count for c in self.classes], dtype=np.int64)

    @property
    def wnids(self) -> list[str]:
        return [c.wnid for c in self.classes]

    def save(self, path: str | os.PathLike) -> None:
        """Write ``vocab.json`` atomically."""
        head = {"format_version": FORMAT_VERSION, "wordnet_version": self.wordnet_version, "sense": self.sense,
                "content_hash": self.content_hash, "num_images": self.num_images, "selection": self.selection,
                "stats": self.stats}
        # One line per class keeps a 17k-class file readable and diffable.
        classes = ",\n".join("  " + json.dumps(vars(c)) for c in self.classes)
        text = json.dumps(head, indent=1).removesuffix("\n}") + f',\n "classes": [\n{classes}\n ]\n}}\n'
        with atomic_write(path, "w") as f:
            f.write(text)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Vocab:
        """Read ``vocab.json``; UserError naming the file if it is missing, corrupt or of another format."""
        path = Path(path)
        try:
            body = json.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(f"vocabulary {path} does not exist (make one with `fastpretrain vocab build`)") from None
        except (OSError, ValueError, RecursionError) as e:  # RecursionError: nested deeper than the decoder's stack
            raise UserError(f"vocabulary {path} is not readable JSON: {e}") from None
        if not isinstance(body, dict) or body.get("format_version") != FORMAT_VERSION:
            found = body.get("format_version") if isinstance(body, dict) else None
            raise UserError(f"vocabulary {path} has format version {found}, this fastpretrain reads "
                            f"{FORMAT_VERSION}: build it again with `fastpretrain vocab build`")
        try:
            classes = [VocabClass(int(c["index"]), str(c["wnid"]), list(c["lemmas"]), int(c["count"]))
                       for c in body["classes"]]
            vocab = cls(classes, body["sense"], body["content_hash"], int(body["num_images"]),
                        body["wordnet_version"], body.get("selection", {}), body.get("stats", {}))
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"vocabulary {path} is corrupt: {type(e).__name__}: {e}") from None
        if [c.index for c in classes] != list(range(len(classes))) or not classes:
            raise UserError(f"vocabulary {path} is corrupt: class indexes are not 0..C-1")
        if vocab.content_hash != cls.hash_of(vocab.wnids, vocab.sense, vocab.wordnet_version):
            raise UserError(f"vocabulary {path} is corrupt: its content hash does not match its classes")
        return vocab

