"""Host memory for CPU training: glibc's malloc hands every allocation above its mmap threshold (at most 32 MB)
fresh pages from the kernel and returns them on free, so a step that allocates the same large activations again
pays a page fault per 4 KiB each time. At 512³ that was most of the VAE step's growth beyond linear in the voxels
(bench/vae_scaling.py: 12.4 s → 8.5 s per step, 53 → 37 µs per voxel against 33 at 256³). Keeping large blocks in
the heap (no mmap, trimmed only above 2 GB free at the top) lets the next step reuse them.

`INTERIORFUSION_CPU_MALLOC=default` leaves glibc's behaviour alone; other C libraries are left alone anyway.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger("interiorfusion_core")
ENV = "INTERIORFUSION_CPU_MALLOC"
# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_TRIM_AT = 2**31 - 1  # bytes free at the heap's top before it is returned (mallopt takes an int)
_applied = False


def keep_large_allocations() -> bool:
    """Serve large allocations from the heap for the rest of this process (and the workers it forks); True when
    applied (or already), False where the C library is not glibc or the environment opts out."""
    global _applied
    if _applied:
        return True
    if os.environ.get(ENV, "").strip().lower() == "default" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no glibc tunables to set
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(_M_MMAP_MAX, 0) != 1 or mallopt(_M_TRIM_THRESHOLD, _TRIM_AT) != 1:
        log.warning("glibc refused the large-allocation settings (mallopt); keeping its defaults")
        return False
    _applied = True
    return True


__all__ = ["ENV", "keep_large_allocations"]
