"""How a process's C heap gives memory back (glibc): keep what a step frees, so the next
step does not fault the same pages in again.

Set when distgrad is imported (in the user's process and in every worker), unless the
environment says ``DISTGRAD_KEEP_FREED_HEAP=0``. Measured in one process at load < 1.5
(BLAS and torch threads limited alike; wall ms per training step, without -> with):
LeNet at 128 rows 27.2 -> 24.5 (one thread), 24.9 -> 21.3 (two); the MLP
784-1024-1024-10 at 256 rows 75.0 -> 74.9 (one), 42.2 -> 38.1 (two). In a Ray worker
(where every other process competes for the cores) it was a quarter of a LeNet step's
CPU. The price: up to 64 MiB of freed heap stays with the process for reuse.
"""
import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3        # glibc's mallopt parameters
_heap_kept = []


def keep_freed_heap(trim_bytes=64 << 20, mmap_bytes=32 << 20):
    """Keep freed memory in this process's heap for the next step (glibc; once per process).

    By default glibc hands the top of the heap back to the OS whenever ``free`` leaves a
    few MB there, so a step that frees its activations at the end of backward faults the
    same pages in (zero-filled by the kernel) in the next forward: LeNet at 128 rows, 1,800
    page faults and a quarter of the step's CPU time. Up to ``trim_bytes`` now stay, and
    blocks under ``mmap_bytes`` (glibc's own upper bound for its moving threshold) come
    from the heap. Returns whether the settings took. Example: ``keep_freed_heap()``.
    """
    if not _heap_kept:
        ok = False
        if sys.platform.startswith("linux"):
            try:
                mallopt = ctypes.CDLL("libc.so.6").mallopt
                ok = bool(mallopt(M_MMAP_THRESHOLD, mmap_bytes)) and bool(
                    mallopt(M_TRIM_THRESHOLD, trim_bytes))
            except (OSError, AttributeError):      # not glibc (musl): nothing to tune
                pass
        _heap_kept.append(ok)
    return _heap_kept[0]


def keep_freed_heap_unless_told_not_to():
    """``keep_freed_heap()`` unless ``DISTGRAD_KEEP_FREED_HEAP=0`` (what importing distgrad
    does). Example: ``keep_freed_heap_unless_told_not_to()``."""
    if os.environ.get("DISTGRAD_KEEP_FREED_HEAP", "1").strip() != "0":
        return keep_freed_heap()
    return False
