"""Give back the pages of shared memory a worker has read its inputs from (Linux).

A Ray worker receives the driver's big arrays (a program's inputs: the parameters of
``cluster.replicate``, the batches of ``cluster.shard``) as read-only numpy arrays on Ray's
object store, a file in ``/dev/shm`` mapped shared, and reads them in place. Every page it
reads stays in its resident set (``RssShmem``) for as long as the mapping lives, which is
the worker's life: once an optimizer step has replaced the parameters it read, their pages
(the model's size) would still count as the worker's. ``madvise(MADV_DONTNEED)`` on a
shared file mapping drops only this process's page-table entries: the data stays in the
file, and a later read faults the pages back in from there. On private memory the same call
would discard the data, so an array is released only when it lies wholly inside a shared
mapping of ``/proc/self/maps`` while it is alive (it pins its object, hence the mapping).
"""
import ctypes
import mmap
import sys
import weakref

import numpy as np

MADV_DONTNEED = 4
MIN_BYTES = 1 << 16     # below this the pages are few and reading the map costs more
_madvise = None
_due = {}               # id -> the weak references whose callbacks are still to come


def shared_ranges():
    """``[(start, end)]`` of this process's shared mappings (``s`` in ``/proc/self/maps``).

    Example: ``any(s <= addr < e for s, e in shared_ranges())``.
    """
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            span, perms = line.split(None, 2)[:2]
            if perms[3] == "s":
                lo, hi = span.split("-")
                out.append((int(lo, 16), int(hi, 16)))
    return out


def _byte_bounds(a):
    bounds = getattr(getattr(np.lib, "array_utils", np), "byte_bounds", None) or np.byte_bounds
    return bounds(a)


def _drop(start, length):
    """madvise(MADV_DONTNEED); an error (a locked or huge-page mapping) leaves the pages."""
    global _madvise
    if _madvise is None:
        fn = ctypes.CDLL(None, use_errno=True).madvise
        fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        fn.restype = ctypes.c_int
        _madvise = fn
    return _madvise(start, length, MADV_DONTNEED) == 0


def _on_death(ref, start, length):
    # Called as the array dies, before numpy lets go of its base: the object is still
    # pinned, so the mapping is the one checked.
    _due.pop(id(ref), None)
    try:
        _drop(start, length)
    except Exception:       # at interpreter exit ctypes may be gone: nothing to keep then
        pass


def _root(a):
    """The array every view of ``a``'s memory refers to (numpy collapses view chains)."""
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def release_shared_pages(arrays, min_bytes=MIN_BYTES, when_dropped=True):
    """Drop this process's resident pages under the read-only numpy ``arrays`` that lie in
    shared mappings (the page-aligned interior of each: its end pages may hold a
    neighbour's data), now and, with ``when_dropped``, once more when the last array on
    that memory goes (what was read until then). Other arrays (writable, private memory,
    cupy, small) are left alone. Values never change. Returns the bytes released now.

    Example: ``release_shared_pages(side_arrays)`` after a program that read them.
    """
    todo = {id(r): r for r in (_root(a) for a in arrays if type(a) is np.ndarray)
            if not r.flags.writeable and r.nbytes >= min_bytes}
    if not todo or not sys.platform.startswith("linux"):
        return 0
    ranges, page, done = shared_ranges(), mmap.PAGESIZE, 0
    for r in todo.values():
        lo, hi = _byte_bounds(r)
        start, end = -(-lo // page) * page, hi // page * page
        if end - start < page or not any(s <= lo and hi <= e for s, e in ranges):
            continue
        if _drop(start, end - start):
            done += end - start
        if when_dropped:
            ref = weakref.ref(r, lambda ref, s=start, n=end - start: _on_death(ref, s, n))
            _due[id(ref)] = ref
    return done
