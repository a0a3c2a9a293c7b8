"""Running what the driver recorded: one message per worker per sync point, all or nothing.

The executor takes the pending program from the recorder, sends it (in full, or only
its key where the driver's mirror of that worker's program cache says the worker has
it), waits, and returns the replies. A step is all or nothing: an error on any worker
rolls the program back on every worker before the driver raises; a lost worker is
recovered (``scheduler.recovery``) and the program runs again, so it commits once.

Example::

    results = cluster.executor.flush()       # what cluster.sync() does
    cluster.executor.control([0], {"control": "export", "vids": [vid]})
"""
import collections
import logging
import time

import numpy as np

from distgrad import _backend, program as prog
from distgrad._interrupt import atomic
from distgrad.errors import RecoveryError, RemoteError, WorkerError
from distgrad.placement import Partial, Shard

log = logging.getLogger("distgrad")

# A step whose undo data (the old parameters and moments each worker keeps until every
# worker finished it) reaches this size on some worker is committed by a message of its
# own, so it does not sit beside the new values until the next step; a smaller one waits
# for the next program, which commits it for free (the message costs about as much as a
# small model's step takes).
COMMIT_BYTES = 16 << 20


class Executor:
    """Sends programs and control messages to a cluster's workers, with retries.

    ``sent_keys[r]`` mirrors worker r's LRU program cache (same size, same order of use),
    so the driver knows when a key alone is enough; a worker whose mirror was reset
    (``reset_cache``) is told to empty its cache too, so the two never drift.

    Example: ``cluster.executor.messages_sent`` counts the programs run.
    """

    def __init__(self, cluster):
        self.cluster = cluster
        self.messages_sent = 0
        self.driver_spans = collections.deque(maxlen=100_000)   # (start, end) of each wait
        self.commit_bytes = COMMIT_BYTES
        self.restart(cluster.world_size)

    def restart(self, world):
        """Forget every worker's cache (a new gang of ``world`` workers)."""
        self.sent_keys = [collections.OrderedDict() for _ in range(world)]
        self.reset_cache = set(range(world))

    def flush(self):
        """Send the pending program to every worker, wait, and return their results.

        If workers die or hang, the survivors roll the program back, the failed workers
        are replaced (or, without resources, dropped and the shards re-split), their state
        is restored from a surviving replica and the driver's shard sources, and the same
        program runs again: the step commits once. If any worker reports an error, every
        worker rolls the program back before the driver raises, so a retried step is
        applied exactly once.
        """
        recorder = self.cluster.recorder
        recorder.check_open()
        if recorder.traced:
            raise RuntimeError(
                f"{recorder.traced[-1]} needs the value of a distributed tensor (.item(), .numpy(), "
                "printing, bool()): it is traced into the program the workers run, so it can "
                "only combine its arguments with distgrad ops")
        taken = self._take(recorder)
        if taken is None:
            return [{"fetched": {}} for _ in range(self.cluster.world_size)]
        header, structure, rec, free = taken
        try:
            return self.run_program(header, structure, rec)
        except BaseException:
            if not rec.committed:       # (a Ctrl-C after every worker committed it changes nothing)
                self._undo(rec, free)
            raise

    @atomic
    def _take(self, recorder):
        """(header, structure, recording, frees) of the pending program, taken from the
        recorder; None if there is nothing to send. All or nothing, even on Ctrl-C."""
        if not recorder.rec.instrs and not recorder.pending_free():
            return None
        rec = recorder.take()
        keep = sorted(s for s, vid in rec.outputs.items() if vid in recorder.live)
        structure = {"instrs": rec.instrs, "nslots": rec.nslots, "ext": rec.ext, "keep": keep}
        inv = {s: v for v, s in rec.slot_of.items()}
        bind = [inv[s] for s in rec.ext] + [rec.outputs[s] for s in keep]
        free = recorder.take_free()
        lost = [v for v in bind[:len(rec.ext)] if v in recorder.lost]
        if lost:
            self._undo(rec, free)
            raise RecoveryError(f"values {lost} cannot be used: {recorder.lost[lost[0]]} "
                                "(only inputs given to cluster.shard/replicate are kept): "
                                "recompute them")
        header = {"v": prog.PROTOCOL, "key": prog.structure_key(structure), "bind": bind,
                  "free": free, "scalars": rec.scalars}
        return header, structure, rec, free

    @atomic
    def _undo(self, rec, free):
        """The driver's side of a program that did not run: its in-place effects on driver
        tensors are restored, its values are gone (those sent from here go again)."""
        for restore in reversed(rec.rollback):
            restore()
        self.cluster.recorder.rolled_back(rec, free)

    def fetch(self, store):
        """The global value of ``store``: fetched from every worker and assembled (a sync)."""
        recorder = self.cluster.recorder
        recorder.check_open()
        rec = recorder.rec
        slot = rec.ref(store.vid)
        rec.instrs.append(["fetch", slot])
        results = self.flush()
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

    def run_program(self, header, structure, rec):
        """Run one program on every worker (retrying after recoveries); all or nothing."""
        cluster = self.cluster
        for attempt in range(cluster.max_retries + 1):
            payloads = self.payloads(header, structure, rec)
            start = time.time()
            try:
                results = cluster.gang.run(payloads)
            except WorkerError as err:
                self.driver_spans.append((start, time.time()))
                if not cluster.fault_tolerant or attempt == cluster.max_retries or \
                        not hasattr(cluster.gang, "replace"):
                    self.abort(repair=True)    # whoever ran or still runs it undoes it
                    raise
                cluster.recovery.recover(err, rec)
                continue
            except KeyboardInterrupt:
                # Every worker got the program (posting is atomic) and runs it to the end:
                # undo it there too, as the driver does, so that both forget it.
                self.abort()
                raise
            errors = self._settle(results, rec, start)
            if not errors:
                return results
            missed = [r for r, e in errors if prog.NOT_CACHED in e]
            waited = [r for r, e in errors if _waited_for_peer(e)]
            # A failed worker leaves the collective group so its peers stop waiting at once:
            # the group must then be formed anew.
            left = any(res.get("left_group") for res in results)
            if missed and len(missed) + len(waited) == len(errors) and attempt < cluster.max_retries:
                # Those workers ran nothing (their cache and the driver's mirror disagreed);
                # the others ran the program (or waited for them in a collective): undo it
                # there, then run it again everywhere, in full where it was missing.
                self.abort([r for r in range(cluster.world_size) if r not in missed],
                           repair=bool(waited) or left)
                self.reset_mirrors(missed)
                continue
            self.abort(repair=left or any("Collective" in e for _, e in errors))
            self.reset_mirrors([r for r, _ in errors])
            raise _remote_error(errors)
        raise AssertionError("unreachable")

    @atomic
    def _settle(self, results, rec, start):
        """The errors in the replies of a program every worker finished; none means it
        committed there, and the driver's bookkeeping follows at once (atomic: from here a
        Ctrl-C must not undo it on the driver alone)."""
        self.driver_spans.append((start, time.time()))
        errors = [(r, res["error"]) for r, res in enumerate(results) if res.get("error")]
        if errors:
            return errors
        rec.committed = True
        self.messages_sent += 1
        self.cluster.sizing.measure(rec, results)
        self._observe_streams(results)
        if max(res.get("undo_bytes", 0) for res in results) >= self.commit_bytes:
            self.commit()
        return errors

    def abort(self, ranks=None, repair=False):
        """Roll the last program back on those workers (default: all), without waiting: the
        rollback runs after whatever the worker is running, before any later message.
        ``repair``: the collective group may be broken (a peer timed out): form a new one."""
        cluster = self.cluster
        ranks = list(range(cluster.world_size)) if ranks is None else list(ranks)
        try:
            self._post_rollback(ranks)
            if repair and cluster.world_size > 1:
                cluster.gang.repair()
        except Exception as e:        # a dead worker is replaced (and re-hydrated) anyway
            log.warning("could not roll workers %s back: %s", ranks, e)

    @atomic
    def _post_rollback(self, ranks):
        msg = self.encode({"v": prog.PROTOCOL, "control": "rollback"})
        self.cluster.gang.post([msg] * len(ranks), ranks)

    def commit(self):
        """Every worker finished the last program: tell them, without waiting, so that what
        they keep to undo it (the old parameters and optimizer moments of a step) goes now
        rather than at the next program. Posted like a rollback, it runs before any later
        message."""
        cluster = self.cluster
        msg = self.encode({"v": prog.PROTOCOL, "control": "commit"})
        try:
            cluster.gang.post([msg] * cluster.world_size, list(range(cluster.world_size)))
        except Exception as e:        # the next program commits it anyway
            log.warning("could not tell the workers the step committed: %s", e)

    def reset_mirrors(self, ranks=None):
        """Forget what those workers cache; they are told to empty their caches too."""
        for r in range(self.cluster.world_size) if ranks is None else ranks:
            self.sent_keys[r].clear()
            self.reset_cache.add(r)

    def payloads(self, header, structure, rec):
        """One message per worker: the shared header, that worker's own inputs, and the
        program in full where that worker's cache (as mirrored here) lacks it."""
        key, out = header["key"], []
        for r in range(self.cluster.world_size):
            sent = self.sent_keys[r]
            msg = dict(header, inputs=rec.inputs[r], prog=None if key in sent else structure)
            if r in self.reset_cache:
                msg["reset_cache"] = True
                self.reset_cache.discard(r)
            sent[key] = True
            sent.move_to_end(key)
            while len(sent) > prog.PROGRAM_CACHE_SIZE:
                sent.popitem(last=False)
            out.append(self.encode(msg))
        return out

    @staticmethod
    def encode(msg):
        """(msgpack bytes, side arrays) of one message, as the gangs send it."""
        side = []
        return prog.encode(msg, side), side

    def control(self, ranks, msg):
        """Send a recovery control message to some workers; return their replies."""
        msg = dict(msg, v=prog.PROTOCOL)
        replies = self.cluster.gang.run([self.encode(msg) for _ in ranks], ranks=ranks)
        for r, rep in zip(ranks, replies):
            if rep.get("error"):
                raise RecoveryError(f"worker {r} failed {msg['control']}: {rep['error']}")
        return [rep["fetched"] for rep in replies]

    def _observe_streams(self, results):
        """Each reply says how far the workers' data streams have read ahead."""
        sources = self.cluster.recorder.data_sources
        for r, res in enumerate(results):
            for sid, status in (res.get("data") or {}).items():
                src = sources.get(sid)
                if src is not None and src.streaming and src.active is not None:
                    src.observe(r, status)


def _waited_for_peer(error_text):
    """Whether a worker's error says it only waited for a peer that failed or left."""
    return "CollectiveTimeoutError" in error_text or "CollectiveAbortedError" in error_text


def _remote_error(errors):
    """The RemoteError for workers' errors [(rank, text)]: the cause first (peers that
    waited for the failed worker report a timeout)."""
    errors = sorted(errors, key=lambda e: _waited_for_peer(e[1]))
    rank, err = errors[0]
    also = f"; workers {[r for r, _ in errors[1:]]} failed too" if len(errors) > 1 else ""
    return RemoteError(f"worker {rank}: {err} (the step was rolled back on every "
                       f"worker{also})")
