"""The embedded demo: a synthetic hashtag corpus made once into a cache folder, ready to train on.

The corpus goes through the same stages as real data: shards of tagged JPEGs, WordNet canonicalization
and vocabulary selection (``fastpretrain vocab build``), a label index per shard, then the trainer.
Also home of the ``fastpretrain synth`` command, which writes such a corpus wherever the user wants it.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fastpretrain.data.synth import write_demo_corpus, write_labeled_split
from fastpretrain.formats.files import cache_root

log = logging.getLogger(__name__)

CORPUS_VERSION = 2  # bump when synth.py draws differently, so stale caches are not reused
VAL_IMAGES = 1000


@dataclass(frozen=True)
class DemoPaths:
    train: Path
    label_dir: Path
    vocab: Path
    val: Path
    val_label_dir: Path

    @classmethod
    def under(cls, root: Path) -> "DemoPaths":
        return cls(root / "train", root / "labels", root / "vocab.json", root / "val", root / "val-labels")


def prepare_demo(images: int, seed: int = 0, workers: int = 2) -> DemoPaths:
    """The demo corpus of ``images`` training posts (plus a held-out split), built on first use.

    Built in a temporary folder and renamed into place, so an interrupted build never leaves a half corpus.
    """
    from fastpretrain.formats.vocab import Vocab
    from fastpretrain.hashtags import VocabBuildConfig, build_vocab, write_label_indexes

    root = cache_root() / "demo" / f"v{CORPUS_VERSION}-n{images}-s{seed}"
    if (root / "vocab.json").is_file():
        return DemoPaths.under(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}."))
    try:
        paths = DemoPaths.under(tmp)
        log.info("demo: writing %d + %d synthetic posts into %s", images, VAL_IMAGES, root)
        write_demo_corpus(paths.train, images, seed=seed)
        write_demo_corpus(paths.val, VAL_IMAGES, seed=seed + 1)  # another seed: other pictures, same distribution
        build_vocab(VocabBuildConfig(data=[str(paths.train)], out=str(paths.vocab), label_dir=str(paths.label_dir),
                                     workers=workers))
        write_label_indexes([str(paths.val)], Vocab.load(paths.vocab), paths.val_label_dir, workers=workers)
        try:
            tmp.rename(root)
        except OSError:  # another process finished first: use its corpus
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return DemoPaths.under(root)


def run_synth(args) -> int:
    if args.labeled:
        written = write_labeled_split(args.out, {"train": args.per_class, "val": args.per_class}, seed=args.seed,
                                      image_size=args.image_size)
        print(f"wrote {', '.join(f'{n} {split}' for split, n in written.items())} labeled pictures "
              f"(ImageFolder: SPLIT/CLASS/*.jpg) to {args.out}")
        return 0
    shards = write_demo_corpus(args.out, args.images, seed=args.seed, shard_size=args.shard_size,
                               image_size=args.image_size)
    print(f"wrote {args.images} posts in {len(shards)} shards to {args.out}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("synth", help="write a synthetic weakly labeled corpus (WebDataset shards)")
    p.add_argument("--out", required=True, help="folder for the shards")
    p.add_argument("--images", type=int, default=5000, help="number of posts (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="the corpus is a pure function of the seed (default: %(default)s)")
    p.add_argument("--shard-size", type=int, default=1000, help="posts per shard (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=96, help="picture side in pixels (default: %(default)s)")
    p.add_argument("--labeled", action="store_true",
                   help="a labeled ImageFolder (train/, val/, a folder per object) for fine-tuning and probing instead")
    p.add_argument("--per-class", type=int, default=40,
                   help="with --labeled: pictures per class and split (default: %(default)s)")
    p.set_defaults(func=run_synth)

