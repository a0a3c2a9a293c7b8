"""Placements of distributed values and how each op propagates them (DESIGN.md section 2).

``Shard(dim, sizes)``: worker r holds rows ``sizes[r]`` of ``dim``. ``Replicate()``: every
worker holds the same value. ``Partial()``: the value is the sum of the workers' values.

A rule takes the op's name, the input placements, the inputs' GLOBAL shapes and the
attrs, and returns ``Decision(out, local_attrs, allreduce_first, shape)``: the output
placement, the attrs each worker runs with (a reshape to the global batch becomes -1
locally), which Partial inputs need a forward all-reduce first, and the global output
shape where the rule knows it better than a local run would (a gather). An op that
cannot run on its placements raises ``PlacementError`` naming the op and the
placements (``fail``).

This module holds the rule FAMILIES shared by many ops; an op names its rule in its
``defop`` (``placement=rule_elementwise``), and a rule only one op family needs is
defined beside those ops, written with the public helpers here (``fail``,
``non_shard_out``, ``Decision``). No rule tests op names: an op that propagates
differently gets its own rule. This module imports nothing of distgrad, so the op
families can import it.
"""
import math
from dataclasses import dataclass, field

import numpy as np


class PlacementError(RuntimeError):
    """An op was asked to run on placements it cannot handle."""


@dataclass(frozen=True)
class Shard:
    """Split along ``dim``; ``sizes[r]`` is worker r's extent (uneven splits allowed).

    Equality looks at ``dim`` only (``x.placement == Shard(0)``); rules that combine
    shards compare ``sizes`` explicitly."""
    dim: int
    sizes: tuple = field(default=(), compare=False)

    def __repr__(self):
        return f"Shard({self.dim})"


@dataclass(frozen=True)
class Replicate:
    def __repr__(self):
        return "Replicate()"


@dataclass(frozen=True)
class Partial:
    def __repr__(self):
        return "Partial()"


REPLICATE, PARTIAL = Replicate(), Partial()


@dataclass
class Decision:
    """What a rule decided: see the module docstring.

    Example: ``Decision(REPLICATE, attrs, shape=(10, 3))``."""
    out: object
    attrs: dict
    allreduce_first: tuple = ()
    shape: tuple = None


def encode(p):
    """Placement -> msgpack-friendly list."""
    if isinstance(p, Shard):
        return ["S", p.dim, list(p.sizes)]
    return ["R"] if isinstance(p, Replicate) else ["P"]


def decode(v):
    if v[0] == "S":
        return Shard(int(v[1]), tuple(int(s) for s in v[2]))
    if v[0] == "R":
        return REPLICATE
    if v[0] == "P":
        return PARTIAL
    raise ValueError(f"unknown placement code {v!r}")


def split_sizes(n, world, sizes=None):
    """Even split of n rows over ``world`` workers (first ones get the extra rows)."""
    if sizes is not None:
        sizes = tuple(int(s) for s in sizes)
        if len(sizes) != world or sum(sizes) != n or min(sizes) < 0:
            raise ValueError(f"shard: sizes {sizes} must be {world} non-negative numbers adding up "
                             f"to {n}")
        return sizes
    base, extra = divmod(n, world)
    return tuple(base + (r < extra) for r in range(world))


def fail(op, placements, why):
    """Raise the ``PlacementError`` of an op that cannot run on ``placements``.

    Example: ``fail("conv2d", placements, "only a batch (dim 0) sharding is supported")``.
    """
    names = ", ".join(repr(p) for p in placements)
    raise PlacementError(f"{op}: cannot run on placements ({names}): {why}")


def _shards(placements):
    return [p for p in placements if isinstance(p, Shard)]


def partial_inputs_to_reduce(op, placements):
    """Indices of Partial inputs that must be all-reduced before ``op`` (an ``OpDef``) runs.

    The op's ``linear_in`` fact says through which inputs a Partial value flows.
    Example: ``partial_inputs_to_reduce(get_op("exp"), [PARTIAL]) == (0,)``.
    """
    partial = [i for i, p in enumerate(placements) if isinstance(p, Partial)]
    if not partial:
        return ()
    kind = op.linear_in
    others = [p for i, p in enumerate(placements) if i not in partial and p is not None]
    if kind == "sum":
        # Sums stay Partial only among Partials: adding a constant (scalar or replicated)
        # on every worker would count it N times.
        return () if len(partial) == len(placements) else tuple(partial)
    if kind == "all" and all(isinstance(p, Replicate) for p in others):
        return ()
    if kind == "each" and len(partial) == 1 and all(isinstance(p, Replicate) for p in others):
        return ()
    if isinstance(kind, tuple) and set(partial) <= set(kind) and all(
            isinstance(p, Replicate) for p in others):
        return ()
    return tuple(partial)


