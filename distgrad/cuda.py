"""``dg.cuda``: what scripts ask of ``torch.cuda`` (is a GPU there, how many, seeding).

GPUs are reached through cupy (``pip install cupy-cuda12x``); without it, or without a
GPU, ``is_available()`` is False and nothing here raises except asking for a GPU tensor.

Example::

    device = dg.device("cuda" if dg.cuda.is_available() else "cpu")
    dg.cuda.manual_seed(0)
"""
from . import _backend, random
from .compat import missing as _missing
from .factories import legacy_types

globals().update(legacy_types("cuda"))     # dg.cuda.FloatTensor and friends


def is_available():
    """True when cupy is installed and sees at least one CUDA GPU. Example: ``dg.cuda.is_available()``."""
    try:
        _backend.cupy_module()
    except _backend.DeviceError:
        return False
    return True


def device_count():
    """Number of CUDA GPUs (0 without cupy or a GPU). Example: ``dg.cuda.device_count()``."""
    if not is_available():
        return 0
    return int(_backend.cupy_module().cuda.runtime.getDeviceCount())


def current_device():
    """Index of the current GPU. Example: ``dg.cuda.current_device()``."""
    return int(_backend.cupy_module().cuda.Device().id)


def get_device_name(device=None):
    """The GPU's name. Example: ``dg.cuda.get_device_name(0)``."""
    cp = _backend.cupy_module()
    index = (_backend.device(device).index or 0) if isinstance(device, str) else int(device or 0)
    name = cp.cuda.runtime.getDeviceProperties(index)["name"]
    return name.decode() if isinstance(name, bytes) else name


def synchronize(device=None):
    """Wait for the GPU's queued work (nothing to wait for without a GPU).

    Example: ``dg.cuda.synchronize()`` before reading a timer.
    """
    if is_available():
        _backend.cupy_module().cuda.Device().synchronize()


def empty_cache():
    """Release cupy's cached GPU memory blocks (nothing to do without a GPU).

    Example: ``del activations; dg.cuda.empty_cache()``.
    """
    if is_available():
        _backend.cupy_module().get_default_memory_pool().free_all_blocks()


def manual_seed(seed):
    """Seed GPU random numbers. distgrad draws every random number on the CPU and moves it,
    so this seeds the one global generator (the same as ``dg.manual_seed``).

    Example: ``dg.cuda.manual_seed(0)``.
    """
    random.manual_seed(seed)


manual_seed_all = manual_seed


def __getattr__(name):
    raise _missing("torch.cuda", name)       # a PyTorch name we lack: say so, and what to use
