"""``dg.optim``: SGD, Adam, AdamW, Adadelta and learning-rate schedulers with PyTorch's signatures.

Example::

    opt = dg.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    opt.zero_grad(); loss.backward(); opt.step()
"""
from . import lr_scheduler  # noqa: F401
from .adadelta import Adadelta  # noqa: F401
from .adam import Adam, AdamW  # noqa: F401
from .optimizer import Optimizer  # noqa: F401
from .sgd import SGD  # noqa: F401
from ..compat import missing as _missing


def __getattr__(name):
    raise _missing("torch.optim", name)       # a PyTorch name we lack: say so, and what to use
