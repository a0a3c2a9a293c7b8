"""The driver side of data parallelism: ``dg.init`` and ``Cluster``, the public API.

Ops on distributed values are not run here: they are recorded (with their placement,
global shape and dtype) into a program that every worker runs at the next sync point
(``.item()``, ``.numpy()``, printing, ``bool()``, ``cluster.sync()``, a full buffer).
``Cluster`` keeps the API and hands each job to the part that owns it: recording and
the table of values to ``distgrad.lazy``; sending, retries and the cache mirrors,
recovery and resize, shard sizing, checkpoints and the trace to ``scheduler/``. This
module never imports Ray: ``backend="ray"`` loads ``distgrad.scheduler.ray_gang``.

Example::

    cluster = dg.init(workers=2, backend="local")
    X = cluster.shard(np.random.randn(10, 3).astype(np.float32))
    W = Variable(dg.randn(3, 1), requires_grad=True)
    loss = ((X @ W) ** 2).mean()
    loss.backward()              # W.grad: the exact gradient over all 10 rows
    print(loss.item())
    cluster.shutdown()
"""
import weakref

import numpy as np

from . import _backend, _checks, _hints, _interrupt, dist_autograd
from .errors import RemoteError
from .lazy import Recorder
from .placement import REPLICATE, Partial, PlacementError, Replicate, Shard
from .scheduler import checkpoint
from .scheduler.execution import Executor
from .scheduler.local import LocalGang
from .scheduler.recovery import Recovery
from .scheduler.sizing import Sizing
from .scheduler.timeline import write_trace
from .tensor import Tensor, Variable, set_lazy_dispatch
from .utils.data import sources as data_sources

__all__ = ["init", "Cluster", "current_cluster", "Shard", "Replicate", "Partial",
           "PlacementError", "RemoteError"]


