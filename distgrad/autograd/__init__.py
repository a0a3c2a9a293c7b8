"""``distgrad.autograd``: Variable, Function, backward, grad, gradcheck, no_grad.

``distgrad.autograd.engine`` is the backward engine (``distgrad/engine.py``, a layer
below the tensors); importing this package installs ``backward`` as what
``Tensor.backward`` runs.
"""
from .. import engine, tensor
from ..engine import enable_grad, is_grad_enabled, no_grad, run_backward, set_grad_enabled  # noqa: F401
from ..tensor import Variable
from .entry import backward, grad
from .function import Function, FunctionCtx
from .gradcheck import GradcheckError, gradcheck

tensor.set_backward(backward)

__all__ = ["Variable", "Function", "FunctionCtx", "backward", "grad", "gradcheck", "GradcheckError",
           "no_grad", "enable_grad", "set_grad_enabled", "is_grad_enabled", "engine"]
