"""Host (CPU-side) process settings that the training and benchmark loops rely on for speed."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
from pathlib import Path

__all__ = ["retain_freed_memory", "cpu_info", "onednn_linear_pays"]

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


@functools.cache
def cpu_info(cpuinfo: str = "/proc/cpuinfo") -> dict[str, object]:
    """The first processor's ``vendor`` (``AuthenticAMD``, ``GenuineIntel``), ``family``,
    ``model`` and ``flags`` as Linux reports them; empty values where ``/proc/cpuinfo`` is
    absent (other systems), so that every decision made from them falls back to the default."""
    info: dict[str, object] = {"vendor": "", "family": -1, "model": -1, "flags": frozenset()}
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return info
    for line in text.split("\n\n", 1)[0].splitlines():  # the first processor's block
        key, _, value = (part.strip() for part in line.partition(":"))
        if key == "vendor_id":
            info["vendor"] = value
        elif key in ("cpu family", "model") and value.isdigit():
            info["family" if key == "cpu family" else "model"] = int(value)
        elif key in ("flags", "Features"):  # x86 / ARM
            info["flags"] = frozenset(value.split())
    return info


def onednn_linear_pays(info: dict[str, object] | None = None) -> bool:
    """Whether large fp32 linear layers should run through oneDNN rather than BLAS here.

    PyTorch's BLAS (MKL) takes its AVX2 path on AMD CPUs, oneDNN its AVX-512 one. That pays
    where AVX-512 runs at full width: AMD Zen 5 and later (family >= 26), measured 1.8-2.2x
    from 784 rows up (``benchmarks/BENCHMARKS.md`` section 5). Zen 4 (family 25) executes
    AVX-512 as two 256-bit halves, so both libraries peak alike (209 vs 211 GFLOP/s on the
    2-vCPU machine of section 10) and the oneDNN route was 0.6-0.9x on the head's shapes;
    on Intel CPUs MKL uses AVX-512 itself. ``MLIC_ONEDNN_LINEAR=1`` / ``0`` overrides.
    """
    forced = os.environ.get("MLIC_ONEDNN_LINEAR")
    if forced in ("0", "1"):
        return forced == "1"
    info = cpu_info() if info is None else info
    flags = info["flags"]
    return (
        info["vendor"] == "AuthenticAMD"
        and isinstance(info["family"], int)
        and info["family"] >= 26
        and isinstance(flags, frozenset)
        and "avx512f" in flags
    )
