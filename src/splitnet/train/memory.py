"""Large allocations on Linux (glibc): keep freed memory for reuse instead of handing it back.

glibc serves every allocation above its mmap threshold (at most 32 MB) with a fresh mmap and unmaps
it on free. An AlexNet training step at batch 128 is made of such allocations (conv1's output is
74 MB per column, the input batch 77 MB, and their gradients), so every step asks the kernel for
hundreds of MB of new, zero-filled pages. Raising the thresholds keeps those blocks in the heap and
reuses them. Measured on the 2-core dev box (torch 2.13.0): a training step of the CPU emulation at
batch 128 took 5.5 to 7.1 s without, 4.0 s with (README, Performance). The cost: the process keeps
its peak heap size until it exits, which a training process reaches every step anyway.

Each process that trains calls keep_freed_memory() once at its start: the command line (cli.main),
`ablate --jobs N`'s spawned workers (experiments/run_pool.py: _worker_start, since a spawned process
runs none of cli.main) and the distributed bench's ranks (bench/dist.py). Importing splitnet does not.
Set SPLITNET_MALLOC=default to leave the allocator alone.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8


def _libc_function(name: str):
    """The C library's function `name` on Linux, None elsewhere or where the library lacks it (musl
    has no mallopt)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def keep_freed_memory(limit: int = 1 << 30) -> bool:
    """Serve allocations up to `limit` bytes from the heap and keep up to 2 x limit of freed memory.
    Returns whether the allocator took the settings (False off glibc, or when switched off)."""
    mallopt = None if os.environ.get("SPLITNET_MALLOC", "") == "default" else _libc_function("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # One arena: a thread's own arena grows in heaps of at most 64 MB, so its large blocks would be
    # mmapped afresh anyway (the column threads of model/concurrent.py allocate from every thread).
    return (bool(mallopt(M_MMAP_THRESHOLD, limit)) and bool(mallopt(M_TRIM_THRESHOLD, 2 * limit))
            and bool(mallopt(M_ARENA_MAX, 1)))


__all__ = ["keep_freed_memory"]
