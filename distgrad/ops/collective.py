"""Collectives as registry ops, with their transposes as VJPs (DESIGN.md section 4),
and the thread's communicator that runs them.

A worker sets the thread's communicator with ``use_communicator``; outside a worker
the world has one rank and the collectives are identities, so they can be
gradient-checked like any other op.

- ``allreduce``: Partial -> Replicate (sum). Its transpose is an allreduce too: the
  cotangent of a replicated value is a per-worker partial sum.
- ``allgather(dim, sizes)``: Shard(dim) -> Replicate; transpose ``reduce_scatter``.
- ``reduce_scatter(dim, sizes)``: Partial -> Shard(dim); transpose ``allgather``.
- ``shard_rows(dim, sizes)``: Replicate -> Shard(dim) (each worker keeps its rows);
  transpose ``unshard_rows``: Shard(dim) -> Partial (its rows in place, zeros elsewhere).
  A replicated gradient seeding a sharded output goes through them, differentiably.
- ``to_partial``: Replicate -> Partial (rank 0 keeps the value, the others hold zeros);
  its transpose is itself. Traced hooks and custom backward rules use it to hand back
  a replicated gradient where a per-worker term is expected.
"""
import threading
from contextlib import contextmanager

from .. import placement as P
from .registry import LINEAR_ALL, defop

_ctx = threading.local()


class _SoloCommunicator:
    rank, world_size = 0, 1

    def allreduce(self, array, op="sum"):
        return array

    def allgather(self, array):
        return [array]


_SOLO = _SoloCommunicator()


def current():
    """The communicator of the worker running on this thread (a 1-rank one elsewhere).

    Example: ``current().rank`` is 0 outside a worker.
    """
    return getattr(_ctx, "comm", None) or _SOLO


@contextmanager
def use_communicator(comm):
    """Run this thread's collectives on ``comm``. Example: ``with use_communicator(c): ...``."""
    prev = getattr(_ctx, "comm", None)
    _ctx.comm = comm
    try:
        yield comm
    finally:
        _ctx.comm = prev


def _allreduce(xp, x):
    return current().allreduce(xp.array(x, copy=True), op="sum")


def _allgather(xp, x, dim, sizes):
    parts = current().allgather(xp.ascontiguousarray(x))
    return xp.concatenate([xp.asarray(p) for p in parts], axis=dim)


def _own_rows(xp, x, dim, sizes):
    rank = current().rank
    start = sum(sizes[:rank])
    index = (slice(None),) * (dim % x.ndim) + (slice(start, start + sizes[rank]),)
    return xp.ascontiguousarray(x[index])


def _reduce_scatter(xp, x, dim, sizes):
    return _own_rows(xp, _allreduce(xp, x), dim, sizes)


def _unshard_rows(xp, x, dim, sizes):
    dim = dim % x.ndim
    rank = current().rank
    start = sum(sizes[:rank])
    shape = list(x.shape)
    shape[dim] = sum(sizes)
    out = xp.zeros(tuple(shape), dtype=x.dtype)
    out[(slice(None),) * dim + (slice(start, start + x.shape[dim]),)] = x
    return out


def _to_partial(xp, x):
    return x if current().rank == 0 else xp.zeros_like(x)


defop("allreduce", _allreduce, lambda g, ans, x: g.apply("allreduce"),
      placement=P.rule_allreduce, linear_in=LINEAR_ALL)
defop("allgather", _allgather,
      lambda g, ans, x, dim, sizes: g.apply("reduce_scatter", dim=dim, sizes=sizes),
      placement=P.rule_allgather)
defop("reduce_scatter", _reduce_scatter,
      lambda g, ans, x, dim, sizes: g.apply("allgather", dim=dim, sizes=sizes),
      placement=P.rule_reduce_scatter, linear_in=LINEAR_ALL)
defop("to_partial", _to_partial, lambda g, ans, x: g.apply("to_partial"),
      placement=P.rule_to_partial)
defop("shard_rows", _own_rows,
      lambda g, ans, x, dim, sizes: g.apply("unshard_rows", dim=dim, sizes=sizes),
      placement=P.rule_shard_rows)
defop("unshard_rows", _unshard_rows,
      lambda g, ans, x, dim, sizes: g.apply("shard_rows", dim=dim, sizes=sizes),
      placement=P.rule_unshard_rows)