def _out_dim(in_dim, in_ndim, out_ndim):
    """Where input dim ``in_dim`` lands in a broadcast output."""
    return in_dim + (out_ndim - in_ndim)


def rule_elementwise(op, placements, shapes, attrs, out_ndim):
    shards = [(i, p) for i, p in enumerate(placements) if isinstance(p, Shard)]
    if not shards:
        return Decision(non_shard_out(placements), attrs)
    dims = {(_out_dim(p.dim, len(shapes[i]), out_ndim), p.sizes) for i, p in shards}
    if len(dims) > 1:
        fail(op, placements, "operands are sharded differently")
    (dim, sizes), = dims
    for i, p in enumerate(placements):
        if isinstance(p, Replicate) and shapes[i] is not None:
            k = dim - (out_ndim - len(shapes[i]))
            if k >= 0 and shapes[i][k] != 1:
                fail(op, placements, f"replicated operand of shape {tuple(shapes[i])} spans the "
                                      f"sharded dim {dim}; shard it the same way")
    return Decision(Shard(dim, sizes), attrs)


def non_shard_out(placements):
    ps = [p for p in placements if p is not None]
    if ps and all(isinstance(p, Partial) for p in ps):
        return PARTIAL
    if any(isinstance(p, Partial) for p in ps):
        return PARTIAL        # linear op of Partial with Replicate (checked beforehand)
    return REPLICATE


def reduced_axes(dim, ndim):
    if dim is None:
        return tuple(range(ndim))
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    return tuple(sorted(d % ndim for d in dims))


def rule_reduce_linear(op, placements, shapes, attrs, out_ndim):
    """A sum-like reduction (sum, mean): over the sharded dim it gives a Partial value."""
    return _reduce(op, placements, shapes, attrs, linear=True)


def rule_reduce(op, placements, shapes, attrs, out_ndim):
    """A reduction that cannot combine per-worker parts (max, prod, norm...)."""
    return _reduce(op, placements, shapes, attrs, linear=False)


def _reduce(op, placements, shapes, attrs, linear):
    p = placements[0]
    if not isinstance(p, Shard):
        return Decision(non_shard_out(placements), attrs)
    ndim = len(shapes[0])
    axes = reduced_axes(attrs.get("dim"), ndim)
    if p.dim in axes:
        if not linear:
            fail(op, placements, f"reducing over the sharded dim {p.dim} is only supported for "
                                  "sum and mean")
        return Decision(PARTIAL, attrs)
    if attrs.get("keepdim"):
        return Decision(Shard(p.dim, p.sizes), attrs)
    return Decision(Shard(p.dim - sum(a < p.dim for a in axes), p.sizes), attrs)


def rule_along_dim(op, placements, shapes, attrs, out_ndim):
    p = placements[0]
    if isinstance(p, Shard) and attrs["dim"] % len(shapes[0]) == p.dim:
        fail(op, placements, f"it works along dim {attrs['dim']}, the sharded dim")
    return rule_elementwise(op, placements, shapes, attrs, out_ndim)


def rule_batch_local(op, placements, shapes, attrs, out_ndim):
    """Ops that treat samples (dim 0) independently: conv, pooling."""
    p = placements[0]
    if isinstance(p, Shard) and p.dim != 0:
        fail(op, placements, "only a batch (dim 0) sharding is supported")
    for q in placements[1:]:
        if isinstance(q, Shard):
            fail(op, placements, "only the first operand may be sharded")
    return Decision(p if isinstance(p, Shard) else non_shard_out(placements), attrs)


def rule_matmul(op, placements, shapes, attrs, out_ndim):
    pa, pb = placements
    sa, sb = shapes
    if not isinstance(pa, Shard) and not isinstance(pb, Shard):
        return Decision(non_shard_out(placements), attrs)
    na, nb = len(sa), len(sb)
    out_ndim = max(na, nb) - (na == 1) - (nb == 1)
    if isinstance(pa, Shard) and isinstance(pb, Shard):
        if na >= 2 and nb >= 2 and pa.dim == na - 1 and pb.dim == nb - 2 and pa.sizes == pb.sizes:
            return Decision(PARTIAL, attrs)          # contraction over the sharded dim
        fail(op, placements, "both operands sharded, but not both along the contracted dim")
    if isinstance(pa, Shard):
        if na >= 2 and pa.dim < na - 1 and nb <= 2:
            # The left operand's dims keep their places (a matrix-vector product drops
            # only the contracted one, which is last).
            return Decision(Shard(_out_dim(pa.dim, na, out_ndim + (nb == 1)), pa.sizes), attrs)
        fail(op, placements, "the left operand is sharded along its contracted dim")
    if nb >= 2 and pb.dim == nb - 1 and na <= 2:
        return Decision(Shard(out_ndim - 1, pb.sizes), attrs)
    fail(op, placements, "the right operand is sharded along its contracted dim")


