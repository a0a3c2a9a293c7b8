"""Shape and indexing ops: reshape and its kin, expand, indexing and its scatter
transposes, cat and stack, and rows picked by a tensor index (``take_rows``).

The ops whose output may be a view of their input declare ``view=``: how an in-place
write through the view hands its gradient back to the base (``distgrad.views``).
"""
import numpy as np

from .. import _backend, placement as P
from .collective import current
from .registry import LINEAR_ALL, defop, is_basic_index, shape_of, unbroadcast


def _onto_base_by_reshape(base, out, attrs):
    return "reshape", (out,), {"shape": tuple(base.shape)}


def _onto_base_by_transpose(base, out, attrs):
    return "transpose", (out,), attrs


def _onto_base_by_permute(base, out, attrs):
    inverse = tuple(np.argsort([d % out.ndim for d in attrs["dims"]]).tolist())
    return "permute", (out,), {"dims": inverse}


def _onto_base_by_index_put(base, out, attrs):
    return "index_put", (base, out), {"index": attrs["index"]}


def _squeezable(shape, dim):
    # PyTorch ignores a squeeze dim whose size is not 1; numpy raises.
    if dim is None:
        return None
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    return tuple(d for d in dims if shape[d] == 1)


def _expand_shape(shape, sizes):
    lead = len(sizes) - len(shape)
    if lead < 0:
        raise ValueError(f"expand: cannot expand shape {tuple(shape)} to {tuple(sizes)}")
    return tuple(shape[i - lead] if s == -1 else s for i, s in enumerate(sizes))


defop("reshape", lambda xp, x, shape: xp.reshape(x, shape),
      lambda g, ans, x, shape: g.reshape(x.shape),
      placement=P.rule_reshape, linear_in=LINEAR_ALL, view=_onto_base_by_reshape)
defop("transpose", lambda xp, x, dim0, dim1: xp.swapaxes(x, dim0, dim1),
      lambda g, ans, x, dim0, dim1: g.transpose(dim0, dim1),
      placement=P.rule_transpose, linear_in=LINEAR_ALL, view=_onto_base_by_transpose)
defop("permute", lambda xp, x, dims: xp.transpose(x, dims),
      lambda g, ans, x, dims: g.permute(*np.argsort([d % x.ndim for d in dims]).tolist()),
      placement=P.rule_permute, linear_in=LINEAR_ALL, view=_onto_base_by_permute)
defop("squeeze", lambda xp, x, dim=None: xp.squeeze(x, axis=_squeezable(x.shape, dim)),
      lambda g, ans, x, dim=None: g.reshape(x.shape),
      placement=P.rule_squeeze, linear_in=LINEAR_ALL, view=_onto_base_by_reshape)
defop("unsqueeze", lambda xp, x, dim: xp.expand_dims(x, dim),
      lambda g, ans, x, dim: g.reshape(x.shape),
      placement=P.rule_unsqueeze, linear_in=LINEAR_ALL, view=_onto_base_by_reshape)
# numpy's broadcast_to is a read-only view: never written through, so no view= here.
defop("expand", lambda xp, x, shape: xp.broadcast_to(x, _expand_shape(x.shape, shape)),
      lambda g, ans, x, shape: unbroadcast(g, x.shape),
      placement=P.rule_expand, linear_in=LINEAR_ALL)


def _getitem(xp, x, index):
    out = x[index]
    if not isinstance(out, xp.ndarray) and is_basic_index(index):
        # numpy gives a scalar copy for a full integer index: take a 0-d view instead, so
        # that x[0] aliases x as it does in PyTorch.
        out = x[(index if isinstance(index, tuple) else (index,)) + (Ellipsis,)]
    return out


def _scatter_add(xp, g, shape, index):
    """Zeros of ``shape`` with ``g`` added at ``index``; repeated indices accumulate."""
    out = xp.zeros(shape, dtype=g.dtype)
    if is_basic_index(index):
        out[index] = g
    else:
        _backend.add_at(out, index, g)
    return out


defop("getitem", _getitem,
      lambda g, ans, x, index: g.scatter_add_zeros(x.shape, index),
      placement=P.rule_getitem, linear_in=LINEAR_ALL, view=_onto_base_by_index_put)
defop("scatter_add_zeros", _scatter_add,
      lambda gg, ans, g, shape, index: gg[index], placement=P.rule_replicate_only)


def _index_put(xp, x, value, index):
    out = x.copy()
    out[index] = value
    return out


