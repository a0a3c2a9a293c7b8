"""Layers and losses (``dg.nn.Linear``, ``dg.nn.Conv2d``, ...), as thin modules over ``functional``.

Example::

    model = nn.Sequential(nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(6 * 12 * 12, 10))
"""
import math

from .. import engine, factories
from . import functional as F
from . import init
from .arguments import legacy_reduction, pair
from .module import Module, Parameter


def _empty(*shape, device=None, dtype=None):
    return factories.empty(*shape, dtype=dtype, device=device)


class Identity(Module):
    """Returns its input. Example: ``nn.Identity()(x) is x``."""

    def forward(self, x):
        return x


class Linear(Module):
    """y = x @ weight.T + bias; PyTorch's default init (kaiming_uniform a=sqrt(5)).

    Example::

        fc = nn.Linear(784, 10); y = fc(dg.randn(64, 784))
    """

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        # Stored column-major (a transposed view of an (in, out) array): x @ weight.T is
        # then a plain GEMM, which OpenBLAS runs ~10% faster than the transposed one, and
        # the weight gradient comes in the same layout (distgrad/ops/linalg.py _column_major). Values,
        # shape and indexing are as in PyTorch; only the strides differ.
        self.weight = Parameter(_empty(in_features, out_features, device=device, dtype=dtype).t())
        self.bias = Parameter(_empty(out_features, device=device, dtype=dtype)) if bias else None
        if not bias:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self):
        init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight.shape[1]
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            init.uniform_(self.bias, -bound, bound)

    def forward(self, x):
        weight, bias = self._weight_and_bias(Linear)
        return F.linear(x, weight, bias)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")


class Conv2d(Module):
    """2-D convolution over NCHW input (stride, padding, dilation, groups).

    Example::

        conv = nn.Conv2d(1, 6, 5); y = conv(dg.randn(8, 1, 28, 28))    # (8, 6, 24, 24)
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, padding_mode="zeros", device=None, dtype=None):
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels ({in_channels}) and out_channels ({out_channels}) "
                             f"must be divisible by groups ({groups})")
        if padding_mode != "zeros":
            raise NotImplementedError(f"padding_mode={padding_mode!r}: only 'zeros' is supported")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = pair(kernel_size, "kernel_size")
        self.stride, self.dilation = pair(stride), pair(dilation)
        self.padding = padding if isinstance(padding, str) else pair(padding)
        self.groups = int(groups)
        self.weight = Parameter(_empty(out_channels, in_channels // groups, *self.kernel_size,
                                       device=device, dtype=dtype))
        if bias:
            self.bias = Parameter(_empty(out_channels, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self):
        init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in, _ = init._calculate_fan_in_and_fan_out(self.weight)
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            init.uniform_(self.bias, -bound, bound)

    def forward(self, x):
        weight, bias = self._weight_and_bias(Conv2d)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self):
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"stride={self.stride}")
        if self.padding not in ((0, 0), "valid"):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        return s


class _Pool2d(Module):
    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode=False):
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = kernel_size if stride is None else stride
        self.padding, self.ceil_mode = padding, ceil_mode


class MaxPool2d(_Pool2d):
    """Max pooling. Example: ``nn.MaxPool2d(2)(x)`` halves H and W."""

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, return_indices=False,
                 ceil_mode=False):
        super().__init__(kernel_size, stride, padding, ceil_mode)
        self.dilation, self.return_indices = dilation, return_indices

    def forward(self, x):
        return F.max_pool2d(x, self.kernel_size, self.stride, self.padding, self.dilation,
                            self.ceil_mode, self.return_indices)

    def extra_repr(self):
        return (f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"dilation={self.dilation}, ceil_mode={self.ceil_mode}")


class AvgPool2d(_Pool2d):
    """Average pooling. Example: ``nn.AvgPool2d(2)(x)``."""

    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode=False,
                 count_include_pad=True, divisor_override=None):
        super().__init__(kernel_size, stride, padding, ceil_mode)
        self.count_include_pad, self.divisor_override = count_include_pad, divisor_override

    def forward(self, x):
        return F.avg_pool2d(x, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                            self.count_include_pad, self.divisor_override)

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class AdaptiveAvgPool2d(Module):
    """Average pooling to a fixed output size. Example: ``nn.AdaptiveAvgPool2d(1)``."""

    def __init__(self, output_size):
        super().__init__()
        self.output_size = output_size

    def forward(self, x):
        return F.adaptive_avg_pool2d(x, self.output_size)

    def extra_repr(self):
        return f"output_size={self.output_size}"


def _activation(name, fn, doc, inplace_form=False):
    """A parameter-free layer that applies ``fn`` (one class per activation, no twins);
    ``inplace_form``: it takes PyTorch's ``inplace=`` and passes it on."""
    if not inplace_form:
        return type(name, (Module,), {"forward": lambda self, x: fn(x), "__doc__": doc})

    def __init__(self, inplace=False):
        Module.__init__(self)
        self.inplace = inplace
    return type(name, (Module,), {
        "__init__": __init__, "__doc__": doc,
        "forward": lambda self, x: fn(x, inplace=self.inplace),
        "extra_repr": lambda self: "inplace=True" if self.inplace else ""})


