"""distgrad's collectives as a ``ray.util.collective`` backend named ``"distgrad"``.

Ray keeps its backend registry per process, so :func:`register` must run in the
driver and in every actor before a group is created (it is idempotent; call it
at actor start, or let Ray call it in every worker with
``runtime_env={"worker_process_setup_hook":
"distgrad.workers.collective.ray_backend.register"}``). Then::

    import ray.util.collective as col
    col.init_collective_group(world_size, rank, backend="distgrad", group_name="g")
    col.allreduce(array, group_name="g")          # numpy array, in place

The group is a :class:`~.hierarchical.HierarchicalCommunicator`: ranks on the same Ray
node talk through shared memory, nodes through a TCP ring, rendezvous through
Ray's internal KV store (no fixed ports). Collective timeout:
``DISTGRAD_COLLECTIVE_TIMEOUT_S`` (default 30 s) or :func:`set_default_timeout`;
group creation waits up to ``DISTGRAD_COLLECTIVE_INIT_TIMEOUT_S`` (default 60 s).
"""
from __future__ import annotations

import os
import threading
from typing import Optional

import numpy as np
import ray
from ray.util.collective.backend_registry import _global_registry, register_collective_backend
from ray.util.collective.collective_group.base_collective_group import BaseGroup
from ray.util.collective.types import (AllGatherOptions, AllReduceOptions, BarrierOptions,
                                       BroadcastOptions, RecvOptions, ReduceOptions,
                                       ReduceScatterOptions, SendOptions)

from .base import DEFAULT_TIMEOUT_S, Communicator
from .rendezvous import RayKVStore
from .hierarchical import HierarchicalCommunicator

__all__ = ["BACKEND_NAME", "DistgradGroup", "register", "set_default_timeout"]

BACKEND_NAME = "DISTGRAD"
_lock = threading.Lock()
_timeout_override: Optional[float] = None


def set_default_timeout(timeout_s: Optional[float]) -> None:
    """Timeout for groups created afterwards in this process (None: back to the env/default).

    >>> set_default_timeout(10.0)
    """
    global _timeout_override
    _timeout_override = timeout_s


def _timeout() -> float:
    if _timeout_override is not None:
        return float(_timeout_override)
    return float(os.environ.get("DISTGRAD_COLLECTIVE_TIMEOUT_S", DEFAULT_TIMEOUT_S))


def register() -> None:
    """Register backend ``"distgrad"`` with ``ray.util.collective`` in this process (idempotent).

    >>> register(); register()      # the second call is a no-op
    """
    with _lock:
        if not _global_registry.is_registered(BACKEND_NAME):
            register_collective_backend(BACKEND_NAME, DistgradGroup)


def _as_numpy(t) -> np.ndarray:
    """numpy arrays as they are; CPU torch tensors as a numpy view (same memory)."""
    if isinstance(t, np.ndarray):
        return t
    if type(t).__module__.startswith("torch") and hasattr(t, "numpy"):
        if getattr(t, "is_cuda", False):
            raise TypeError("backend 'distgrad' handles CPU arrays; use backend 'nccl' for GPU "
                            "tensors")
        return t.detach().numpy()
    raise TypeError(f"backend 'distgrad' takes numpy arrays (or CPU torch tensors), got "
                    f"{type(t).__module__}.{type(t).__name__}; use backend 'nccl' for cupy")


def _single(tensor):
    """ray.util.collective wraps the tensor argument in a one-element list."""
    if isinstance(tensor, (list, tuple)):
        if len(tensor) != 1:
            raise ValueError(f"backend 'distgrad' is single-device per process: got "
                             f"{len(tensor)} tensors")
        tensor = tensor[0]
    return _as_numpy(tensor)


def _single_list(tensor_list):
    if isinstance(tensor_list, (list, tuple)) and tensor_list and \
            isinstance(tensor_list[0], (list, tuple)):
        if len(tensor_list) != 1:
            raise ValueError("backend 'distgrad' is single-device per process")
        tensor_list = tensor_list[0]
    return [_as_numpy(t) for t in tensor_list]


class DistgradGroup(BaseGroup):
    """A ``ray.util.collective`` group backed by distgrad's shm/TCP communicators.

    Created by Ray (``init_collective_group`` / ``create_collective_group`` with
    ``backend="distgrad"``); the underlying :class:`Communicator` is
    ``group.communicator`` for code that wants distgrad's richer API.

    Example (inside an actor, after ``register()``)::

        col.init_collective_group(2, rank, backend="distgrad", group_name="g")
        col.allreduce(x, group_name="g")
    """

    def __init__(self, world_size: int, rank: int, group_name: str):
        super().__init__(world_size, rank, group_name)
        ctx = ray.get_runtime_context()
        self._comm = HierarchicalCommunicator(
            rank, world_size, RayKVStore(), node_id=ctx.get_node_id(), group_name=group_name,
            timeout_s=_timeout(), host=ray.util.get_node_ip_address(),
            # actors reach init_collective_group at different times: wait longer here
            init_timeout_s=float(os.environ.get("DISTGRAD_COLLECTIVE_INIT_TIMEOUT_S",
                                                max(60.0, _timeout()))))

    @property
    def communicator(self) -> Communicator:
        return self._comm

    @classmethod
    def backend(cls):
        return BACKEND_NAME

    @classmethod
    def check_backend_availability(cls) -> bool:
        return True

    def destroy_group(self):
        self._comm.close()

    def allreduce(self, tensor, allreduce_options=AllReduceOptions()):
        opts = allreduce_options or AllReduceOptions()
        self._comm.allreduce(_single(tensor), op=opts.reduceOp)

    def barrier(self, barrier_options=BarrierOptions()):
        self._comm.barrier()

    def reduce(self, tensor, reduce_options=ReduceOptions()):
        opts = reduce_options or ReduceOptions()
        self._comm.reduce(_single(tensor), root=opts.root_rank, op=opts.reduceOp)

    def allgather(self, tensor_list, tensor, allgather_options=AllGatherOptions()):
        outs = _single_list(tensor_list)
        got = self._comm.allgather(_single(tensor))
        if len(outs) != len(got):
            raise ValueError(f"allgather needs a list of {len(got)} output tensors, got "
                             f"{len(outs)}")
        for dst, src in zip(outs, got):
            if dst.size != src.size:
                raise ValueError(f"allgather output has {dst.size} elements, rank sent {src.size}")
            dst[...] = src.reshape(dst.shape)

    def broadcast(self, tensor, broadcast_options=BroadcastOptions()):
        opts = broadcast_options or BroadcastOptions()
        self._comm.broadcast(_single(tensor), root=opts.root_rank)

    def reducescatter(self, tensor, tensor_list, reducescatter_options=ReduceScatterOptions()):
        # Ray semantics: every rank passes world_size inputs; rank r receives the
        # reduction over ranks of input r. Stacked, that is a reduce-scatter of rows.
        opts = reducescatter_options or ReduceScatterOptions()
        out = _single(tensor)
        ins = _single_list(tensor_list)
        if len(ins) != self.world_size:
            raise ValueError(f"reducescatter needs {self.world_size} input tensors, got {len(ins)}")
        stacked = np.stack([np.asarray(t).reshape(out.shape) for t in ins])
        out[...] = self._comm.reducescatter(stacked, op=opts.reduceOp)[0]

    def send(self, tensor, send_options: SendOptions):
        self._comm.send(_single(tensor), send_options.dst_rank)

    def recv(self, tensor, recv_options: RecvOptions):
        self._comm.recv(_single(tensor), recv_options.src_rank)
