"""The collective interface every distgrad backend implements.

A ``Communicator`` is one rank's handle on a group of ``world_size`` ranks
(ChainerMN style). All collectives are blocking, take numpy arrays, and must be
called by every rank of the group in the same order with matching shapes and
dtypes. Every wait is bounded by ``timeout_s``: a rank that does not arrive
gives a :class:`CollectiveTimeoutError` naming the group, the op and the
missing rank(s), never a hang.

Determinism: reductions combine the ranks' values in rank order
``((x0 op x1) op x2) ...`` (the tcp ring documents its own fixed order), so a
result is bit-identical on every rank and reproducible for a fixed world size.
"""
from __future__ import annotations

import abc
import math
from typing import List, Sequence

import numpy as np

__all__ = [
    "CollectiveError", "CollectiveTimeoutError", "CollectiveMismatchError",
    "Communicator", "REDUCE_OPS", "normalize_op", "reduce_in_order",
    "split_sizes", "split_ranges", "DEFAULT_TIMEOUT_S", "dtype_code", "code_dtype",
    "check_ndarray", "flat_view", "resolve_recv_target", "META_WORDS", "MAX_META_NDIM",
    "MalformedMessage", "array_meta", "parse_array_meta",
]

DEFAULT_TIMEOUT_S = 30.0

# name -> binary ufunc; "sum" of bool arrays is a logical or (numpy's add).
REDUCE_OPS = {
    "sum": np.add,
    "prod": np.multiply,
    "min": np.minimum,
    "max": np.maximum,
}
_OP_ALIASES = {"product": "prod", "mul": "prod", "add": "sum"}
OP_CODES = {"sum": 1, "prod": 2, "min": 3, "max": 4}


class CollectiveError(RuntimeError):
    """A collective failed (base class of the errors below)."""


class CollectiveTimeoutError(CollectiveError):
    """A rank did not arrive at a collective within the timeout (or died).

    Attributes: ``group_name``, ``op``, ``rank`` (who raised),
    ``missing_ranks`` (sorted list), ``timeout_s``.
    """

    def __init__(self, group_name: str, op: str, rank: int,
                 missing_ranks: Sequence[int], timeout_s: float, detail: str = ""):
        self.group_name = group_name
        self.op = op
        self.rank = rank
        self.missing_ranks = sorted(int(r) for r in missing_ranks)
        self.timeout_s = timeout_s
        who = ", ".join(str(r) for r in self.missing_ranks) or "?"
        plural = "s" if len(self.missing_ranks) != 1 else ""
        msg = (f"collective group {group_name!r}: {op} on rank {rank} timed out "
               f"after {timeout_s:g}s: rank{plural} {who} did not arrive")
        if detail:
            msg += f" ({detail})"
        super().__init__(msg)


class CollectiveAbortedError(CollectiveTimeoutError):
    """A peer left the collectives of a step it could not finish (``Communicator.abort``):
    raised at once rather than after the timeout. The peer reports the cause itself."""

    def __init__(self, group_name: str, op: str, rank: int,
                 missing_ranks: Sequence[int], timeout_s: float, detail: str = ""):
        super().__init__(group_name, op, rank, missing_ranks, timeout_s, detail)
        who = ", ".join(str(r) for r in self.missing_ranks) or "?"
        self.args = (f"collective group {group_name!r}: {op} on rank {rank} stopped: rank "
                     f"{who} left the step" + (f" ({detail})" if detail else ""),)


class CollectiveMismatchError(CollectiveError, ValueError):
    """Ranks called different collectives, or with different shapes/dtypes."""


def normalize_op(op) -> str:
    """Return the canonical op name ("sum", "prod", "min", "max").

    Accepts those strings (any case, plus "product"), and Ray's
    ``ray.util.collective.types.ReduceOp`` members (matched by name).

    >>> normalize_op("SUM"), normalize_op("product")
    ('sum', 'prod')
    """
    name = getattr(op, "name", op)
    if not isinstance(name, str):
        raise ValueError(f"unknown reduce op {op!r}; expected one of {sorted(REDUCE_OPS)}")
    key = name.lower()
    key = _OP_ALIASES.get(key, key)
    if key not in REDUCE_OPS:
        raise ValueError(f"unknown reduce op {op!r}; expected one of {sorted(REDUCE_OPS)}")
    return key