ReLU = _activation("ReLU", F.relu, "max(x, 0). Example: ``nn.ReLU()(x)``.", inplace_form=True)
Tanh = _activation("Tanh", F.tanh, "tanh(x). Example: ``nn.Tanh()(x)``.")
Sigmoid = _activation("Sigmoid", F.sigmoid, "1/(1+exp(-x)). Example: ``nn.Sigmoid()(x)``.")


class LeakyReLU(Module):
    """x if x > 0 else slope * x. Example: ``nn.LeakyReLU(0.2)(x)``."""

    def __init__(self, negative_slope=0.01, inplace=False):
        super().__init__()
        self.negative_slope = negative_slope
        self.inplace = inplace

    def forward(self, x):
        return F.leaky_relu(x, self.negative_slope, self.inplace)

    def extra_repr(self):
        return f"negative_slope={self.negative_slope}" + (", inplace=True" if self.inplace else "")


class Softmax(Module):
    """Softmax along ``dim``. Example: ``nn.Softmax(dim=1)(x)``."""

    def __init__(self, dim=None):
        super().__init__()
        self.dim = dim

    def forward(self, x):
        return F.softmax(x, self.dim)

    def extra_repr(self):
        return f"dim={self.dim}"


class LogSoftmax(Softmax):
    """log(softmax) along ``dim``, computed stably. Example: ``nn.LogSoftmax(dim=1)(x)``."""

    def forward(self, x):
        return F.log_softmax(x, self.dim)


class Flatten(Module):
    """Flatten dims start_dim..end_dim (default: all but the batch). Example: ``nn.Flatten()(x)``."""

    def __init__(self, start_dim=1, end_dim=-1):
        super().__init__()
        self.start_dim, self.end_dim = start_dim, end_dim

    def forward(self, x):
        return x.flatten(self.start_dim, self.end_dim)

    def extra_repr(self):
        return f"start_dim={self.start_dim}, end_dim={self.end_dim}"


class Dropout(Module):
    """Zero elements with probability p during training. Example: ``nn.Dropout(0.5)``."""

    def __init__(self, p=0.5, inplace=False):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
        self.p = p
        self.inplace = inplace

    def forward(self, x):
        return F.dropout(x, self.p, self.training, self.inplace)

    def extra_repr(self):
        return f"p={self.p}, inplace={self.inplace}"


class Dropout2d(Dropout):
    """Zero whole channels of (N, C, H, W) input with probability p during training.

    Example: ``nn.Dropout2d(0.25)``.
    """

    def forward(self, x):
        return F.dropout2d(x, self.p, self.training, self.inplace)


class _BatchNorm(Module):
    _dims = ()          # accepted input ranks

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, device=None, dtype=None):
        super().__init__()
        self.num_features, self.eps, self.momentum = int(num_features), eps, momentum
        self.affine, self.track_running_stats = affine, track_running_stats
        if affine:
            self.weight = Parameter(factories.ones(num_features, dtype=dtype, device=device))
            self.bias = Parameter(factories.zeros(num_features, dtype=dtype, device=device))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", factories.zeros(num_features, dtype=dtype, device=device))
            self.register_buffer("running_var", factories.ones(num_features, dtype=dtype, device=device))
            self.register_buffer("num_batches_tracked", factories.tensor(0, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)

    def forward(self, x):
        if x.ndim not in self._dims or x.shape[1] != self.num_features:
            want = " or ".join(f"{d}-D" for d in self._dims)
            raise F.InputShapeError(f"expected {want} input with {self.num_features} channels in "
                                    f"dim 1, got {tuple(x.shape)}")
        use_batch = self.training or not self.track_running_stats
        momentum = self.momentum
        if self.training and self.track_running_stats:
            with engine.no_grad():
                self.num_batches_tracked.add_(1)
            if momentum is None:         # cumulative moving average
                momentum = 1.0 / float(self.num_batches_tracked.item())
        return F.batch_norm(x, self.running_mean if self.training or not use_batch else None,
                            self.running_var if self.training or not use_batch else None,
                            self.weight, self.bias, use_batch, momentum, self.eps)

    def extra_repr(self):
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}")


class BatchNorm1d(_BatchNorm):
    """Batch normalisation over (N, C) or (N, C, L). Example: ``nn.BatchNorm1d(16)``."""

    _dims = (2, 3)


class BatchNorm2d(_BatchNorm):
    """Batch normalisation over (N, C, H, W). Example: ``nn.BatchNorm2d(6)``."""

    _dims = (4,)


