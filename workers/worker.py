"""The worker: owns a device and a local autograd engine, runs the driver's programs.

A plain class: ``backend="local"`` calls it from one thread per worker, and
``backend="ray"`` wraps it in a Ray actor (``distgrad.workers.actor``). Messages are
msgpack (``distgrad.program``); a bad message gets an error back and the worker stays
usable. Replicated leaves' gradients are all-reduced in buckets during backward.
"""
import collections
import contextlib
import functools
import sys
import threading
import time

import numpy as np

from distgrad import _backend, program as prog
from distgrad.autograd import engine
from distgrad.ops.collective import use_communicator
from distgrad.tensor import Tensor, Variable, apply_op

from .autograd_steps import AutogradSteps
from .bucketing import OrderedComm
from .sources import make_table


class Worker(AutogradSteps):  # long: the instruction interpreter, one short method per message or instruction kind
    """One rank of the gang. Example (in-process, one rank)::

        w = Worker(0, 1)
        reply = w.execute(payload_bytes, side_arrays)
    """

    def __init__(self, rank, world_size, device="cpu", communicator=None, bucket_cap_mb=25.0,
                 timeout_s=60.0, cache_size=prog.PROGRAM_CACHE_SIZE,
                 max_message_bytes=prog.MAX_MESSAGE_BYTES, compress=None):
        self.rank, self.world_size = rank, world_size
        self.device = _backend.normalize_device(device)
        self.xp = _backend.xp_for_device(self.device)
        self.comm = OrderedComm(communicator, timeout_s) if communicator is not None else None
        self.bucket_cap = int(bucket_cap_mb * (1 << 20))
        if compress not in (None, "fp16"):
            raise ValueError(f"compress must be None or 'fp16', got {compress!r}")
        self.compress = compress
        self.values = {}
        self.sources = {}              # source id -> table (workers/sources.py)
        self.undo = UndoLog()          # the last program's writes, until the driver commits it
        self.fail_after = None         # test hook: (kind, seconds) -> crash or hang in the next program
        self.slowdown_s = 0.0          # test hook: extra compute time per program (a slow worker)
        self.cache = collections.OrderedDict()
        self.cache_size = cache_size
        self.max_message_bytes = max_message_bytes
        self.stats = {"programs": 0, "cache_hits": 0, "bytes_in": 0, "backward_s": 0.0, "run_s": 0.0}
        self.step_times = collections.deque(maxlen=1000)
        self.spans = collections.deque(maxlen=200_000)   # (name, start, end, thread) for timelines

    def set_communicator(self, communicator):
        """Use a new collective group from the next message on (after a broken one)."""
        if self.comm is not None:
            self.comm.close()
        self.comm = OrderedComm(communicator, self.comm.timeout_s if self.comm else 60.0) \
            if communicator is not None else None

    def span(self, name, start, end=None):
        """Record a timeline span (wall-clock seconds) on the calling thread."""
        self.spans.append((name, start, time.time() if end is None else end,
                           threading.current_thread().name))

    # ------------------------------------------------------------------ entry point
    def execute(self, payload, side=()):
        """Run one message; return ``(msgpack bytes, side arrays)`` of
        ``{"fetched": {slot: array}, "error": ...}`` (big arrays travel beside the bytes)."""
        t0, w0 = time.perf_counter(), time.time()
        waited = self.comm.wait_s if self.comm is not None else 0.0
        control = None
        try:
            msg = prog.decode(payload, side, self.max_message_bytes)
            control = msg.get("control") if isinstance(msg, dict) else None
            self.span("decode", w0)
            fetched = self._run_message(msg)
            # Busy time: the program's time minus waits for the other workers. The driver
            # sizes shards by it (cluster.shard(..., sizes="auto")).
            busy = time.perf_counter() - t0 - ((self.comm.wait_s if self.comm else 0.0) - waited)
            reply = {"fetched": fetched, "error": None, "busy_s": busy}
        except Exception as e:          # reported to the driver; the worker stays usable
            reply = {"fetched": {}, "error": f"{type(e).__name__}: {e}"}
            if control is None and self.comm is not None and self.comm.world_size > 1:
                # Peers may wait for this worker in a collective of the failed program:
                # leaving the group makes them fail now, not after their timeout (the
                # driver re-forms the group when it rolls the step back).
                self.comm.abort(f"{type(e).__name__}")
                reply["left_group"] = True
        if self.undo.nbytes:
            # What this worker keeps to undo the program: the driver commits it (the undo
            # data goes) once every worker reported success.
            reply["undo_bytes"] = self.undo.nbytes
        streams = {sid: t.status() for sid, t in self.sources.items() if t.streaming}
        if streams:                     # how far each stream has read ahead: the driver plans by it
            reply["data"] = streams
        self.stats["programs"] += 1
        self.stats["bytes_in"] += len(payload)
        self.stats["run_s"] += time.perf_counter() - t0
        if control is None:             # a commit or a ping is no step
            self.step_times.append(time.perf_counter() - t0)
        out_side = []
        return prog.encode(reply, out_side), out_side

    def _run_message(self, msg):
        if not isinstance(msg, dict) or msg.get("v") != prog.PROTOCOL:
            raise prog.ProgramError(f"unsupported message (protocol {msg.get('v') if isinstance(msg, dict) else '?'})")
        control = msg.get("control")
        if control is not None:
            return self._control(control, msg)
        # A new program means the driver saw the previous one succeed everywhere: commit it
        # (if its "commit" message has not already).
        self.undo = UndoLog()
        self._maybe_fail()
        if self.slowdown_s:
            time.sleep(self.slowdown_s)
        structure, drops = self._structure_of(msg)
        bind = msg["bind"]
        ext, keep = structure["ext"], structure["keep"]
        if len(bind) != len(ext) + len(keep):
            raise prog.ProgramError(f"bind list has {len(bind)} ids, program needs {len(ext) + len(keep)}")
        env = [None] * structure["nslots"]
        for s, vid in zip(ext, bind):
            if vid not in self.values:
                raise prog.ProgramError(f"value {vid} is not held by worker {self.rank}")
            env[s] = self.values[vid]
        # Only what outlives the program needs undoing: writes into the values it reads (and
        # their views, which share their version counter), not into its temporaries.
        self.undo.track(env[s] for s in ext)
        bound = set(bind)
        for vid in msg.get("free", []):
            if vid not in bound and vid in self.values:
                # The driver holds no reference to it and a re-run of this program does not
                # read it: it goes now, without an undo copy (an old gradient, typically).
                del self.values[vid]
        inputs = [self._to_device(a) for a in msg.get("inputs", [])]
        scalars = msg.get("scalars", [])
        fetched = {}
        phase, start = None, time.time()
        with use_communicator(self.comm):
            for n, ins in enumerate(structure["instrs"]):
                now = _phase(ins)
                if now != phase:
                    if phase is not None:
                        self.span(phase, start)
                    phase, start = now, time.time()
                try:
                    self._step(ins, env, inputs, fetched, scalars, dying=drops[n])
                except Exception as e:
                    if _rewrappable(e):         # name the instruction: the op and its index
                        raise type(e)(f"{_describe(ins, n)}: {e}") from e
                    raise
                for s in drops[n]:              # last use: the temporary can go now
                    env[s] = None
        if phase is not None:
            self.span(phase, start)
        for s, vid in zip(keep, bind[len(ext):]):
            self.undo.table(self.values, vid)
            self.values[vid] = env[s]
        for vid in msg.get("free", []):
            if vid in self.values:      # read by this program: a re-run needs it back
                self.undo.table(self.values, vid)
                del self.values[vid]
            elif vid in self.sources:     # a data source the driver no longer uses
                self.sources.pop(vid).close()
        return fetched

    def _structure_of(self, msg):
        """The program a message names: sent in it (validated, then cached) or cached from an
        earlier message (the LRU order mirrors the driver's); with its release points."""
        key = msg.get("key")
        structure = msg.get("prog")
        if msg.get("reset_cache"):
            self.cache.clear()           # the driver's mirror of this cache starts empty
        if structure is not None:
            prog.validate(structure)
            if prog.structure_key(structure) != key:
                raise prog.ProgramError("program key does not match its structure")
            drops = prog.release_points(structure)
            self.cache[key] = (structure, drops)
            self.cache.move_to_end(key)  # a re-sent program is the most recently used
            while len(self.cache) > self.cache_size:
                self.cache.popitem(last=False)
            return structure, drops
        entry = self.cache.get(key)
        if entry is None:
            raise prog.ProgramError(f"program {key} {prog.NOT_CACHED}")
        self.cache.move_to_end(key)
        self.stats["cache_hits"] += 1
        return entry

    # ------------------------------------------------------------------ recovery
    def _control(self, control, msg):
        """Messages of the recovery protocol (see distgrad.scheduler.recovery)."""
        if control == "rollback":
            self.undo.restore(self.values)
            self.undo = UndoLog()
            return {}
        if control == "commit":        # the last program succeeded on every worker
            self.undo = UndoLog()
            return {}
        if control == "export":
            out = {}
            for vid in msg["vids"]:
                t = self.values.get(vid)
                if t is not None:
                    out[vid] = [_backend.to_numpy(t.store.array), bool(t.requires_grad and t.is_leaf)]
            return out
        if control == "import":
            for vid, (array, requires_grad) in msg["values"].items():
                t = Variable.from_array(self._to_device(array))
                if requires_grad:
                    t.init_requires_grad(True)
                self.values[int(vid)] = t
            return {}
        if control == "ping":
            return {}
        if control == "source_read":   # a batch held across a failure or resize, read again
            arrays = self._source(msg["sid"]).read(np.asarray(msg["rows"], dtype=np.int64))
            for vid, a in zip(msg["vids"], arrays):
                if vid >= 0:
                    self.values[vid] = Variable.from_array(self._to_device(a))
            return {}
        if control == "source_wait":   # a stream's read-ahead, once it holds `want` rows
            table = self._source(msg["sid"])
            return {"status": table.wait(msg["want"], msg.get("timeout_s"))}
        raise prog.ProgramError(f"unknown control message {control!r}")

    def inject_failure(self, kind, seconds=0.0):
        """Test hook: make the next program crash the process ("crash") or hang ("hang")."""
        self.fail_after = (kind, seconds)

    def _maybe_fail(self):
        if self.fail_after is None:
            return
        kind, seconds = self.fail_after
        self.fail_after = None
        time.sleep(seconds)
        if kind == "crash":
            import os
            os._exit(1)
        if kind == "hang":
            time.sleep(10 ** 6)

    def _to_device(self, a):
        a = np.asarray(a)
        return _backend.to_device(a, self.device) if self.device != "cpu" else a

    # ------------------------------------------------------------------ instructions
    def _step(self, ins, env, inputs, fetched, scalars, traced=False, dying=()):
        """Run one instruction. ``traced``: inside a sub-program (a custom backward or a
        hook), whose ops record a graph exactly when the backward pass asks for one.
        ``dying``: slots no later instruction reads."""
        kind = ins[0]
        if kind == "op":
            name, args, attrs, out, grad_enabled = ins[1:6]
            vals, attrs = _call(args, attrs, ins[6] if len(ins) > 6 else None, env, scalars)
            if traced:
                env[out] = apply_op(name, *vals, **attrs)
                return
            prev = engine.is_grad_enabled()
            engine.set_grad_enabled(grad_enabled)
            try:
                env[out] = apply_op(name, *vals, **attrs)
            finally:
                engine.set_grad_enabled(prev)
        elif kind == "put":
            _, slot, idx, requires_grad = ins
            t = Variable.from_array(inputs[idx])
            if requires_grad:
                t.init_requires_grad(True)
            env[slot] = t
        elif kind == "update":
            _, slot, idx = ins
            t = env[slot]
            self.undo.write(t, copy=False)    # the array is replaced, not changed
            t.store.array = inputs[idx]
            t.store.version += 1
        elif kind == "assign":
            _, target, src = ins
            self._write(env[target], env[src], src in dying)
        elif kind == "foreach":
            self._foreach(ins, env, scalars)
        elif kind == "fetch":
            v = env[ins[1]]
            fetched[ins[1]] = _backend.to_numpy(v.store.array if isinstance(v, Tensor) else v)
        elif kind == "detach":
            _, src, out, requires_grad = ins
            t = env[src].detach()             # shares the storage (and version counter)
            if requires_grad:
                t.init_requires_grad(True)
            env[out] = t
        elif kind == "source":
            _, outs, sid, idx, ahead = ins
            table = self._source(sid)
            arrays = table.fetch(*(None if i < 0 else np.asarray(_backend.to_numpy(inputs[i]), np.int64)
                                   for i in (idx, ahead)))
            if len(arrays) != len(outs):
                raise prog.ProgramError(f"data source {sid} has {len(arrays)} columns, the "
                                        f"program reads {len(outs)}")
            if table.streaming:          # a rolled-back step gives its rows back
                self.undo.on_restore(functools.partial(table.unread, arrays))
            for s, a in zip(outs, arrays):
                env[s] = Variable.from_array(self._to_device(a))
        elif kind == "custom":
            self._custom(ins, env, scalars)
        elif kind == "backward":
            self._backward(ins, env, scalars)
        elif kind == "grad":
            self._grad(ins, env, scalars)

    def _write(self, t, v, fresh):
        """The in-place write of ``v`` into ``t`` (``fresh``: no later instruction reads ``v``)."""
        if fresh and _can_take(t, v):
            # An optimizer update: the fresh result becomes the value and the undo log
            # keeps the old array (until the commit), so the step costs no copy at all.
            self.undo.write(t, copy=False)
            t.store.array = v.store.array
            t.store.version += 1
            return
        self.undo.write(t)
        with engine.no_grad() if not v.requires_grad else contextlib.nullcontext():
            t.overwrite(v, "assign")

    def _foreach(self, ins, env, scalars):
        """``["foreach", op, groups, attrs, floats, outs]``: the op (grad recording off)
        on each argument list of ``groups``, its result in the slot ``outs`` names, or,
        with no ``outs``, written into its first argument (as an ``op`` then an
        ``assign`` of its result would be)."""
        _, name, groups, attrs, floats, outs = ins
        prev = engine.is_grad_enabled()
        engine.set_grad_enabled(False)
        try:
            for i, args in enumerate(groups):
                vals, kw = _call(args, attrs, floats, env, scalars)
                if outs:
                    env[outs[i]] = apply_op(name, *vals, **kw)
                else:
                    self._write(vals[0], apply_op(name, *vals, **kw), True)
        finally:
            engine.set_grad_enabled(prev)

    # ------------------------------------------------------------------ data sources
    def add_source(self, payload, side=(), obj=None):
        """Register data source ``sid`` (replacing any of that id): ``payload`` is a msgpack
        spec (workers/sources.py); ``obj`` what only Ray's serializer carries (a generator
        function, a Ray Data iterator). Replies ``{"schema": ...}`` or ``{"error": ...}``.
        Example: ``w.add_source(prog.encode({"sid": 3, "kind": "npy", "columns": cols}))``."""
        try:
            spec = prog.decode(payload, side, self.max_message_bytes)
            table = make_table(spec, obj, self.rank, self.comm.timeout_s if self.comm else 60.0)
            old = self.sources.pop(spec["sid"], None)
            if old is not None:
                old.close()
            self.sources[spec["sid"]] = table
            reply = {"schema": table.schema(), "error": None}
        except Exception as e:
            reply = {"schema": None, "error": f"{type(e).__name__}: {e}"}
        return prog.encode(reply), []

    def _source(self, sid):
        table = self.sources.get(sid)
        if table is None:
            raise prog.ProgramError(f"data source {sid} is not registered on worker {self.rank}")
        return table

    def get_stats(self):
        comm_bytes = self.comm.bytes if self.comm is not None else 0
        return dict(self.stats, values=len(self.values), cached_programs=len(self.cache),
                    step_times=list(self.step_times), bytes_communicated=comm_bytes)

    def get_spans(self):
        return list(self.spans)

    def close(self):
        if self.comm is not None:
            self.comm.close()
        self.values.clear()
        for table in self.sources.values():
            table.close()
        self.sources.clear()


