"""Matrix products: matmul, and linear (x @ w.T + b) with its weight-gradient op."""
from .. import placement as P
from .registry import LINEAR_EACH, defop, unbroadcast


def _mm_operands(g, a, b):
    """Promote 1-D operands of matmul to matrices, as matmul itself does."""
    A = a.unsqueeze(0) if a.ndim == 1 else a
    B = b.unsqueeze(-1) if b.ndim == 1 else b
    G = g.unsqueeze(-2) if a.ndim == 1 else g
    G = G.unsqueeze(-1) if b.ndim == 1 else G
    return G, A, B


def _matmul_vjp_a(g, ans, a, b):
    if a.ndim == 1 and b.ndim == 1:
        return g * b
    G, A, B = _mm_operands(g, a, b)
    return unbroadcast(G @ B.mT, A.shape).reshape(a.shape)


def _matmul_vjp_b(g, ans, a, b):
    if a.ndim == 1 and b.ndim == 1:
        return g * a
    G, A, B = _mm_operands(g, a, b)
    return unbroadcast(A.mT @ G, B.shape).reshape(b.shape)


defop("matmul", lambda xp, a, b: xp.matmul(a, b), _matmul_vjp_a, _matmul_vjp_b,
      placement=P.rule_matmul, linear_in=LINEAR_EACH)


# ---------------------------------------------------------------- linear

def _linear(xp, x, w, b=None):
    out = xp.matmul(x, w.T)
    if b is not None:
        out += b
    return out


def _flat2(t, n):
    """``t`` as a matrix with ``n`` columns (no op when it already is one)."""
    return t if t.ndim == 2 else t.reshape(-1, n)


def _column_major(t):
    """Whether tensor ``t`` is stored column-major (nn.Linear's weights are: see there)."""
    store = t._store
    flags = None if store.lazy else getattr(store.array, "flags", None)
    return flags is not None and flags.f_contiguous and not flags.c_contiguous


def _linear_vjp_w(g, ans, x, w, b=None):
    # The gradient in the weight's own layout: the optimizer's in-place updates then run
    # over two arrays of one layout (mixed layouts make numpy stride across rows).
    out_features, in_features = w.shape
    return _flat2(g, out_features).apply("linear_weight_grad", _flat2(x, in_features),
                                         f_order=_column_major(w))


def _linear_vjp_b(g, ans, x, w, b=None):
    return _flat2(g, w.shape[0]).sum(dim=0)


def rule_linear(op, placements, shapes, attrs, out_ndim):
    """x @ w.T + b: only the input may be sharded, and not along its feature dim."""
    px = placements[0]
    if [p for p in placements[1:] if isinstance(p, P.Shard)]:
        P.fail(op, placements, "weight and bias must be replicated")
    if isinstance(px, P.Shard):
        if px.dim == len(shapes[0]) - 1:
            P.fail(op, placements, "the input is sharded along its feature dim")
        return P.Decision(px, attrs)
    return P.Decision(P.non_shard_out(placements), attrs)


def rule_batch_reduce(op, placements, shapes, attrs, out_ndim):
    """Sums over the batch of batch-sharded operands (a weight gradient): Partial."""
    s = [p for p in placements if isinstance(p, P.Shard)]
    if not s:
        return P.Decision(P.non_shard_out(placements), attrs)
    if len(s) != sum(p is not None for p in placements) or any(
            p.dim != 0 or p.sizes != s[0].sizes for p in s):
        P.fail(op, placements, "every operand must be sharded along the batch (dim 0)")
    return P.Decision(P.PARTIAL, attrs)


# y = x @ w.T + b in one op: the MLP hot path pays one dispatch instead of three.
defop("linear", _linear,
      lambda g, ans, x, w, b=None: g @ w,
      _linear_vjp_w, _linear_vjp_b, placement=rule_linear)


def _linear_weight_grad(xp, g, x, f_order=False):
    if not f_order:
        return xp.matmul(g.T, x)
    # (x.T @ g).T written straight into a column-major array that owns its memory (a
    # transposed view would be copied, C-ordered, when it becomes a leaf's .grad).
    out = xp.empty((g.shape[1], x.shape[1]), dtype=xp.result_type(g, x), order="F")
    xp.matmul(x.T, g, out=out.T)
    return out


# g.T @ x for 2-D g (N, out) and x (N, in): the weight gradient of linear, one dispatch
# (no transpose op). Contracting the batch of two batch-sharded operands gives a Partial sum.
defop("linear_weight_grad", _linear_weight_grad,
      lambda gw, ans, g, x, f_order=False: x.apply("linear", gw, None),     # x @ gw.T
      lambda gw, ans, g, x, f_order=False: g @ gw, placement=rule_batch_reduce)
