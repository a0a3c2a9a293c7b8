"""Tensor printing in the classic PyTorch style of the seed tutorial.

    Variable containing:
     4.5000  4.5000
     4.5000  4.5000
    [distgrad.FloatTensor of size 2x2]
"""
import math

import numpy as np

TYPE_NAMES = {
    "float32": "FloatTensor", "float64": "DoubleTensor", "float16": "HalfTensor",
    "bfloat16": "BFloat16Tensor", "int64": "LongTensor", "int32": "IntTensor",
    "int16": "ShortTensor", "int8": "CharTensor", "uint8": "ByteTensor", "bool": "BoolTensor",
}
PRECISION = 4


def type_name(dtype, device):
    prefix = "distgrad.cuda." if str(device).startswith("cuda") else "distgrad."
    return prefix + TYPE_NAMES.get(str(dtype), f"Tensor[{dtype}]")


def parse_type_name(name):
    """``'torch.cuda.DoubleTensor'`` / ``'distgrad.LongTensor'`` -> (numpy dtype, device).

    Example: ``parse_type_name('torch.FloatTensor') == (np.dtype('float32'), 'cpu')``.
    """
    parts = name.split(".")
    device = "cuda" if "cuda" in parts[:-1] else "cpu"
    for dtype, short in TYPE_NAMES.items():
        if short == parts[-1] and dtype != "bfloat16":
            return np.dtype(dtype), device
    raise TypeError(f"invalid type: {name!r}; expected a name such as 'torch.FloatTensor' "
                    f"or 'distgrad.DoubleTensor'")


def _exponent(v):
    return math.floor(math.log10(v)) + 1 if v != 0 else 1


def _number_format(a):
    """A format string for every element, chosen as classic PyTorch did."""
    if a.dtype == np.bool_:
        return "{:>5}"
    if np.issubdtype(a.dtype, np.integer):
        # Digits of the largest magnitude plus one column (a minus sign or a space), as
        # for integer-valued floats.
        width = len(str(max(abs(int(a.min())), abs(int(a.max())))))
        return "{:" + str(width + 1) + "d}"
    finite = np.abs(a[np.isfinite(a)].astype(np.float64))
    if finite.size == 0:
        return "{:>7}"
    exp_min, exp_max = _exponent(finite.min()), _exponent(finite.max())
    if np.all(finite == np.round(finite)):
        if exp_max > PRECISION + 1:
            return "{:11." + str(PRECISION) + "e}"
        return "{:" + str(exp_max + 1) + ".0f}"
    if exp_max - exp_min > PRECISION or exp_max > PRECISION + 1 or exp_max < 0:
        return "{:11." + str(PRECISION) + "e}"
    width = 7 if exp_max == 0 else exp_max + 6
    return "{:" + str(width) + "." + str(PRECISION) + "f}"


def _matrix(a, fmt):
    return "\n".join(" ".join(fmt.format(v) for v in row) for row in a.tolist())


def format_values(a):
    """The value lines of a numpy array (no type footer)."""
    fmt = _number_format(a)
    if a.ndim == 0:
        return fmt.format(a.item())
    if a.ndim == 1:
        return "\n".join(fmt.format(v) for v in a.tolist())
    if a.ndim == 2:
        return _matrix(a, fmt)
    blocks = []
    for idx in np.ndindex(*a.shape[:-2]):
        head = "(" + ",".join(str(i) for i in idx) + ",.,.) = "
        blocks.append(head + "\n" + _matrix(a[idx], fmt))
    return "\n\n".join(blocks)


def format_tensor(a, dtype, device, variable):
    """Full printed form of a tensor whose values are the numpy array ``a``."""
    name = type_name(dtype, device)
    if a.size == 0:
        body = f"[{name} with no elements]"
    else:
        size = "x".join(str(n) for n in a.shape) if a.ndim else "()"
        body = f"{format_values(a)}\n[{name} of size {size}]"
    return "Variable containing:\n" + body if variable else "\n" + body + "\n"
