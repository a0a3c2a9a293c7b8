"""How a worker process's C heap gives memory back (glibc): a Ray worker keeps what its
steps free, so the next step does not fault the same pages in again.

Set once per worker process by the Ray actor, never in the user's own process (the
in-process backend leaves the program's allocator as the program set it).
"""
import ctypes
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
