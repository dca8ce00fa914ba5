"""The ``fastpretrain`` command: parse, dispatch to one function per subcommand, report errors.

Each component registers its own subcommands (``register(subparsers)``), so this file holds no logic.
"""

from __future__ import annotations

import argparse
import sys

from fastpretrain import __version__, demo
from fastpretrain.data import commands as data_commands
from fastpretrain.hashtags import commands as hashtag_commands
from fastpretrain.train import commands as train_commands
from fastpretrain.train import report
from fastpretrain.transfer import dedup, evaluate, export, probe
from fastpretrain.errors import UserError
from fastpretrain.log import setup_logging


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors kept to one line (it prints the whole usage by default)."""

    def error(self, message: str):  # noqa: D401 - argparse's API
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastpretrain", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"fastpretrain {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for component in (train_commands, report, evaluate, probe, export, dedup, demo, data_commands, hashtag_commands):
        component.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging()
    try:
        return args.func(args) or 0
    except UserError as e:
        print(f"fastpretrain: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # a path the user gave that cannot be made, read or written: the message names it
        print(f"fastpretrain: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastpretrain: interrupted", file=sys.stderr)
        return 130
