"""``fastpretrain data index``: write DALI ``wds2idx`` index files beside WebDataset shards."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from fastpretrain.errors import DataError, UserError


@dataclass
class IndexConfig:
    """``shards``: folders, globs, brace patterns or files, as ``list_shards`` takes them."""

    shards: list[str]

    def __post_init__(self) -> None:
        if not self.shards:
            raise UserError("data index: give at least one shard, folder or pattern")


def register(subparsers) -> None:
    """Add the ``data`` command and its ``index`` subcommand."""
    data = subparsers.add_parser("data", help="WebDataset shards: index them for DALI")
    actions = data.add_subparsers(dest="data_command", required=True, parser_class=type(data))
    index = actions.add_parser(
        "index", help="write DALI's wds2idx index beside each shard (SHARD.idx); training reads samples by it")
    index.add_argument("shards", nargs="+", help="shard files, folders (their *.tar), globs or {00000..00099} patterns")
    index.set_defaults(func=run_index)


def run_index(args: argparse.Namespace) -> int:
    from fastpretrain.formats.shards import list_shards, write_index

    config = IndexConfig(shards=args.shards)
    shards = list_shards(config.shards)
    failed = []
    for shard in shards:
        try:
            write_index(shard)
        except DataError as e:  # index the others, then fail
            failed.append(str(e))
    print(f"wrote {len(shards) - len(failed)} index files")
    if failed:
        raise DataError(f"{len(failed)} of {len(shards)} shards could not be indexed: " + "; ".join(failed[:3]))
    return 0