class LayerNorm(Module):
    """Normalise over the trailing ``normalized_shape`` dims. Example: ``nn.LayerNorm(16)``."""

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True,
                 device=None, dtype=None):
        super().__init__()
        shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        self.normalized_shape, self.eps = shape, eps
        self.elementwise_affine = elementwise_affine
        if elementwise_affine:
            self.weight = Parameter(factories.ones(*shape, dtype=dtype, device=device))
            if bias:
                self.bias = Parameter(factories.zeros(*shape, dtype=dtype, device=device))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    def extra_repr(self):
        return (f"{self.normalized_shape}, eps={self.eps}, "
                f"elementwise_affine={self.elementwise_affine}")


class Embedding(Module):
    """A lookup table of ``num_embeddings`` rows of size ``embedding_dim``; init N(0, 1).

    Example::

        emb = nn.Embedding(100, 16); vecs = emb(dg.tensor([[1, 2], [3, 4]]))   # (2, 2, 16)
    """

    def __init__(self, num_embeddings, embedding_dim, padding_idx=None, device=None, dtype=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = int(num_embeddings), int(embedding_dim)
        if padding_idx is not None and not -num_embeddings <= padding_idx < num_embeddings:
            raise ValueError(f"padding_idx {padding_idx} must be within num_embeddings "
                             f"({num_embeddings})")
        self.padding_idx = None if padding_idx is None else padding_idx % num_embeddings
        self.weight = Parameter(_empty(num_embeddings, embedding_dim, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self):
        init.normal_(self.weight)
        if self.padding_idx is not None:
            with engine.no_grad():
                self.weight.data[self.padding_idx] = 0

    def forward(self, ids):
        return F.embedding(ids, self.weight, self.padding_idx)

    def extra_repr(self):
        s = f"{self.num_embeddings}, {self.embedding_dim}"
        return s + (f", padding_idx={self.padding_idx}" if self.padding_idx is not None else "")


class _Loss(Module):
    # size_average / reduce: PyTorch's deprecated spelling of ``reduction`` (warns).
    def __init__(self, size_average=None, reduce=None, reduction="mean"):
        super().__init__()
        self.reduction = legacy_reduction(size_average, reduce, reduction)


class MSELoss(_Loss):
    """Mean squared error. Example: ``nn.MSELoss()(pred, target)``."""

    def forward(self, input, target):
        return F.mse_loss(input, target, reduction=self.reduction)


class L1Loss(_Loss):
    """Mean absolute error. Example: ``nn.L1Loss()(pred, target)``."""

    def forward(self, input, target):
        return F.l1_loss(input, target, reduction=self.reduction)


class SmoothL1Loss(_Loss):
    """Smooth L1 (Huber-like) loss. Example: ``nn.SmoothL1Loss(beta=0.5)(pred, target)``."""

    def __init__(self, size_average=None, reduce=None, reduction="mean", beta=1.0):
        super().__init__(size_average, reduce, reduction)
        self.beta = beta

    def forward(self, input, target):
        return F.smooth_l1_loss(input, target, reduction=self.reduction, beta=self.beta)


class NLLLoss(_Loss):
    """Negative log-likelihood of class indices. Example: ``nn.NLLLoss()(log_probs, target)``."""

    def __init__(self, weight=None, size_average=None, ignore_index=-100, reduce=None,
                 reduction="mean"):
        super().__init__(size_average, reduce, reduction)
        self.weight, self.ignore_index = weight, ignore_index

    def forward(self, input, target):
        return F.nll_loss(input, target, self.weight, ignore_index=self.ignore_index,
                          reduction=self.reduction)


class CrossEntropyLoss(NLLLoss):
    """log_softmax + NLL, numerically stable. Example: ``nn.CrossEntropyLoss()(logits, target)``."""

    def __init__(self, weight=None, size_average=None, ignore_index=-100, reduce=None,
                 reduction="mean", label_smoothing=0.0):
        super().__init__(weight, size_average, ignore_index, reduce, reduction)
        self.label_smoothing = label_smoothing

    def forward(self, input, target):
        return F.cross_entropy(input, target, self.weight, ignore_index=self.ignore_index,
                               reduction=self.reduction, label_smoothing=self.label_smoothing)


class BCELoss(_Loss):
    """Binary cross-entropy on probabilities. Example: ``nn.BCELoss()(p, y)``."""

    def __init__(self, weight=None, size_average=None, reduce=None, reduction="mean"):
        super().__init__(size_average, reduce, reduction)
        self.weight = weight

    def forward(self, input, target):
        return F.binary_cross_entropy(input, target, self.weight, reduction=self.reduction)


class BCEWithLogitsLoss(_Loss):
    """Sigmoid + binary cross-entropy, stable. Example: ``nn.BCEWithLogitsLoss()(logits, y)``."""

    def __init__(self, weight=None, size_average=None, reduce=None, reduction="mean",
                 pos_weight=None):
        super().__init__(size_average, reduce, reduction)
        self.weight, self.pos_weight = weight, pos_weight

    def forward(self, input, target):
        return F.binary_cross_entropy_with_logits(input, target, self.weight,
                                                  reduction=self.reduction,
                                                  pos_weight=self.pos_weight)
