"""Views and in-place writes through them: the bookkeeping behind ``x[0] += 1``.

A view (an op whose ``defop`` declares ``view=``, and whose output really shares the
input's memory) shares its base's version counter and remembers how it was taken.
After a recorded in-place write through a view, ``rebase`` gives the base the new
history: a node that maps the view's gradient back onto the base, built from the view
op's ``view`` fact; then every other live view of a changed tensor takes its history
from it again. The tensor layer calls the four functions below and nothing else here.

Example::

    y = x.clone(); v = y[0]          # track_view(v, y, ...)
    v.mul_(2)                        # rebase(v): y.grad_fn puts v's gradient into row 0
"""
import weakref

from . import engine
from .ops.registry import get_op


def track_view(result, base, op, attrs, out, source, xp):
    """Record ``result`` as a view of tensor ``base`` if ``op`` made one (``out`` shares
    ``source``'s memory). Example: called by ``apply_op`` for every op with ``view=``."""
    if op.view is None or getattr(out, "base", None) is None or not xp.may_share_memory(out, source):
        return
    result._store.counter = base._store.counter
    result._view_of = (base, op.name, attrs)
    views = base.__dict__.get("_views")
    if views is None:
        views = base._views = weakref.WeakSet()
    views.add(result)          # refreshed if the base's history changes in place


def view_root(t):
    """The tensor whose memory ``t`` is a view of (``t`` itself if it is none).

    Example: ``view_root(x[0].T) is x``.
    """
    while getattr(t, "_view_of", None) is not None:
        t = t._view_of[0]
    return t


def is_view_or_viewed(t):
    """Whether ``t`` is a view or has live views (an in-place write must then ``rebase``).

    Example: ``is_view_or_viewed(x)`` is True once ``v = x[0]`` exists.
    """
    return getattr(t, "_view_of", None) is not None or bool(t.__dict__.get("_views"))


def detach_from_base(t):
    """``t`` got a memory of its own (a write into a read-only view copied it).

    Example: ``detach_from_base(v)`` after replacing ``v._store.array``.
    """
    t._view_of = None


def rebase(view):
    """After a recorded in-place write through ``view``, give its base the new history.

    The base's values already changed (shared memory); its ``grad_fn`` becomes a node
    that puts the view's gradient back into place, as the view op's ``view`` fact says
    (index_put for an indexed view, the inverse reshape/transpose/permute otherwise).
    Repeats up a chain of views; then every other live view of a changed tensor takes
    its history from it again. Example: ``rebase(v)`` after ``v.mul_(2)``.
    """
    changed = [view]
    while getattr(view, "_view_of", None) is not None:
        base, name, attrs = view._view_of
        back, inputs, at = get_op(name).view(base, view, attrs)
        node = engine.make_node(get_op(back), inputs, at, None)   # these VJPs read no values
        if node is None:
            break
        base.grad_fn, base.requires_grad = node, True
        view = base
        changed.append(base)
    _refresh_views(changed)


def _refresh_views(changed):
    """Views of tensors whose history changed in place get a node from the new history."""
    done = set(id(t) for t in changed)
    todo = list(changed)
    while todo:
        t = todo.pop()
        for v in list(t.__dict__.get("_views", ())):
            info = getattr(v, "_view_of", None)
            if id(v) in done or info is None or info[0] is not t:
                continue
            done.add(id(v))
            node = engine.make_node(get_op(info[1]), (t,), info[2], None)
            if node is not None:
                v.grad_fn, v.requires_grad = node, True
            todo.append(v)
