"""The topology-aware communicator: shared memory inside a node, the TCP ring between nodes.

:class:`HierarchicalCommunicator` exchanges every rank's node id through the
rendezvous store, then builds at most three sub-groups: a
:class:`~.shm.ShmCommunicator` of the ranks on its node, a
:class:`~.tcp.TcpCommunicator` ring of the node leaders (each node's lowest rank),
and a send/recv-only TCP mesh for point-to-point messages across nodes.
All-reduce = node-local reduce to the leader, ring all-reduce among leaders,
node-local broadcast. One node: plain shm; one rank per node: plain TCP ring.
This file owns only that composition; the transports live in ``shm.py`` and
``tcp.py``.
"""
from __future__ import annotations

import socket
import time
from typing import List, Optional, Sequence

import numpy as np

from .base import (DEFAULT_TIMEOUT_S, META_WORDS, CollectiveError, CollectiveTimeoutError,
                   Communicator, MalformedMessage, array_meta, parse_array_meta)
from .rendezvous import Store
from .shm import ShmCommunicator
from .tcp import TcpCommunicator

__all__ = ["HierarchicalCommunicator"]


def _pack_arrays(items: Sequence[tuple]) -> np.ndarray:
    """[(rank, array)] -> one uint8 buffer (no pickle): per item its meta words, then bytes."""
    parts = []
    for rank, a in items:
        m = array_meta(a)
        m[-1] = rank
        parts.append(m.view(np.uint8))
        raw = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
        parts.append(raw)
        parts.append(np.zeros((-raw.size) % 8, np.uint8))
    return np.concatenate(parts) if parts else np.zeros(0, np.uint8)


def _unpack_arrays(buf: np.ndarray, world_size: int) -> List[np.ndarray]:
    """Inverse of :func:`_pack_arrays` for ranks 0..world_size-1, each exactly once; every
    declared size is checked against the bytes left (``MalformedMessage`` otherwise)."""
    out, i = {}, 0
    while i < buf.size:
        if buf.size - i < 8 * META_WORDS:
            raise MalformedMessage(f"packed arrays: {buf.size - i} stray bytes at the end")
        m = buf[i: i + 8 * META_WORDS].copy().view(np.int64)
        i += 8 * META_WORDS
        dt, shape, nbytes = parse_array_meta(m, buf.size - i)
        rank = int(m[-1])
        if not 0 <= rank < world_size or rank in out:
            raise MalformedMessage(f"packed arrays: rank {rank} is out of range or repeated")
        out[rank] = buf[i: i + nbytes].copy().view(dt).reshape(shape)
        i += nbytes + (-nbytes) % 8
    if len(out) != world_size:
        raise MalformedMessage(f"packed arrays: ranks {sorted(set(range(world_size)) - set(out))} "
                        "are missing")
    return [out[k] for k in range(world_size)]


