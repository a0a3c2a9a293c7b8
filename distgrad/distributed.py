"""The driver side of data parallelism: ``dg.init``, ``Cluster``, lazy distributed values.

Ops on distributed values are not run here: they are recorded (with their placement,
global shape and dtype) into a program that every worker runs at the next sync point
(``.item()``, ``.numpy()``, printing, ``bool()``, ``cluster.sync()``, a full buffer).
This module never imports Ray: ``backend="ray"`` loads ``distgrad.scheduler``.

Example::

    cluster = dg.init(workers=2, backend="local")
    X = cluster.shard(np.random.randn(10, 3).astype(np.float32))
    W = Variable(dg.randn(3, 1), requires_grad=True)
    loss = ((X @ W) ** 2).mean()
    loss.backward()              # W.grad: the exact gradient over all 10 rows
    print(loss.item())
    cluster.shutdown()
"""
import collections
import itertools
import logging
import time
import weakref

import numpy as np

from . import _backend, _checks, _hints, _interrupt, placement as pl, program as prog
from .autograd import engine
from .errors import RecoveryError, RemoteError, ResizeError, WorkerError
from .ops import get_op
from .placement import REPLICATE, Partial, PlacementError, Replicate, Shard
from . import dist_autograd
from .recording import LazyNode, Recording
from .tensor import Storage, Tensor, Variable, set_lazy_dispatch
from .utils.data import sources as data_sources

log = logging.getLogger("distgrad")
__all__ = ["init", "Cluster", "Shard", "Replicate", "Partial", "PlacementError", "RemoteError"]


class LazyStorage:
    """Storage of a distributed value: an id on the workers plus what the driver knows."""

    lazy = True
    __slots__ = ("cluster", "vid", "shape", "dtype", "placement", "counter", "leaves",
                 "device", "_cache", "__weakref__")

    def __init__(self, cluster, vid, shape, dtype, placement, leaves=frozenset(), device=None):
        self.cluster, self.vid = cluster, vid
        self.shape, self.dtype = tuple(int(n) for n in shape), np.dtype(dtype)
        self.placement, self.leaves = placement, leaves
        self.device = device or cluster.device       # where the workers hold it
        self.counter = [0]       # a one-item list, shared with aliases (detach, .data)
        self._cache = None

    @property
    def array(self):
        """The global value, fetched from the workers (a sync point)."""
        if self._cache is None or self._cache[0] != self.version:
            self._cache = (self.version, self.cluster._fetch(self))
        return self._cache[1]

    def assign(self, result):
        self.cluster._record_assign(self, result)

    version = Storage.version     # the same counter protocol as a local storage

    def bring_home(self, array):
        """Become the storage of a local tensor holding ``array`` (at shutdown)."""
        self.cluster = None
        self._cache = array
        self.__class__ = HomeStorage

    def __del__(self):
        # getattr: a Ctrl-C may land inside __init__, before the slot is set.
        cluster = getattr(self, "cluster", None)
        vid = getattr(self, "vid", None)
        if cluster is not None and vid is not None and not cluster._closed:
            cluster._release(vid)


class HomeStorage(LazyStorage):
    """A replicated value brought home when its cluster shut down: from then on a plain
    local storage (same object, so every tensor that held it is local now)."""

    __slots__ = ()
    lazy = False

    def _set_array(self, array):
        self._cache = array

    array = property(lambda self: self._cache, _set_array)
    shape = property(lambda self: self._cache.shape)
    dtype = property(lambda self: self._cache.dtype)