def reduce_in_order(terms: Sequence[np.ndarray], op: str, out: np.ndarray) -> np.ndarray:
    """``out = ((terms[0] op terms[1]) op terms[2]) ...`` in exactly that order.

    ``out`` may be the same memory as ``terms[0]`` or ``terms[1]`` but no later
    term (it is overwritten before later terms are read).

    >>> a = [np.ones(3), np.full(3, 2.0), np.full(3, 3.0)]
    >>> reduce_in_order(a, "sum", np.empty(3))
    array([6., 6., 6.])
    """
    ufunc = REDUCE_OPS[op]
    if len(terms) == 1:
        if out is not terms[0]:
            np.copyto(out, terms[0])
        return out
    ufunc(terms[0], terms[1], out=out)
    for t in terms[2:]:
        ufunc(out, t, out=out)
    return out


def split_sizes(n: int, parts: int) -> List[int]:
    """Sizes of ``numpy.array_split(range(n), parts)``: the first ``n % parts`` get one more.

    >>> split_sizes(10, 4)
    [3, 3, 2, 2]
    """
    q, r = divmod(n, parts)
    return [q + 1 if i < r else q for i in range(parts)]


def split_ranges(n: int, parts: int) -> List[tuple]:
    """``(start, stop)`` of each part of ``numpy.array_split(range(n), parts)``.

    >>> split_ranges(5, 2)
    [(0, 3), (3, 5)]
    """
    out, s = [], 0
    for size in split_sizes(n, parts):
        out.append((s, s + size))
        s += size
    return out


def dtype_code(dt: np.dtype) -> int:
    """A dtype as one int64 word for frame and segment headers (its ``str``, zero padded).

    >>> code_dtype(dtype_code(np.dtype("<f4")))
    dtype('float32')
    """
    return int.from_bytes(dt.str.encode().ljust(8, b"\0")[:8], "little")


def code_dtype(code: int):
    """Inverse of :func:`dtype_code`; None unless the word names a plain numeric dtype (the
    word may come from a peer: no object, string or structured dtype comes out of it).

    >>> code_dtype(12345) is None
    True
    """
    try:
        dt = np.dtype(int(code).to_bytes(8, "little").rstrip(b"\0").decode("ascii"))
    except (OverflowError, UnicodeDecodeError, TypeError, ValueError):
        return None
    return dt if dt.kind in "biufc" and dt.fields is None and dt.subdtype is None else None


# An array's description as int64 words (tcp frames, hierarchical's packed allgather):
# [dtype code, ndim, nbytes, shape..., free word for the caller (e.g. a rank)].
META_WORDS = 32
MAX_META_NDIM = META_WORDS - 4


class MalformedMessage(Exception):
    """Internal: a peer's words or bytes do not parse (corrupted or hostile). Backends turn
    it into a :class:`CollectiveError` that breaks the group."""


def array_meta(array: np.ndarray) -> np.ndarray:
    """``array``'s dtype, rank, size and shape as :data:`META_WORDS` int64 words.

    >>> parse_array_meta(array_meta(np.ones((2, 3), np.float32)), 1 << 20)
    (dtype('float32'), (2, 3), 24)
    """
    if array.ndim > MAX_META_NDIM:
        raise ValueError(f"at most {MAX_META_NDIM} dimensions supported")
    m = np.zeros(META_WORDS, np.int64)
    m[0], m[1], m[2] = dtype_code(array.dtype), array.ndim, array.nbytes
    m[3: 3 + array.ndim] = array.shape
    return m


