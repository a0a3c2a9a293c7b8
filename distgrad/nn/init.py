"""Weight initialisations with PyTorch's formulas (``dg.nn.init``).

Each writes into the tensor in place under ``no_grad`` and returns it.

Example::

    w = nn.Parameter(dg.empty(64, 32))
    nn.init.kaiming_uniform_(w, a=math.sqrt(5))
"""
import math

from ..autograd import engine


def calculate_gain(nonlinearity, param=None):
    """The recommended gain for a nonlinearity. Example: ``calculate_gain("relu")`` is sqrt(2)."""
    linear = ("linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
              "conv_transpose3d", "sigmoid")
    if nonlinearity in linear:
        return 1.0
    if nonlinearity == "tanh":
        return 5.0 / 3
    if nonlinearity == "relu":
        return math.sqrt(2.0)
    if nonlinearity == "leaky_relu":
        slope = 0.01 if param is None else float(param)
        return math.sqrt(2.0 / (1 + slope ** 2))
    if nonlinearity == "selu":
        return 3.0 / 4
    raise ValueError(f"unsupported nonlinearity {nonlinearity!r}")


def _calculate_fan_in_and_fan_out(tensor):
    if tensor.ndim < 2:
        raise ValueError("fan in and fan out can not be computed for a tensor with fewer than "
                         f"2 dimensions (shape {tuple(tensor.shape)})")
    receptive = 1
    for s in tuple(tensor.shape)[2:]:
        receptive *= s
    return tensor.shape[1] * receptive, tensor.shape[0] * receptive


def _fan(tensor, mode):
    fan_in, fan_out = _calculate_fan_in_and_fan_out(tensor)
    if mode not in ("fan_in", "fan_out"):
        raise ValueError(f"mode must be 'fan_in' or 'fan_out', got {mode!r}")
    return fan_in if mode == "fan_in" else fan_out


def uniform_(tensor, a=0.0, b=1.0):
    """Fill with U(a, b). Example: ``nn.init.uniform_(w, -0.1, 0.1)``."""
    with engine.no_grad():
        return tensor.uniform_(a, b)


def normal_(tensor, mean=0.0, std=1.0):
    """Fill with N(mean, std^2). Example: ``nn.init.normal_(w, std=0.02)``."""
    with engine.no_grad():
        return tensor.normal_(mean, std)


def constant_(tensor, val):
    """Fill with a constant. Example: ``nn.init.constant_(b, 0.1)``."""
    with engine.no_grad():
        return tensor.fill_(val)


def zeros_(tensor):
    """Fill with 0. Example: ``nn.init.zeros_(layer.bias)``."""
    return constant_(tensor, 0.0)


def ones_(tensor):
    """Fill with 1. Example: ``nn.init.ones_(norm.weight)``."""
    return constant_(tensor, 1.0)


def xavier_uniform_(tensor, gain=1.0):
    """Glorot uniform: U(-b, b), b = gain*sqrt(6/(fan_in+fan_out)). Example: ``xavier_uniform_(w)``."""
    fan_in, fan_out = _calculate_fan_in_and_fan_out(tensor)
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    return uniform_(tensor, -bound, bound)


def xavier_normal_(tensor, gain=1.0):
    """Glorot normal: N(0, gain^2 * 2/(fan_in+fan_out)). Example: ``xavier_normal_(w)``."""
    fan_in, fan_out = _calculate_fan_in_and_fan_out(tensor)
    return normal_(tensor, 0.0, gain * math.sqrt(2.0 / (fan_in + fan_out)))


def kaiming_uniform_(tensor, a=0.0, mode="fan_in", nonlinearity="leaky_relu"):
    """He uniform (``a=sqrt(5)``: Linear/Conv's default). Example: ``kaiming_uniform_(w, a=2.24)``."""
    std = calculate_gain(nonlinearity, a) / math.sqrt(_fan(tensor, mode))
    bound = math.sqrt(3.0) * std
    return uniform_(tensor, -bound, bound)


def kaiming_normal_(tensor, a=0.0, mode="fan_in", nonlinearity="leaky_relu"):
    """He normal. Example: ``kaiming_normal_(w, nonlinearity="relu")``."""
    std = calculate_gain(nonlinearity, a) / math.sqrt(_fan(tensor, mode))
    return normal_(tensor, 0.0, std)
