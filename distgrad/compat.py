"""Which PyTorch names distgrad has, and one clear error for those it lacks.

``PYTORCH_NAMES`` lists, per PyTorch namespace, the names that tutorials and examples
use. Whether distgrad has each one is read from the code (an attribute lookup), never
written by hand: ``python -m distgrad.compat_table --write README.md`` regenerates the
README's compatibility table, and a test fails when the table and the code disagree.

Asking a distgrad module for a PyTorch name it lacks raises :class:`MissingFeatureError`
(an ``AttributeError``, so ``hasattr`` still works) naming the feature and, where one
exists, the distgrad alternative.

Example::

    dg.nn.LSTM        # MissingFeatureError: torch.nn.LSTM is a PyTorch feature distgrad
                      # does not have; instead: write the cell with nn.Linear ...
"""
import importlib

# PyTorch namespace -> (distgrad module, names). A dotted name is looked up attribute by
# attribute (``parallel.DistributedDataParallel``).
PYTORCH_NAMES = {
    "torch": ("distgrad", [
        "tensor", "Tensor", "from_numpy", "is_tensor", "Size", "device", "Generator",
        "manual_seed", "zeros", "ones", "empty", "full", "zeros_like", "ones_like", "full_like",
        "randn", "rand", "randint", "randperm", "randn_like", "rand_like", "arange", "linspace",
        "eye", "cat", "stack", "where", "maximum", "minimum", "matmul", "mm", "bmm", "einsum",
        "add", "sub", "mul", "div", "pow", "neg", "exp", "log", "sqrt", "abs", "sin", "cos",
        "tanh", "sigmoid", "relu", "softmax", "log_softmax", "sum", "mean", "prod", "max", "min",
        "argmax", "argmin", "norm", "var", "std", "clamp", "reshape", "transpose", "permute",
        "squeeze", "unsqueeze", "flatten", "split", "chunk", "topk", "sort", "gather", "allclose",
        "no_grad", "enable_grad", "set_grad_enabled", "inference_mode", "save", "load",
        "float16", "float32", "float64", "half", "float", "double", "int8", "int16", "int32",
        "int64", "uint8", "long", "bool", "bfloat16",
        "FloatTensor", "DoubleTensor", "HalfTensor", "LongTensor", "IntTensor", "ShortTensor",
        "CharTensor", "ByteTensor", "BoolTensor",
        "autograd", "autograd.Variable", "autograd.Function", "autograd.grad",
        "autograd.gradcheck", "nn", "optim", "utils", "cuda", "cuda.is_available",
        "cuda.device_count", "cuda.manual_seed", "cuda.manual_seed_all", "cuda.FloatTensor",
        "cuda.LongTensor", "accelerator", "accelerator.is_available",
        "accelerator.current_accelerator", "backends", "jit", "compile", "multiprocessing",
        "set_num_threads", "fft", "linalg",
    ]),
    "torch.nn": ("distgrad.nn", [
        "Module", "Parameter", "Sequential", "ModuleList", "ModuleDict", "Linear", "Bilinear",
        "Conv1d", "Conv2d", "Conv3d", "ConvTranspose2d", "MaxPool1d", "MaxPool2d", "AvgPool2d",
        "AdaptiveAvgPool2d", "BatchNorm1d", "BatchNorm2d", "LayerNorm", "GroupNorm", "Dropout",
        "Dropout2d", "Embedding", "RNN", "LSTM", "GRU", "MultiheadAttention", "Transformer",
        "ReLU", "LeakyReLU", "Sigmoid", "Tanh", "GELU", "Softmax", "LogSoftmax", "Flatten",
        "Identity", "MSELoss", "L1Loss", "SmoothL1Loss", "HuberLoss", "NLLLoss",
        "CrossEntropyLoss", "BCELoss", "BCEWithLogitsLoss", "KLDivLoss", "DataParallel",
        "parallel.DistributedDataParallel", "functional", "init", "init.kaiming_uniform_",
        "init.kaiming_normal_", "init.xavier_uniform_", "init.xavier_normal_",
        "init.zeros_", "init.constant_", "utils.clip_grad_norm_", "utils.clip_grad_value_",
    ]),
    "torch.nn.functional": ("distgrad.nn.functional", [
        "relu", "leaky_relu", "gelu", "sigmoid", "tanh", "softmax", "log_softmax", "linear",
        "conv2d", "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "dropout", "dropout2d",
        "batch_norm", "layer_norm", "embedding", "one_hot", "pad", "interpolate", "normalize",
        "mse_loss", "l1_loss", "smooth_l1_loss", "nll_loss", "cross_entropy",
        "binary_cross_entropy", "binary_cross_entropy_with_logits", "kl_div",
    ]),
    "torch.optim": ("distgrad.optim", [
        "Optimizer", "SGD", "Adam", "AdamW", "Adadelta", "Adagrad", "RMSprop", "LBFGS",
        "lr_scheduler.StepLR", "lr_scheduler.MultiStepLR", "lr_scheduler.ExponentialLR",
        "lr_scheduler.LambdaLR", "lr_scheduler.CosineAnnealingLR",
        "lr_scheduler.ReduceLROnPlateau", "lr_scheduler.OneCycleLR",
    ]),
    "torch.utils.data": ("distgrad.utils.data", [
        "Dataset", "IterableDataset", "TensorDataset", "Subset", "ConcatDataset", "random_split",
        "DataLoader", "Sampler", "SequentialSampler", "RandomSampler", "SubsetRandomSampler",
        "BatchSampler", "WeightedRandomSampler", "DistributedSampler", "default_collate",
        "get_worker_info",
    ]),
}