defop("index_put", _index_put,
      lambda g, ans, x, value, index: g.index_put(0, index),
      lambda g, ans, x, value, index: unbroadcast(g[index], shape_of(value)),
      placement=P.rule_replicate_only, inplace=True, snapshot=False)


def _cat_vjp(i, g, ans, *xs, dim=0):
    start = sum(x.shape[dim] for x in xs[:i])
    sl = [slice(None)] * g.ndim
    sl[dim] = slice(start, start + xs[i].shape[dim])
    return g[tuple(sl)]


def _stack_vjp(i, g, ans, *xs, dim=0):
    sl = [slice(None)] * g.ndim
    sl[dim % g.ndim] = i
    return g[tuple(sl)]


defop("cat", lambda xp, *xs, dim=0: xp.concatenate(xs, axis=dim), variadic_vjp=_cat_vjp,
      placement=P.rule_cat, linear_in=LINEAR_ALL)
defop("stack", lambda xp, *xs, dim=0: xp.stack(xs, axis=dim), variadic_vjp=_stack_vjp,
      placement=P.rule_stack, linear_in=LINEAR_ALL)


# ---------------------------------------------------------------- rows picked by index
# For data loading: ``take_rows(x, index)`` is ``x[index]`` along dim 0 with the index as
# a tensor INPUT, so a loader's per-step indices travel as program inputs (the cached
# program is reused).
# On a worker holding rows ``sizes`` of a dim-0 shard, the index holds global row
# numbers of rows this worker owns; ``sizes=()`` means the whole of x is at hand.


def _row_offset(sizes):
    return sum(sizes[:current().rank]) if sizes else 0


def _local_rows(index, sizes, n):
    local = index - _row_offset(sizes) if sizes else index
    if local.size and (int(local.min()) < 0 or int(local.max()) >= n):
        raise IndexError(f"take_rows: row indices {int(index.min())}..{int(index.max())} are "
                         f"not all among the {n} rows held here (from row {_row_offset(sizes)})")
    return local


def _take_rows(xp, x, index, sizes=()):
    return xp.take(x, _local_rows(index, sizes, x.shape[0]), axis=0)


def _put_rows(xp, g, index, rows, sizes=()):
    n = sizes[current().rank] if sizes else rows
    out = xp.zeros((n,) + tuple(g.shape[1:]), dtype=g.dtype)
    _backend.add_at(out, _local_rows(index, sizes, n), g)      # repeated rows accumulate
    return out


def _no_grad_for_indices(*args, **attrs):
    # Row indices are integers: no gradient flows to them.
    return None


def rule_take_rows(op, placements, shapes, attrs, out_ndim):
    """Each worker picks rows of its own shard (or of its whole copy) with its own part of
    a dim-0 sharded index; the result is sharded like the index."""
    px, pi = placements
    if isinstance(px, P.Shard) and px.dim != 0:
        P.fail(op, placements, "the rows are sharded along a dim other than 0")
    if not isinstance(pi, P.Shard):
        if isinstance(px, P.Shard):
            P.fail(op, placements, "each worker needs the indices of its own rows: shard "
                                   "the index like the batch (DataLoader(..., cluster=))")
        return P.Decision(P.non_shard_out(placements), attrs)
    if pi.dim != 0:
        P.fail(op, placements, "the index must be sharded along dim 0")
    sizes = tuple(px.sizes) if isinstance(px, P.Shard) else ()
    return P.Decision(P.Shard(0, pi.sizes), dict(attrs, sizes=sizes))


def rule_put_rows(op, placements, shapes, attrs, out_ndim):
    """take_rows' transpose: a sharded source gets a sharded gradient; a whole copy on
    every worker gets per-worker terms to be summed (Partial)."""
    if not [p for p in placements if isinstance(p, P.Shard)]:
        return P.Decision(P.non_shard_out(placements), attrs)
    if any(not isinstance(p, P.Shard) or p.dim != 0 for p in placements):
        P.fail(op, placements, "gradient and index must both be sharded along dim 0")
    sizes = tuple(attrs.get("sizes") or ())
    return P.Decision(P.Shard(0, sizes) if sizes else P.PARTIAL, attrs)


defop("take_rows", _take_rows,
      lambda g, ans, x, index, sizes=(): g.apply(
          "put_rows", index, rows=sum(sizes) if sizes else x.shape[0], sizes=sizes),
      _no_grad_for_indices, placement=rule_take_rows)
defop("put_rows", _put_rows,
      lambda gg, ans, g, index, rows, sizes=(): gg.apply("take_rows", index, sizes=sizes),
      _no_grad_for_indices, placement=rule_put_rows)
