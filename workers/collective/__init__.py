"""distgrad's collective communication backends.

All backends implement :class:`Communicator` (``base.py``, which also holds the
argument checks every collective shares, the errors and the dtype/shape codes),
one communicator per file, made by :func:`create_communicator`:

- ``"inprocess"`` (``inprocess.py``): ranks are threads of one process (``backend="local"``).
- ``"shm"`` (``shm.py``): ranks are processes on one node, exchanging through POSIX
  shared memory; the segment's lifecycle is ``shm_segment.py``, its waits
  ``shm_sync.py``, its send/recv channels ``shm_p2p.py``.
- ``"tcp"`` (``tcp.py``): ranks anywhere, ring all-reduce over TCP sockets; the
  authenticated connections are ``tcp_links.py`` (hello: ``auth.py``).
- ``"hierarchical"`` (``hierarchical.py``): shm inside each node, tcp ring between
  node leaders.
- ``"nccl"`` (``nccl.py``): GPU actors, through ``ray.util.collective``.

Rendezvous stores: ``rendezvous.py``. ``ray_backend.register()`` makes them
available to ``ray.util.collective`` as backend ``"distgrad"``. Importing this
package does not import Ray.
"""
from .base import (DEFAULT_TIMEOUT_S, CollectiveAbortedError, CollectiveError,
                   CollectiveMismatchError, CollectiveTimeoutError, Communicator, normalize_op, split_ranges,
                   split_sizes)

__all__ = [
    "Communicator", "CollectiveError", "CollectiveTimeoutError", "CollectiveAbortedError",
    "CollectiveMismatchError",
    "DEFAULT_TIMEOUT_S", "create_communicator", "normalize_op", "split_ranges",
    "split_sizes", "KINDS",
]

KINDS = ("inprocess", "shm", "tcp", "hierarchical", "nccl")


def create_communicator(kind: str, **kw) -> Communicator:
    """Create a communicator of backend ``kind`` with that backend's keyword arguments.

    - ``"inprocess"``: ``group=`` (an :class:`InProcessGroup`), ``rank=``
      (or ``world_size=`` and ``rank=`` when ``group`` is omitted only for
      world_size 1), ``timeout_s=``.
    - ``"shm"``: see :class:`~.shm.ShmCommunicator` (``rank, world_size, name, ...``).
    - ``"tcp"``: see :class:`~.tcp.TcpCommunicator` (``rank, world_size, store, ...``).
    - ``"hierarchical"``: see :class:`~.hierarchical.HierarchicalCommunicator`.
    - ``"nccl"``: see :class:`~.nccl.NcclCommunicator` (GPU actors, cupy arrays).

    Example::

        comm = create_communicator("shm", rank=r, world_size=2, name="distgrad_demo")
        comm.allreduce(x)
    """
    kind = kind.lower()
    if kind == "inprocess":
        from .inprocess import InProcessGroup
        group = kw.pop("group", None)
        rank = kw.pop("rank")
        if group is None:
            group = InProcessGroup(kw.pop("world_size", 1), kw.pop("group_name", "inprocess"),
                                   **{k: kw.pop(k) for k in list(kw) if k == "timeout_s"})
        if kw:
            raise TypeError(f"unexpected arguments for inprocess: {sorted(kw)}")
        return group.communicator(rank)
    if kind == "shm":
        from .shm import ShmCommunicator
        return ShmCommunicator(**kw)
    if kind == "tcp":
        from .tcp import TcpCommunicator
        return TcpCommunicator(**kw)
    if kind == "hierarchical":
        from .hierarchical import HierarchicalCommunicator
        return HierarchicalCommunicator(**kw)
    if kind == "nccl":
        from .nccl import NcclCommunicator
        return NcclCommunicator(**kw)
    raise ValueError(f"unknown collective kind {kind!r}; expected one of {KINDS}")