class HierarchicalCommunicator(Communicator):
    """Topology-aware group: shm within a node, TCP ring across node leaders.

    Every rank passes its ``node_id`` (e.g. Ray's node id); ranks with the same
    id share a node. All-reduce = node-local shm reduce to the node leader (its
    lowest rank), ring all-reduce among leaders, node-local broadcast. With one
    node this is the shm backend, with one rank per node the TCP ring.
    Reduction order: rank order inside a node, then the ring order over the node
    partials; bits are identical on every rank.

    Timeout errors name global ranks. A rank waiting on its own node leader while
    that leader waits on another node names its leader (its wait is local); the
    leader names the missing node's leader.

    Args:
        rank, world_size, store: as for :class:`TcpCommunicator`.
        node_id: ranks with equal ``node_id`` share memory (default: host name).
        group_name, timeout_s, host, init_timeout_s: as for :class:`TcpCommunicator`.
        shm_kw, tcp_kw: extra arguments for the node-local / leader communicators.

    Example (each rank)::

        comm = HierarchicalCommunicator(rank, world_size, RayKVStore(), node_id=node,
                                        group_name="grads", host=node_ip)
        comm.allreduce(bucket)
    """

    def __init__(self, rank: int, world_size: int, store: Store, node_id: Optional[str] = None,
                 group_name: str = "hier", timeout_s: float = DEFAULT_TIMEOUT_S,
                 host: str = "127.0.0.1", shm_kw: Optional[dict] = None,
                 tcp_kw: Optional[dict] = None, key_prefix: str = "distgrad",
                 init_timeout_s: Optional[float] = None):
        super().__init__(rank, world_size, group_name, timeout_s)
        init_timeout_s = float(init_timeout_s or timeout_s)
        node_id = str(node_id if node_id is not None else socket.gethostname())
        self._store = store
        key = f"{key_prefix}/{group_name}/hier"
        self._shm = self._cross = self._mesh = None
        deadline = time.monotonic() + init_timeout_s
        store.set(f"{key}/node/{rank}", node_id.encode())
        nodes = []
        for k in range(world_size):
            v = store.wait(f"{key}/node/{k}", max(0.0, deadline - time.monotonic()))
            if v is None:
                missing = [j for j in range(world_size) if store.get(f"{key}/node/{j}") is None]
                raise CollectiveTimeoutError(group_name, "init (topology exchange)", rank,
                                             missing, init_timeout_s)
            nodes.append(v.decode())
        order = []                               # node ids ordered by their lowest rank
        for nd in nodes:
            if nd not in order:
                order.append(nd)
        self.node_index = order.index(node_id)
        self.num_nodes = len(order)
        self.local_ranks = [k for k in range(world_size) if nodes[k] == node_id]
        self.local_rank = self.local_ranks.index(rank)
        self.leaders = [nodes.index(nd) for nd in order]     # global rank of each node's leader
        self._node_of = [order.index(nodes[k]) for k in range(world_size)]
        self._local_index = [[j for j in range(world_size) if nodes[j] == nodes[k]].index(k)
                             for k in range(world_size)]
        self.is_leader = self.local_rank == 0
        try:
            if len(self.local_ranks) > 1:
                # the node leader names the segment (random) and hands the name out
                self._shm = self._sub_call(lambda: ShmCommunicator(
                    self.local_rank, len(self.local_ranks), f"{key}/shm/{self.node_index}",
                    timeout_s=timeout_s, group_name=f"{group_name}/node{self.node_index}",
                    init_timeout_s=max(0.1, deadline - time.monotonic()), store=store,
                    **(shm_kw or {})), self.local_ranks)
            if self.num_nodes > 1:
                if self.is_leader:
                    self._cross = self._sub_call(lambda: TcpCommunicator(
                        self.node_index, self.num_nodes, store, f"{group_name}/leaders",
                        timeout_s, host, key_prefix=key_prefix,
                        init_timeout_s=max(0.1, deadline - time.monotonic()), **(tcp_kw or {})),
                        self.leaders)
                # cross-node send/recv go over a direct mesh (no ring sockets)
                self._mesh = self._sub_call(lambda: TcpCommunicator(
                    rank, world_size, store, f"{group_name}/mesh", timeout_s, host, ring=False,
                    key_prefix=key_prefix, init_timeout_s=max(0.1, deadline - time.monotonic())),
                    list(range(world_size)))
            self.barrier()               # everyone is connected: the keys can go
        except BaseException:
            self.close()
            raise
        finally:
            store.delete(f"{key}/node/{rank}")

    def _sub_call(self, fn, ranks: List[int]):
        """Run fn, renaming a sub-group's ranks in timeout errors to global ranks."""
        try:
            return fn()
        except CollectiveTimeoutError as e:
            missing = [ranks[k] if 0 <= k < len(ranks) else k for k in e.missing_ranks]
            raise CollectiveTimeoutError(self._group_name, e.op, self._rank, missing,
                                         self._timeout_s, str(e)) from None

    def _local(self, method, *args):
        return self._sub_call(lambda: getattr(self._shm, method)(*args), self.local_ranks)

    def _leaders(self, method, *args):
        return self._sub_call(lambda: getattr(self._cross, method)(*args), self.leaders)

    @property
    def topology(self) -> str:
        """"shm", "tcp" or "hierarchical": what this group actually uses."""
        if self.num_nodes == 1:
            return "shm" if self._shm is not None else "single"
        return "tcp" if self._shm is None and len(self.leaders) == self._world_size \
            else "hierarchical"

    # -- collectives (the public methods, in base.Communicator, call these) -------
    def _allreduce_flat(self, flat, op):
        self._check_open()
        if self.num_nodes == 1:
            self._local("allreduce", flat, op)
            return
        if self._shm is not None:
            self._local("reduce", flat, 0, op)
        if self.is_leader:
            self._leaders("allreduce", flat, op)
        if self._shm is not None:
            self._local("broadcast", flat, 0)

    def _reducescatter_rows(self, array, op):
        if self.num_nodes == 1:
            return self._local("reducescatter", array, op)
        tmp = self.allreduce(np.array(array, copy=True), op)
        return np.array_split(tmp, self._world_size, axis=0)[self._rank].copy()

    def _broadcast_flat(self, flat, root):
        self._check_open()
        root_node = self._node_of[root]
        if self._shm is not None and self.node_index == root_node:
            self._local("broadcast", flat, self._local_index[root])
        if self._cross is not None:
            self._leaders("broadcast", flat, root_node)
        if self._shm is not None and self.node_index != root_node:
            self._local("broadcast", flat, 0)

    def _allgather(self, array):
        self._check_open()
        local = self._local("allgather", array) if self._shm else [array]
        if self.num_nodes == 1:
            return local
        if self.is_leader:
            packed = _pack_arrays(list(zip(self.local_ranks, local)))
            full = np.concatenate(self._leaders("allgather", packed))
            size = np.array([full.size], np.int64)
        else:
            size = np.zeros(1, np.int64)
        if self._shm is not None:
            self._local("broadcast", size, 0)
            if not self.is_leader:
                full = np.empty(int(size[0]), np.uint8)
            self._local("broadcast", full, 0)
        try:
            return _unpack_arrays(full, self._world_size)
        except MalformedMessage as e:
            raise CollectiveError(f"collective group {self._group_name!r}: allgather on rank "
                                  f"{self._rank}: malformed data from the node leaders: {e}") \
                from None

    def _barrier_all(self):
        self._check_open()
        if self._shm is not None:
            self._local("barrier")
        if self._cross is not None:
            self._leaders("barrier")
        if self._shm is not None:
            self._local("barrier")

    def send(self, array, dst):
        self._check_peer(dst, "dst")
        if self._shm is not None and dst in self.local_ranks:
            return self._local("send", array, self.local_ranks.index(dst))
        return self._mesh.send(array, dst)

    def recv(self, array_or_shape, src, dtype=None):
        self._check_peer(src, "src")
        if self._shm is not None and src in self.local_ranks:
            return self._local("recv", array_or_shape, self.local_ranks.index(src), dtype)
        return self._mesh.recv(array_or_shape, src, dtype)

    def abort(self, detail=""):
        # Both levels: ranks on this node wait in shm, the other nodes' leaders in tcp.
        for c in (self._shm, self._cross, self._mesh):
            if c is not None:
                c.abort(detail)

    def close(self):
        if self._closed:
            return
        super().close()
        for c in (self._shm, self._cross, self._mesh):
            if c is not None:
                c.close()