class Cluster:
    """A gang of workers holding shards and replicas; made by :func:`init`.

    The public API; each job is done by one part, readable alone: ``recorder``
    (``distgrad.lazy``: ops recorded, the table of values), ``executor`` (sending,
    retries, the mirrors of the workers' program caches), ``recovery`` (lost workers,
    resize), ``sizing`` (shard sizes); checkpoints and the trace are functions of
    ``scheduler.checkpoint`` and ``scheduler.timeline``.

    Example::

        with dg.init(workers=2, backend="local") as cluster:
            X = cluster.shard(np.ones((5, 3), np.float32))
            print(X.sum().item())      # 15.0
    """

    def __init__(self, gang, world_size, device="cpu", max_instructions=20000):
        self.gang = gang
        self.world_size = world_size
        self.device = _backend.normalize_device(device)
        self.max_instructions = max_instructions   # a longer recording is sent at once
        self.closed = False
        self.fault_tolerant = True
        self.max_retries = 3
        self.recoveries = []       # one dict per recovery: ranks, seconds, resized
        self.recorder = Recorder(self)
        self.sizing = Sizing(self)
        self.executor = Executor(self)
        self.recovery = Recovery(self)
        _register(self)

    @property
    def messages_sent(self):
        """Programs run so far (one message per worker each)."""
        return self.executor.messages_sent

    # ---------------------------------------------------------------- placing values
    def shard(self, data, dim=0, sizes=None):
        """Split ``data`` (array, tensor or Variable) along ``dim`` across the workers.

        ``sizes`` gives each worker's extent (default: an even split; uneven allowed);
        ``sizes="auto"`` splits in proportion to each worker's measured speed (rows per
        second of busy time in recent steps), so a slower worker gets fewer rows and the
        gang finishes each step together. The gradients stay exact for any split.
        A Variable that requires grad becomes a sharded leaf whose ``.grad`` is sharded.

        Example: ``X = cluster.shard(np.ones((10, 3), np.float32), sizes=(6, 4))``.
        """
        _checks.shard_args(data, dim, sizes, self.world_size)
        src = data if isinstance(data, Tensor) else None
        arr = _backend.to_numpy(src.store.array if src is not None else np.asarray(data))
        if src is None and arr.dtype == np.float64 and not isinstance(data, np.ndarray):
            arr = arr.astype(np.float32)
        if arr.ndim == 0:
            raise PlacementError("shard: cannot shard a 0-d value")
        _hints.check_sharded(self, arr)
        dim = dim % arr.ndim
        sizes, pieces = self.sizing.split(arr, dim, sizes)
        requires_grad = bool(src is not None and src.requires_grad)
        return self.recorder.put(pieces, arr.shape, arr.dtype, Shard(dim, sizes), requires_grad,
                                 Variable if isinstance(data, Variable) or src is None else Tensor)

    def replicate(self, obj):
        """Place a Variable/tensor, or every parameter and buffer of a Module, on every worker.

        A module's parameters stay the same Python objects, now living on the workers:
        an optimizer built before or after works unchanged, and parameters travel to the
        driver only when read.

        Example: ``model = cluster.replicate(MLP())``.
        """
        _checks.replicate_args(obj, self)
        recorder = self.recorder
        if isinstance(obj, Tensor):
            if obj.store.lazy:
                return obj
            a = _backend.to_numpy(obj.store.array)
            return recorder.put([a] * self.world_size, a.shape, a.dtype, REPLICATE,
                                obj.requires_grad, type(obj))
        tensors = []
        if hasattr(obj, "parameters"):
            tensors += list(obj.parameters())
        if hasattr(obj, "buffers"):
            tensors += [b for b in obj.buffers() if b is not None]
        if not tensors and not hasattr(obj, "parameters"):
            raise TypeError(f"replicate: expected a Tensor, Variable or Module, got {type(obj).__name__}")
        for t in tensors:
            if t.store.lazy:
                continue
            a = _backend.to_numpy(t.store.array)
            t.set_store(recorder.put_storage([a] * self.world_size, a.shape, a.dtype, REPLICATE,
                                             t.requires_grad))
            if t.requires_grad:
                recorder.leaf_objects[t.store.vid] = weakref.ref(t)
            if t.grad is not None and not t.grad.store.lazy:
                t.grad = self.replicate(t.grad.detach())
        return obj

    def shard_dataset(self, data, batch_size, shuffle=False, seed=0, columns=None,
                      drop_last=False, dtypes=None, timeout_s=None):
        """A dataset the WORKERS read, in global batches of ``batch_size`` rows split across
        them: the rows never pass through the driver. Iterate it once per epoch; each batch
        is a tuple of ``Shard(0)`` values, one per column.

        ``data``: a ``ray.data.Dataset`` (each worker streams its ``streaming_split``;
        needs Ray Data: the ``data`` extra); a ``.parquet`` path (read with Ray Data); a ``.npy``
        file, a directory of ``.npy`` shards, or a dict / list of them (one per column,
        memory-mapped by the workers: on several nodes, paths every node can read); or
        in-memory arrays / a TensorDataset (sent to the workers once). ``shuffle``: a new
        order every epoch from ``seed``; for all but Ray Data the batches are the same for
        any worker count, and resizes and recoveries keep the position. ``columns``
        selects and orders columns; ``dtypes`` ({column: dtype}) is checked before any
        step. Missing files or columns, shards of another shape: one DataError naming
        the file or column and the worker, raised here.

        Example::

            train = cluster.shard_dataset({"x": "data/x", "y": "data/y.npy"},
                                          batch_size=256, shuffle=True, seed=0)
            for xb, yb in train:
                loss = F.cross_entropy(model(xb), yb)
            acc = train.evaluate(lambda x, y: model(x).argmax(dim=1) == y)
        """
        return data_sources.shard_dataset(self, data, batch_size, shuffle, seed, columns,
                                          drop_last, dtypes, timeout_s)

    def shard_from(self, fn, rows, batch_size, shuffle=False, seed=0, drop_last=False):
        """A dataset of ``rows`` rows computed on the workers: row i is ``fn(i, rng)``
        (an array or a tuple of arrays, one per column), ``rng`` a numpy Generator seeded
        by ``(seed, i)``, so the global batches are the same for any number of workers.
        ``fn`` travels to the workers once (it must be importable or picklable there).

        Example::

            ds = cluster.shard_from(lambda i, rng: (rng.standard_normal(20, np.float32), i % 2),
                                    rows=10_000, batch_size=128, shuffle=True)
            for xb, yb in ds:
                ...
        """
        return data_sources.shard_from(self, fn, rows, batch_size, shuffle, seed, drop_last)

    # ---------------------------------------------------------------- running, observing
    def sync(self):
        """Run everything recorded so far on the workers and wait for it.

        Example: ``cluster.sync()`` before timing a step.
        """
        self.executor.flush()

    def stats(self):
        """Per-worker step times (s), bytes communicated, programs run and cache hits.

        Example: ``cluster.stats()[0]["step_times"][-1]``.
        """
        self.sync()
        return self.gang.stats()

    def timeline(self, path):
        """Write a Chrome trace (chrome://tracing, Perfetto) of recent steps to ``path``:
        one track per worker with spans for decode, forward, backward, each all-reduce
        bucket and the optimizer step, plus the driver's waits.

        Example: ``cluster.timeline("trace.json")``.
        """
        self.sync()
        return write_trace(path, self.executor.driver_spans, self.gang.spans(), self.world_size)

    def resize(self, n):
        """Grow or shrink the gang to ``n`` workers between steps; shards are re-split
        evenly, replicas copied to new workers. Results stay exact (up to summation order).

        Example: ``cluster.resize(3)``.
        """
        _checks.resize_args(n)
        self.recovery.resize(n)

    def shutdown(self):
        """Stop the workers (idempotent). Replicated values (parameters, buffers, optimizer
        state, their gradients) come home as local tensors, so a model outlives its
        cluster; sharded values are gone (keep one with :meth:`gather` first).

        Example::

            cluster.shutdown()
            model(dg.randn(4, 20))          # the trained model, now local
        """
        if self.closed:
            return
        try:
            if self.recorder.rec.instrs:
                self.sync()
            checkpoint.bring_home(self)
        finally:
            self.closed = True
            _unregister(self)
            self.gang.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()
        return False

    def __repr__(self):
        return f"Cluster(workers={self.world_size}, device={self.device!r}, {self.gang!r})"

    # ---------------------------------------------------------------- checkpoints
    def gather(self, obj, copy=True):
        """Replace every distributed tensor inside ``obj`` (nested dicts/lists) by a local
        copy, fetching all replicated ones in one message. Example: ``cluster.gather(model.state_dict())``."""
        return checkpoint.gather(self, obj, copy)

    def save_checkpoint(self, path, model=None, optimizer=None, step=None, **extra):
        """Write model and optimizer state (read from a replica on worker 0 in one message)
        and the step to ``path``, atomically, with a checksum. Example::

            cluster.save_checkpoint("ckpt.dg", model, opt, step=100)
        """
        return checkpoint.save_checkpoint(self, path, model, optimizer, step, **extra)

    def load_checkpoint(self, path, model=None, optimizer=None):
        """Read a checkpoint; with ``model``/``optimizer`` given, load their state (the
        values are replicated to the workers, whatever their number). Returns the dict.

        Example: ``step = cluster.load_checkpoint("ckpt.dg", model, opt)["step"]``.
        """
        return checkpoint.load_checkpoint(path, model, optimizer)

    # ---------------------------------------------------------------- entry points of the engine
    # tensor.lazy_dispatch, distgrad.autograd and optimizers call these for distributed values.
    def record_op(self, op, inputs, attrs):
        """Record ``op(*inputs, **attrs)`` on distributed values (``tensor.lazy_dispatch``).

        Example: ``cluster.record_op(get_op("mul"), [X, 2.0], {})`` is ``X * 2.0``.
        """
        return self.recorder.record_op(op, inputs, attrs)

    def record_detach(self, t, requires_grad=False):
        """A new value on the workers: ``t`` without its history (sharing its memory and
        version counter), requiring grad as a fresh leaf if asked. ``detach()``, ``.data``
        and ``requires_grad_()`` of a distributed value go through here, so the workers'
        graph stops exactly where the driver's does. Example: ``x.store.cluster.record_detach(x)``."""
        return self.recorder.record_detach(t, requires_grad)

    def record_backward(self, tensors, grad_tensors, retain_graph, create_graph, inputs=None):
        """``backward()`` of distributed roots (see ``distgrad.dist_autograd``).

        Example: ``loss.backward()`` of a distributed ``loss`` lands here."""
        dist_autograd.record_backward(self, tensors, grad_tensors, retain_graph, create_graph, inputs)

    def record_grad(self, outputs, inputs, grad_outputs, retain_graph, create_graph, allow_unused):
        """``dg.autograd.grad`` of distributed outputs (see ``distgrad.dist_autograd``).

        Example: ``dg.autograd.grad(loss, [W])`` of a distributed ``loss`` lands here."""
        return dist_autograd.record_grad(self, outputs, inputs, grad_outputs, retain_graph,
                                         create_graph, allow_unused)

    def apply_function(self, fn_cls, args, kwargs):
        """A custom ``Function`` applied to distributed values (see ``distgrad.dist_autograd``).

        Example: ``MyFn.apply(X)`` with a sharded ``X`` lands here."""
        self.recorder.check_open()
        return dist_autograd.apply_function(self, fn_cls, args, kwargs)

    def on_rollback(self, restore):
        """Call ``restore()`` if the pending program fails on any worker: driver-side state
        changed while recording it (an optimizer's step count) is undone with the workers'.

        Example: ``cluster.on_rollback(lambda: setattr(opt, "steps", old))``."""
        self.recorder.rec.root.rollback.append(restore)


