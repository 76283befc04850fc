"""The C heap under CPU training: jemalloc instead of glibc's malloc, chosen before the process starts.

On the CPU, torch allocates every tensor with the C library's ``malloc``. Under mixed sample lengths
each micro-batch allocates tensors of new shapes, and glibc's heap fragments: freed blocks are kept
but too small for the next, longer batch, so the resident size grows far past what the tensors need
(measured on the demo run, SmolLM2 LoRA at micro-batch 8: 8,248 MiB resident for 4,579 MiB of live
tensors; trimming the heap with ``malloc_trim`` after every step or micro-batch still left 7,574).
jemalloc (size classes, returning unused pages by itself) stays at the live size (4,436 MiB on the
same run) and is at least as fast, which is why PyTorch's CPU performance guides recommend it.

An allocator can only be chosen before the process allocates, so ``chinese-vicuna train`` re-executes
itself once with ``LD_PRELOAD`` naming jemalloc (as launchers like Intel's ``ipexrun`` do); the
process ID stays the same, so torchrun and accelerate launch keep tracking their workers. Written by
hand because no library picks the allocator for a torch training process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
from pathlib import Path

# Debian/Ubuntu (libjemalloc2), Fedora/RHEL (jemalloc), Homebrew on Linux, conda
_SEARCH = (
    "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
    "/usr/lib64/libjemalloc.so.2",
    "/usr/lib/libjemalloc.so.2",
    "/usr/local/lib/libjemalloc.so.2",
)
REEXEC_MARK = "CHINESE_VICUNA_ALLOCATOR"


def find_jemalloc() -> str | None:
    """The path of an installed jemalloc shared library, or None."""
    for env in ("CONDA_PREFIX", "VIRTUAL_ENV"):
        if os.environ.get(env):
            p = Path(os.environ[env]) / "lib" / "libjemalloc.so.2"
            if p.exists():
                return str(p)
    for p in _SEARCH:
        if Path(p).exists():
            return p
    name = ctypes.util.find_library("jemalloc")
    return name if name and Path(name).is_absolute() else None


def loaded_allocator() -> str:
    """``jemalloc`` when it is mapped into this process (LD_PRELOAD), else ``glibc`` (the C library's)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "glibc"
    return "jemalloc" if "libjemalloc" in maps else "glibc"


def wanted(setting: str) -> str | None:
    """The library to preload for ``cpu_allocator: setting``, or None to keep this process as it is.

    ``auto``: jemalloc where it is installed (Linux), else the C library's. ``jemalloc``: an error
    naming the package to install when it is missing. ``glibc``: never.
    """
    if setting == "glibc" or not sys.platform.startswith("linux") or loaded_allocator() == "jemalloc":
        return None
    if os.environ.get(REEXEC_MARK):  # re-executed already: the preload did not take; do not loop
        return None
    lib = find_jemalloc()
    if lib is None and setting == "jemalloc":
        raise FileNotFoundError(
            "cpu_allocator: jemalloc: libjemalloc.so.2 not found (Debian/Ubuntu: apt-get install libjemalloc2; "
            "Fedora: dnf install jemalloc; conda: conda install jemalloc), or use cpu_allocator: auto"
        )
    return lib


def reexec_with(lib: str) -> None:
    """Replace this process by the same command with ``lib`` preloaded (does not return)."""
    env = dict(os.environ)
    env["LD_PRELOAD"] = ":".join(x for x in (lib, env.get("LD_PRELOAD", "")) if x)
    env[REEXEC_MARK] = lib
    argv = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *argv[1:]], env)


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name or "libc.so.6")
        lib.malloc_trim.argtypes = [ctypes.c_size_t]
        lib.malloc_trim.restype = ctypes.c_int
        return lib
    except (OSError, AttributeError):
        return None


def trim() -> bool:
    """glibc: give the heap's free pages back to the system (``malloc_trim(0)``); True if some were.

    The fallback where jemalloc is not installed: it lowers the resident size between steps (what the
    next run of other programs on the machine sees) but not the fragmented peak within a step.
    """
    lib = _libc()
    return bool(lib.malloc_trim(0)) if lib is not None and loaded_allocator() == "glibc" else False
