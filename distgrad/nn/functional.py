"""``dg.nn.functional``: the stateless functions behind the layers, named as in PyTorch.

Example::

    import distgrad.nn.functional as F
    loss = F.cross_entropy(F.linear(x, w, b), target)
"""
import warnings

import numpy as np

from .. import _backend, random
from ..autograd import engine
from ..compat import missing as _missing
from ..factories import where
from ..tensor import Tensor, apply_op, constant_like
from .arguments import legacy_reduction, pair
from .module import InputShapeError, check_not_foreign_array


def _shape(t):
    return tuple(t.shape)


# ---------------------------------------------------------------- activations

def relu(input, inplace=False):
    """max(x, 0); ``inplace=True`` writes it into ``input`` (as PyTorch). Example: ``F.relu(x)``."""
    return input.relu_() if inplace else input.relu()


def leaky_relu(input, negative_slope=0.01, inplace=False):
    """x where x > 0, else slope * x. Example: ``F.leaky_relu(x, 0.2)``."""
    if inplace:
        # x times a constant factor (1 or slope, from x's sign): the same values and the
        # same gradient as the out-of-place form, written into x by one in-place multiply.
        return input.mul_(where(input > 0, 1.0, negative_slope).to(input.dtype))
    return where(input > 0, input, input * negative_slope)


def hardtanh(input, min_val=-1.0, max_val=1.0, inplace=False):
    """x clamped to [min_val, max_val]; gradient 1 strictly inside. Example: ``F.hardtanh(x)``."""
    attrs = {"min_val": float(min_val), "max_val": float(max_val)}
    return input.apply_("hardtanh", **attrs) if inplace else input.apply("hardtanh", **attrs)


def sigmoid(input):
    """1 / (1 + exp(-x)), stable for large |x|. Example: ``F.sigmoid(x)``."""
    return input.sigmoid()


def tanh(input):
    """Hyperbolic tangent. Example: ``F.tanh(x)``."""
    return input.tanh()


def softmax(input, dim=None):
    """exp(x) / sum(exp(x)) along ``dim`` (stable). Example: ``F.softmax(x, dim=1)``."""
    return input.softmax(_default_dim(input, dim))


def log_softmax(input, dim=None):
    """log(softmax(x)), computed stably (no overflow for logits of 1e4). Example: ``F.log_softmax(x, 1)``."""
    return input.log_softmax(_default_dim(input, dim))


def _default_dim(input, dim):
    if dim is None:
        # PyTorch's legacy implicit choice: dim 1 unless the input has 0, 1 or 3 dims.
        dim = 0 if input.ndim in (0, 1, 3) else 1
    return dim


# ---------------------------------------------------------------- linear and conv

def linear(input, weight, bias=None):
    """x @ weight.T + bias in one op. Example: ``F.linear(x, w, b)`` with w of shape (out, in)."""
    if not isinstance(input, Tensor):
        check_not_foreign_array(input, "linear: input")
    in_shape = input.store.shape
    if not in_shape or in_shape[-1] != weight.store.shape[1]:
        raise InputShapeError(f"expected input of shape (*, {weight.shape[1]}), got {_shape(input)}")
    return apply_op("linear", input, weight, bias)


# The checked, normalized attrs of a layer call (conv2d, pooling), by its op, input shapes
# and raw arguments: a model calls each layer with the same ones every step, and the
# checks and pair() conversions cost more than recording the op. Only calls that passed
# the checks are kept; an unhashable argument (a list) is checked every time.
_ATTRS = {}


def _memo_attrs(key, make):
    """``make()`` (the attrs dict, or its exception), memoized under ``key``."""
    try:
        attrs = _ATTRS.get(key)
    except TypeError:             # an unhashable argument
        return make()
    if attrs is None:
        attrs = make()
        if len(_ATTRS) >= 1024:
            _ATTRS.clear()
        _ATTRS[key] = attrs
    return attrs


