"""The C heap under CPU training: give freed memory back to the system between steps.

On the CPU, torch allocates tensors with the C library's ``malloc``. Under mixed sample lengths every
step allocates tensors of new shapes; glibc keeps the freed blocks inside its heap (its mmap threshold
rises as large blocks are freed, so later large tensors come from the heap too) and the resident size
creeps up step after step, far above what the tensors need. ``malloc_trim(0)`` returns every free
page of the heap to the system (``madvise``), so each step starts from what is live. Written by hand
because no library does this for torch's CPU tensors (torch has no caching CPU allocator to tune).
On a C library without ``malloc_trim`` (musl, macOS) nothing is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


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


def can_trim() -> bool:
    """Whether this C library has ``malloc_trim`` (glibc)."""
    return _libc() is not None


def trim() -> bool:
    """Give the heap's free pages back to the system; True if some memory was released."""
    lib = _libc()
    return bool(lib.malloc_trim(0)) if lib is not None else False
