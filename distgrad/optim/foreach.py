"""Multi-tensor ops for the optimizers (PyTorch's ``torch._foreach_*``): one op over a list
of calls. On a cluster's tensors each is one ``foreach`` instruction for all the calls,
where op by op an update costs the driver an instruction per parameter (issue 13);
elsewhere, or where a call needs more than one instruction, each call runs by itself.
Either way every call computes what the single op computes.

Example::

    sq = foreach("mul", [(g, g) for g in grads])            # [g * g for g in grads]
    foreach_("axpby", bufs, [(g,) for g in grads], a=0.9, b=1.0)   # buf.axpby_(g, 0.9, 1.0)
"""
from ..autograd import engine
from ..ops import get_op
from ..tensor import Tensor, apply_op


def foreach(name, calls, **attrs):
    """``[op(*call, **attrs) for call in calls]`` with grad recording off (an optimizer's
    temporaries).

    Example: ``roots = foreach("sqrt", [(v,) for v in exp_avg_sqs])``.
    """
    out = _record(name, calls, attrs, False)
    return out if out is not None else [apply_op(name, *call, **attrs) for call in calls]


def foreach_(name, targets, others, **attrs):
    """``t.data.<name>_(*o, **attrs)`` for each ``t, o`` of ``targets, others``: in place,
    outside the graph.

    Example: ``foreach_("axpby", params, [(d,) for d in steps], a=1.0, b=-lr)``.
    """
    calls = [(t, *o) for t, o in zip(targets, others)]
    if _record(name, calls, attrs, True) is None:
        for t, o in zip(targets, others):
            getattr(t.data, name + "_")(*o, **attrs)


def _record(name, calls, attrs, inplace):
    """The calls recorded as one instruction on their cluster, or None."""
    if not calls or engine.is_grad_enabled():
        return None
    first = next((x for x in calls[0] if isinstance(x, Tensor)), None)
    if first is None or not first.store.lazy:
        return None
    cluster = first.store.cluster
    out = cluster.recorder.record_foreach(get_op(name), calls, attrs, inplace)
    if out is not None and cluster.recorder.too_long():
        cluster.sync()
    return out
