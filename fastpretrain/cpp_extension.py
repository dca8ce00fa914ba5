"""Build and load the C++ extensions of ``csrc/`` once per process, cached on disk between processes.

Two extensions, built and failing separately: ``xent`` (the fused loss) and ``jpeg`` (region decoding with the
system's libjpeg-turbo, whose headers come from Debian's ``libjpeg62-turbo-dev``), so a machine without those
headers still has the loss kernels.

``torch.utils.cpp_extension.load`` compiles the sources with ninja into ``TORCH_EXTENSIONS_DIR`` (default
``~/.cache/torch_extensions/<python>_<accelerator>``): the first build takes about a minute on 2 cores,
a later process loads the cached library in a fraction of a second. The name of the extension carries
the torch version and the CPU's vector capability, so a torch upgrade or a different CPU never loads a
library built for another one.

Two processes may build at once: an advisory ``flock`` (released by the kernel if its holder dies)
serializes them, and the second finds the first one's library. Older torch versions guard the build
with a lock *file* that a killed build leaves behind, blocking every later build forever; holding our
own lock, any such file is stale, so it is removed.
"""

from __future__ import annotations

import fcntl
import logging
import re
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from types import ModuleType

import torch

from fastpretrain.log import log_once


@dataclass(frozen=True)
class _Extension:
    sources: tuple[str, ...]
    libraries: tuple[str, ...] = ()


EXTENSIONS = {
    "xent": _Extension(("hashtag_xent.cpp",)),
    "jpeg": _Extension(("jpeg_region.cpp",), libraries=("jpeg",)),
}

# Vector flags matching what ATen itself runs with on this CPU, so ATen's Vectorized<> headers compile
# to the same instructions (without them they fall back to scalar loops and a scalar exp).
_CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
}

_lock = threading.Lock()
_modules: dict[str, ModuleType] = {}
_failures: dict[str, str] = {}  # extension -> why it cannot be built, kept for the rest of the process
log = logging.getLogger(__name__)


class ExtensionUnavailable(RuntimeError):
    """The C++ extension could not be built or loaded (the message says why)."""


def cpu_capability() -> str:
    """ATen's vector capability on this CPU ("AVX512", "AVX2", "DEFAULT", ...)."""
    return torch.backends.cpu.get_cpu_capability()


def extension_name(kind: str) -> str:
    """The cache name of extension ``kind``: one per torch version and CPU capability."""
    tag = re.sub(r"[^0-9A-Za-z]+", "_", f"{torch.__version__}_{cpu_capability()}")
    return f"fastpretrain_{kind}_{tag}"


# ATen's at::parallel_for is a header template: compiled without OpenMP it runs every range on the calling
# thread (ParallelOpenMP.h is guarded by _OPENMP), so the kernel used one core whatever
# torch.get_num_threads() said. Only with torch's OpenMP backend: the libgomp it loads (soname
# libgomp.so.1) is the one the extension's OpenMP calls bind to, one thread pool for both.
_OPENMP_FLAGS = ["-fopenmp"]


def _uses_openmp() -> bool:
    # Linux only: Apple's clang has no -fopenmp (the kernel then runs on one thread, as before).
    return sys.platform.startswith("linux") and "ATen parallel backend: OpenMP" in torch.__config__.parallel_info()


def build_flags() -> list[str]:
    """Compiler flags: optimized, with the vector instructions ATen uses here, and ATen's OpenMP."""
    return ["-O3", *_CAPABILITY_FLAGS.get(cpu_capability(), []), *(_OPENMP_FLAGS if _uses_openmp() else [])]


def link_flags(kind: str) -> list[str]:
    """Linker flags: OpenMP's runtime when the kernels are compiled with it, and the extension's libraries."""
    return (_OPENMP_FLAGS if _uses_openmp() else []) + [f"-l{name}" for name in EXTENSIONS[kind].libraries]


def source_paths(kind: str) -> list[str]:
    """The C++ sources of extension ``kind``, from the installed package (``fastpretrain.csrc``)."""
    folder = Path(str(resources.files("fastpretrain.csrc")))
    return [str(folder / name) for name in EXTENSIONS[kind].sources]


def _torch_cpp_extension() -> ModuleType:
    """``torch.utils.cpp_extension``, imported without its warning about a CUDA_HOME with no CUDA runtime: this
    extension is built for the CPU, and that line would open every run on a machine without a GPU."""
    quiet = logging.getLogger("torch.utils.cpp_extension")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        quiet.setLevel(level)
    return cpp_extension


def build_directory(kind: str) -> Path:
    """Where torch builds and caches extension ``kind`` (honours ``TORCH_EXTENSIONS_DIR``)."""
    cpp_extension = _torch_cpp_extension()
    # A private helper, but the only one that knows torch's default folder layout; stable since torch 1.x.
    return Path(cpp_extension._get_build_directory(extension_name(kind), verbose=False))


@contextmanager
def _build_lock(folder: Path) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "fastpretrain.flock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            stale = folder / "lock"
            if stale.exists():
                stale.unlink()
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def load_extension(kind: str, verbose: bool = False) -> ModuleType:
    """The compiled extension ``kind`` ("xent" or "jpeg"), built on first use; ``ExtensionUnavailable`` if it cannot be.

    The outcome (module or failure) is kept for the rest of the process: a failed build is not retried.
    """
    with _lock:
        if kind in _modules:
            return _modules[kind]
        if kind in _failures:
            raise ExtensionUnavailable(_failures[kind])
        try:
            cpp_extension = _torch_cpp_extension()
            folder = build_directory(kind)
            with _build_lock(folder):
                _modules[kind] = cpp_extension.load(
                    name=extension_name(kind),
                    sources=source_paths(kind),
                    extra_cflags=build_flags(),
                    extra_ldflags=link_flags(kind),
                    build_directory=str(folder),
                    verbose=verbose,
                )
        except Exception as error:  # a compiler, ninja or loader failure of any kind: report it, never crash
            _failures[kind] = f"cannot build the C++ extension {extension_name(kind)}: {type(error).__name__}: {error}"
            raise ExtensionUnavailable(_failures[kind]) from error
        return _modules[kind]


def extension_or_none(kind: str, fallback: str) -> ModuleType | None:
    """Extension ``kind``, or None after a single warning (per process) saying why, and that ``fallback`` is used."""
    try:
        return load_extension(kind)
    except ExtensionUnavailable as error:
        log_once(log, logging.WARNING, f"{error}; falling back to {fallback}")
        return None