def parse_array_meta(m: np.ndarray, limit: int):
    """(dtype, shape, nbytes) of a peer's :func:`array_meta` words, checked before anything
    is allocated: a plain dtype, non-negative dims that multiply to nbytes, at most
    ``limit`` bytes. Anything else raises :class:`MalformedMessage`.

    >>> parse_array_meta(array_meta(np.arange(3)), limit=24)
    (dtype('int64'), (3,), 24)
    """
    dt, ndim, nbytes = code_dtype(int(m[0])), int(m[1]), int(m[2])
    if dt is None:
        raise MalformedMessage(f"dtype word {int(m[0]):#x} names no plain numeric dtype")
    if not 0 <= ndim <= MAX_META_NDIM:
        raise MalformedMessage(f"{ndim} dimensions (at most {MAX_META_NDIM})")
    shape = tuple(int(d) for d in m[3: 3 + ndim])
    if any(d < 0 for d in shape) or math.prod(shape) * dt.itemsize != nbytes:
        raise MalformedMessage(f"shape {shape} of {dt} does not hold {nbytes} bytes")
    if nbytes > limit:
        raise MalformedMessage(f"announces {nbytes} bytes, more than the limit of {limit} "
                               "(max_message_bytes)")
    return dt, shape, nbytes


def check_ndarray(array) -> None:
    """Raise TypeError unless ``array`` is a numpy array (what the host backends take).

    >>> check_ndarray(np.ones(2))
    """
    if not isinstance(array, np.ndarray):
        raise TypeError(f"collectives take numpy arrays, got {type(array).__name__}")


def flat_view(array: np.ndarray):
    """Return ``(flat, writeback)``: a 1-d C-contiguous view of ``array`` (or a
    copy when ``array`` is not contiguous, with ``writeback()`` to copy back).

    >>> flat, writeback = flat_view(np.ones((2, 2))); flat.shape
    (4,)
    """
    check_ndarray(array)
    if array.flags.c_contiguous:
        return array.reshape(-1), (lambda: None)
    tmp = np.ascontiguousarray(array)

    def writeback():
        array[...] = tmp.reshape(array.shape)
    return tmp.reshape(-1), writeback


