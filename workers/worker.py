"""The worker: owns a device and a local autograd engine, runs the driver's programs.

A plain class: ``backend="local"`` calls it from one thread per worker, and
``backend="ray"`` wraps it in a Ray actor (``distgrad.workers.actor``). Messages are
msgpack (``distgrad.program``); a bad message gets an error back and the worker stays
usable. Replicated leaves' gradients are all-reduced in buckets during backward.
"""
import collections
import contextlib
import threading
import time

import numpy as np

from distgrad import _backend, program as prog
from distgrad.autograd import engine
from distgrad.collective_ops import use_communicator
from distgrad.tensor import Tensor, Variable, apply_op

from .bucketing import Bucketer, OrderedComm


class Worker:
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
        self.undo = UndoLog()          # the last program's writes, until the next message commits it
        self.fail_after = None         # test hook: (kind, seconds) -> crash or hang in the next program
        self.slowdown_s = 0.0          # test hook: extra compute time per program (a slow worker)
        self.cache = collections.OrderedDict()
        self.cache_size = cache_size
        self.max_message_bytes = max_message_bytes
        self.stats = {"programs": 0, "cache_hits": 0, "bytes_in": 0, "backward_s": 0.0, "run_s": 0.0}
        self.step_times = collections.deque(maxlen=1000)
        self.spans = collections.deque(maxlen=200_000)   # (name, start, end, thread) for timelines

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
        try:
            msg = prog.decode(payload, side, self.max_message_bytes)
            self.span("decode", w0)
            fetched = self._run_message(msg)
            # Busy time: the program's time minus waits for the other workers. The driver
            # sizes shards by it (cluster.shard(..., sizes="auto")).
            busy = time.perf_counter() - t0 - ((self.comm.wait_s if self.comm else 0.0) - waited)
            reply = {"fetched": fetched, "error": None, "busy_s": busy}
        except Exception as e:          # reported to the driver; the worker stays usable
            reply = {"fetched": {}, "error": f"{type(e).__name__}: {e}"}
        self.stats["programs"] += 1
        self.stats["bytes_in"] += len(payload)
        self.stats["run_s"] += time.perf_counter() - t0
        self.step_times.append(time.perf_counter() - t0)
        out_side = []
        return prog.encode(reply, out_side), out_side

    def _run_message(self, msg):
        if not isinstance(msg, dict) or msg.get("v") != prog.PROTOCOL:
            raise prog.ProgramError(f"unsupported message (protocol {msg.get('v') if isinstance(msg, dict) else '?'})")
        control = msg.get("control")
        if control is not None:
            return self._control(control, msg)
        # A new program means the driver saw the previous one succeed everywhere: commit it.
        self.undo = UndoLog()
        self._maybe_fail()
        if self.slowdown_s:
            time.sleep(self.slowdown_s)
        key = msg.get("key")
        structure = msg.get("prog")
        if structure is not None:
            prog.validate(structure)
            if prog.structure_key(structure) != key:
                raise prog.ProgramError("program key does not match its structure")
            self.cache[key] = structure
            while len(self.cache) > self.cache_size:
                self.cache.popitem(last=False)
        else:
            structure = self.cache.get(key)
            if structure is None:
                raise prog.ProgramError(f"program {key} {prog.NOT_CACHED}")
            self.cache.move_to_end(key)
            self.stats["cache_hits"] += 1
        bind = msg["bind"]
        ext, keep = structure["ext"], structure["keep"]
        if len(bind) != len(ext) + len(keep):
            raise prog.ProgramError(f"bind list has {len(bind)} ids, program needs {len(ext) + len(keep)}")
        env = [None] * structure["nslots"]
        for s, vid in zip(ext, bind):
            if vid not in self.values:
                raise prog.ProgramError(f"value {vid} is not held by worker {self.rank}")
            env[s] = self.values[vid]
        inputs = [self._to_device(a) for a in msg.get("inputs", [])]
        fetched = {}
        phase, start = None, time.time()
        with use_communicator(self.comm):
            for ins in structure["instrs"]:
                now = _phase(ins)
                if now != phase:
                    if phase is not None:
                        self.span(phase, start)
                    phase, start = now, time.time()
                self._step(ins, env, inputs, fetched)
        if phase is not None:
            self.span(phase, start)
        for s, vid in zip(keep, bind[len(ext):]):
            self.undo.table(self.values, vid)
            self.values[vid] = env[s]
        for vid in msg.get("free", []):
            if vid in self.values:
                self.undo.table(self.values, vid)
                del self.values[vid]
        return fetched

    # ------------------------------------------------------------------ recovery
    def _control(self, control, msg):
        """Messages of the recovery protocol (see distgrad.scheduler.recovery)."""
        if control == "rollback":
            self.undo.restore(self.values)
            self.undo = UndoLog()
            return {}
        if control == "export":
            out = {}
            for vid in msg["vids"]:
                t = self.values.get(vid)
                if t is not None:
                    out[vid] = [_backend.to_numpy(t._store.array), bool(t.requires_grad and t.is_leaf)]
            return out
        if control == "import":
            for vid, (array, requires_grad) in msg["values"].items():
                t = Variable._from_array(self._to_device(array))
                if requires_grad:
                    t._init_requires_grad(True)
                self.values[int(vid)] = t
            return {}
        if control == "ping":
            return {}
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
    def _step(self, ins, env, inputs, fetched):
        kind = ins[0]
        if kind == "op":
            _, name, args, attrs, out, grad_enabled = ins
            vals = [env[a[1]] if a[0] == "s" else a[1] for a in args]
            prev = engine.is_grad_enabled()
            engine.set_grad_enabled(grad_enabled)
            try:
                env[out] = apply_op(name, *vals, **attrs)
            finally:
                engine.set_grad_enabled(prev)
        elif kind == "put":
            _, slot, idx, requires_grad = ins
            t = Variable._from_array(inputs[idx])
            if requires_grad:
                t._init_requires_grad(True)
            env[slot] = t
        elif kind == "update":
            _, slot, idx = ins
            t = env[slot]
            self.undo.write(t)
            t._store.array = inputs[idx]
            t._store.version += 1
        elif kind == "assign":
            _, target, src = ins
            t = env[target]
            self.undo.write(t)
            with engine.no_grad() if not env[src].requires_grad else contextlib.nullcontext():
                t._write(env[src], "assign")
        elif kind == "fetch":
            v = env[ins[1]]
            fetched[ins[1]] = _backend.to_numpy(v._store.array if isinstance(v, Tensor) else v)
        elif kind == "backward":
            self._backward(ins, env)

    def _backward(self, ins, env):
        _, root_slot, seed_slot, placement, retain, leaves = ins
        t0 = time.perf_counter()
        root = env[root_slot]
        if seed_slot >= 0:
            seed = env[seed_slot]
        else:
            seed = Tensor._from_array(self.xp.ones(root.shape, dtype=root.dtype))
        if placement == "R" and self.rank != 0:
            # The cotangent of a replicated value is a sum over workers: rank 0 carries it.
            seed = Tensor._from_array(self.xp.zeros(root.shape, dtype=root.dtype))
        prev, replicated = [], set()
        for leaf_slot, prev_slot, _new, is_rep in leaves:
            leaf = env[leaf_slot]
            prev.append(env[prev_slot] if prev_slot >= 0 else None)
            self.undo.grad(leaf)
            leaf._grad = None                 # this backward's gradient alone is all-reduced
            if is_rep:
                replicated.add(id(leaf))
        bucketer = (Bucketer(self.comm, self.bucket_cap, replicated, self.compress, self.span)
                    if self.comm else None)
        engine.run_backward([root], [seed], retain_graph=bool(retain),
                     on_leaf_ready=bucketer.add if bucketer else None)
        if bucketer:
            bucketer.finish()
        for (leaf_slot, _p, new_slot, _r), old in zip(leaves, prev):
            leaf = env[leaf_slot]
            g = leaf._grad
            if old is not None:
                g = old if g is None else Variable._from_array(old._store.array + g._store.array)
            if g is None:
                g = Variable._from_array(self.xp.zeros(leaf.shape, dtype=leaf.dtype))
            leaf._grad = g
            env[new_slot] = g
        self.stats["backward_s"] += time.perf_counter() - t0

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


