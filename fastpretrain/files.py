"""Writing a file atomically, readable as a plain ``open()`` would make it."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import IO


@cache
def shared_file_mode() -> int:
    """The mode a plain ``open()`` gives a new file (0o666 less the umask), for files made by ``mkstemp``, whose
    0o600 would hide them from the other users of a shared cluster. The umask is read once: reading it means
    setting it, briefly."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """A file to write ``path`` through: a temporary file in the same folder, renamed over ``path`` once the block
    ends without an error (else removed), so readers and parallel writers only ever see a whole file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        os.chmod(tmp, shared_file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
