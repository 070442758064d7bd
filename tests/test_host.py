"""Host settings: freed tensor memory stays in the process (no mmap per large tensor)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mlic.host import retain_freed_memory

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
    from mlic.host import retain_freed_memory
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


# A process that retains freed memory (as `mlic train` does), then starts a DataLoader worker;
# prints the MiB of anonymous memory mapped in the parent and in the worker.
WORKER_PROBE = """
import torch
from mlic.data.dataset import _NamedErrorLoader
from mlic.host import retain_freed_memory

def anon_mib():
    with open("/proc/self/smaps_rollup") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("Anonymous:")) >> 10

class Probe(torch.utils.data.Dataset):
    def __len__(self):
        return 1
    def __getitem__(self, i):
        return anon_mib()

assert retain_freed_memory()
x = torch.ones(2**26)  # 256 MiB of activations, freed into the retained heap
del x
loader = _NamedErrorLoader(Probe(), batch_size=None, num_workers=1)
print(anon_mib(), next(iter(loader)))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_loader_workers_do_not_keep_the_parents_freed_heap() -> None:
    """A worker forked from a process that retains freed memory maps none of that memory.

    Otherwise each loader's workers pin a copy of the heap as it was when they started (the
    parent rewrites those pages at the next step): measured 1.6 GB per loader for msformer,
    and an out-of-memory kill with four runs on a 24 GiB machine.
    """
    if not retain_freed_memory():
        pytest.skip("not glibc")
    out = subprocess.run(
        [sys.executable, "-c", WORKER_PROBE], capture_output=True, text=True, check=True
    )
    parent_mib, worker_mib = map(int, out.stdout.split())
    assert parent_mib >= 256
    assert worker_mib < parent_mib - 200, (parent_mib, worker_mib)