class UndoLog:
    """What one program changed in state that outlives it, so that a step that failed on
    some worker can be rolled back on the others and re-run (a step commits only once
    every worker finished it)."""

    _MISSING = object()

    def __init__(self):
        self.arrays, self.grads, self.values = {}, {}, {}

    def write(self, t):
        """Before the first in-place write of ``t`` in this program: keep its contents."""
        key = id(t._store)
        if key not in self.arrays:
            self.arrays[key] = (t, t._store, t._store.array.copy(), t._store.version,
                                t.grad_fn, t.requires_grad)

    def grad(self, leaf):
        self.grads.setdefault(id(leaf), (leaf, leaf._grad))

    def table(self, values, vid):
        self.values.setdefault(vid, values.get(vid, self._MISSING))

    def restore(self, values):
        for t, store, array, version, grad_fn, requires_grad in self.arrays.values():
            store.array, store.version = array, version
            t.grad_fn, t.requires_grad = grad_fn, requires_grad
        for leaf, g in self.grads.values():
            leaf._grad = g
        for vid, old in self.values.items():
            if old is self._MISSING:
                values.pop(vid, None)
            else:
                values[vid] = old


def _phase(ins):
    """Timeline phase of an instruction: ops with grad recording are the forward pass;
    ops without (after backward) are the optimizer step."""
    kind = ins[0]
    if kind == "op":
        return "forward" if ins[5] else "optimizer step"
    if kind == "assign":
        return "optimizer step"
    return {"backward": "backward", "fetch": "fetch"}.get(kind, "inputs")
