"""``Parameter``: the tensor class a ``Module`` registers, below ``nn`` so that files can
name it (``dg.save`` / ``dg.load``) without importing the layers. ``dg.nn.Parameter`` is
this class.

Example: ``nn.Parameter(dg.randn(3, 4)).requires_grad`` is True.
"""
import numpy as np

from .tensor import Variable


class Parameter(Variable):
    """A Variable that a ``Module`` registers as a parameter (``requires_grad=True``).

    Example::

        w = nn.Parameter(dg.randn(3, 4))
        w.requires_grad      # True
    """

    def __init__(self, data=None, requires_grad=True):
        if data is None:
            data = np.zeros(0, dtype=np.float32)
        super().__init__(data, requires_grad=requires_grad)

    def __repr__(self):
        return "Parameter containing:\n" + repr(self.data)
