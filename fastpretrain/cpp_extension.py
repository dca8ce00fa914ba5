"""Build and load the C++ kernels of ``csrc/`` once per process, cached on disk between processes.

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
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from types import ModuleType

import torch

SOURCES = ("hashtag_xent.cpp",)

# Vector flags matching what ATen itself runs with on this CPU, so ATen's Vectorized<> headers compile
# to the same instructions (without them they fall back to scalar loops and a scalar exp).
_CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
}

_lock = threading.Lock()
_module: ModuleType | None = None
_failure: str | None = None
_warned = False


class ExtensionUnavailable(RuntimeError):
    """The C++ extension could not be built or loaded (the message says why)."""


def cpu_capability() -> str:
    """ATen's vector capability on this CPU ("AVX512", "AVX2", "DEFAULT", ...)."""
    return torch.backends.cpu.get_cpu_capability()


def extension_name() -> str:
    """The extension's cache name: one per torch version and CPU capability."""
    tag = re.sub(r"[^0-9A-Za-z]+", "_", f"{torch.__version__}_{cpu_capability()}")
    return f"fastpretrain_csrc_{tag}"


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


def link_flags() -> list[str]:
    """Linker flags: OpenMP's runtime when the kernels are compiled with it."""
    return _OPENMP_FLAGS if _uses_openmp() else []


def source_paths() -> list[str]:
    """The C++ sources, from the installed package (``fastpretrain.csrc``)."""
    folder = Path(str(resources.files("fastpretrain.csrc")))
    return [str(folder / name) for name in SOURCES]


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


def build_directory() -> Path:
    """Where torch builds and caches this extension (honours ``TORCH_EXTENSIONS_DIR``)."""
    cpp_extension = _torch_cpp_extension()
    # A private helper, but the only one that knows torch's default folder layout; stable since torch 1.x.
    return Path(cpp_extension._get_build_directory(extension_name(), verbose=False))


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


def load_extension(verbose: bool = False) -> ModuleType:
    """The compiled extension module, built on first use; raises ``ExtensionUnavailable`` if it cannot be.

    The outcome (module or failure) is kept for the rest of the process: a failed build is not retried.
    """
    global _module, _failure
    with _lock:
        if _module is not None:
            return _module
        if _failure is not None:
            raise ExtensionUnavailable(_failure)
        try:
            cpp_extension = _torch_cpp_extension()
            folder = build_directory()
            with _build_lock(folder):
                _module = cpp_extension.load(
                    name=extension_name(),
                    sources=source_paths(),
                    extra_cflags=build_flags(),
                    extra_ldflags=link_flags(),
                    build_directory=str(folder),
                    verbose=verbose,
                )
        except Exception as error:  # a compiler, ninja or loader failure of any kind: report it, never crash
            _failure = f"cannot build the C++ extension {extension_name()}: {type(error).__name__}: {error}"
            raise ExtensionUnavailable(_failure) from error
        return _module


def extension_or_none() -> ModuleType | None:
    """The extension, or None after a single warning (per process) saying why it is unavailable."""
    global _warned
    try:
        return load_extension()
    except ExtensionUnavailable as error:
        if not _warned:
            _warned = True
            warnings.warn(f"{error}; falling back to the plain PyTorch implementation", RuntimeWarning, stacklevel=2)
        return None
