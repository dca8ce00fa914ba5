"""Logging: every module logs under ``fastpretrain.*``; the CLI configures the output once (``setup_logging``).

Progress and facts (INFO) go to stdout, problems (WARNING and up) to stderr, so that a run's stderr holds only
what went wrong. In a multi-process run rank 0 says everything; the other ranks only their warnings and errors,
each line prefixed with the rank, so that N copies of the same progress line never interleave.

``log_once`` is the one way to say something once per process (a fallback, a choice made for the user).
"""

from __future__ import annotations

import logging
import sys
import threading

ROOT = "fastpretrain"

_said: set[tuple[str, str]] = set()
_said_lock = threading.Lock()


def log_once(logger: logging.Logger, level: int, message: str) -> None:
    """Log ``message`` at ``level`` the first time this process asks for it, and never again."""
    with _said_lock:
        if (logger.name, message) in _said:
            return
        _said.add((logger.name, message))
    logger.log(level, message)


def forget_said() -> None:
    """Let every ``log_once`` message be said again (tests of what is said)."""
    with _said_lock:
        _said.clear()


class _RankFilter(logging.Filter):
    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        return self.rank == 0 or record.levelno >= logging.WARNING


class _Below(logging.Filter):
    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < self.level


_HANDLER_MARK = "_fastpretrain_handler"


def setup_logging(rank: int = 0, level: int = logging.INFO) -> None:
    """Send ``fastpretrain.*`` records to stdout (below WARNING) and stderr; call again to change the rank."""
    logger = logging.getLogger(ROOT)
    for handler in [h for h in logger.handlers if getattr(h, _HANDLER_MARK, False)]:
        logger.removeHandler(handler)
    prefix = f"[rank {rank}] " if rank else ""
    formatter = logging.Formatter(prefix + "%(message)s")
    # The streams are looked up per record: tests (and pytest's capture) replace sys.stdout and sys.stderr.
    for stream, extra in ((_Stream("stdout"), _Below(logging.WARNING)), (_Stream("stderr"), None)):
        handler = logging.StreamHandler(stream)
        handler.setFormatter(formatter)
        handler.addFilter(_RankFilter(rank))
        if extra is not None:
            handler.addFilter(extra)
        else:
            handler.setLevel(logging.WARNING)
        setattr(handler, _HANDLER_MARK, True)
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = True  # pytest's caplog listens at the root logger


class _Stream:
    """``sys.stdout`` or ``sys.stderr`` as it is when a record is written, not when logging was set up."""

    def __init__(self, name: str) -> None:
        self.name = name

    def write(self, text: str) -> int:
        return getattr(sys, self.name).write(text)

    def flush(self) -> None:
        getattr(sys, self.name).flush()