def _shape_key(t):
    """A batched (4-D) tensor's shape, for a memo key; None for anything else (not memoized)."""
    if isinstance(t, Tensor):
        shape = t.store.shape
        if len(shape) == 4:
            return shape
    return None


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """2-D convolution (cross-correlation) over NCHW input, via im2col and one matmul.

    Example::

        y = F.conv2d(x, w, b, stride=1, padding=2)   # x (N, C, H, W), w (O, C/groups, kh, kw)
    """
    shape = _shape_key(input)
    if shape is not None and isinstance(weight, Tensor):
        key = ("conv2d", shape, weight.store.shape, stride, padding, dilation, groups)
        attrs = _memo_attrs(key, lambda: _conv2d_attrs(input, weight, stride, padding, dilation,
                                                       groups))
        return apply_op("conv2d", input, weight, bias, **attrs)
    unbatched = input.ndim == 3
    if unbatched:
        input = input.unsqueeze(0)
    out = apply_op("conv2d", input, weight, bias,
                   **_conv2d_attrs(input, weight, stride, padding, dilation, groups, unbatched))
    return out.squeeze(0) if unbatched else out


def _conv2d_attrs(input, weight, stride, padding, dilation, groups, unbatched=False):
    """conv2d's checked attrs for a batched ``input``."""
    c_in = weight.shape[1] * groups
    if input.ndim != 4 or input.shape[1] != c_in:
        raise InputShapeError(f"expected input of shape (N, {c_in}, H, W), got "
                              f"{_shape(input if not unbatched else input[0])}")
    stride, dilation = pair(stride, "stride"), pair(dilation, "dilation")
    padding = _conv_padding(padding, weight.shape[-2:], stride, dilation)
    kh, kw = weight.shape[-2:]
    for n, k, p, d in zip(input.shape[-2:], (kh, kw), padding, dilation):
        if n + 2 * p < d * (k - 1) + 1:
            raise InputShapeError(f"input of shape {_shape(input)} (padded by {padding}) is smaller "
                                  f"than the kernel {(kh, kw)} (dilation {dilation})")
    return dict(stride=stride, padding=padding, dilation=dilation, groups=int(groups))