class Cluster:
    """A gang of workers holding shards and replicas; made by :func:`init`.

    Example::

        with dg.init(workers=2, backend="local") as cluster:
            X = cluster.shard(np.ones((5, 3), np.float32))
            print(X.sum().item())      # 15.0
    """

    def __init__(self, gang, world_size, device="cpu", max_instructions=20000):
        self.gang = gang
        self.world_size = world_size
        self.device = _backend.normalize_device(device)
        self.max_instructions = max_instructions
        self._vids = itertools.count(1)
        self._closed = False
        self._rec = Recording(world_size)
        self._tracing = []         # what is being traced into a sub-program (innermost last)
        self._live = weakref.WeakValueDictionary()      # vid -> LazyStorage
        self._free = []
        # One mirror per worker of its LRU program cache (same size, same order of use),
        # so the driver knows when a key alone is enough; a worker whose mirror was reset
        # is told to empty its cache too, so the two never drift.
        self._sent_keys = [collections.OrderedDict() for _ in range(world_size)]
        self._reset_cache = set(range(world_size))
        self._rollback_hooks = []  # driver-side state to restore if the pending program fails
        self._replicas = {}        # (id(storage), requires_grad) -> [weakref(store), vid, version]
        self._leaf_objects = {}    # vid -> weakref(driver tensor whose .grad receives gradients)
        self._infer_cache = {}
        self._sources = {}         # vid -> (per-worker pieces, requires_grad) of live shards
        self._data_sources = weakref.WeakValueDictionary()   # id -> worker-side dataset source
        self._data_reads = {}      # vid -> (source, batch rows, vids of the read) of live batches
        self._lost = {}            # vid -> why its value is gone from the workers
        self.fault_tolerant = True
        self.max_retries = 3
        self.recoveries = []       # one dict per recovery: ranks, seconds, resized
        self._speed = {}           # rank -> rows per busy second (for sizes="auto")
        self.messages_sent = 0
        self._driver_spans = collections.deque(maxlen=100_000)
        _register(self)

    # ---------------------------------------------------------------- public API
    def shard(self, data, dim=0, sizes=None):
        """Split ``data`` (array, tensor or Variable) along ``dim`` across the workers.

        ``sizes`` gives each worker's extent (default: an even split; uneven allowed);
        ``sizes="auto"`` splits in proportion to each worker's measured speed (rows per
        second of busy time in recent steps), so a slower worker gets fewer rows and the
        gang finishes each step together. The gradients stay exact for any split.
        A Variable that requires grad becomes a sharded leaf whose ``.grad`` is sharded.
        """
        _checks.shard_args(data, dim, sizes, self.world_size)
        src = data if isinstance(data, Tensor) else None
        arr = _backend.to_numpy(src._store.array if src is not None else np.asarray(data))
        if src is None and arr.dtype == np.float64 and not isinstance(data, np.ndarray):
            arr = arr.astype(np.float32)
        if arr.ndim == 0:
            raise PlacementError("shard: cannot shard a 0-d value")
        _hints.check_sharded(self, arr)
        dim = dim % arr.ndim
        if isinstance(sizes, str):
            if sizes != "auto":
                raise ValueError(f"shard: sizes must be a list of {self.world_size} numbers or 'auto'")
            sizes = self._auto_sizes(arr.shape[dim])
        sizes = pl.split_sizes(arr.shape[dim], self.world_size, sizes)
        bounds = np.cumsum((0,) + sizes)
        pieces = [np.ascontiguousarray(np.take(arr, np.arange(bounds[r], bounds[r + 1]), axis=dim))
                  for r in range(self.world_size)]
        requires_grad = bool(src is not None and src.requires_grad)
        return self._put(pieces, arr.shape, arr.dtype, Shard(dim, sizes), requires_grad,
                         Variable if isinstance(data, Variable) or src is None else Tensor)

    def replicate(self, obj):
        """Place a Variable/tensor, or every parameter and buffer of a Module, on every worker.

        A module's parameters stay the same Python objects, now living on the workers:
        an optimizer built before or after works unchanged, and parameters travel to the
        driver only when read.
        """
        _checks.replicate_args(obj, self)
        if isinstance(obj, Tensor):
            if obj._store.lazy:
                return obj
            a = _backend.to_numpy(obj._store.array)
            return self._put([a] * self.world_size, a.shape, a.dtype, REPLICATE,
                             obj.requires_grad, type(obj))
        tensors = []
        if hasattr(obj, "parameters"):
            tensors += list(obj.parameters())
        if hasattr(obj, "buffers"):
            tensors += [b for b in obj.buffers() if b is not None]
        if not tensors and not hasattr(obj, "parameters"):
            raise TypeError(f"replicate: expected a Tensor, Variable or Module, got {type(obj).__name__}")
        for t in tensors:
            if t._store.lazy:
                continue
            a = _backend.to_numpy(t._store.array)
            t._store = self._put_storage([a] * self.world_size, a.shape, a.dtype, REPLICATE,
                                         t.requires_grad)
            if t.requires_grad:
                self._leaf_objects[t._store.vid] = weakref.ref(t)
            if t._grad is not None and not t._grad._store.lazy:
                t._grad = self.replicate(t._grad.detach())
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

    def sync(self):
        """Run everything recorded so far on the workers and wait for it."""
        self._flush()

    def stats(self):
        """Per-worker step times (s), bytes communicated, programs run and cache hits.

        Example: ``cluster.stats()[0]["step_times"][-1]``.
        """
        self._flush()
        return self.gang.stats()

    def timeline(self, path):
        """Write a Chrome trace (chrome://tracing, Perfetto) of recent steps to ``path``:
        one track per worker with spans for decode, forward, backward, each all-reduce
        bucket and the optimizer step, plus the driver's waits.

        Example: ``cluster.timeline("trace.json")``.
        """
        import json
        import os
        self._flush()
        events, threads = [], {}

        def add(pid, name, start, end, thread):
            tid = threads.setdefault((pid, thread), len(threads))
            events.append({"name": name, "ph": "X", "pid": pid, "tid": tid,
                           "ts": start * 1e6, "dur": max(end - start, 0) * 1e6})
        for start, end in self._driver_spans:
            add(0, "driver wait", start, end, "driver")
        for rank, spans in enumerate(self.gang.spans()):
            for name, start, end, thread in spans:
                add(rank + 1, name, start, end, thread)
        meta = [{"name": "process_name", "ph": "M", "pid": 0, "args": {"name": "driver"}}]
        meta += [{"name": "process_name", "ph": "M", "pid": r + 1, "args": {"name": f"worker {r}"}}
                 for r in range(self.world_size)]
        meta += [{"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": t}}
                 for (pid, t), tid in threads.items()]
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump({"traceEvents": meta + events, "displayTimeUnit": "ms"}, f)
        os.replace(tmp, path)
        return path

    def shutdown(self):
        """Stop the workers (idempotent). Replicated values (parameters, buffers, optimizer
        state, their gradients) come home as local tensors, so a model outlives its
        cluster; sharded values are gone (keep one with :meth:`gather` first).

        Example::

            cluster.shutdown()
            model(dg.randn(4, 20))          # the trained model, now local
        """
        if self._closed:
            return
        try:
            if self._rec.instrs:
                self._flush()
            self._bring_home()
        finally:
            self._closed = True
            _unregister(self)
            self.gang.shutdown()

    def _bring_home(self):
        """Fetch every live replicated value from worker 0 and make it local, in place."""
        stores = {vid: st for vid, st in list(self._live.items())
                  if isinstance(st.placement, Replicate) and vid not in self._lost}
        if not stores:
            return
        try:
            arrays = self._control([0], {"control": "export", "vids": sorted(stores)})[0]
        except Exception as e:     # the workers are gone: the values are lost with them
            log.warning("could not bring the replicated values home at shutdown: %s", e)
            return
        for vid, store in stores.items():
            got = arrays.get(vid)
            if got is not None:
                a = np.array(got[0], copy=True)
                store.bring_home(_backend.to_device(a, store.device) if store.device != "cpu" else a)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()
        return False

    def __repr__(self):
        return f"Cluster(workers={self.world_size}, device={self.device!r}, {self.gang!r})"

    # ---------------------------------------------------------------- recording
    def _check_open(self):
        if self._closed:
            raise RuntimeError("this cluster was shut down: its sharded values are gone (its "
                               "replicated ones came home as local tensors); to keep a sharded "
                               "value, call cluster.gather(x) before shutdown")

    def _new_storage(self, shape, dtype, placement, leaves=frozenset(), device=None):
        vid = next(self._vids)
        store = LazyStorage(self, vid, shape, dtype, placement, leaves, device)
        self._live[vid] = store
        return store

    def _put_storage(self, pieces, shape, dtype, placement, requires_grad):
        self._check_open()
        store = self._new_storage(shape, dtype, placement)
        rec = self._rec.root
        slot = rec.new_slot(store.vid)
        idx = rec.add_input(pieces)
        rec.instrs.append(["put", slot, idx, bool(requires_grad)])
        if requires_grad:
            store.leaves = frozenset([store.vid])
        if isinstance(placement, Shard):
            # The driver keeps the source of every live shard: a replaced worker gets its
            # shard again, and a resize re-splits it.
            self._sources[store.vid] = (pieces, bool(requires_grad))
            rec.shard_puts.append((idx, store))
        return store

    def _put(self, pieces, shape, dtype, placement, requires_grad, cls):
        store = self._put_storage(pieces, shape, dtype, placement, requires_grad)
        t = cls._from_array(None)
        t._store = store
        t.requires_grad = bool(requires_grad)
        if requires_grad:
            self._leaf_objects[store.vid] = weakref.ref(t)
        return t

    def _replay(self, t):
        """Re-record a driver-local computation on the workers, so that its leaves get
        exact gradients (e.g. a weight penalty computed locally, added to a sharded loss)."""
        memo = self._rec.root.replayed
        stack = [(t, False)]
        while stack:
            x, ready = stack.pop()
            node = x.grad_fn
            if id(node) in memo:
                continue
            if not isinstance(node, engine.OpNode) or node.released:
                raise PlacementError(
                    f"a local tensor made by {node.name()} cannot be replayed on the workers: "
                    "detach it, or compute it from distributed values")
            pending = [i for i in node.inputs if isinstance(i, Tensor) and i.grad_fn is not None
                       and not i._store.lazy and id(i.grad_fn) not in memo]
            if not ready and pending:
                stack.append((x, True))
                stack.extend((i, False) for i in pending)
                continue
            for i, v in zip(node.inputs, node.versions):
                if isinstance(i, Tensor) and not i._store.lazy and i._store.version != v:
                    engine.check_version(i, v, node)
            args = [memo[id(i.grad_fn)][1] if isinstance(i, Tensor) and i.grad_fn is not None
                    and not i._store.lazy else i for i in node.inputs]
            memo[id(node)] = (node, self.record_op(node.op, args, node.attrs))
        return memo[id(t.grad_fn)][1]

    def _local_replica(self, t):
        """Implicit replication of a driver-local tensor: sent once, again when its version changes."""
        if t.grad_fn is not None:
            return self._replay(t)._store
        store = t._store
        key = (id(store), t.requires_grad)
        entry = self._replicas.get(key)
        if entry is not None and entry[0]() is not store:
            entry = None
        a = None
        if entry is None:
            a = _backend.to_numpy(store.array)
            _hints.check_implicit_replica(self, t, a)
            lazy = self._put_storage([a] * self.world_size, a.shape, a.dtype, REPLICATE,
                                     t.requires_grad)
            entry = [weakref.ref(store), lazy, store.version]
            self._replicas[key] = entry
            weakref.finalize(store, self._replicas.pop, key, None)
        elif entry[2] != store.version:
            a = _backend.to_numpy(store.array)
            lazy = entry[1]
            rec = self._rec.root
            idx = rec.add_input([a] * self.world_size)
            rec.instrs.append(["update", rec.ref(lazy.vid), idx])
            entry[2] = store.version
            lazy.version += 1
        lazy = entry[1]
        if t.requires_grad:
            self._leaf_objects[lazy.vid] = weakref.ref(t)
        return lazy

    def _arg(self, x):
        """(argspec, placement, global shape, store) of one op input."""
        if isinstance(x, Tensor):
            store = x._store
            if not store.lazy:
                store = self._local_replica(x)
            elif store.cluster is not self:
                raise PlacementError("values of two different clusters cannot be mixed")
            if store.vid in self._lost:
                raise RecoveryError(f"a {store.placement!r} value of shape {store.shape} "
                                    f"{self._lost[store.vid]}: recompute it from the inputs")
            return ["s", self._rec.ref(store.vid)], store.placement, store.shape, store
        if isinstance(x, np.generic):
            x = x.item()
        if type(x) is float:
            return ["k", self._rec.add_scalar(x)], None, None, x
        if not isinstance(x, (int, bool, type(None))):
            raise TypeError(f"unsupported operand of type {type(x).__name__} in a distributed op")
        return ["c", x], None, None, None

    def _emit(self, op, args, placements, shapes, stores, attrs, cls, requires_grad, inputs=()):
        """Record one op whose inputs are already resolved; return the result tensor.

        ``stores[i]`` is the input's storage, or the value of a float operand (which
        travels as a message scalar); ``inputs`` are the tensors, for the graph's edges."""
        decision = pl.propagate(op, placements, shapes, attrs, max((len(s) for s in shapes if s is not None), default=0))
        local_shape, dtype = self._infer(op, placements, shapes, stores, args, decision.attrs)
        stores = [s if isinstance(s, LazyStorage) else None for s in stores]
        out_p = decision.out
        shape = list(local_shape)
        if isinstance(out_p, Shard):
            shape[out_p.dim] = sum(out_p.sizes)
        elif op.placement == "allgather":
            shape = list(shapes[0])      # inferred with a 1-rank communicator: the local shard
        requires_grad = requires_grad and op.differentiable and engine.is_grad_enabled()
        leaves = frozenset().union(*(s.leaves for s in stores if s is not None)) if requires_grad else frozenset()
        device = decision.attrs["device"] if op.name == "to_device" else next(
            (s.device for s in stores if s is not None), None)
        store = self._new_storage(shape, dtype, out_p, leaves, device)
        rec = self._rec
        slot = rec.new_slot(store.vid)
        ins = ["op", op.name, args, decision.attrs, slot, engine.is_grad_enabled()]
        floats = [k for k, v in decision.attrs.items() if type(v) is float]
        if floats:
            # Float attrs (learning rates, betas, eps...) are message scalars, not part of
            # the structure: a scheduler changing them keeps the program cached.
            ins[3] = {k: v for k, v in decision.attrs.items() if type(v) is not float}
            ins.append({k: rec.add_scalar(decision.attrs[k]) for k in floats})
        rec.instrs.append(ins)
        grad_fn = None
        if requires_grad:
            grad_fn = engine.node_class(op.name, LazyNode)(
                tuple([engine.next_node_of(x) if isinstance(x, Tensor) else None for x in inputs]))
            grad_fn.vid = store.vid
        t = cls._from_array(None, grad_fn=grad_fn, requires_grad=requires_grad)
        t._store = store
        if len(rec.instrs) >= self.max_instructions and not self._tracing:
            self._flush()
        return t

    def _infer(self, op, placements, shapes, stores, args, attrs):
        """Local output shape and dtype, by running the op on zeros of one worker's shapes."""
        rank = 0
        for p in placements:
            if isinstance(p, Shard):
                rank = max(range(len(p.sizes)), key=p.sizes.__getitem__)   # the largest shard
                break
        local, key_local = [], []
        for a, p, s, st in zip(args, placements, shapes, stores):
            if not isinstance(st, LazyStorage):
                # A message scalar's value does not change shapes: keyed by kind only.
                local.append(st if a[0] == "k" else a[1])
                key_local.append("k" if a[0] == "k" else (type(a[1]), a[1]))   # True != 1 here
                continue
            s = list(s)
            if isinstance(p, Shard):
                s[p.dim] = p.sizes[rank]
            local.append((tuple(s), st.dtype.str))
            key_local.append(local[-1])
        key = (op.name, tuple(key_local),
               tuple((k, "k" if type(v) is float else (type(v), v)) for k, v in attrs.items()))
        try:
            hit = self._infer_cache.get(key)
        except TypeError:             # an unhashable attr (a list, an index array): by its text
            key = repr(key)
            hit = self._infer_cache.get(key)
        if hit is None:
            arrays = [np.zeros(x[0], np.dtype(x[1])) if isinstance(x, tuple) else x for x in local]
            try:
                with np.errstate(all="ignore"):
                    out = op.forward(np, *arrays, **attrs)
            except (ValueError, IndexError, TypeError) as e:
                names = ", ".join(repr(p) for p in placements if p is not None)
                raise RuntimeError(f"{op.name}: cannot apply to tensors of global shapes "
                                   f"{[tuple(s) for s in shapes if s is not None]} ({names}): {e}") from None
            out = np.asarray(out)
            hit = (out.shape, out.dtype)
            if len(self._infer_cache) > 4096:
                self._infer_cache.clear()
            self._infer_cache[key] = hit
        return hit

    def _allreduce_partial(self, store, cls=Tensor, requires_grad=False, source=None):
        """Forward collective: the sum over workers of a Partial value, replicated."""
        return self._emit(get_op("allreduce"), [["s", self._rec.ref(store.vid)]], [store.placement],
                          [store.shape], [store], {}, cls, requires_grad,
                          () if source is None else (source,))

    def record_op(self, op, inputs, attrs):
        """Record ``op(*inputs, **attrs)`` on distributed values (``tensor.lazy_dispatch``)."""
        self._check_open()
        inputs = list(inputs)
        cls = Variable if any(isinstance(x, Variable) for x in inputs) else Tensor
        requires_grad = any(isinstance(x, Tensor) and x.requires_grad for x in inputs)
        resolved = [self._arg(x) for x in inputs]
        placements = [r[1] for r in resolved]
        for i in pl.partial_inputs_to_reduce(op.name, placements):
            x = inputs[i]
            inputs[i] = self._allreduce_partial(resolved[i][3], cls, isinstance(x, Tensor) and x.requires_grad, x)
            resolved[i] = self._arg(inputs[i])
        args, placements, shapes, stores = (list(z) for z in zip(*resolved))
        if op.name == "mean" and isinstance(placements[0], Shard) and \
                placements[0].dim in pl._reduced_axes(attrs.get("dim"), len(shapes[0])):
            # Mean over the sharded dim: local sums divided by the GLOBAL count -> Partial.
            total = self._emit(get_op("sum"), args, placements, shapes, stores, attrs, cls, requires_grad,
                               inputs)
            return total / pl.global_count(shapes[0], attrs.get("dim"))
        return self._emit(op, args, placements, shapes, stores, attrs, cls, requires_grad, inputs)

    def _record_assign(self, target, result):
        """In-place write of ``result`` into the distributed value ``target``."""
        self._check_open()
        src = result._store if result._store.lazy else self._local_replica(result.detach())
        if src.shape != target.shape:
            raise RuntimeError(f"in-place write: result of shape {src.shape} into a tensor of shape {target.shape}")
        if src.placement != target.placement:
            if isinstance(src.placement, Partial) and isinstance(target.placement, Replicate):
                src = self._allreduce_partial(src, Tensor, result.requires_grad)._store
            else:
                raise PlacementError(f"in-place write of a {src.placement!r} value into a "
                                     f"{target.placement!r} one")
        rec = self._rec
        rec.instrs.append(["assign", rec.ref(target.vid), rec.ref(src.vid)])
        target.leaves = target.leaves | src.leaves

    # Autograd entry points (distgrad.autograd calls them for distributed values).
    def record_backward(self, tensors, grad_tensors, retain_graph, create_graph, inputs=None):
        """``backward()`` of distributed roots (see ``distgrad.dist_autograd``)."""
        dist_autograd.record_backward(self, tensors, grad_tensors, retain_graph, create_graph, inputs)

    def record_grad(self, outputs, inputs, grad_outputs, retain_graph, create_graph, allow_unused):
        """``dg.autograd.grad`` of distributed outputs (see ``distgrad.dist_autograd``)."""
        return dist_autograd.record_grad(self, outputs, inputs, grad_outputs, retain_graph,
                                         create_graph, allow_unused)

    def apply_function(self, fn_cls, args, kwargs):
        """A custom ``Function`` applied to distributed values (see ``distgrad.dist_autograd``)."""
        self._check_open()
        return dist_autograd.apply_function(self, fn_cls, args, kwargs)

    def record_detach(self, t, requires_grad=False):
        """A new value on the workers: ``t`` without its history (sharing its memory and
        version counter), requiring grad as a fresh leaf if asked. ``detach()``, ``.data``
        and ``requires_grad_()`` of a distributed value go through here, so the workers'
        graph stops exactly where the driver's does."""
        self._check_open()
        src = t._store
        store = self._new_storage(src.shape, src.dtype, src.placement, device=src.device)
        store.counter = src.counter
        rec = self._rec
        rec.instrs.append(["detach", rec.ref(src.vid), rec.new_slot(store.vid), bool(requires_grad)])
        if requires_grad:
            store.leaves = frozenset([store.vid])
        return store

    def on_rollback(self, restore):
        """Call ``restore()`` if the pending program fails on any worker: driver-side state
        changed while recording it (an optimizer's step count) is undone with the workers'."""
        self._rollback_hooks.append(restore)

    # ---------------------------------------------------------------- execution
    def _release(self, vid):
        self._sources.pop(vid, None)
        self._lost.pop(vid, None)
        rec = self._rec.root
        if vid in rec.slot_of and rec.slot_of[vid] in rec.outputs:
            return                      # defined in the pending program: simply not kept
        self._free.append(vid)

    def _fetch(self, store):
        self._check_open()
        rec = self._rec
        slot = rec.ref(store.vid)
        rec.instrs.append(["fetch", slot])
        results = self._flush()
        locals_ = [r["fetched"][slot] for r in results]
        p = store.placement
        if isinstance(p, Shard):
            out = np.concatenate(locals_, axis=p.dim)
        elif isinstance(p, Partial):
            out = locals_[0].copy()
            for a in locals_[1:]:
                out += a
        else:
            out = locals_[0]
        out = out.reshape(store.shape).astype(store.dtype, copy=False)
        return _backend.to_device(out, store.device) if store.device != "cpu" else out

    def _flush(self):
        """Send the pending program to every worker, wait, and return their results.

        A step is all or nothing. If workers die or hang, the survivors roll the program
        back, the failed workers are replaced (or, without resources, dropped and the
        shards re-split), their state is restored from a surviving replica and the
        driver's shard sources, and the same program runs again: the step commits once.
        If any worker reports an error, every worker rolls the program back before the
        driver raises, so a retried step is applied exactly once.
        """
        self._check_open()
        if self._tracing:
            raise RuntimeError(
                f"{self._tracing[-1]} needs the value of a distributed tensor (.item(), .numpy(), "
                "printing, bool()): it is traced into the program the workers run, so it can "
                "only combine its arguments with distgrad ops")
        rec = self._rec
        self._rec = Recording(self.world_size)
        restores, self._rollback_hooks = self._rollback_hooks, []
        if not rec.instrs and not self._free:
            return [{"fetched": {}} for _ in range(self.world_size)]
        keep = sorted(s for s, vid in rec.outputs.items() if vid in self._live)
        structure = {"instrs": rec.instrs, "nslots": rec.nslots, "ext": rec.ext, "keep": keep}
        key = prog.structure_key(structure)
        inv = {s: v for v, s in rec.slot_of.items()}
        bind = [inv[s] for s in rec.ext] + [rec.outputs[s] for s in keep]
        lost = [v for v in bind[:len(rec.ext)] if v in self._lost]
        if lost:
            raise RecoveryError(f"values {lost} cannot be used: {self._lost[lost[0]]} "
                                "(only inputs given to cluster.shard/replicate are kept): "
                                "recompute them")
        free, self._free = self._free, []
        header = {"v": prog.PROTOCOL, "key": key, "bind": bind, "free": free,
                  "scalars": rec.scalars}
        try:
            return self._run_program(header, structure, rec)
        except BaseException:
            for restore in reversed(restores):
                restore()
            self._free.extend(free)
            for vid in rec.outputs.values():
                self._lost.setdefault(vid, "was computed by a step that failed and was rolled back")
            raise

    def _run_program(self, header, structure, rec):
        """Run one program on every worker (retrying after recoveries); all or nothing."""
        for attempt in range(self.max_retries + 1):
            payloads = self._payloads(header, structure, rec)
            start = time.time()
            try:
                results = self.gang.run(payloads)
            except WorkerError as err:
                if not self.fault_tolerant or attempt == self.max_retries or \
                        not hasattr(self.gang, "replace"):
                    self._abort(repair=True)    # whoever ran or still runs it undoes it
                    raise
                self._recover(err, rec)
                continue
            finally:
                self._driver_spans.append((start, time.time()))
            errors = [(r, res["error"]) for r, res in enumerate(results) if res.get("error")]
            if not errors:
                self.messages_sent += 1
                self._measure_speed(rec, results)
                self._observe_streams(results)
                return results
            missed = [r for r, e in errors if prog.NOT_CACHED in e]
            waited = [r for r, e in errors if "CollectiveTimeoutError" in e]
            if missed and len(missed) + len(waited) == len(errors) and attempt < self.max_retries:
                # Those workers ran nothing (their cache and the driver's mirror disagreed);
                # the others ran the program (or waited for them in a collective): undo it
                # there, then run it again everywhere, in full where it was missing.
                self._abort([r for r in range(self.world_size) if r not in missed],
                            repair=bool(waited))
                self._reset_mirrors(missed)
                continue
            self._abort(repair=any("Collective" in e for _, e in errors))
            self._reset_mirrors([r for r, _ in errors])
            # The cause first: peers that waited for the failed worker report a timeout.
            errors.sort(key=lambda e: "CollectiveTimeoutError" in e[1])
            rank, err = errors[0]
            also = f"; workers {[r for r, _ in errors[1:]]} failed too" if len(errors) > 1 else ""
            raise RemoteError(f"worker {rank}: {err} (the step was rolled back on every "
                              f"worker{also})")
        raise AssertionError("unreachable")

    def _abort(self, ranks=None, repair=False):
        """Roll the last program back on those workers (default: all), without waiting: the
        rollback runs after whatever the worker is running, before any later message.
        ``repair``: the collective group may be broken (a peer timed out): form a new one."""
        ranks = list(range(self.world_size)) if ranks is None else list(ranks)
        msg = self._encode({"v": prog.PROTOCOL, "control": "rollback"})
        try:
            self.gang.post([msg] * len(ranks), ranks)
            if repair and self.world_size > 1:
                self.gang.repair()
        except Exception as e:        # a dead worker is replaced (and re-hydrated) anyway
            log.warning("could not roll workers %s back: %s", ranks, e)

    def _observe_streams(self, results):
        """Each reply says how far the workers' data streams have read ahead."""
        for r, res in enumerate(results):
            for sid, status in (res.get("data") or {}).items():
                src = self._data_sources.get(sid)
                if src is not None and src.streaming and src.active is not None:
                    src.observe(r, status)

    def _reset_mirrors(self, ranks=None):
        """Forget what those workers cache; they are told to empty their caches too."""
        for r in range(self.world_size) if ranks is None else ranks:
            self._sent_keys[r].clear()
            self._reset_cache.add(r)

    def _measure_speed(self, rec, results):
        """Rows per busy second of each worker, from programs with sharded inputs (EMA)."""
        if not rec.shard_puts or len(results) != self.world_size:
            return
        sizes = rec.shard_puts[0][1].placement.sizes
        if len(sizes) != self.world_size:
            return
        for r, (rows, res) in enumerate(zip(sizes, results)):
            busy = res.get("busy_s")
            if not rows or not busy:
                continue                  # no rows, no information: keep the old estimate
            speed = rows / max(busy, 1e-6)
            old = self._speed.get(r)
            self._speed[r] = speed if old is None else 0.5 * old + 0.5 * speed

    def _auto_sizes(self, n):
        """Split n rows in proportion to measured speeds (even until every worker is measured)."""
        if len(self._speed) < self.world_size:
            return None
        speeds = np.array([self._speed[r] for r in range(self.world_size)])
        exact = n * speeds / speeds.sum()
        sizes = np.floor(exact).astype(int)
        for r in np.argsort(-(exact - sizes))[:n - sizes.sum()]:   # largest remainders
            sizes[r] += 1
        return tuple(int(s) for s in sizes)

    def _payloads(self, header, structure, rec):
        """One message per worker: the shared header, that worker's own inputs, and the
        program in full where that worker's cache (as mirrored here) lacks it."""
        key, out = header["key"], []
        for r in range(self.world_size):
            sent = self._sent_keys[r]
            msg = dict(header, inputs=rec.inputs[r], prog=None if key in sent else structure)
            if r in self._reset_cache:
                msg["reset_cache"] = True
                self._reset_cache.discard(r)
            sent[key] = True
            sent.move_to_end(key)
            while len(sent) > prog.PROGRAM_CACHE_SIZE:
                sent.popitem(last=False)
            out.append(self._encode(msg))
        return out

    @staticmethod
    def _encode(msg):
        side = []
        return prog.encode(msg, side), side

    def _control(self, ranks, msg):
        """Send a recovery control message to some workers; return their replies."""
        msg = dict(msg, v=prog.PROTOCOL)
        replies = self.gang.run([self._encode(msg) for _ in ranks], ranks=ranks)
        for r, rep in zip(ranks, replies):
            if rep.get("error"):
                raise RecoveryError(f"worker {r} failed {msg['control']}: {rep['error']}")
        return [rep["fetched"] for rep in replies]

    # ---------------------------------------------------------------- failures and resizing
    def _recover(self, err, rec):
        t0 = time.time()
        dead = sorted(set(err.ranks))
        log.warning("worker(s) %s on node(s) %s failed (%s): recovering", dead,
                    list(getattr(err, "nodes", ())), err)
        survivors = [r for r in range(self.world_size) if r not in dead]
        if not survivors:
            raise RecoveryError("every worker failed; nothing to recover from") from err
        # Survivors end (or give up on) the failed program, then undo it: nothing commits.
        self._control(survivors, {"control": "rollback"})
        pending = set(rec.outputs.values())
        try:
            self.gang.replace(dead)
            resized, new_ranks, source = False, dead, survivors[0]
        except ResizeError as e:
            log.warning("cannot replace workers %s (%s): continuing with %d workers",
                        dead, e, len(survivors))
            self.gang.drop(dead)
            self._set_world(len(survivors), rec)
            resized, new_ranks, source = True, [], 0
        self._rehydrate(new_ranks, resized, source, exclude=pending)
        self.recoveries.append({"ranks": dead, "seconds": time.time() - t0, "resized": resized})
        log.warning("recovered from the failure of %s in %.1f s", dead, time.time() - t0)

    def _set_world(self, n, rec=None):
        """Change the world size: re-split every live shard source (and the inputs of a
        recording about to be re-run) evenly over ``n`` workers."""
        old = self.world_size
        self.world_size = n
        for vid, (pieces, rg) in list(self._sources.items()):
            store = self._live.get(vid)
            if store is None:
                continue
            self._sources[vid] = (_resplit(pieces, store.placement.dim, n), rg)
        for store in list(self._live.values()):
            p = store.placement
            if isinstance(p, Shard):
                store.placement = Shard(p.dim, pl.split_sizes(sum(p.sizes), n))
        if rec is not None:
            shard_inputs = {idx: store for idx, store in rec.shard_puts}
            inputs = [[] for _ in range(n)]
            for idx in range(len(rec.inputs[0])):
                store = shard_inputs.get(idx)
                if store is None:
                    per = [rec.inputs[0][idx]] * n
                else:
                    per = _resplit([rec.inputs[r][idx] for r in range(old)], store.placement.dim, n)
                for r in range(n):
                    inputs[r].append(per[r])
            for idx, src, rows, stores in rec.source_reads:
                per, sizes = src.split(rows, n)       # the same rows, split over n workers
                for r in range(n):
                    inputs[r][idx] = per[r]
                for store in stores:
                    store.placement = Shard(0, sizes)
            rec.inputs = inputs
        self._rec = Recording(n)
        self._sent_keys = [collections.OrderedDict() for _ in range(n)]
        self._reset_cache = set(range(n))
        self._speed = {}

    def _rehydrate(self, new_ranks, resharded, source, exclude=()):
        """Give new workers the replicated values (from worker ``source``) and every worker
        that needs it its shards (from the driver's sources); the rest is marked lost."""
        live = {vid: st for vid, st in list(self._live.items())
                if vid not in exclude and vid not in self._lost}
        replicated = [vid for vid, st in live.items() if isinstance(st.placement, Replicate)]
        exported = self._control([source], {"control": "export", "vids": replicated})[0] if new_ranks else {}
        shard_ranks = range(self.world_size) if resharded else new_ranks
        imports = {r: dict(exported) if r in new_ranks else {} for r in shard_ranks}
        # Datasets the workers read: opened again where needed, batches still held read again.
        broken, reread = data_sources.rehydrate(self, live, list(shard_ranks), resharded)
        for vid, st in live.items():
            if isinstance(st.placement, Replicate) or vid in reread:
                continue
            src = self._sources.get(vid) if isinstance(st.placement, Shard) else None
            if src is None:
                if isinstance(st.placement, Partial) or new_ranks or resharded:
                    self._lost[vid] = "was lost with a failed worker"
                continue
            pieces, rg = src
            for r in shard_ranks:
                imports[r][vid] = [pieces[r], rg]
        for r, values in imports.items():
            if values:
                self._control([r], {"control": "import", "values": values})
        self._reset_mirrors()
        if broken:
            raise broken[0]

    def resize(self, n):
        """Grow or shrink the gang to ``n`` workers between steps; shards are re-split
        evenly, replicas copied to new workers. Results stay exact (up to summation order).

        Example: ``cluster.resize(3)``.
        """
        _checks.resize_args(n)
        if n < 1:
            raise ResizeError(f"resize: cannot run with {n} workers (need at least 1)")
        if n == self.world_size:
            return
        if not hasattr(self.gang, "resize"):
            raise ResizeError(f"resize: the {type(self.gang).__name__} backend cannot resize")
        self._flush()
        for src in list(self._data_sources.values()):
            src.check_resize()
        old = self.world_size
        self.gang.resize(n)               # raises ResizeError (with the reason) if impossible
        self._set_world(n)
        self._rehydrate(list(range(old, n)), True, 0)

    # ---------------------------------------------------------------- checkpoints
    def gather(self, obj, copy=True):
        """Replace every distributed tensor inside ``obj`` (nested dicts/lists) by a local
        copy, fetching all replicated ones in one message. Example: ``cluster.gather(model.state_dict())``."""
        self._flush()
        found = {}

        def collect(o):
            if isinstance(o, Tensor) and o._store.lazy:
                found[o._store.vid] = o
            elif isinstance(o, dict):
                for v in o.values():
                    collect(v)
            elif isinstance(o, (list, tuple)):
                for v in o:
                    collect(v)
        collect(obj)
        rep = [vid for vid, t in found.items() if isinstance(t._store.placement, Replicate)]
        arrays = self._control([0], {"control": "export", "vids": rep})[0] if rep else {}

        def convert(o):
            if isinstance(o, Tensor) and o._store.lazy:
                vid = o._store.vid
                a = arrays[vid][0] if vid in arrays else o._store.array
                # Arrays from the object store are read-only views; copy=False is for
                # callers that only read them (checkpoints).
                a = np.array(a, copy=True) if copy else a
                return (Variable if isinstance(o, Variable) else Tensor)._from_array(a)
            if isinstance(o, dict):
                return {k: convert(v) for k, v in o.items()}
            if isinstance(o, (list, tuple)):
                return type(o)(convert(v) for v in o)
            return o
        return convert(obj)

    def save_checkpoint(self, path, model=None, optimizer=None, step=None, **extra):
        """Write model and optimizer state (read from a replica on worker 0 in one message)
        and the step to ``path``, atomically, with a checksum. Example::

            cluster.save_checkpoint("ckpt.dg", model, opt, step=100)
        """
        from .serialization import save
        state = {"step": step, "world_size": self.world_size, **extra}
        if model is not None:
            state["model"] = model.state_dict()
        if optimizer is not None:
            state["optimizer"] = optimizer.state_dict()
        save(self.gather(state, copy=False), path)
        return path

    def load_checkpoint(self, path, model=None, optimizer=None):
        """Read a checkpoint; with ``model``/``optimizer`` given, load their state (the
        values are replicated to the workers, whatever their number). Returns the dict."""
        from .serialization import load
        state = load(path)
        if model is not None:
            model.load_state_dict(state["model"])
        if optimizer is not None and "optimizer" in state:
            optimizer.load_state_dict(state["optimizer"])
        return state


