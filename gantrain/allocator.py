"""Keep the memory a training step frees for the next step (glibc's malloc, Linux).

By default glibc returns freed blocks above a moving threshold to the kernel, so every step's activations and
gradients come back as fresh pages faulted in and zeroed: ~70 MB per DCGAN CPU step (``ru_minflt``), some 10% of
its time on a 2-core VM. Taking blocks up to 32 MiB from the heap and not trimming it below 1 GiB free, a step
reuses the previous one's pages, at the price of keeping that much freed memory. The entry point sets this once;
glibc's own ``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` (or ``MALLOC_TOP_PAD_``) in the environment win.
"""

from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's largest (64-bit): bigger blocks are still mapped and unmapped
TRIM_THRESHOLD = 1 << 30
OWN_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def keep_freed_memory() -> bool:
    """Set the thresholds above with ``mallopt`` if this is glibc and the environment does not set them; returns
    whether they were set."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or any(k in os.environ for k in OWN_SETTINGS):
        return False
    mallopt = ctypes.CDLL(None).mallopt
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