def _resolve_shape(shape, numel):
    shape = list(shape)
    if shape.count(-1) == 1:
        known = int(np.prod([s for s in shape if s != -1], dtype=np.int64))
        shape[shape.index(-1)] = numel // known if known else 0
    return shape


def rule_squeeze(op, placements, shapes, attrs, out_ndim):
    p = placements[0]
    if not isinstance(p, Shard):
        return Decision(non_shard_out(placements), attrs)
    in_shape = tuple(shapes[0])
    d = attrs.get("dim")
    dims = [i for i, n in enumerate(in_shape) if n == 1] if d is None else \
        [x % len(in_shape) for x in ((d,) if isinstance(d, int) else d) if in_shape[x] == 1]
    if p.dim in dims:
        fail(op, placements, "cannot squeeze the sharded dim")
    return Decision(Shard(p.dim - sum(x < p.dim for x in dims), p.sizes),
                    dict(attrs, dim=tuple(dims)))


def rule_unsqueeze(op, placements, shapes, attrs, out_ndim):
    p = placements[0]
    if not isinstance(p, Shard):
        return Decision(non_shard_out(placements), attrs)
    d = attrs.get("dim") % (len(shapes[0]) + 1)
    return Decision(Shard(p.dim + (d <= p.dim), p.sizes), attrs)


def rule_reshape(op, placements, shapes, attrs, out_ndim):
    p = placements[0]
    if not isinstance(p, Shard):
        return Decision(non_shard_out(placements), attrs)
    in_shape = tuple(shapes[0])
    numel = int(np.prod(in_shape, dtype=np.int64))
    out = _resolve_shape(attrs["shape"], numel)
    prefix = int(np.prod(in_shape[:p.dim], dtype=np.int64))
    acc = 1
    for j, n in enumerate(out):
        if acc == prefix and n == in_shape[p.dim]:
            local = list(out)
            local[j] = -1
            return Decision(Shard(j, p.sizes), dict(attrs, shape=tuple(local)))
        acc *= n
    fail(op, placements, f"reshape {in_shape} -> {tuple(out)} does not keep the sharded dim {p.dim}")


def rule_transpose(op, placements, shapes, attrs, out_ndim):
    p = placements[0]
    if not isinstance(p, Shard):
        return Decision(non_shard_out(placements), attrs)
    n = len(shapes[0])
    d0, d1 = attrs["dim0"] % n, attrs["dim1"] % n
    new = d1 if p.dim == d0 else d0 if p.dim == d1 else p.dim
    return Decision(Shard(new, p.sizes), attrs)


def rule_permute(op, placements, shapes, attrs, out_ndim):
    p = placements[0]
    if not isinstance(p, Shard):
        return Decision(non_shard_out(placements), attrs)
    n = len(shapes[0])
    new = [d % n for d in attrs["dims"]].index(p.dim)
    return Decision(Shard(new, p.sizes), attrs)


def rule_expand(op, placements, shapes, attrs, out_ndim):
    p = placements[0]
    if not isinstance(p, Shard):
        return Decision(non_shard_out(placements), attrs)
    dim = _out_dim(p.dim, len(shapes[0]), len(attrs["shape"]))
    local = list(attrs["shape"])
    local[dim] = -1
    return Decision(Shard(dim, p.sizes), dict(attrs, shape=tuple(local)))


def rule_getitem(op, placements, shapes, attrs, out_ndim):
    p = placements[0]
    if not isinstance(p, Shard):
        return Decision(non_shard_out(placements), attrs)
    index = attrs["index"]
    items = list(index) if isinstance(index, tuple) else [index]
    if any(isinstance(i, (np.ndarray, list)) for i in items):
        fail(op, placements, "advanced (array) indexing of a sharded tensor")
    ndim = len(shapes[0])
    used = sum(1 for i in items if i is not None and i is not Ellipsis)
    if Ellipsis in items:
        k = items.index(Ellipsis)
        items = items[:k] + [slice(None)] * (ndim - used) + items[k + 1:]
    else:
        items = items + [slice(None)] * (ndim - used)
    in_dim, out_dim = 0, 0
    for it in items:
        if it is None:
            out_dim += 1
            continue
        if in_dim == p.dim:
            if not (isinstance(it, slice) and it == slice(None)):
                fail(op, placements, f"indexing along the sharded dim {p.dim} with {it!r}")
            return Decision(Shard(out_dim, p.sizes), attrs)
        if not isinstance(it, (int, np.integer)):
            out_dim += 1
        in_dim += 1
    return Decision(Shard(out_dim, p.sizes), attrs)


