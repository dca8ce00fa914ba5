"""``fastpretrain vocab build`` and ``fastpretrain vocab label``: parse flags, call the library, print a summary."""

from __future__ import annotations

import argparse

from fastpretrain.hashtags.canonical import SENSE_RULES


def register(subparsers) -> None:
    """Add the ``vocab`` command and its ``build`` and ``label`` subcommands."""
    vocab = subparsers.add_parser("vocab", help="hashtag vocabulary: build it, label shards with it")
    actions = vocab.add_subparsers(dest="vocab_command", required=True, parser_class=type(vocab))

    build = actions.add_parser(
        "build",
        help="count canonical hashtags, keep the most frequent, label the inputs"
    )
    build.add_argument("--data", nargs="+", required=True,
                       help="shards (folder, glob, {000..999} pattern) or metadata files (.jsonl, .tsv)")
    build.add_argument("--out", default="vocab.json", help="the vocabulary file to write (default: %(default)s)")
    build.add_argument("--labels", default=None, help="label index folder (default: <folder of --out>/labels)")
    build.add_argument("--size", type=int, default=None, help="classes to keep (default 17000)")
    build.add_argument("--min-count", type=int, default=None, help="fewest images a class needs (default 1)")
    build.add_argument("--targeted", choices=["imagenet1k"], default=None,
                       help="keep exactly ImageNet-1k's 1000 synsets, in ImageNet's class order")
    build.add_argument("--sense", choices=SENSE_RULES, default="concrete-first", help="WordNet sense rule (default: %(default)s)")
    _add_common(build)
    build.set_defaults(func=run_build)

    label = actions.add_parser(
        "label",
        help="write label indexes for more inputs (e.g. a validation split) with an existing vocabulary"
    )
    label.add_argument("--data", nargs="+", required=True, help="shards or metadata files, as for build")
    label.add_argument("--vocab", required=True, help="vocab.json from `fastpretrain vocab build`")
    label.add_argument("--out", required=True, help="folder for the label indexes")
    _add_common(label)
    label.set_defaults(func=run_label)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, default=1, help="processes, each reading whole input files (default: %(default)s)")
    parser.add_argument("--max-bad-fraction", type=float, default=0.01,
                        help="fail (exit 1) when a larger share of posts is malformed (default: %(default)s)")


def run_build(args: argparse.Namespace) -> int:
    from fastpretrain.hashtags.build import VocabBuildConfig, build_vocab

    config = VocabBuildConfig(
        data=args.data, out=args.out, size=args.size, min_count=args.min_count, targeted=args.targeted,
        sense=args.sense, workers=args.workers, label_dir=args.labels, max_bad_fraction=args.max_bad_fraction,
    )
    print("\n".join(build_vocab(config).lines()))
    return 0


def run_label(args: argparse.Namespace) -> int:
    from fastpretrain.hashtags.build import VocabLabelConfig, write_label_indexes
    from fastpretrain.formats.vocab import Vocab

    config = VocabLabelConfig(data=args.data, vocab=args.vocab, out=args.out, workers=args.workers,
                              max_bad_fraction=args.max_bad_fraction)
    summary = write_label_indexes(config.data, Vocab.load(config.vocab), config.out, config.workers,
                                  config.max_bad_fraction)
    print("\n".join(summary.lines()))
    return 0