def _resplit(pieces, dim, n):
    whole = np.concatenate(pieces, axis=dim)
    sizes = pl.split_sizes(whole.shape[dim], n)
    bounds = np.cumsum((0,) + sizes)
    return [np.ascontiguousarray(np.take(whole, np.arange(bounds[r], bounds[r + 1]), axis=dim))
            for r in range(n)]


# Live clusters (weak): lazy_dispatch finds the cluster through the value's storage.
_clusters = weakref.WeakSet()


def _register(cluster):
    _clusters.add(cluster)
    set_lazy_dispatch(_dispatch)


def _unregister(cluster):
    _clusters.discard(cluster)


def _dispatch(op, inputs, attrs):
    for x in inputs:
        if isinstance(x, Tensor) and x._store.lazy:
            return x._store.cluster.record_op(op, inputs, attrs)
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
    workers' output off this terminal).

    One cluster per process: while one is active (not shut down), another ``init`` raises
    at once, whatever its arguments. A GPU request without cupy or a GPU fails at once.

    Example::

        with dg.init(workers=2, backend="local") as cluster:
            model = cluster.replicate(model)
    """
    _checks.init_args(workers, device, address, backend, bucket_cap_mb, timeout_s,
                      num_cpus_per_worker, collective, compress)
    active = next((c for c in list(_clusters) if not c._closed), None)
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
        if device != "cpu":
            _backend.cupy_module()
        from .scheduler.local import LocalGang
        gang = LocalGang(workers, device=device, bucket_cap_mb=bucket_cap_mb, timeout_s=timeout_s,
                         compress=compress)
    elif backend == "ray":
        from .scheduler.ray_gang import RayGang
        gang = RayGang(workers, device=device, address=address, bucket_cap_mb=bucket_cap_mb,
                       timeout_s=timeout_s, num_cpus_per_worker=num_cpus_per_worker,
                       collective=collective, compress=compress, **kwargs)
    else:
        raise ValueError(f"init: unknown backend {backend!r}: expected 'ray' or 'local'")
    return Cluster(gang, workers, device)
