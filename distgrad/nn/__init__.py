"""``dg.nn``: modules, parameters, layers and losses with PyTorch's names.

Example::

    import distgrad.nn as nn
    model = nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))
    loss = nn.CrossEntropyLoss()(model(x), y)
"""
from . import functional, init, parallel, utils  # noqa: F401
from .module import (InputShapeError, Module, ModuleDict, ModuleList, Parameter,  # noqa: F401
                     Sequential)
from .modules import (AdaptiveAvgPool2d, AvgPool2d, BatchNorm1d, BatchNorm2d, BCELoss,  # noqa: F401
                      BCEWithLogitsLoss, Conv2d, CrossEntropyLoss, Dropout, Dropout2d, Embedding,
                      Flatten, Identity, L1Loss, LayerNorm, LeakyReLU, Linear, LogSoftmax,
                      MaxPool2d, MSELoss, NLLLoss, ReLU, Sigmoid, SmoothL1Loss, Softmax, Tanh)
from .parallel import DataParallel  # noqa: F401
from ..compat import missing as _missing


def __getattr__(name):
    raise _missing("torch.nn", name)       # a PyTorch name we lack: say so, and what to use
