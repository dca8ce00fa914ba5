"""Files every stage writes the same way: atomically, readable as a plain ``open()`` would make them, and the one
cache folder derived files go to."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import IO

CACHE_ENV = "FASTPRETRAIN_CACHE"


def cache_root() -> Path:
    """Where derived files are cached (the demo corpus, WordNet's noun table): ``$FASTPRETRAIN_CACHE`` when set and
    not empty, else ``~/.cache/fastpretrain``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "fastpretrain")


@cache
def shared_file_mode() -> int:
    """The mode a plain ``open()`` gives a new file (0o666 less the umask), for files made by ``mkstemp``, whose
    0o600 would hide them from the other users of a shared cluster. The umask is read once: reading it means
    setting it, briefly."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


class AtomicFile:
    """A file that appears at ``path`` whole or not at all.

    It is written as a temporary file of its own in the same folder (a unique name: two writers of one path never
    share it), renamed over ``path`` by ``commit()``, removed by ``abort()``. ``durable`` also syncs the file and its
    folder to the disk before and after the rename, so a machine that loses power keeps the old file or the new one
    (checkpoints want that; caches do not pay for it).
    """

    def __init__(self, path: str | os.PathLike, mode: str = "wb", durable: bool = False) -> None:
        self.path = Path(path)
        self.durable = durable
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        self.tmp = Path(tmp)
        self.file: IO = os.fdopen(fd, mode)

    def commit(self) -> None:
        try:
            self.file.flush()
            if self.durable:
                os.fsync(self.file.fileno())
            self.file.close()
            os.chmod(self.tmp, shared_file_mode())
            os.replace(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise
        if self.durable:
            _sync_folder(self.path.parent)

    def abort(self) -> None:
        try:
            self.file.close()  # on a full disk this fails again, flushing what is still buffered
        finally:
            self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", durable: bool = False) -> Iterator[IO]:
    """The file object of an :class:`AtomicFile`: committed when the block ends without an error, else removed."""
    with AtomicFile(path, mode, durable) as atomic:
        yield atomic.file


def _sync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where folders cannot be opened, as on Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
