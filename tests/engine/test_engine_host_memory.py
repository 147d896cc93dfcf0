"""CPU training keeps large allocations in glibc's heap (engine/host_memory.py), and the environment can opt out."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = """
import resource, torch
from interiorfusion_core.engine.host_memory import keep_large_allocations
applied = keep_large_allocations()
torch.set_num_threads(1)
x = torch.empty(12_000_000).fill_(1.0); del x  # 48 MB: above glibc's largest mmap threshold
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    y = torch.empty(12_000_000).fill_(1.0); del y
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _probe(**env: str) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120,
                         env={**os.environ, **env}, check=True).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_large_blocks_are_reused_instead_of_faulted_in_again() -> None:
    applied, faults = _probe()
    default, default_faults = _probe(INTERIORFUSION_CPU_MALLOC="default")
    assert applied and not default
    # A 48 MB block is ~11.7k pages: glibc's default maps and faults them in on each of the 5 allocations; from the
    # heap they are faulted in once at most (measured: 58.6k vs 11.7k).
    assert default_faults > 4 * 11_000 and faults < default_faults / 3, (faults, default_faults)