class Communicator(abc.ABC):
    """One rank's handle on a collective group.

    Subclasses implement ``send``/``recv`` and the ``_..._flat`` hooks under the
    collectives below; all are blocking and must be called by every rank in the same
    order. One communicator is used by one thread at a time (calls may come from
    different threads if serialized). ``op`` is one of "sum", "prod", "min", "max"
    (or a Ray ``ReduceOp``).

    Example (in-process group, one thread per rank)::

        group = InProcessGroup(world_size=2)
        # in thread r:
        comm = group.communicator(r)
        x = np.full(4, float(r + 1))
        comm.allreduce(x)            # x == [3, 3, 3, 3] on both ranks
    """

    def __init__(self, rank: int, world_size: int, group_name: str,
                 timeout_s: float = DEFAULT_TIMEOUT_S):
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        if not (timeout_s > 0 and math.isfinite(timeout_s)):
            raise ValueError(f"timeout_s must be a positive number, got {timeout_s!r}")
        self._rank = int(rank)
        self._world_size = int(world_size)
        self._group_name = str(group_name)
        self._timeout_s = float(timeout_s)
        self._closed = False

    # -- identity -----------------------------------------------------------
    @property
    def rank(self) -> int:
        """This rank, 0 <= rank < world_size."""
        return self._rank

    @property
    def world_size(self) -> int:
        """Number of ranks in the group."""
        return self._world_size

    @property
    def group_name(self) -> str:
        """Name of the group (appears in error messages)."""
        return self._group_name

    @property
    def timeout_s(self) -> float:
        """Seconds any single collective may wait for the other ranks."""
        return self._timeout_s

    @property
    def closed(self) -> bool:
        return self._closed

    # -- collectives ----------------------------------------------------------
    # Each public collective checks its arguments, handles world_size 1 and flattens the
    # array here, once; a backend writes only the ``_..._flat`` / ``_..._rows`` hook below
    # it, which runs with world_size > 1 on a 1-d C-contiguous array (template method).
    def allreduce(self, array: np.ndarray, op="sum") -> np.ndarray:
        """Reduce ``array`` over all ranks in place; return it.

        With 2 ranks:

        >>> comm.allreduce(np.ones(3))      # doctest: +SKIP
        array([2., 2., 2.])
        """
        op = normalize_op(op)
        flat, writeback = flat_view(array)
        if self._world_size > 1:
            self._allreduce_flat(flat, op)
            writeback()
        return array

    def allgather(self, array: np.ndarray) -> List[np.ndarray]:
        """Return every rank's ``array`` as a list indexed by rank (new arrays;
        ranks may pass different shapes, the dtype must match).

        >>> comm.allgather(np.array([comm.rank]))   # doctest: +SKIP
        [array([0]), array([1])]
        """
        check_ndarray(array)
        if self._world_size == 1:
            return [array.copy()]
        return self._allgather(array)

    def allgather_stacked(self, array: np.ndarray) -> np.ndarray:
        """``numpy.stack(allgather(array))``: shape ``(world_size, *array.shape)``."""
        return np.stack(self.allgather(array))

    def reducescatter(self, array: np.ndarray, op="sum") -> np.ndarray:
        """Reduce ``array`` over ranks and return this rank's part of the result,
        ``numpy.array_split(result, world_size, axis=0)[rank]`` (a new array;
        ``array`` is not modified; uneven splits allowed).

        On rank 0 of 2:

        >>> comm.reducescatter(np.ones(5))   # doctest: +SKIP
        array([2., 2., 2.])
        """
        op = normalize_op(op)
        if not isinstance(array, np.ndarray) or array.ndim == 0:
            raise ValueError("reducescatter needs a numpy array with at least one dimension")
        if self._world_size == 1:
            return array.copy()
        return self._reducescatter_rows(array, op)

    def broadcast(self, array: np.ndarray, root: int = 0) -> np.ndarray:
        """Copy root's ``array`` into every rank's ``array`` in place; return it.

        >>> comm.broadcast(x, root=0)     # doctest: +SKIP
        """
        self._check_root(root)
        flat, writeback = flat_view(array)
        if self._world_size > 1:
            self._broadcast_flat(flat, root)
            if self._rank != root:
                writeback()
        return array

    def reduce(self, array: np.ndarray, root: int = 0, op="sum") -> np.ndarray:
        """Reduce onto ``root`` in place; other ranks' arrays are left unchanged.
        Returns ``array``.

        >>> comm.reduce(x, root=0, op="max")   # doctest: +SKIP
        """
        self._check_root(root)
        op = normalize_op(op)
        flat, writeback = flat_view(array)
        if self._world_size > 1:
            self._reduce_flat(flat, root, op)
            if self._rank == root:
                writeback()
        return array

    def barrier(self) -> None:
        """Return once every rank has called ``barrier``.

        >>> comm.barrier()   # doctest: +SKIP
        """
        if self._world_size > 1:
            self._barrier_all()

    # -- what a host backend writes (world_size > 1; arguments already checked) --------
    # Not abstract: a backend on device arrays (nccl.py) overrides the public methods
    # instead, since the checks and flat views above are for numpy arrays.
    def _not_written(self, public: str):
        raise NotImplementedError(f"{type(self).__name__} implements neither {public} nor "
                                  f"the hook under it")

    def _allreduce_flat(self, flat: np.ndarray, op: str) -> None:
        """Reduce the 1-d contiguous ``flat`` over all ranks in place."""
        self._not_written("allreduce")

    def _allgather(self, array: np.ndarray) -> List[np.ndarray]:
        """Every rank's ``array`` (any shape, same dtype), indexed by rank."""
        self._not_written("allgather")

    def _reducescatter_rows(self, array: np.ndarray, op: str) -> np.ndarray:
        """This rank's rows of the reduction of ``array`` (at least 1-d, not modified)."""
        self._not_written("reducescatter")

    def _broadcast_flat(self, flat: np.ndarray, root: int) -> None:
        """Copy root's 1-d contiguous ``flat`` into every rank's ``flat``."""
        self._not_written("broadcast")

    def _reduce_flat(self, flat: np.ndarray, root: int, op: str) -> None:
        """Reduce ``flat`` onto ``root`` in place. Default: all-reduce a copy, which root
        keeps (a backend with a cheaper rooted reduce overrides this). It calls the public
        ``allreduce``, so a backend that overrides that instead of the hook has it too."""
        tmp = flat.copy()
        self.allreduce(tmp, op)
        if self._rank == root:
            flat[...] = tmp

    def _barrier_all(self) -> None:
        """Return once every rank has entered the barrier."""
        self._not_written("barrier")

    @abc.abstractmethod
    def send(self, array: np.ndarray, dst: int) -> None:
        """Send ``array`` to rank ``dst`` (matched by a ``recv`` there, in order).
        May block until ``dst`` receives when the message is large.

        >>> comm.send(np.arange(3.0), dst=1)   # doctest: +SKIP
        """

    @abc.abstractmethod
    def recv(self, array_or_shape, src: int, dtype=None) -> np.ndarray:
        """Receive the next message from rank ``src``.

        ``array_or_shape``: an array to fill in place, a shape (with ``dtype``,
        default: the sender's) to allocate, or ``None`` to take the sender's
        shape and dtype. A size or dtype mismatch raises
        :class:`CollectiveMismatchError`.

        >>> comm.recv(np.empty(3), src=0)   # doctest: +SKIP
        array([0., 1., 2.])
        """

    def abort(self, detail: str = "") -> None:
        """Leave the current step: every peer waiting for this rank in a collective (now or
        later) raises :class:`CollectiveAbortedError` at once instead of waiting out its
        timeout. The group is broken afterwards (the scheduler re-forms it). The default
        closes the communicator, which socket-based peers see at once.

        Example: ``comm.abort("rank 1: ValueError in the forward pass")``.
        """
        self.close()

    def close(self) -> None:
        """Release this rank's resources (idempotent)."""
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- helpers for subclasses ------------------------------------------------
    def _check_open(self):
        if self._closed:
            raise CollectiveError(f"collective group {self._group_name!r}: communicator "
                                  f"of rank {self._rank} is closed")

    def _check_root(self, root: int, what: str = "root"):
        if not isinstance(root, (int, np.integer)) or not 0 <= root < self._world_size:
            raise ValueError(f"{what} {root!r} out of range for world_size {self._world_size}")

    def _check_peer(self, peer: int, what: str):
        self._check_root(peer, what)
        if peer == self._rank:
            raise ValueError(f"{what} {peer} is this rank itself")

    def __repr__(self):
        return (f"{type(self).__name__}(group={self._group_name!r}, rank={self._rank}, "
                f"world_size={self._world_size})")