def _same_shards(op, placements):
    shards = _shards(placements)
    if shards and (len(shards) != len(placements)
                   or len({(p.dim, p.sizes) for p in shards}) != 1):
        fail(op, placements, "all operands must be sharded the same way")
    return shards[0] if shards else None


def rule_cat(op, placements, shapes, attrs, out_ndim):
    p = _same_shards(op, placements)
    if p is None:
        return Decision(non_shard_out(placements), attrs)
    if attrs.get("dim", 0) % len(shapes[0]) == p.dim:
        fail(op, placements, "concatenating along the sharded dim")
    return Decision(p, attrs)


def rule_stack(op, placements, shapes, attrs, out_ndim):
    p = _same_shards(op, placements)
    if p is None:
        return Decision(non_shard_out(placements), attrs)
    d = attrs.get("dim", 0) % (len(shapes[0]) + 1)
    return Decision(Shard(p.dim + (d <= p.dim), p.sizes), attrs)


def rule_identity(op, placements, shapes, attrs, out_ndim):
    return Decision(placements[0], attrs)


def _expect(op, placements, kind, why):
    """Fail unless the input's placement is a ``kind`` (``why`` says what the op does)."""
    if not isinstance(placements[0], kind):
        fail(op, placements, why)


def rule_allreduce(op, placements, shapes, attrs, out_ndim):
    _expect(op, placements, Partial, "only a Partial value is all-reduced")
    return Decision(REPLICATE, attrs)


def _sharded_along_dim(op, placements, shapes, attrs, doing):
    """The input's placement, which must shard it along ``attrs["dim"]``."""
    p = placements[0]
    if not (isinstance(p, Shard) and p.dim == attrs["dim"] % len(shapes[0])):
        fail(op, placements, f"{doing} a value sharded along dim {attrs['dim']}")
    return p


def rule_allgather(op, placements, shapes, attrs, out_ndim):
    p = _sharded_along_dim(op, placements, shapes, attrs, "gathers")
    # Inferred with a one-rank communicator the output would be the local shard: the
    # gathered value has the input's global shape.
    return Decision(REPLICATE, dict(attrs, sizes=list(p.sizes)), shape=tuple(shapes[0]))


def rule_reduce_scatter(op, placements, shapes, attrs, out_ndim):
    _expect(op, placements, Partial, "scatters a Partial value")
    return Decision(Shard(attrs["dim"] % len(shapes[0]), tuple(attrs["sizes"])), attrs)


def rule_shard_rows(op, placements, shapes, attrs, out_ndim):
    _expect(op, placements, Replicate, "only a Replicate value is split into shards")
    return Decision(Shard(attrs["dim"] % len(shapes[0]), tuple(attrs["sizes"])), attrs)


def rule_unshard_rows(op, placements, shapes, attrs, out_ndim):
    p = _sharded_along_dim(op, placements, shapes, attrs, "places rows of")
    return Decision(PARTIAL, dict(attrs, sizes=list(p.sizes)))


def rule_to_partial(op, placements, shapes, attrs, out_ndim):
    _expect(op, placements, Replicate, "only a Replicate value is turned into a Partial one")
    return Decision(PARTIAL, attrs)


def rule_like(op, placements, shapes, attrs, out_ndim):
    p = placements[0]
    return Decision(p if isinstance(p, Shard) else REPLICATE, attrs)


def rule_replicate_only(op, placements, shapes, attrs, out_ndim):
    if any(isinstance(p, Shard) for p in placements if p is not None):
        fail(op, placements, "this op needs replicated operands")
    return Decision(non_shard_out(placements), attrs)


def propagate(op, placements, shapes, attrs, out_ndim):
    """Apply ``op``'s placement rule (its ``defop``'s ``placement``; see module docstring).

    Example: ``propagate(get_op("exp"), [Shard(0, (2, 3))], [(5, 4)], {}, 2).out == Shard(0)``.
    """
    if op.placement is None:
        raise PlacementError(f"{op.name}: no placement rule is defined")
    return op.placement(op.name, placements, shapes, attrs, out_ndim)


def cotangent(p):
    """Placement of the gradient of a value placed ``p`` on the workers.

    A shard's gradient is sharded alike; a replicated value's gradient is a sum of
    per-worker terms (Partial); a Partial value's gradient is the same on every worker.
    """
    if isinstance(p, Shard):
        return p
    return PARTIAL if isinstance(p, Replicate) else REPLICATE


def global_count(shape, dim):
    return math.prod(shape[d] for d in reduced_axes(dim, len(shape)))
