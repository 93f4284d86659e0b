"""Freed tensors go back to the system once :func:`common.host_memory.map_large_allocations` has run."""

import subprocess
import sys

import pytest

from common.host_memory import TUNABLE, map_large_allocations

_PROGRAM = """
import sys, torch
from common.host_memory import TUNABLE, map_large_allocations
def resident_mib():
    return int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**20
if sys.argv[1] == 'mapped':
    assert map_large_allocations()
big = torch.ones(4 << 20)  # 16 MiB: freeing it raises glibc's default mmap threshold to its size
del big
tensors = [torch.ones(1 << 20) for _ in range(24)]  # 24 x 4 MiB, touched
keep = torch.ones(1 << 10)  # a small live allocation above them on the heap
before = resident_mib()
del tensors
print(before - resident_mib())
"""


def _released_mib(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", _PROGRAM, mode], capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


@pytest.mark.skipif(not TUNABLE or not sys.platform.startswith("linux"), reason="glibc's heap only")
def test_freed_tensors_leave_the_resident_set():
    assert _released_mib("mapped") > 80  # of 96 MiB freed


def test_rejects_a_non_positive_threshold():
    with pytest.raises(ValueError, match="threshold_bytes"):
        map_large_allocations(0)