def resolve_recv_target(array_or_shape, dtype, sent_dtype: np.dtype, sent_shape: tuple,
                        group_name: str, src: int) -> np.ndarray:
    """Allocate or check the receive buffer for a message of ``sent_dtype``/``sent_shape``
    (what ``recv``'s ``array_or_shape`` and ``dtype`` ask for); a size or dtype that does
    not match raises :class:`CollectiveMismatchError`.

    >>> resolve_recv_target(None, None, np.dtype("f4"), (2, 3), "g", 1).shape
    (2, 3)
    """
    if isinstance(array_or_shape, np.ndarray):
        out = array_or_shape
        if out.dtype != sent_dtype or out.size != math.prod(sent_shape):
            raise CollectiveMismatchError(
                f"collective group {group_name!r}: recv from rank {src}: message is "
                f"{sent_dtype} of shape {tuple(sent_shape)}, buffer is {out.dtype} of shape "
                f"{out.shape}")
        return out
    shape = sent_shape if array_or_shape is None else (
        (int(array_or_shape),) if np.isscalar(array_or_shape) else tuple(array_or_shape))
    dt = sent_dtype if dtype is None else np.dtype(dtype)
    if dt != sent_dtype or math.prod(shape) != math.prod(sent_shape):
        raise CollectiveMismatchError(
            f"collective group {group_name!r}: recv from rank {src}: message is "
            f"{sent_dtype} of shape {tuple(sent_shape)}, asked for {dt} of shape {shape}")
    return np.empty(shape, dt)
