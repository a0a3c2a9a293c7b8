"""Where a local tensor's values live: an array plus a version counter.

Every in-place write bumps the counter; views of the same memory share one counter,
so a write through any of them invalidates what the others saved for backward. A
saved tensor that was modified in place is replaced by a ``StaleStorage`` stand-in:
its metadata still works, reading its data raises the version error. This module
imports nothing of distgrad (the distributed layer's storages reuse its protocol).

A distributed value's storage (``lazy = True``: ``distgrad.lazy.LazyStorage``) keeps
the same protocol (``array`` fetches, ``assign`` records a write) plus ``placement``,
``device`` and ``cluster``; ``LazyRuntime`` lists all the core asks of that cluster.

Example::

    s = Storage(np.zeros(3))
    s.version += 1          # what an in-place write does
"""


class Storage:
    """An array and a version counter bumped by every in-place write.

    Example: ``Storage(np.ones(2)).version == 0``.
    """

    __slots__ = ("array", "counter", "__weakref__")

    def __init__(self, array, counter=None):
        self.array = array
        # A one-item list, shared by the storages of views of the same memory: an in-place
        # write through any of them invalidates what the others saved.
        self.counter = [0] if counter is None else counter

    @property
    def version(self):
        return self.counter[0]

    @version.setter
    def version(self, value):
        self.counter[0] = value

    @property
    def shape(self):
        return self.array.shape

    @property
    def dtype(self):
        return self.array.dtype

    lazy = False


class StaleStorage:
    """Stands in for a saved tensor modified in place: metadata works, data raises.

    Example: ``StaleStorage(store, RuntimeError("modified")).array`` raises.
    """

    __slots__ = ("shape", "dtype", "error")
    lazy = False
    version = -1

    def __init__(self, store, error):
        self.shape, self.dtype, self.error = store.shape, store.dtype, error

    @property
    def array(self):
        raise self.error


class LazyRuntime:
    """The interface between the core (tensor, autograd, nn.functional) and the owner of
    distributed values (``store.cluster``: ``distgrad.distributed.Cluster``). The core
    calls these methods and nothing else of it; ops themselves go through the recorder
    installed with ``tensor.set_lazy_dispatch``.

    Example: ``store.cluster.record_backward([loss], None, None, False)`` for ``loss.backward()``.
    """

    def record_backward(self, tensors, grad_tensors, retain_graph, create_graph, inputs=None):
        """``backward()`` of distributed roots: recorded for the workers."""
        raise NotImplementedError

    def record_grad(self, outputs, inputs, grad_outputs, retain_graph, create_graph, allow_unused):
        """``autograd.grad`` of distributed outputs: the gradients stay on the workers."""
        raise NotImplementedError

    def apply_function(self, fn_cls, args, kwargs):
        """A custom ``Function`` applied to distributed values (both rules traced)."""
        raise NotImplementedError

    def record_detach(self, t, requires_grad=False):
        """``t``'s value without its history (``detach``, ``.data``, ``requires_grad_``)."""
        raise NotImplementedError

    def shard(self, data, dim=0, sizes=None):
        """A constant split across the workers (``tensor.constant_like``)."""
        raise NotImplementedError

    def replicate(self, value):
        """A constant held by every worker (``tensor.constant_like``)."""
        raise NotImplementedError


def check_version(tensor, saved_version, node):
    """Raise if a tensor a VJP needs was modified in place after it was saved.

    Example: ``check_version(x, node.versions[0], node)``.
    """
    if tensor._store.version != saved_version:
        raise RuntimeError(
            f"one of the variables needed for gradient computation has been modified by an "
            f"inplace operation: a tensor of shape {tuple(tensor.shape)} used by {node.name()} "
            f"is at version {tensor._store.version}; expected version {saved_version} instead.")