# What to use instead of a PyTorch name distgrad lacks (where something fits).
ALTERNATIVES = {
    "torch.multiprocessing": "dg.init(workers=N): data-parallel workers over Ray",
    "torch.jit": "nothing to compile: run the model as it is",
    "torch.compile": "nothing to compile: run the model as it is",
    "torch.nn.HuberLoss": "nn.SmoothL1Loss(beta=delta), times delta",
    "torch.nn.RNN": "write the recurrence with nn.Linear and tanh",
    "torch.nn.LSTM": "write the cell with nn.Linear, sigmoid and tanh",
    "torch.nn.GRU": "write the cell with nn.Linear, sigmoid and tanh",
    "torch.optim.RMSprop": "dg.optim.Adam or dg.optim.Adadelta",
    "torch.utils.data.DistributedSampler": (
        "DataLoader(dataset, batch_size=B, shuffle=True, cluster=cluster): every batch is "
        "sharded across the workers, with no sampler or set_epoch"),
    "torch.utils.data.get_worker_info": "loading runs in the main process: there is no worker",
}


_LISTED = {f"{ns}.{n}" for ns, (_, names) in PYTORCH_NAMES.items() for n in names}


class MissingFeatureError(AttributeError, NotImplementedError):
    """A PyTorch name distgrad does not have; the message says what to use instead."""


def missing(namespace, name):
    """The error for ``namespace.name`` (e.g. ``"torch.nn", "LSTM"``): raise what it returns.

    Example::

        def __getattr__(name):            # in distgrad/nn/__init__.py
            raise missing("torch.nn", name)
    """
    full = f"{namespace}.{name}"
    module = PYTORCH_NAMES.get(namespace, (namespace.replace("torch", "distgrad", 1),))[0]
    if name.startswith("__"):           # copy, pickle, IPython... probe dunders: stay plain
        return AttributeError(f"module {module!r} has no attribute {name!r}")
    hint = ALTERNATIVES.get(full)
    if hint is not None:
        return MissingFeatureError(f"{full} is a PyTorch feature distgrad does not have; "
                                   f"instead: {hint}")
    what = ("is a PyTorch feature distgrad does not have" if full in _LISTED
            else f"is not in {module}")
    return MissingFeatureError(f"{full} {what} (see the PyTorch compatibility table in "
                               "distgrad's README)")


def resolve(module_name, dotted):
    """The object at ``module.dotted`` or None. Example: ``resolve("distgrad.nn", "init.zeros_")``."""
    obj = importlib.import_module(module_name)
    for part in dotted.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            return None
    return obj


def availability():
    """{PyTorch namespace: ([names distgrad has], [names it lacks])}, read from the code.

    Example: ``have, lack = availability()["torch.nn"]``.
    """
    out = {}
    for namespace, (module, names) in PYTORCH_NAMES.items():
        have = [n for n in names if resolve(module, n) is not None]
        out[namespace] = (have, [n for n in names if n not in have])
    return out


BEGIN, END = "<!-- compat-table:begin -->", "<!-- compat-table:end -->"


def table():
    """The README's compatibility table (Markdown), generated from ``availability()``.

    Example: ``print(table())``.
    """
    lines = [BEGIN,
             "| PyTorch | in distgrad | not in distgrad (what to use instead) |",
             "|---|---|---|"]
    for namespace, (have, lack) in availability().items():
        def alt(n):
            hint = ALTERNATIVES.get(f"{namespace}.{n}")
            return f"`{n}`" + (f" ({hint})" if hint else "")
        lines.append(f"| `{namespace}` ({len(have)}/{len(have) + len(lack)}) | "
                     + ", ".join(f"`{n}`" for n in have) + " | "
                     + ", ".join(alt(n) for n in lack) + " |")
    lines.append(END)
    return "\n".join(lines)
