"""``default_collate``: a list of samples -> one batch, as PyTorch builds it."""
import collections.abc

import numpy as np

from ...factories import stack
from ...tensor import Tensor


def default_collate(batch):
    """Stack tensors and numpy arrays along a new dim 0; Python floats become a float64
    tensor and ints an int64 one (as in PyTorch); dicts, tuples and lists are collated
    field by field; strings stay a list.

    Example::

        default_collate([(dg.ones(2), 0), (dg.zeros(2), 1)])    # [2x2 tensor, tensor([0, 1])]
    """
    elem = batch[0]
    if isinstance(elem, Tensor):
        return stack(batch)
    if isinstance(elem, np.ndarray):
        _check_numeric(elem.dtype)
        return Tensor.from_array(np.stack(batch))
    if isinstance(elem, np.generic):
        _check_numeric(elem.dtype)
        return Tensor.from_array(np.asarray(batch))
    if isinstance(elem, bool):
        return Tensor.from_array(np.asarray(batch, dtype=np.bool_))
    if isinstance(elem, float):
        return Tensor.from_array(np.asarray(batch, dtype=np.float64))
    if isinstance(elem, int):
        return Tensor.from_array(np.asarray(batch, dtype=np.int64))
    if isinstance(elem, (str, bytes)):
        return list(batch)
    if isinstance(elem, collections.abc.Mapping):
        return {key: default_collate([d[key] for d in batch]) for key in elem}
    if isinstance(elem, tuple) and hasattr(elem, "_fields"):          # namedtuple
        return type(elem)(*(default_collate(list(s)) for s in zip(*batch)))
    if isinstance(elem, collections.abc.Sequence):
        if any(len(s) != len(elem) for s in batch):
            raise RuntimeError("each element in list of batch should be of equal size")
        return [default_collate(list(s)) for s in zip(*batch)]
    raise TypeError(f"default_collate: batch must contain tensors, numpy arrays, numbers, dicts "
                    f"or lists; found {type(elem).__name__}")


def default_convert(data):
    """Without batching (``batch_size=None``): numpy arrays become tensors, the rest stays.

    Example: ``default_convert(np.ones(3))`` is a tensor.
    """
    if isinstance(data, np.ndarray) and data.dtype.kind in "biuf":
        return Tensor.from_array(data)
    if isinstance(data, collections.abc.Mapping):
        return {k: default_convert(v) for k, v in data.items()}
    if isinstance(data, tuple) and hasattr(data, "_fields"):
        return type(data)(*(default_convert(d) for d in data))
    if isinstance(data, (list, tuple)):
        return type(data)(default_convert(d) for d in data)
    return data


def _check_numeric(dtype):
    if np.dtype(dtype).kind not in "biuf":
        raise TypeError(f"default_collate: batch must contain tensors, numpy arrays, numbers, "
                        f"dicts or lists; found numpy arrays of dtype {dtype}")
