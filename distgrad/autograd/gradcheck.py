"""Numerical gradient checking by float64 central differences."""
import numpy as np

from .._backend import to_numpy
from ..tensor import Tensor
from .entry import grad as autograd_grad


class GradcheckError(AssertionError):
    pass


def _as_outputs(out):
    return out if isinstance(out, (tuple, list)) else (out,)


def _host(t):
    """A float64 numpy copy (an output may be a view of the input being perturbed)."""
    return np.array(to_numpy(t._store.array), dtype=np.float64, copy=True)


def gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-3, raise_exception=True):
    """Compare ``autograd.grad`` of ``fn`` with central differences, input by input.

    Inputs that require grad should be float64. Returns True, or raises
    ``GradcheckError`` naming the input, the output and the worst element.

    Example::

        x = Variable(dg.randn(3, dtype=dg.float64), requires_grad=True)
        assert gradcheck(lambda x: (x * x).sum(), (x,))
    """
    inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    diff = [x for x in inputs if isinstance(x, Tensor) and x.requires_grad]
    for x in diff:
        if x.dtype != np.float64:
            raise GradcheckError(f"gradcheck needs float64 inputs; got {x.dtype} of shape {tuple(x.shape)}")
    outputs = _as_outputs(fn(*inputs))
    for k, out in enumerate(outputs):
        # An output that does not require grad has a zero analytic Jacobian: still compare
        # it with the numerical one (a VJP that drops a dependence must not pass).
        out_flat = out.numel()
        analytic = [np.zeros((out_flat, x.numel())) for x in diff]
        numeric = [np.zeros((out_flat, x.numel())) for x in diff]
        for j in range(out_flat if out.requires_grad else 0):
            seed = np.zeros(out_flat)
            seed[j] = 1.0
            seed_t = Tensor(seed.reshape(out.shape).astype(out.dtype), device=out.device)
            gs = autograd_grad(_as_outputs(fn(*inputs))[k], diff, grad_outputs=seed_t,
                               allow_unused=True)
            for i, g in enumerate(gs):
                if g is not None:
                    analytic[i][j] = _host(g).ravel()
        for i, x in enumerate(diff):
            arr = x._store.array
            for e in range(arr.size):
                at = np.unravel_index(e, arr.shape)   # in place even if arr is not contiguous
                orig = arr[at].item()
                arr[at] = orig + eps
                plus = _host(_as_outputs(fn(*inputs))[k]).ravel()
                arr[at] = orig - eps
                minus = _host(_as_outputs(fn(*inputs))[k]).ravel()
                arr[at] = orig
                numeric[i][:, e] = (plus - minus) / (2 * eps)
            bad = ~np.isclose(analytic[i], numeric[i], rtol=rtol, atol=atol)
            if bad.any():
                j, e = map(int, np.argwhere(bad)[0])
                msg = (f"gradcheck: Jacobian mismatch for output {k} w.r.t. input {i} (shape "
                       f"{tuple(x.shape)}) at output element {j}, input element {e}: "
                       f"analytic {analytic[i][j, e]:.8g} vs numerical {numeric[i][j, e]:.8g}")
                if raise_exception:
                    raise GradcheckError(msg)
                return False
    return True
