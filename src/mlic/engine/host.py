"""Host (CPU-side) process settings that the training and benchmark loops rely on for speed."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

__all__ = ["retain_freed_memory"]

log = logging.getLogger(__name__)

# glibc <malloc.h> mallopt parameters
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1


@functools.cache
def retain_freed_memory() -> bool:
    """Keep memory that tensors free inside the process instead of handing it back to the OS.

    glibc's malloc serves large blocks (above 128 KiB to 32 MiB) with ``mmap`` and returns
    them with ``munmap`` when freed. A training step frees and re-allocates its activations
    (tens of MiB each at 448 px), so every step page-faults all of them in again and the
    kernel zeroes every page: measured 1.23x slower msformer (ResNet-101, 448 px) training
    steps on the 2-vCPU machine of ``benchmarks/BENCHMARKS.md``. With ``mmap`` off for
    malloc (``M_MMAP_MAX=0``) and the heap trimmed only above 2 GiB free, freed blocks are
    reused; the process keeps its peak footprint. The effect of jemalloc/tcmalloc, which
    PyTorch's CPU performance guides preload, without a preload.

    Process-wide and idempotent; a no-op returning False where the C library is not glibc.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - glibc only (not musl, not macOS)
    except (OSError, AttributeError):
        log.debug("not glibc: malloc settings left as they are")
        return False
    ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _INT_MAX) == 1
    return bool(ok)