# Live clusters (weak): lazy_dispatch finds the cluster through the value's storage.
_clusters = weakref.WeakSet()


def current_cluster():
    """The cluster this process is using (made by :func:`init`, not shut down), or None.

    Example: ``cluster = dg.distributed.current_cluster() or dg.init(workers=2)``.
    """
    # init keeps at most one open cluster per process.
    return next((c for c in list(_clusters) if not c.closed), None)


def _register(cluster):
    _clusters.add(cluster)
    set_lazy_dispatch(_dispatch)


def _unregister(cluster):
    _clusters.discard(cluster)


def _dispatch(op, inputs, attrs):
    for x in inputs:
        if isinstance(x, Tensor):
            store = x.store
            if store.lazy:
                recorder = store.cluster.recorder
                out = recorder.record_op(op, inputs, attrs)
                if recorder.too_long():
                    store.cluster.sync()
                return out
    raise AssertionError("lazy dispatch without a lazy input")


def init(workers=2, device="cpu", address=None, backend="ray", bucket_cap_mb=25.0,
         timeout_s=60.0, num_cpus_per_worker=1, collective=None, compress=None, **kwargs):
    """Start ``workers`` workers and return a :class:`Cluster`.

    ``backend="ray"`` starts Ray actors (a local Ray instance when ``address`` is None,
    the cluster this job runs on with ``"auto"``); ``backend="local"`` runs the same
    worker code in threads of this process. ``device="cuda"`` gives each worker a GPU.
    ``bucket_cap_mb`` sizes the gradient all-reduce buckets; ``compress="fp16"`` sends
    them as float16 (off by default: it gives up exactness); ``timeout_s`` bounds every
    wait on a worker; ``collective`` forces "shm", "tcp" or "hierarchical" (default:
    shm on one node, hierarchical across nodes); other keywords go to the Ray scheduler
    (``strategy="SPREAD"``, ``place_timeout_s``, ``log_to_driver=False`` to keep the
    workers' output off this terminal, ``pin_cpus=True`` to give each worker its own
    cores of its machine: faster when the workers fill the machine, but two pinned jobs on
    one machine would share its first cores).

    One cluster per process: while one is active (not shut down), another ``init`` raises
    at once, whatever its arguments. A GPU request without cupy or a GPU fails at once.

    Example::

        with dg.init(workers=2, backend="local") as cluster:
            model = cluster.replicate(model)
    """
    _checks.init_args(workers, device, address, backend, bucket_cap_mb, timeout_s,
                      num_cpus_per_worker, collective, compress)
    active = current_cluster()
    if active is not None:
        # Like a second init_process_group: the first one holds the workers and their
        # resources, so waiting for placement would only time out.
        raise RuntimeError(f"init: a cluster is already active in this process ({active!r}): "
                           "call its shutdown() first, or use `with dg.init(...) as cluster:`")
    _interrupt.install()          # Ctrl-C inside a finalizer must not be lost
    if workers < 1:
        raise ValueError(f"init: workers must be >= 1, got {workers}")
    device = _backend.normalize_device(device)
    if backend == "local":
        if kwargs:      # Ray scheduler options: silently dropped, a typo would go unseen
            raise TypeError(f"init: {', '.join(sorted(kwargs))} only apply to backend='ray' "
                            "(the local backend runs its workers as threads of this process)")
        if device != "cpu":
            _backend.cupy_module()
        gang = LocalGang(workers, device=device, bucket_cap_mb=bucket_cap_mb, timeout_s=timeout_s,
                         compress=compress)
    elif backend == "ray":
        # Here, not at the top: Ray is needed (and imported) only for backend="ray".
        from .scheduler.ray_gang import RayGang
        gang = RayGang(workers, device=device, address=address, bucket_cap_mb=bucket_cap_mb,
                       timeout_s=timeout_s, num_cpus_per_worker=num_cpus_per_worker,
                       collective=collective, compress=compress, **kwargs)
    else:
        raise ValueError(f"init: unknown backend {backend!r}: expected 'ray' or 'local'")
    return Cluster(gang, workers, device)
