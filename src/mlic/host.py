"""Host (CPU-side) process settings that the training and benchmark loops rely on for speed."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "retain_freed_memory",
    "release_inherited_heap",
    "CpuInfo",
    "cpu_info",
    "onednn_linear_min_rows",
]

log = logging.getLogger(__name__)

# glibc <malloc.h> mallopt parameters
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The process's C library where it is glibc (not musl, not macOS), else None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - glibc only
    except (OSError, AttributeError):
        return None
    return libc


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
    libc = _glibc()
    if libc is None:
        log.debug("not glibc: malloc settings left as they are")
        return False
    ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _INT_MAX) == 1
    return bool(ok)


def release_inherited_heap(worker_id: int = 0) -> bool:
    """Give back the free heap memory a forked process inherited (``malloc_trim(0)``).

    A DataLoader worker forked from a process that retains freed memory (above) maps that
    process's whole heap, free blocks included. The parent rewrites those blocks at its next
    step, copy-on-write hands it fresh pages, and the worker alone keeps the old ones: each
    loader's workers pinned a snapshot of the heap as it was when they started (1.6 GB for an
    msformer run whose validation loader started after the first epoch). Trimmed at the
    worker's start, only the parent's live data stays shared. Used as the default
    ``worker_init_fn`` of mlic's loaders (``worker_id`` is that hook's argument); a no-op
    returning False where the C library is not glibc.
    """
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


@dataclass(frozen=True)
class CpuInfo:
    """The first processor's ``vendor`` (``AuthenticAMD``, ``GenuineIntel``), ``family``,
    ``model`` and feature ``flags`` as Linux reports them; the defaults (unknown) where
    ``/proc/cpuinfo`` is absent, so that every decision made from them falls back."""

    vendor: str = ""
    family: int = -1
    model: int = -1
    flags: frozenset[str] = field(default_factory=frozenset)


@functools.cache
def cpu_info(cpuinfo: str = "/proc/cpuinfo") -> CpuInfo:
    """This machine's :class:`CpuInfo`, read once from ``cpuinfo``."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return CpuInfo()
    found: dict = {}
    for line in text.split("\n\n", 1)[0].splitlines():  # the first processor's block
        key, _, value = (part.strip() for part in line.partition(":"))
        if key == "vendor_id":
            found["vendor"] = value
        elif key in ("cpu family", "model") and value.isdigit():
            found["family" if key == "cpu family" else "model"] = int(value)
        elif key in ("flags", "Features"):  # x86 / ARM
            found["flags"] = frozenset(value.split())
    return CpuInfo(**found)


def onednn_linear_min_rows(info: CpuInfo | None = None) -> int | None:
    """From how many rows a fp32 linear layer runs faster through oneDNN than through BLAS
    on this CPU (None: never), as measured (``benchmarks/BENCHMARKS.md`` sections 5, 10).

    PyTorch's BLAS (MKL) takes its AVX2 path on AMD CPUs, oneDNN its AVX-512 one. Where
    AVX-512 runs at full width, AMD Zen 5 and later (family >= 26), oneDNN is 1.0-1.1x at
    64-320 rows and 1.8-2.2x from 784 rows up: 256. Zen 4 (family 25) runs AVX-512 as two
    256-bit halves, so neither peaks clearly higher (2048^3: 165-180 vs 162-211 GFLOP/s over
    two measurements); there MKL was faster
    fwd + bwd on most shapes below 400 rows (up to 2x), oneDNN on most from 784 rows up
    (0.9-1.7x, typically 1.1-1.3x): 1024, also the choice elsewhere (Intel's MKL uses
    AVX-512 itself).
    ``MLIC_ONEDNN_LINEAR=0`` turns the route off, ``=1`` takes it from 256 rows.
    """
    forced = os.environ.get("MLIC_ONEDNN_LINEAR")
    if forced in ("0", "1"):
        return 256 if forced == "1" else None
    info = cpu_info() if info is None else info
    full_width_avx512_amd = (
        info.vendor == "AuthenticAMD" and info.family >= 26 and "avx512f" in info.flags
    )
    return 256 if full_width_avx512_amd else 1024
