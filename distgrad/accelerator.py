"""``dg.accelerator``: PyTorch 2.6's device-neutral accelerator API (CUDA here, via cupy).

Example::

    device = dg.accelerator.current_accelerator() if dg.accelerator.is_available() else "cpu"
"""
from . import _backend, cuda


def is_available():
    """True when a CUDA GPU is usable. Example: ``dg.accelerator.is_available()``."""
    return cuda.is_available()


def current_accelerator(check_available=False):
    """``dg.device('cuda')`` when a GPU is usable, else None. Example: ``dg.accelerator.current_accelerator()``."""
    return _backend.device("cuda") if cuda.is_available() else None


def device_count():
    """Number of accelerators. Example: ``dg.accelerator.device_count()``."""
    return cuda.device_count()


def current_device_index():
    """Index of the current accelerator. Example: ``dg.accelerator.current_device_index()``."""
    return cuda.current_device()


def synchronize(device=None):
    """Wait for the accelerator's queued work. Example: ``dg.accelerator.synchronize()``."""
    cuda.synchronize(device)
