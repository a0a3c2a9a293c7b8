"""Array-module selection: the one place that knows about numpy vs cupy.

Op code receives ``xp`` (numpy or cupy) and never imports cupy itself.
cupy is imported only when a CUDA device is asked for.
"""
import numpy as np

_cupy = None


class DeviceError(RuntimeError):
    """A device was requested that this machine cannot provide."""


def cupy_module():
    """Return the cupy module, importing it on first use (clear error if absent)."""
    global _cupy
    if _cupy is None:
        try:
            import cupy  # noqa: PLC0415  (imported only when CUDA is asked for)
        except ImportError as e:
            raise DeviceError(
                "device='cuda' needs cupy and an NVIDIA GPU: pip install cupy-cuda12x "
                f"(import cupy failed: {e})") from None
        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except Exception as e:  # cupy raises CUDARuntimeError without a driver
            raise DeviceError(f"device='cuda': cupy is installed but no CUDA GPU is usable ({e})") from None
        if count < 1:
            raise DeviceError("device='cuda': cupy is installed but no CUDA GPU was found")
        _cupy = cupy
    return _cupy


class device(str):
    """A device, as ``torch.device``: ``dg.device("cuda:0")``, ``dg.device("cuda", 1)``.

    It is also the canonical device string, so it compares equal to ``"cpu"`` or
    ``"cuda:1"`` and goes wherever a device string does.

    Example::

        dev = dg.device("cuda" if dg.cuda.is_available() else "cpu")
        x = dg.ones(3).to(dev)          # dev.type == "cpu", dev.index is None
    """

    def __new__(cls, type, index=None):
        name = normalize_device(type)
        if index is not None:
            if ":" in name:
                raise ValueError(f"device: type {type!r} already names an index; got index={index}")
            if name == "cpu" and int(index) != 0:
                raise ValueError(f"device: cpu has only index 0, got {index}")
            name = name if name == "cpu" else f"{name}:{int(index)}"
        return super().__new__(cls, name)

    @property
    def type(self):
        return self.split(":")[0]

    @property
    def index(self):
        return int(self.split(":")[1]) if ":" in self else None

    def __repr__(self):
        idx = "" if self.index is None else f", index={self.index}"
        return f"device(type='{self.type}'{idx})"

    __hash__ = str.__hash__


def normalize_device(device):
    """'cpu', 'cuda', 'cuda:0' -> canonical string; anything else is an error."""
    if device is None:
        return "cpu"
    device = str(device)
    if device == "cpu" or device == "cuda" or device.startswith("cuda:"):
        return device
    raise ValueError(f"unknown device {device!r}: expected 'cpu' or 'cuda'")


def xp_for_device(device):
    """The array module for a device string."""
    return np if normalize_device(device) == "cpu" else cupy_module()


_NOT_CUPY = {np.ndarray, int, float, bool, type(None)}


def is_cupy_array(a):
    t = type(a)
    if t in _NOT_CUPY:          # the hot path: every op asks this of every operand
        return False
    return t.__module__.split(".")[0] == "cupy"


def array_module(*arrays):
    """numpy or cupy, whichever the arrays belong to (scalars count as numpy)."""
    for a in arrays:
        if is_cupy_array(a):
            return cupy_module()
    return np


def device_of(array):
    if is_cupy_array(array):
        return f"cuda:{array.device.id}" if array.device.id else "cuda"
    return "cpu"


def to_device(array, device):
    """Copy an array to a device (no copy when it is already there)."""
    device = normalize_device(device)
    if device == "cpu":
        return array.get() if is_cupy_array(array) else array
    cp = cupy_module()
    if device != "cuda":
        with cp.cuda.Device(int(device.split(":")[1])):
            return cp.asarray(array)
    return cp.asarray(array)


def to_numpy(array):
    return array.get() if is_cupy_array(array) else np.asarray(array)


def add_at(out, index, values):
    """Unbuffered ``out[index] += values`` (repeated indices accumulate) on CPU or GPU."""
    if is_cupy_array(out):
        import cupyx  # noqa: PLC0415  (cupy's companion package; present whenever cupy is)
        cupyx.scatter_add(out, index, values)
    else:
        np.add.at(out, index, values)
