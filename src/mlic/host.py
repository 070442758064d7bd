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

    Why: glibc returns large freed blocks to the OS (``munmap``), so every training step
    page-faults its activations in again and the kernel zeroes them (BENCHMARKS.md 10.1).
    With ``M_MMAP_MAX=0`` and the heap trimmed only above 2 GiB free, freed blocks are reused
    and the process keeps its peak footprint: jemalloc's effect without a preload.

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

    Why: a worker forked from a process that retains freed memory (above) would keep, by
    copy-on-write, a private snapshot of the parent's free heap (BENCHMARKS.md 10.5). The
    default ``worker_init_fn`` of mlic's loaders; a no-op returning False without glibc.
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
    on this CPU (None: never).

    MKL takes its AVX2 path on AMD CPUs, oneDNN its AVX-512 one: 256 rows where AVX-512 runs
    at full width (AMD Zen 5 and later), 1024 elsewhere (BENCHMARKS.md 10.1 has the
    measurements). ``MLIC_ONEDNN_LINEAR=0`` turns the route off, ``=1`` takes it from 256 rows.
    """
    forced = os.environ.get("MLIC_ONEDNN_LINEAR")
    if forced in ("0", "1"):
        return 256 if forced == "1" else None
    info = cpu_info() if info is None else info
    full_width_avx512_amd = (
        info.vendor == "AuthenticAMD" and info.family >= 26 and "avx512f" in info.flags
    )
    return 256 if full_width_avx512_amd else 1024
