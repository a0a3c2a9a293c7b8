"""Argument forms that ``nn.functional`` and the layers in ``nn.modules`` both accept.

Example: ``pair(3)`` is ``(3, 3)``; ``legacy_reduction(None, False, "mean")`` is ``"none"``.
"""
import warnings


def pair(v, name="value"):
    """An int or a pair of ints as a pair (a kernel size, a stride, a padding)."""
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ValueError(f"{name} must be an int or a pair, got {v!r}")
        return (int(v[0]), int(v[1]))
    return (int(v), int(v))


def legacy_reduction(size_average, reduce, reduction):
    """The ``reduction`` that PyTorch's deprecated ``size_average`` / ``reduce`` mean (with
    its warning, pointed at the loss's caller); ``reduction`` itself when neither is given."""
    if size_average is None and reduce is None:
        return reduction
    warnings.warn("size_average and reduce args will be deprecated, please use "
                  "reduction='sum' (or 'mean', 'none') instead.", UserWarning, stacklevel=3)
    if reduce is False:
        return "none"
    return "sum" if size_average is False else "mean"
