"""Big arrays without page faults: glibc's allocator asked to keep the memory it frees.

Why
    glibc's ``malloc`` serves any block above 32 MiB (its largest mmap threshold) with a fresh
    ``mmap`` and gives it back with ``munmap`` when it is freed. A 3D U-Net's activations are
    such blocks (16 channels of an 80x112x80 frame are 46 MB), so every convolution, norm and
    activation of a forward or backward pass asked the kernel for new pages and took a page fault
    on every 4 KiB of its output before writing it. Measured on 2 cores
    (``python benchmarks/bench_inference.py --threads 2 --previous ...`` and
    ``benchmarks/bench_fold_steps.py --previous ...``): that was a third of a 3D light-model
    forward pass and of a 3D training step.

What `keep_freed_memory` does
    While it is entered, glibc takes big blocks from its heap instead of ``mmap``
    (``mallopt(M_MMAP_MAX, 0)``) and keeps what is freed at the heap's top
    (``M_TRIM_THRESHOLD``), so the next pass of the same shapes reuses pages that are already
    mapped. On exit it restores glibc's defaults for both and hands the free memory back
    (``malloc_trim(0)``): the process keeps no more than it did before. Nested and concurrent
    uses count: the settings change when the first one enters and are restored when the last
    one leaves.

    The outputs are bit for bit the same: only where the memory comes from changes. The price
    is memory: what the heap holds is its high-water mark plus fragmentation, measured at 2.6 GB
    for a 3D light-model training step at batch 2 where the transient peak had been 1.9 GB.
    The package uses it around every prediction (the scan-sized maps of a volume are big
    blocks too: the built-in 2D model on a 189-slice volume went from 4.97 to 3.88 s) and
    around 3D training folds on the CPU; 2D training, whose activations stay under glibc's mmap
    threshold, gained nothing measurable (1.06x) and is left as it was.

Where it does nothing
    Other C libraries (macOS, Windows, musl) have no ``mallopt``: the context is a no-op there.
    ``MTML_KEEP_FREED=0`` turns it off (for comparing, or if a machine's memory is so tight that
    a peak held for the length of a run matters).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["keep_freed_memory", "keep_freed_memory_while_training", "heap_control_available"]

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# glibc's defaults, restored on exit
_DEFAULT_TRIM_THRESHOLD = 128 * 1024
_DEFAULT_MMAP_MAX = 65536
# mallopt takes an int: the largest trim threshold it accepts (2 GiB - 1)
_KEEP_TRIM_THRESHOLD = 2**31 - 1

_lock = threading.Lock()
_depth = 0
_libc_cache: list = []


def _libc():
    """glibc's handle with ``mallopt`` and ``malloc_trim``, or ``None`` elsewhere."""
    if not _libc_cache:
        handle = None
        if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
            try:
                lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                lib.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
                lib.mallopt.restype = ctypes.c_int
                lib.malloc_trim.argtypes = (ctypes.c_size_t,)
                lib.malloc_trim.restype = ctypes.c_int
                handle = lib
            except (OSError, AttributeError):
                handle = None
        _libc_cache.append(handle)
    return _libc_cache[0]


def heap_control_available() -> bool:
    """Whether `keep_freed_memory` can act here (glibc, and not turned off)."""
    return os.environ.get("MTML_KEEP_FREED", "1") != "0" and _libc() is not None


@contextmanager
def keep_freed_memory(enabled: bool = True) -> Iterator[bool]:
    """Reuse freed memory for big arrays while inside (see the module docstring).

    `enabled=False` makes it a plain no-op context (for callers that use it only for 3D work).
    Yields whether the allocator's settings are in effect (``False`` where it cannot act).
    """
    global _depth
    lib = _libc() if enabled and heap_control_available() else None
    if lib is None:
        yield False
        return
    with _lock:
        if _depth == 0:
            lib.mallopt(_M_MMAP_MAX, 0)
            lib.mallopt(_M_TRIM_THRESHOLD, _KEEP_TRIM_THRESHOLD)
        _depth += 1
    try:
        yield True
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                lib.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
                lib.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
                lib.malloc_trim(0)


def keep_freed_memory_while_training(device_type: str, dims: int | None):
    """`keep_freed_memory` as training uses it, for a fold and for the budget's warm-up that
    times its steps alike: on the CPU and for 3D models only (2D activations stay under
    glibc's mmap threshold, see the module docstring)."""
    return keep_freed_memory(device_type == "cpu" and dims == 3)