def _call(args, attrs, floats, env, scalars):
    """An op instruction's argument values and attrs: slots from ``env``, message scalars
    (float operands, and the float attrs ``floats`` names) from ``scalars``."""
    vals = [env[a[1]] if a[0] == "s" else scalars[a[1]] if a[0] == "k" else a[1] for a in args]
    if floats:
        attrs = dict(attrs, **{k: scalars[i] for k, i in floats.items()})
    return vals, attrs


def _can_take(t, v):
    """May ``t`` take ``v``'s array instead of a copy of it? Only when nothing else sees
    either buffer: ``v`` is a fresh result (it dies here, owns its memory, is not viewed,
    aliased or in a graph) of exactly ``t``'s layout, and no view shares ``t``'s version
    counter (a view of ``t``'s old buffer would go stale where a local write updates it)."""
    a, b = t.store.array, v.store.array
    return (type(a) is np.ndarray and type(b) is np.ndarray and b.flags.owndata
            and a.shape == b.shape and a.dtype == b.dtype and a.strides == b.strides
            and not v.requires_grad and v.store is not t.store
            # reference counts: the slot plus the call's argument (plus the local ``b``)
            and sys.getrefcount(t.store.counter) == 2 and sys.getrefcount(v.store) == 2
            and sys.getrefcount(b) == 3)


