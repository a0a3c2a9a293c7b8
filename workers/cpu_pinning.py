"""Giving each worker of a host its own cores (``dg.init(pin_cpus=True)``).

Unpinned, the kernel moves a worker's threads between cores: its communication thread
wakes on the core where the other worker computes and delays that worker, which the
next barrier turns into waiting for both (issue 13: a 2-worker MLP step took 2.7% longer
unpinned; DDP's processes gained 1.3% from the same pinning). Pinned, a worker's threads
share its own cores and leave the others alone. Opt-in: two unrelated pinned jobs on one
host would both take its first cores.
"""
import os


def cores_for(index, count, per_worker, available):
    """The cores of the ``index``-th of ``count`` workers of a host that has ``available``
    cores, each worker taking ``per_worker``; None when they do not all fit (then none of
    that host's workers is pinned: one left floating would land on the pinned ones' cores).

    >>> cores_for(1, 2, 1, [0, 1, 2, 3])
    [1]
    >>> cores_for(0, 3, 2, [0, 1, 2, 3]) is None
    True
    """
    cores = sorted(available)
    if count * per_worker > len(cores):
        return None
    return cores[index * per_worker:(index + 1) * per_worker]


def pin_process(cores):
    """Restrict every thread of this process to ``cores`` (threads started later inherit
    the mask of the thread that starts them, so new ones stay there too).

    Example: ``pin_process([1])``.
    """
    cores = set(cores)
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
        except (ProcessLookupError, FileNotFoundError):
            pass                      # a thread that ended meanwhile
    os.sched_setaffinity(0, cores)