def _conv_padding(padding, kernel, stride, dilation):
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        if stride != (1, 1):
            raise ValueError("padding='same' is not supported for strided convolutions")
        total = [d * (k - 1) for k, d in zip(kernel, dilation)]
        if any(t % 2 for t in total):
            raise NotImplementedError("padding='same' with an even kernel needs asymmetric padding")
        return tuple(t // 2 for t in total)
    return pair(padding, "padding")


def _pool_args(input, kernel_size, stride, padding, dilation=1):
    if input.ndim != 4:
        raise InputShapeError(f"expected a 4-D input (N, C, H, W), got {_shape(input)}")
    k = pair(kernel_size, "kernel_size")
    s = k if stride is None or stride == [] or stride == () else pair(stride, "stride")
    p, d = pair(padding, "padding"), pair(dilation, "dilation")
    if any(pi > ki // 2 for pi, ki in zip(p, k)):
        raise ValueError(f"pad should be at most half of the kernel size, got padding {p} for "
                         f"kernel {k}")
    for n, ki, pi, di in zip(input.shape[-2:], k, p, d):
        if n + 2 * pi < di * (ki - 1) + 1:
            raise InputShapeError(f"input of shape {_shape(input)} is smaller than the pooling "
                                  f"window {k}")
    return k, s, p, d


def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
               return_indices=False):
    """Max over sliding windows (PyTorch's first-maximum gradient rule). Example: ``F.max_pool2d(x, 2)``."""
    if return_indices:
        raise NotImplementedError("max_pool2d(return_indices=True) is not supported")
    shape = _shape_key(input)
    if shape is not None:
        key = ("max_pool2d", shape, kernel_size, stride, padding, dilation, ceil_mode)
        return apply_op("max_pool2d", input, **_memo_attrs(key, lambda: _max_pool2d_attrs(
            input, kernel_size, stride, padding, dilation, ceil_mode)))
    unbatched = input.ndim == 3
    x = input.unsqueeze(0) if unbatched else input
    out = apply_op("max_pool2d", x, **_max_pool2d_attrs(x, kernel_size, stride, padding, dilation,
                                                        ceil_mode))
    return out.squeeze(0) if unbatched else out


def _max_pool2d_attrs(x, kernel_size, stride, padding, dilation, ceil_mode):
    k, s, p, d = _pool_args(x, kernel_size, stride, padding, dilation)
    return dict(kernel_size=k, stride=s, padding=p, dilation=d, ceil_mode=bool(ceil_mode))


def avg_pool2d(input, kernel_size, stride=None, padding=0, ceil_mode=False,
               count_include_pad=True, divisor_override=None):
    """Mean over sliding windows. Example: ``F.avg_pool2d(x, 2)``."""
    if divisor_override is not None:
        raise NotImplementedError("avg_pool2d(divisor_override=...) is not supported")
    shape = _shape_key(input)
    if shape is not None:
        key = ("avg_pool2d", shape, kernel_size, stride, padding, ceil_mode, count_include_pad)
        return apply_op("avg_pool2d", input, **_memo_attrs(key, lambda: _avg_pool2d_attrs(
            input, kernel_size, stride, padding, ceil_mode, count_include_pad)))
    unbatched = input.ndim == 3
    x = input.unsqueeze(0) if unbatched else input
    out = apply_op("avg_pool2d", x, **_avg_pool2d_attrs(x, kernel_size, stride, padding, ceil_mode,
                                                        count_include_pad))
    return out.squeeze(0) if unbatched else out


def _avg_pool2d_attrs(x, kernel_size, stride, padding, ceil_mode, count_include_pad):
    k, s, p, _ = _pool_args(x, kernel_size, stride, padding)
    return dict(kernel_size=k, stride=s, padding=p, ceil_mode=bool(ceil_mode),
                count_include_pad=bool(count_include_pad))


def adaptive_avg_pool2d(input, output_size):
    """Average pooling to a fixed output size (sizes that divide the input evenly).

    Example::

        F.adaptive_avg_pool2d(x, 1)     # global average pooling, (N, C, 1, 1)
    """
    out = pair(output_size, "output_size")
    H, W = input.shape[-2:]
    if out == (1, 1):
        return input.mean(dim=(-2, -1), keepdim=True)
    if H % out[0] or W % out[1]:
        raise NotImplementedError(f"adaptive_avg_pool2d: output size {out} must divide the input "
                                  f"size {(H, W)}")
    k = (H // out[0], W // out[1])
    return avg_pool2d(input, k, k)


# ---------------------------------------------------------------- regularisation and normalisation

def dropout(input, p=0.5, training=True, inplace=False):
    """Zero elements with probability p and scale the rest by 1/(1-p) (training only).

    Example::

        h = F.dropout(h, 0.2, training=model.training)
    """
    return _dropout(input, p, training, tuple(input.shape), inplace)


def dropout2d(input, p=0.5, training=True, inplace=False):
    """Zero whole channels of (N, C, H, W) or (C, H, W) input with probability p; scale the
    rest by 1/(1-p) (training only).

    Example::

        h = F.dropout2d(F.relu(conv(x)), 0.2, training=model.training)
    """
    if input.ndim not in (3, 4):
        raise InputShapeError(f"dropout2d: expected (N, C, H, W) or (C, H, W) input, got "
                              f"{_shape(input)}")
    return _dropout(input, p, training, tuple(input.shape[:-2]) + (1, 1), inplace)


def _dropout(input, p, training, mask_shape, inplace=False):
    """Multiply by a mask of ``mask_shape`` (broadcast over the input) of 0 or 1/(1-p)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if not training or p == 0.0:
        return input
    scale = 0.0 if p == 1.0 else 1.0 / (1.0 - p)
    # One mask multiply: mask values are 0 or 1/(1-p), drawn from the global generator on
    # the driver, so a sharded run drops exactly the elements a single process would.
    mask = ((random.uniform(mask_shape) >= p) * scale).astype(input.dtype)
    mask = constant_like(input, mask)
    return input.mul_(mask) if inplace else input * mask


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5):
    """Normalise per channel (dim 1) with batch statistics (training) or running ones.

    In training the running statistics are updated in place with tensor ops.

    Example::

        y = F.batch_norm(x, rm, rv, w, b, training=True)
    """
    C = input.shape[1]
    dims = (0,) + tuple(range(2, input.ndim))
    bshape = (1, C) + (1,) * (input.ndim - 2)
    if training:
        n = input.numel() // C
        if n <= 1:
            raise InputShapeError(f"expected more than 1 value per channel when training, got "
                                  f"input of shape {_shape(input)}")
        mean = input.mean(dim=dims, keepdim=True)
        xc = input - mean
        var = (xc * xc).mean(dim=dims, keepdim=True)
        if running_mean is not None:
            with engine.no_grad():
                m = momentum
                running_mean.axpby_(mean.detach().reshape(C), a=1 - m, b=m)
                running_var.axpby_(var.detach().reshape(C), a=1 - m, b=m * n / (n - 1))
    else:
        xc = input - running_mean.reshape(bshape)
        var = running_var.reshape(bshape)
    out = xc / (var + eps).sqrt()
    if weight is not None:
        out = out * weight.reshape(bshape)
    if bias is not None:
        out = out + bias.reshape(bshape)
    return out


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """Normalise over the trailing ``normalized_shape`` dims. Example: ``F.layer_norm(x, (16,))``."""
    normalized_shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    k = len(normalized_shape)
    if tuple(input.shape[input.ndim - k:]) != normalized_shape or input.ndim < k:
        raise InputShapeError(f"expected input of shape (*, {', '.join(map(str, normalized_shape))}), "
                              f"got {_shape(input)}")
    dims = tuple(range(input.ndim - k, input.ndim))
    xc = input - input.mean(dim=dims, keepdim=True)
    var = (xc * xc).mean(dim=dims, keepdim=True)
    out = xc / (var + eps).sqrt()
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out


def embedding(input, weight, padding_idx=None):
    """Rows of ``weight`` picked by integer ``input`` (any shape). Example: ``F.embedding(ids, w)``.

    ``padding_idx``'s row gets no gradient, as in PyTorch.
    """
    if not isinstance(input, Tensor):
        input = Tensor.from_array(np.asarray(input))
    if not np.issubdtype(np.dtype(input.dtype), np.integer):
        raise TypeError(f"embedding: expected an integer index tensor, got {input.dtype}")
    out = weight[input]
    if padding_idx is not None:
        pad = padding_idx % weight.shape[0]
        keep = (input != pad).unsqueeze(-1)
        out = where(keep, out, out.detach())       # no gradient flows from padding positions
    return out


def one_hot(tensor, num_classes=-1):
    """Class indices to 0/1 int64 with a trailing class dim. Example: ``F.one_hot(t, 10)``."""
    a = _backend.to_numpy(tensor.store.array)
    n = int(a.max()) + 1 if num_classes < 0 else num_classes
    return Tensor.from_array(np.eye(n, dtype=np.int64)[a]).to(tensor.device)


# ---------------------------------------------------------------- losses

def _match_target(input, target):
    """A driver-local target beside a batch-sharded input is sharded the same way.

    ``criterion(model(x), y)`` under ``nn.DataParallel`` shards x, not y; each worker
    needs its own rows of y, exactly as if y had come from a sharded loader.
    """
    # A target with history keeps it (sharding a detached copy would drop its gradient).
    if (isinstance(target, Tensor) and input.store.lazy and not target.store.lazy
            and not target.requires_grad):
        p = input.placement
        if getattr(p, "dim", None) == 0 and target.ndim and target.shape[0] == input.shape[0]:
            return input.store.cluster.shard(target, 0, p.sizes)
    return target


def _reduce(loss, reduction):
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def _check_same_shape(input, target, name):
    """Warn, as PyTorch does, when the target will be broadcast; return the target
    (sharded like a sharded input, see ``_match_target``)."""
    if _shape(input) != _shape(target):
        warnings.warn(f"{name}: target size {_shape(target)} differs from input size "
                      f"{_shape(input)}; they will be broadcast", stacklevel=3)
        return target
    return _match_target(input, target)


def mse_loss(input, target, size_average=None, reduce=None, reduction="mean"):
    """Mean squared error. Example: ``F.mse_loss(pred, y)``."""
    reduction = legacy_reduction(size_average, reduce, reduction)
    target = _check_same_shape(input, target, "mse_loss")
    d = input - target
    return _reduce(d * d, reduction)


def l1_loss(input, target, size_average=None, reduce=None, reduction="mean"):
    """Mean absolute error. Example: ``F.l1_loss(pred, y)``."""
    reduction = legacy_reduction(size_average, reduce, reduction)
    target = _check_same_shape(input, target, "l1_loss")
    return _reduce((input - target).abs(), reduction)


def smooth_l1_loss(input, target, size_average=None, reduce=None, reduction="mean", beta=1.0):
    """Huber-like loss: 0.5 d^2 / beta where |d| < beta, |d| - 0.5 beta elsewhere.

    Example: ``F.smooth_l1_loss(pred, y, beta=0.5)``.
    """
    reduction = legacy_reduction(size_average, reduce, reduction)
    if beta < 0:
        raise ValueError(f"smooth_l1_loss: beta must be non-negative, got {beta}")
    target = _check_same_shape(input, target, "smooth_l1_loss")
    d = input - target
    ad = d.abs()
    if beta == 0:
        return _reduce(ad, reduction)
    return _reduce(where(ad < beta, d * d * (0.5 / beta), ad - 0.5 * beta), reduction)


def _check_class_target(input, target, who):
    if not isinstance(target, Tensor):
        target = Tensor.from_array(np.asarray(target))
    target = _match_target(input, target)
    if not issubclass(np.dtype(target.dtype).type, np.integer):     # np.issubdtype, in C
        raise TypeError(f"{who}: expected class indices of an integer dtype as target, got "
                        f"{target.dtype} (use a LongTensor)")
    expect = (input.shape[0],) + tuple(input.shape[2:]) if input.ndim >= 2 else ()
    if input.ndim == 0 or _shape(target) != expect:
        raise InputShapeError(f"{who}: input of shape {_shape(input)} needs a target of shape "
                              f"{expect}, got {_shape(target)}")
    return target


def nll_loss(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
             reduction="mean"):
    """Negative log-likelihood of class indices; input (N, C, ...) holds log-probabilities.

    Example::

        loss = F.nll_loss(F.log_softmax(logits, 1), target)
    """
    reduction = legacy_reduction(size_average, reduce, reduction)
    if input.ndim == 1:                         # unbatched (C,) with a scalar target
        target = target if isinstance(target, Tensor) else Tensor.from_array(np.asarray(target))
        out = nll_loss(input.unsqueeze(0), target.reshape(1), weight, ignore_index=ignore_index,
                       reduction=reduction)
        return out.reshape(()) if reduction == "none" else out
    return _class_index_loss("nll_loss", input, target, weight, ignore_index, reduction)


def _class_index_loss(op, input, target, weight, ignore_index, reduction):
    """Apply ``nll_loss`` or ``cross_entropy`` (the fused op) to class-index targets."""
    target = _check_class_target(input, target, op)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    attrs = dict(ignore_index=int(ignore_index))
    if reduction == "mean" and input.store.lazy:
        # Distributed: the divisor (the weight of the targets not ignored) is a global sum
        # (nll_total_weight all-reduces it). Each worker divides its own sum by it: the
        # loss is Partial, so its backward needs no collective.
        total_weight = apply_op("nll_total_weight", target, weight, **attrs)
        return apply_op(op, input, target, weight, total_weight, reduction="mean", **attrs)
    return apply_op(op, input, target, weight, reduction=reduction, **attrs)


def cross_entropy(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
                  reduction="mean", label_smoothing=0.0):
    """log_softmax over dim 1, then nll_loss: stable for any logits (1e4 gives finite values).

    ``target`` holds class indices (N, ...) or class probabilities (same shape as input).

    Example::

        loss = F.cross_entropy(model(x), y, ignore_index=-1, reduction="sum")
    """
    reduction = legacy_reduction(size_average, reduce, reduction)
    if input.ndim == 1:
        input, target = input.unsqueeze(0), (target.reshape(1) if isinstance(target, Tensor)
                                             and target.ndim == 0 else target)
        if isinstance(target, Tensor) and target.is_floating_point():
            target = target.unsqueeze(0)
        out = cross_entropy(input, target, weight, ignore_index=ignore_index, reduction=reduction,
                            label_smoothing=label_smoothing)
        return out.reshape(()) if reduction == "none" else out
    if not label_smoothing and not (isinstance(target, Tensor) and target.is_floating_point()):
        # The common case, one fused op each way (PyTorch fuses the backward the same way).
        return _class_index_loss("cross_entropy", input, target, weight, ignore_index, reduction)
    logp = input.log_softmax(1)
    C = input.shape[1]
    if isinstance(target, Tensor) and target.is_floating_point():
        # Class probabilities.
        if _shape(target) != _shape(input):
            raise InputShapeError(f"cross_entropy: probability target of shape {_shape(target)} "
                                  f"must match input {_shape(input)}")
        if label_smoothing:
            target = target * (1 - label_smoothing) + label_smoothing / C
        lp = logp if weight is None else logp * weight.reshape((1, C) + (1,) * (input.ndim - 2))
        loss = -(lp * target).sum(dim=1)
        return _reduce(loss, reduction)
    nll = nll_loss(logp, target, weight, ignore_index=ignore_index, reduction=reduction)
    if not label_smoothing:
        return nll
    # PyTorch's smoothing term: the (weighted) mean of -log p over classes.
    target = _check_class_target(input, target, "cross_entropy")
    lp = logp if weight is None else logp * weight.reshape((1, C) + (1,) * (input.ndim - 2))
    valid = (target != ignore_index)
    smooth = -(lp.sum(dim=1)) * valid
    if reduction == "mean":
        denom = valid.sum() if weight is None else where(valid, weight[target * valid], 0).sum()
        smooth = smooth.sum() / denom.astype(input.dtype)
    else:
        smooth = _reduce(smooth, reduction)
    return nll * (1 - label_smoothing) + smooth * (label_smoothing / C)


def binary_cross_entropy(input, target, weight=None, size_average=None, reduce=None,
                         reduction="mean"):
    """BCE on probabilities, log clamped at -100 as in PyTorch. Example: ``F.binary_cross_entropy(p, y)``."""
    reduction = legacy_reduction(size_average, reduce, reduction)
    target = _check_same_shape(input, target, "binary_cross_entropy")
    loss = -(target * input.log().clamp(min=-100) + (1 - target) * (1 - input).log().clamp(min=-100))
    if weight is not None:
        loss = loss * weight
    return _reduce(loss, reduction)


def binary_cross_entropy_with_logits(input, target, weight=None, size_average=None, reduce=None,
                                     reduction="mean", pos_weight=None):
    """Sigmoid + BCE in the stable form max(x,0) - x*y + log(1+exp(-|x|)).

    Example::

        loss = F.binary_cross_entropy_with_logits(logits, y)
    """
    reduction = legacy_reduction(size_average, reduce, reduction)
    target = _check_same_shape(input, target, "binary_cross_entropy_with_logits")
    softplus_neg = (1 + (-input.abs()).exp()).log() + (-input).relu()     # log(1 + exp(-x))
    if pos_weight is None:
        loss = (1 - target) * input + softplus_neg
    else:
        lw = 1 + (pos_weight - 1) * target
        loss = (1 - target) * input + lw * softplus_neg
    if weight is not None:
        loss = loss * weight
    return _reduce(loss, reduction)


def __getattr__(name):
    raise _missing("torch.nn.functional", name)   # a PyTorch name we lack: say so, and what to use