def _rewrappable(e):
    """Exceptions whose message can be prefixed with the instruction (plain constructors)."""
    return type(e) in (RuntimeError, ValueError, TypeError, IndexError,
                       NotImplementedError, ZeroDivisionError, FloatingPointError)


def _describe(ins, n):
    kind = ins[0]
    if kind in ("op", "custom"):
        return f"instruction {n} ({kind} '{ins[1]}')"
    return f"instruction {n} ({kind})"


class UndoLog:
    """What one program changed in state that outlives it, so that a step that failed on
    some worker can be rolled back on the others and re-run (a step commits only once
    every worker finished it). It holds the old arrays of the values the program wrote
    (those of an optimizer step: parameters and moments) until the driver commits.

    Example::

        undo = UndoLog()
        undo.track([w])              # w: a value the program reads
        undo.write(w)                # before writing into w in place
        undo.restore(values)         # the step failed somewhere: w as it was
    """

    _MISSING = object()

    def __init__(self):
        self.arrays, self.leaves, self.values = {}, {}, {}
        self.restores = []
        # ids of the version counters of the values the program read (ids only: a reference
        # would change the counts _can_take reads; the values outlive the program's writes)
        self.counters = set()
        self.nbytes = 0              # array bytes kept only for a rollback

    def track(self, tensors):
        """The program reads these values: writes into them (or into views of them, which
        share their version counter) are undone; writes into anything else are not."""
        for t in tensors:
            if isinstance(t, Tensor):
                self.counters.add(id(t.store.counter))

    def on_restore(self, fn):
        """Call ``fn()`` at a rollback (a stream puts back the rows it gave out)."""
        self.restores.append(fn)

    def write(self, t, copy=True):
        """Before the first in-place write of ``t`` in this program: keep its contents
        (``copy=False``: the array itself, which the write replaces rather than changes).
        A temporary of the program (no value it read shares its counter) is not kept."""
        key = id(t.store)
        if key in self.arrays or id(t.store.counter) not in self.counters:
            return
        a = t.store.array
        # A read-only array (one that came through Ray's object store) is replaced by a
        # write, never changed (Tensor.overwrite): the array itself is the undo data.
        writeable = getattr(getattr(a, "flags", None), "writeable", True)
        saved = a.copy() if copy and writeable else None
        self.arrays[key] = (t, t.store, a, saved, t.store.version, t.grad_fn, t.requires_grad)
        self.nbytes += a.nbytes

    def grad(self, leaf):
        """Before a backward pass clears ``leaf``'s gradient. The worker's ``leaf.grad`` is
        scratch (the driver reads gradients from the table of values, and each backward
        starts from None), so a rollback clears it rather than keeping the old array."""
        self.leaves[id(leaf)] = leaf

    def table(self, values, vid):
        if vid not in self.values:
            old = self.values[vid] = values.get(vid, self._MISSING)
            if isinstance(old, Tensor) and old.store.array is not None:
                self.nbytes += old.store.array.nbytes

    def restore(self, values):
        # Newest first, so where two writes reach the same memory (a value and a view of
        # it) the oldest contents are the ones left.
        for t, store, array, saved, version, grad_fn, requires_grad in reversed(self.arrays.values()):
            if saved is not None:
                array[...] = saved   # in place: a view's write reached its base's memory too
            store.array, store.version = array, version
            t.grad_fn, t.requires_grad = grad_fn, requires_grad
        for leaf in self.leaves.values():
            leaf.grad = None
        for vid, old in self.values.items():
            if old is self._MISSING:
                values.pop(vid, None)
            else:
                values[vid] = old
        for fn in reversed(self.restores):
            fn()


def _phase(ins):
    """Timeline phase of an instruction: ops with grad recording are the forward pass;
    ops without (after backward) are the optimizer step."""
    kind = ins[0]
    if kind == "op":
        return "forward" if ins[5] else "optimizer step"
    if kind in ("assign", "foreach"):
        return "optimizer step"
    return {"backward": "backward", "grad": "backward", "custom": "forward",
            "fetch": "fetch", "source": "data"}.get(kind, "inputs")
