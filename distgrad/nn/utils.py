"""Gradient utilities: ``clip_grad_norm_`` and ``clip_grad_value_``.

Both work with tensor ops only (no host sync): the total norm stays a tensor, so
on distributed parameters the clipping runs on the workers.
"""
import math

from .. import factories
from ..autograd import engine
from ..tensor import Tensor


def _grads(parameters):
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    return [p.grad for p in parameters if p.grad is not None]


def clip_grad_norm_(parameters, max_norm, norm_type=2.0, error_if_nonfinite=False):
    """Scale gradients in place so their total ``norm_type``-norm is at most ``max_norm``.

    Returns the total norm before clipping, as a tensor.

    Example::

        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
        opt.step()
    """
    grads = _grads(parameters)
    if not grads:
        return factories.tensor(0.0)
    norm_type = float(norm_type)
    with engine.no_grad():
        if norm_type == math.inf:
            norms = [g.detach().abs().amax() for g in grads]
            total = norms[0] if len(norms) == 1 else factories.stack(norms).amax()
        else:
            norms = [g.detach().norm(norm_type) for g in grads]
            total = norms[0] if len(norms) == 1 else factories.stack(norms).norm(norm_type)
        if error_if_nonfinite and not math.isfinite(float(total)):
            raise RuntimeError(f"the total norm of order {norm_type} of the gradients is "
                               "non-finite, so it cannot be clipped")
        # min(1, max_norm / (total + eps)) as a tensor: no branch on data, no sync.
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.data.mul_(coef.astype(g.dtype))
    return total


def clip_grad_value_(parameters, clip_value):
    """Clamp every gradient element into [-clip_value, clip_value] in place.

    Example::

        nn.utils.clip_grad_value_(model.parameters(), 0.5)
    """
    with engine.no_grad():
        for g in _grads(parameters):
            g.data.clamp_(-clip_value, clip_value)
