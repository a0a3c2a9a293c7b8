"""Distributed values as the driver sees them: their storage (an id on the workers) and the
recorder that turns ops on them into the pending program.

The driver never computes a distributed value: it records the op with its placement,
global shape and dtype, and keeps a table of the values the workers hold (which are
alive, which were lost, where each shard came from). ``scheduler/`` sends what is
recorded here; ``dist_autograd`` records backward passes through the same recorder.

Example::

    cluster = dg.init(workers=2, backend="local")
    X = cluster.shard(np.ones((4, 3), np.float32))    # recorder.put: a "put" instruction
    y = X.sum()                                       # recorder.record_op: an "op" one
    y.store                                          # a LazyStorage: vid, Partial, shape ()
    y.item()                                          # a sync point: the program runs
"""
import contextlib
import gc
import itertools
import weakref

import numpy as np

from . import _backend, _hints, engine, placement as pl
from ._interrupt import atomic
from .errors import RecoveryError
from .ops import get_op
from .placement import REPLICATE, Partial, PlacementError, Replicate, Shard
from .recording import LazyNode, Recording
from .storage import Storage
from .tensor import Tensor, Variable


class LazyStorage:
    """Storage of a distributed value: an id on the workers plus what the driver knows.

    Example: ``cluster.shard(a).store.placement`` is ``Shard(dim=0)``.
    """

    lazy = True
    __slots__ = ("cluster", "vid", "shape", "dtype", "placement", "counter", "leaves",
                 "device", "_cache", "sig", "sig_for", "__weakref__")

    def __init__(self, cluster, vid, shape, dtype, placement, leaves=frozenset(), device=None):
        # ``shape`` a tuple of ints and ``dtype`` a numpy dtype: Recorder.new_storage
        # converts what it is given; a memoized op output is already in that form.
        self.cluster, self.vid = cluster, vid
        self.shape, self.dtype = shape, dtype
        self.placement, self.leaves = placement, leaves
        self.device = device or cluster.device       # where the workers hold it
        self.counter = [0]       # a one-item list, shared with aliases (detach, .data)
        self._cache = None
        # Recorder.sig of this value, valid while ``placement is sig_for`` (a resize puts
        # a new Shard in place of the old one).
        self.sig = self.sig_for = None

    @property
    def array(self):
        """The global value, fetched from the workers (a sync point)."""
        if self._cache is None or self._cache[0] != self.version:
            self._cache = (self.version, self.cluster.executor.fetch(self))
        return self._cache[1]

    def assign(self, result):
        self.cluster.recorder.record_assign(self, result)

    version = Storage.version     # the same counter protocol as a local storage

    def bring_home(self, array):
        """Become the storage of a local tensor holding ``array`` (at shutdown)."""
        self.cluster = None
        self._cache = array
        self.__class__ = HomeStorage

    def __del__(self):
        try:
            cluster, vid = self.cluster, self.vid
        except AttributeError:        # a Ctrl-C landed inside __init__, before the slot was set
            return
        if cluster is not None and vid is not None:
            recorder = cluster.recorder
            recorder.live.refs.pop(vid, None)
            if not cluster.closed:
                recorder.release(vid)


