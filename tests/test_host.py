"""Host settings: freed tensor memory stays in the process (no mmap per large tensor)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mlic.engine.host import retain_freed_memory

# allocate a 64 MiB tensor and print how many MiB glibc holds in mmap'd blocks meanwhile
PROBE = """
import ctypes, sys, torch
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                 "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
if sys.argv[1] == "retain":
    from mlic.engine.host import retain_freed_memory
    assert retain_freed_memory()
before = libc.mallinfo2().hblkhd
x = torch.empty(16 * 2**20)
print((libc.mallinfo2().hblkhd - before) >> 20)
"""


def _mmapped_mib(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True
    )
    return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_large_tensors_come_from_the_heap_once_retained() -> None:
    if not retain_freed_memory():
        pytest.skip("not glibc")
    assert _mmapped_mib("plain") >= 64  # glibc's default: its own mmap, unmapped when freed
    assert _mmapped_mib("retain") == 0  # served from the heap, which keeps it when freed