def snapshot(table):
    """``list(table.items())`` of a dict that storages' finalizers change (the recorder's
    live values, shard sources, data-source reads), taken with the cyclic collector off:
    building the list allocates, an allocation may run the collector, and a storage it
    frees pops itself from the dict in the middle ("dictionary changed size during
    iteration").

    Example: ``for vid, (pieces, rg) in snapshot(recorder.sources): ...``."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return list(table.items())
    finally:
        if enabled:
            gc.enable()


class LiveTable:
    """vid -> LazyStorage of the values the driver still references, without keeping them
    alive: plain weak references, each taken out by its storage's ``__del__`` (a
    ``WeakValueDictionary`` costs four Python calls per value, and the recorder makes
    one value per recorded op). Reads as that dictionary did: ``get``, ``in``, ``items``,
    ``values``, all skipping a value already gone.

    Example: ``cluster.recorder.live.get(x.store.vid) is x.store``.
    """

    __slots__ = ("refs",)

    def __init__(self):
        self.refs = {}       # vid -> weakref: Recorder.new_storage adds, LazyStorage.__del__ pops

    def get(self, vid, default=None):
        ref = self.refs.get(vid)
        store = None if ref is None else ref()
        return default if store is None else store

    def __contains__(self, vid):
        return self.get(vid) is not None

    def __len__(self):
        return len(self.items())

    def items(self):
        return [(vid, store) for vid, store in ((v, r()) for v, r in snapshot(self.refs))
                if store is not None]

    def values(self):
        return [store for _, store in self.items()]


class Signature:
    """An interned description of a distributed value as ops see it (placement with a
    shard's sizes, global shape, dtype): compared and hashed by identity, the recorder
    making one per description (``Recorder.signature``).

    Example: ``Signature((Replicate, (3, 4), np.dtype("float32")))``.
    """

    __slots__ = ("desc",)

    def __init__(self, desc):
        self.desc = desc

    def __repr__(self):
        return f"Signature{self.desc!r}"


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


class Recorder:  # long: one open program's table, driver values and ops (split candidate)
    """Records ops on one cluster's distributed values, and keeps the driver's table of them.

    ``rec`` is the recording ops go to (the pending program, or a sub-program while a
    custom Function's backward or a hook is traced); ``live`` the values still referenced
    on the driver (vid -> LazyStorage); ``lost`` why a value is gone from the workers;
    ``sources`` the per-worker pieces of each live shard (a replaced worker gets its shard
    again, a resize re-splits it); ``leaf_objects`` the driver tensors whose ``.grad``
    receives gradients.

    The methods that change these tables are :func:`~distgrad._interrupt.atomic`: a
    Ctrl-C lands before or after an op's recording, never half-way through it.

    Example::

        t = cluster.recorder.record_op(get_op("mul"), [X, 2.0], {})   # as X * 2.0 does
    """

    def __init__(self, cluster):
        self.cluster = cluster
        self.rec = Recording(cluster.world_size)
        self.traced = []           # what is being traced into a sub-program (innermost last)
        self.live = LiveTable()
        self.lost = {}
        self.sources = {}          # vid -> (per-worker pieces, requires_grad)
        self.leaf_objects = {}     # vid -> weakref(driver tensor)
        self.data_sources = weakref.WeakValueDictionary()   # id -> worker-side dataset source
        self.data_reads = {}       # vid -> (source, batch rows, vids of the read) of live batches
        self._ids = itertools.count(1)
        self._free = []            # vids the workers may drop with the next program
        self._replicas = {}        # (id(storage), requires_grad) -> [weakref(store), lazy, version]
        self._infer_cache = {}
        self._out_cache = {}       # op_key -> what an op's output is (see _work_out)
        self._sigs = {}            # description -> Signature (see sig)

    # ---------------------------------------------------------------- the table of values
    def new_id(self):
        """A fresh id in the values' space (data sources take theirs here too)."""
        return next(self._ids)

    def check_open(self):
        if self.cluster.closed:
            raise RuntimeError("this cluster was shut down: its sharded values are gone (its "
                               "replicated ones came home as local tensors); to keep a sharded "
                               "value, call cluster.gather(x) before shutdown")

    def new_storage(self, shape, dtype, placement, leaves=frozenset(), device=None):
        """A LazyStorage for a value the pending program is about to define."""
        return self._new_value(tuple(map(int, shape)), np.dtype(dtype), placement, leaves, device)

    def new_storage_like(self, store, leaves=frozenset()):
        """A LazyStorage placed, shaped and typed as ``store`` (a leaf's new gradient), with
        its :meth:`sig` when known."""
        return self._new_value(store.shape, store.dtype, store.placement, leaves, store.device,
                               store.sig if store.sig_for is store.placement else None)

    @atomic
    def _new_value(self, shape, dtype, placement, leaves, device, sig=None):
        """:meth:`new_storage` of a ``shape`` (tuple of ints) and ``dtype`` (numpy dtype)
        already in the storage's form, and its :meth:`sig` if known (a memoized op output)."""
        vid = next(self._ids)
        store = LazyStorage(self.cluster, vid, shape, dtype, placement, leaves, device)
        if sig is not None:
            store.sig, store.sig_for = sig, placement
        self.live.refs[vid] = weakref.ref(store)
        return store

    def sig(self, store):
        """What an op's output depends on of a distributed input ``store``: its placement
        (a shard's sizes too), global shape and dtype, as one interned
        :class:`Signature` (kept on the store), so that an :meth:`op_key` is built,
        hashed and compared in a few steps.

        Example: ``rec.sig(a.store) is rec.sig(b.store)`` for two values placed alike."""
        p = store.placement
        sig = self.signature(p, store.shape, store.dtype)
        store.sig, store.sig_for = sig, p
        return sig

    def signature(self, placement, shape, dtype):
        """The interned :class:`Signature` of a value placed ``placement`` of global
        ``shape`` and ``dtype``."""
        p = placement
        desc = (Shard, p.dim, p.sizes, shape, dtype) if isinstance(p, Shard) else (type(p), shape, dtype)
        sig = self._sigs.get(desc)
        if sig is None:
            if len(self._sigs) > 4096:
                self._sigs.clear()        # the old ones stay valid: each means what it says
            sig = self._sigs[desc] = Signature(desc)
        return sig

    def op_key(self, op, args, stores, attrs):
        """What an op's output (placement, global shape, dtype) and the attrs its workers
        run with depend on: the op, each distributed input's :meth:`sig`, the constants
        (``True != 1`` here), and the attrs (a float by kind only, as in
        :func:`infer_local`; a tuple with its items' types, so ``(1,)`` and ``(True,)``
        differ). Unhashable when an attr is.

        Example: ``x * 2.0`` on a sharded ``x`` gives ``(mul, sig(x.store), "k")``.
        """
        key = [op]
        for a, st in zip(args, stores):
            kind = a[0]
            if kind == "s":
                key.append(st.sig if st.sig_for is st.placement else self.sig(st))
            elif kind == "k":
                key.append("k")
            else:
                key.append((type(a[1]), a[1]))
        if attrs:
            for k, v in attrs.items():
                t = type(v)
                key.append((k, "k" if t is float else (t, v) if t is not tuple else
                            (t, tuple(map(type, v)), v)))
        return tuple(key)

    @atomic
    def release(self, vid):
        """The driver no longer references ``vid``: the workers drop it with the next program."""
        if vid in self.sources:
            del self.sources[vid]
        if vid in self.lost:
            del self.lost[vid]
        rec = self.rec.root
        if vid in rec.slot_of and rec.slot_of[vid] in rec.outputs:
            return                      # defined in the pending program: simply not kept
        self._free.append(vid)

    @atomic
    def take(self):
        """The pending program, replaced by an empty one (the executor sends it)."""
        rec, self.rec = self.rec, Recording(self.cluster.world_size)
        return rec

    @atomic
    def take_free(self):
        free, self._free = self._free, []
        return free

    def pending_free(self):
        return bool(self._free)

    @atomic
    def rolled_back(self, rec, free):
        """``rec`` failed and was undone: its values never existed, its frees are still due.

        Values the driver sent (``cluster.shard``/``replicate``: a model replicated just
        before a failed first step) are not lost: their data goes again with the next
        program. Values the program computed are gone."""
        self._free.extend(free)
        puts = {ins[1]: ins for ins in rec.instrs if ins[0] == "put"}
        same_world = len(rec.inputs) == self.cluster.world_size
        for slot, vid in rec.outputs.items():
            ins = puts.get(slot)
            if ins is not None and same_world and vid in self.live:
                self._send_again(rec, vid, ins)
            else:
                self.lost.setdefault(vid, "was computed by a step that failed and was rolled back")

    @atomic
    def _send_again(self, failed, vid, put):
        """Re-record ``put`` (an instruction of the failed recording) in the pending one."""
        rec = self.rec.root
        _, _, idx, requires_grad = put
        new_idx = rec.add_input([failed.inputs[r][idx] for r in range(len(failed.inputs))])
        rec.instrs.append(["put", rec.new_slot(vid), new_idx, requires_grad])
        rec.shard_puts.extend((new_idx, store) for i, store in failed.shard_puts if i == idx)

    @contextlib.contextmanager
    def tracing(self, what):
        """Record into a fresh sub-program of the current recording (yields it)."""
        outer = self.rec
        sub = Recording(self.cluster.world_size, parent=outer)
        self.rec = sub
        self.traced.append(what)
        try:
            with engine.no_grad():
                yield sub
        finally:
            self.rec = outer
            self.traced.pop()
            for vid in sub.outputs.values():
                # Values made inside a trace exist only while the sub-program runs.
                self.lost[vid] = f"was computed inside {what}, which runs on the workers"

    # ---------------------------------------------------------------- values from the driver
    @atomic
    def put_storage(self, pieces, shape, dtype, placement, requires_grad):
        """Record sending ``pieces[r]`` to worker r as one value; returns its storage."""
        self.check_open()
        store = self.new_storage(shape, dtype, placement)
        rec = self.rec.root
        slot = rec.new_slot(store.vid)
        idx = rec.add_input(pieces)
        rec.instrs.append(["put", slot, idx, bool(requires_grad)])
        if requires_grad:
            store.leaves = frozenset([store.vid])
        if isinstance(placement, Shard):
            self.sources[store.vid] = (pieces, bool(requires_grad))
            rec.shard_puts.append((idx, store))
        return store

    @atomic
    def put(self, pieces, shape, dtype, placement, requires_grad, cls):
        """As :meth:`put_storage`, wrapped in a new tensor of class ``cls``."""
        store = self.put_storage(pieces, shape, dtype, placement, requires_grad)
        t = cls.from_storage(store, requires_grad=requires_grad)
        if requires_grad:
            self.leaf_objects[store.vid] = weakref.ref(t)
        return t

    def replay(self, t):
        """Re-record a driver-local computation on the workers, so that its leaves get
        exact gradients (e.g. a weight penalty computed locally, added to a sharded loss)."""
        memo = self.rec.root.replayed
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
                       and not i.store.lazy and id(i.grad_fn) not in memo]
            if not ready and pending:
                stack.append((x, True))
                stack.extend((i, False) for i in pending)
                continue
            for i, v in zip(node.inputs, node.versions):
                if isinstance(i, Tensor) and not i.store.lazy and i.store.version != v:
                    engine.check_version(i, v, node)
            args = [memo[id(i.grad_fn)][1] if isinstance(i, Tensor) and i.grad_fn is not None
                    and not i.store.lazy else i for i in node.inputs]
            memo[id(node)] = (node, self.record_op(node.op, args, node.attrs))
        return memo[id(t.grad_fn)][1]

    @atomic
    def local_replica(self, t):
        """Implicit replication of a driver-local tensor: sent once, again when its version changes."""
        if t.grad_fn is not None:
            return self.replay(t).store
        store = t.store
        key = (id(store), t.requires_grad)
        entry = self._replicas.get(key)
        if entry is not None and entry[0]() is not store:
            entry = None
        if entry is None:
            a = _backend.to_numpy(store.array)
            _hints.check_implicit_replica(self.cluster, t, a)
            lazy = self.put_storage([a] * self.cluster.world_size, a.shape, a.dtype, REPLICATE,
                                    t.requires_grad)
            entry = [weakref.ref(store), lazy, store.version]
            self._replicas[key] = entry
            weakref.finalize(store, self._replicas.pop, key, None)
        elif entry[2] != store.version:
            a = _backend.to_numpy(store.array)
            lazy = entry[1]
            rec = self.rec.root
            idx = rec.add_input([a] * self.cluster.world_size)
            rec.instrs.append(["update", rec.ref(lazy.vid), idx])
            entry[2] = store.version
            lazy.version += 1
        lazy = entry[1]
        if t.requires_grad:
            self.leaf_objects[lazy.vid] = weakref.ref(t)
        return lazy

    def store_of(self, t):
        """The distributed storage of ``t``, replicating a driver-local tensor if needed."""
        store = t.store
        return store if store.lazy else self.local_replica(t)

    # ---------------------------------------------------------------- ops
    def arg(self, x):
        """(argspec, placement, global shape, store) of one op input."""
        if isinstance(x, Tensor):
            store = x.store
            if not store.lazy:
                store = self.local_replica(x)
            elif store.cluster is not self.cluster:
                raise PlacementError("values of two different clusters cannot be mixed")
            if store.vid in self.lost:
                raise RecoveryError(f"a {store.placement!r} value of shape {store.shape} "
                                    f"{self.lost[store.vid]}: recompute it from the inputs")
            return ["s", self.rec.ref(store.vid)], store.placement, store.shape, store
        if isinstance(x, np.generic):
            x = x.item()
        if type(x) is float:
            return ["k", self.rec.add_scalar(x)], None, None, x
        if not isinstance(x, (int, bool, type(None))):
            raise TypeError(f"unsupported operand of type {type(x).__name__} in a distributed op")
        return ["c", x], None, None, None

    @atomic
    def emit(self, op, args, placements, shapes, stores, attrs, cls, requires_grad, inputs=()):
        """Record one op whose inputs are already resolved; return the result tensor.

        ``stores[i]`` is the input's storage, or the value of a float operand (which
        travels as a message scalar); ``inputs`` are the tensors, for the graph's edges.
        What the output and its instruction depend on besides the inputs' ids (placement,
        global shape, dtype, the attrs the workers run with) is memoized by :meth:`op_key`:
        a cached step records the same ops on the same placements and shapes every time."""
        key = self.op_key(op, args, stores, attrs)
        try:
            out = self._out_cache.get(key)
        except TypeError:             # an unhashable attr (a list, an index array)
            key, out = None, None
        if out is None:
            out = self._work_out(op, args, placements, shapes, stores, attrs, key)
        out_p, shape, dtype, sig, rule_attrs, static, floats, node_cls = out
        dattrs = attrs if rule_attrs is None else rule_attrs
        grad_enabled = engine.is_grad_enabled()
        requires_grad = requires_grad and grad_enabled and op.differentiable
        rec = self.rec
        leaves, device = frozenset(), None
        for s in stores:
            if isinstance(s, LazyStorage):
                if device is None:
                    device = s.device
                if requires_grad and s.leaves:
                    leaves = leaves | s.leaves
        if op.device_attr:
            device = dattrs[op.device_attr]
        store = self._new_value(shape, dtype, out_p, leaves, device, sig)
        slot = rec.new_slot(store.vid)
        self._append_op(rec, op, args, dattrs, static, floats, slot, grad_enabled)
        grad_fn = None
        if requires_grad:
            grad_fn = node_cls(
                tuple([engine.next_node_of(x) if isinstance(x, Tensor) else None for x in inputs]))
            grad_fn.vid = store.vid
        return cls.from_storage(store, grad_fn=grad_fn, requires_grad=requires_grad)

    @staticmethod
    def _append_op(rec, op, args, dattrs, static, floats, slot, grad_enabled):
        """The ``op`` instruction (``static``, ``floats``: see :meth:`_work_out`)."""
        if floats:
            # Float attrs (learning rates, betas, eps...) are message scalars, not part of
            # the structure: a scheduler changing them keeps the program cached.
            add = rec.add_scalar
            rec.instrs.append(["op", op.name, args, static, slot, grad_enabled,
                               {k: add(dattrs[k]) for k in floats}])
        else:
            rec.instrs.append(["op", op.name, args, dattrs, slot, grad_enabled])

    def _work_out(self, op, args, placements, shapes, stores, attrs, key):
        """The memo entry of an op's output, memoized under ``key`` (unless None):
        ``(placement, global shape, dtype, sig, rule_attrs, static, floats, node class)``.
        ``sig`` is the output's :meth:`signature`; ``rule_attrs`` the attrs the placement
        rule gave the workers (a reshape's local shape), None when they are the call's
        own; ``floats`` the names of the float attrs (message scalars) and ``static`` the
        others, None when there is no float; the node class names the driver's grad_fn.
        Raises what the rule or the shape inference raise (nothing is memoized then)."""
        out_p, shape, dtype, dattrs = self._infer_out(op, args, placements, shapes, stores, attrs)
        floats = tuple([k for k, v in dattrs.items() if type(v) is float])
        static = {k: v for k, v in dattrs.items() if type(v) is not float} if floats else None
        rule_attrs = None if dattrs is attrs else dattrs
        out = (out_p, shape, dtype, self.signature(out_p, shape, dtype), rule_attrs, static, floats,
               engine.node_class(op.name, LazyNode))
        # The key fixes every attr but a float's value: the rule's own attrs are the same
        # for every call only when the call has no float attr (a float could reach them).
        if key is not None and (rule_attrs is None or
                                not any(type(v) is float for v in attrs.values())):
            if len(self._out_cache) > 4096:
                self._out_cache.clear()
            self._out_cache[key] = out
        return out

    def too_long(self):
        """Whether the pending program has grown long enough to be sent now (the caller,
        outside the atomic recording, sends it)."""
        return len(self.rec.instrs) >= self.cluster.max_instructions and not self.traced

    def _infer_out(self, op, args, placements, shapes, stores, attrs):
        """(placement, global shape, dtype, attrs the workers run with) of ``op``'s output:
        its placement rule, then its forward on zeros of one worker's shapes. Raises what
        the rule or the forward raise."""
        decision = pl.propagate(op, placements, shapes, attrs,
                                max((len(s) for s in shapes if s is not None), default=0))
        local_shape, dtype = infer_local(self._infer_cache, op, placements, shapes, stores, args,
                                         decision.attrs)
        out_p = decision.out
        shape = list(local_shape)
        if isinstance(out_p, Shard):
            shape[out_p.dim] = sum(out_p.sizes)
        elif decision.shape is not None:
            shape = list(decision.shape)     # the rule knows the global shape (a gather)
        return out_p, tuple(map(int, shape)), np.dtype(dtype), decision.attrs

    @atomic
    def allreduce_partial(self, store, cls=Tensor, requires_grad=False, source=None):
        """Forward collective: the sum over workers of a Partial value, replicated."""
        return self.emit(get_op("allreduce"), [["s", self.rec.ref(store.vid)]], [store.placement],
                         [store.shape], [store], {}, cls, requires_grad,
                         () if source is None else (source,))

    @atomic
    def record_op(self, op, inputs, attrs):
        """Record ``op(*inputs, **attrs)`` on distributed values (``tensor.lazy_dispatch``)."""
        if self.cluster.closed:
            self.check_open()
        inputs = list(inputs)
        n = len(inputs)
        args, placements, shapes, stores = [None] * n, [None] * n, [None] * n, [None] * n
        cls, requires_grad, partial = Tensor, False, False
        for i, x in enumerate(inputs):
            if isinstance(x, Tensor):
                if cls is Tensor and isinstance(x, Variable):
                    cls = Variable
                if x.requires_grad:
                    requires_grad = True
                store = x.store
                if store.lazy and store.cluster is self.cluster and store.vid not in self.lost:
                    # What arg() does, for the usual input.
                    rec = self.rec
                    slot = rec.slot_of.get(store.vid)
                    args[i] = ["s", rec.ref(store.vid) if slot is None else slot]
                    p = placements[i] = store.placement
                    shapes[i], stores[i] = store.shape, store
                    if isinstance(p, Partial):
                        partial = True
                    continue
            args[i], p, shapes[i], stores[i] = self.arg(x)
            placements[i] = p
            if isinstance(p, Partial):
                partial = True
        for i in pl.partial_inputs_to_reduce(op, placements) if partial else ():
            x = inputs[i]
            inputs[i] = self.allreduce_partial(stores[i], cls, isinstance(x, Tensor) and x.requires_grad, x)
            args[i], placements[i], shapes[i], stores[i] = self.arg(inputs[i])
        if op.divides_by_count and isinstance(placements[0], Shard) and \
                placements[0].dim in pl.reduced_axes(attrs.get("dim"), len(shapes[0])):
            # Mean over the sharded dim: local sums divided by the GLOBAL count -> Partial.
            total = self.emit(get_op("sum"), args, placements, shapes, stores, attrs, cls, requires_grad,
                              inputs)
            return total / pl.global_count(shapes[0], attrs.get("dim"))
        return self.emit(op, args, placements, shapes, stores, attrs, cls, requires_grad, inputs)

    @atomic
    def record_foreach(self, op, calls, attrs, inplace=False):
        """``op(*call, **attrs)`` for each ``call`` of ``calls`` (tuples of inputs), with
        grad recording off, as one ``foreach`` instruction (PyTorch's ``_foreach_`` ops):
        the memo checks all calls at once, where op by op each is checked by itself
        (issue 13: an optimizer's step was a few instructions per parameter, recorded
        while the workers waited). ``inplace``: each result is written into ``call[0]``,
        which must keep its placement, global shape and dtype (what
        ``Tensor._inplace`` records for each); True is returned. Otherwise the
        results' tensors are returned. None, recording nothing, where a call needs more
        than that (grad recording on, an input of another cluster or lost, a Partial
        one, a device attr): the caller then records each call by itself.

        Example: ``rec.record_foreach(get_op("axpby"), [(b, g) for b, g in zip(bufs, grads)],
        {"a": 0.9, "b": 1.0}, inplace=True)``."""
        if engine.is_grad_enabled() or self.traced or self.cluster.closed or op.device_attr \
                or (inplace and not op.inplace) or not calls:
            return None
        rec = self.rec
        slot_of, groups, key = rec.slot_of, [], [op, inplace]
        for call in calls:
            args = []
            for x in call:
                if isinstance(x, Tensor):
                    store = x.store
                    if not store.lazy or store.cluster is not self.cluster or store.vid in self.lost:
                        return None
                    slot = slot_of.get(store.vid)
                    # A value not yet in this program gets its slot once the calls fit.
                    args.append(["s", slot] if slot is not None else ["v", store.vid])
                    key.append(store.sig if store.sig_for is store.placement else self.sig(store))
                elif type(x) is float:
                    args.append(["k", x])       # a message scalar, as record_op's
                    key.append("k")
                elif isinstance(x, (int, bool, type(None))):
                    args.append(["c", x])
                    key.append((type(x), x))
                else:
                    return None
            groups.append(args)
            key.append(None)                    # where one call's inputs end
        floats = {k: v for k, v in attrs.items() if type(v) is float}
        static = {k: v for k, v in attrs.items() if type(v) is not float}
        key = (tuple(key), tuple(floats), tuple((k, type(v), v) for k, v in static.items()))
        try:
            outs = self._out_cache.get(key)
        except TypeError:                       # an unhashable attr
            return None
        if outs is None:
            outs = self._out_cache[key] = self._foreach_outs(op, calls, groups, attrs, inplace)
        if not outs:
            return None
        for args in groups:
            for a in args:
                if a[0] == "v":
                    a[0], a[1] = "s", rec.ref(a[1])
                elif a[0] == "k":
                    a[1] = rec.add_scalar(a[1])
        ins = ["foreach", op.name, groups, static, {k: rec.add_scalar(v) for k, v in floats.items()}, []]
        rec.instrs.append(ins)
        if inplace:
            for call in calls:
                call[0].store.version += 1
            return True
        results = []
        for call, (out_p, shape, dtype, sig) in zip(calls, outs):
            first = next(x for x in call if isinstance(x, Tensor))
            store = self._new_value(shape, dtype, out_p, frozenset(), first.store.device, sig)
            ins[5].append(rec.new_slot(store.vid))
            cls = Variable if any(isinstance(x, Variable) for x in call) else Tensor
            results.append(cls.from_storage(store, grad_fn=None, requires_grad=False))
        return results

    def _foreach_outs(self, op, calls, groups, attrs, inplace):
        """What :meth:`record_foreach` needs of each call's output: ``(placement, global
        shape, dtype, sig)`` each, or False where a call has a Partial input (an
        all-reduce first), its placement rule changes its attrs (a reshape's local shape)
        or its output would not fit its target (``inplace``)."""
        outs = []
        for call, args in zip(calls, groups):
            stores = [x.store if isinstance(x, Tensor) else x for x in call]
            placements = [x.store.placement if isinstance(x, Tensor) else None for x in call]
            if any(isinstance(p, Partial) for p in placements):
                return False
            shapes = [x.store.shape if isinstance(x, Tensor) else None for x in call]
            try:
                out_p, shape, dtype, sig, rule_attrs, *_ = self._work_out(
                    op, args, placements, shapes, stores, attrs, None)
            except (RuntimeError, ValueError, TypeError, PlacementError):
                return False                    # the call's own path raises its error
            if rule_attrs is not None:          # the workers would run other attrs
                return False
            target = stores[0]
            if inplace and not (shape == target.shape and dtype == target.dtype and
                                (out_p is target.placement or out_p == target.placement)):
                return False
            outs.append((out_p, shape, dtype, sig))
        return outs

    @atomic
    def record_assign(self, target, result):
        """In-place write of ``result`` into the distributed value ``target``."""
        if self.cluster.closed:
            self.check_open()
        src = result.store
        src = src if src.lazy else self.local_replica(result.detach())
        if src.shape != target.shape:
            raise RuntimeError(f"in-place write: result of shape {src.shape} into a tensor of shape {target.shape}")
        if src.placement is not target.placement and src.placement != target.placement:
            if isinstance(src.placement, Partial) and isinstance(target.placement, Replicate):
                src = self.allreduce_partial(src, Tensor, result.requires_grad).store
            else:
                raise PlacementError(f"in-place write of a {src.placement!r} value into a "
                                     f"{target.placement!r} one")
        rec = self.rec
        rec.instrs.append(["assign", rec.ref(target.vid), rec.ref(src.vid)])
        target.leaves = target.leaves | src.leaves

    @atomic
    def record_detach(self, t, requires_grad=False):
        """A new value on the workers: ``t`` without its history (sharing its memory and
        version counter), a fresh leaf of ``t`` if ``requires_grad``."""
        if self.cluster.closed:
            self.check_open()
        src = t.store
        # The same placement, shape and dtype: already in the storage's form, and its sig.
        store = self._new_value(src.shape, src.dtype, src.placement, frozenset(), src.device,
                                src.sig if src.sig_for is src.placement else None)
        store.counter = src.counter
        rec = self.rec
        rec.instrs.append(["detach", rec.ref(src.vid), rec.new_slot(store.vid), bool(requires_grad)])
        if requires_grad:
            store.leaves = frozenset([store.vid])
            self.leaf_objects[store.vid] = weakref.ref(t)
        return store


def infer_local(cache, op, placements, shapes, stores, args, attrs):
    """Local output (shape, dtype) of ``op``, by running it on zeros of one worker's shapes
    (memoized in ``cache`` by the op, the local shapes and dtypes and the attrs).

    Example: ``sum(dim=1)`` of a float32 value of global shape (5, 4) sharded 3 + 2 rows
    runs on zeros of shape (3, 4) (the largest shard) and gives ``((3,), float32)``.
    """
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
        hit = cache.get(key)
    except TypeError:             # an unhashable attr (a list, an index array): by its text
        key = repr(key)
        hit = cache.get(key)
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
        if len(cache) > 4096:
            cache.clear()
        cache[key] = hit
    return hit

