"""Recovery and resize: the gang changes, the values it held are restored.

When workers fail during a step, the survivors roll the step back, the failed workers
are replaced (or, without resources, dropped and every shard re-split over the rest),
and the new workers are re-hydrated: replicated values copied from a survivor, shards
sent again from the driver's sources, batches of worker-side datasets read again. A
value that cannot be restored is marked lost and names why when used. ``resize`` is
the same re-hydration, asked for between steps.

The workers' side of this protocol is ``Worker._control`` in ``workers/worker.py``: the
messages ``rollback``, ``export``, ``import`` and ``source_read``.

Example::

    cluster.recovery.resize(3)          # what cluster.resize(3) does
    cluster.recoveries[-1]              # {"ranks": [1], "seconds": 0.4, "resized": False}
"""
import logging
import time

from distgrad import placement as pl
from distgrad.errors import RecoveryError, ResizeError
from distgrad.lazy import snapshot
from distgrad.placement import Partial, Replicate, Shard
from distgrad.utils.data import sources as data_sources

from .sizing import resplit

log = logging.getLogger("distgrad")


class Recovery:
    """Recovers a cluster from lost workers and resizes it.

    Example: ``cluster.recovery.recover(err, rec)`` after ``gang.run`` raised ``err``.
    """

    def __init__(self, cluster):
        self.cluster = cluster

    def recover(self, err, rec):
        """Roll back the failed program ``rec`` on the survivors, replace (or drop) the
        failed workers, restore their state; the caller runs ``rec`` again."""
        cluster = self.cluster
        t0 = time.time()
        dead = sorted(set(err.ranks))
        log.warning("worker(s) %s on node(s) %s failed (%s): recovering", dead,
                    list(getattr(err, "nodes", ())), err)
        survivors = [r for r in range(cluster.world_size) if r not in dead]
        if not survivors:
            raise RecoveryError("every worker failed; nothing to recover from") from err
        # Survivors end (or give up on) the failed program, then undo it: nothing commits.
        cluster.executor.control(survivors, {"control": "rollback"})
        pending = set(rec.outputs.values())
        try:
            cluster.gang.replace(dead)
            resized, new_ranks, source = False, dead, survivors[0]
        except ResizeError as e:
            log.warning("cannot replace workers %s (%s): continuing with %d workers",
                        dead, e, len(survivors))
            cluster.gang.drop(dead)
            self.set_world(len(survivors), rec)
            resized, new_ranks, source = True, [], 0
        self.rehydrate(new_ranks, resized, source, exclude=pending)
        cluster.recoveries.append({"ranks": dead, "seconds": time.time() - t0, "resized": resized})
        log.warning("recovered from the failure of %s in %.1f s", dead, time.time() - t0)

    def resize(self, n):
        """Grow or shrink the gang to ``n`` workers between steps (see ``Cluster.resize``)."""
        cluster = self.cluster
        if n < 1:
            raise ResizeError(f"resize: cannot run with {n} workers (need at least 1)")
        if n == cluster.world_size:
            return
        if not hasattr(cluster.gang, "resize"):
            raise ResizeError(f"resize: the {type(cluster.gang).__name__} backend cannot resize")
        cluster.sync()
        for src in list(cluster.recorder.data_sources.values()):
            src.check_resize()
        old = cluster.world_size
        cluster.gang.resize(n)               # raises ResizeError (with the reason) if impossible
        self.set_world(n)
        self.rehydrate(list(range(old, n)), True, 0)

    def set_world(self, n, rec=None):
        """Change the world size: re-split every live shard source (and the inputs of a
        recording about to be re-run) evenly over ``n`` workers."""
        cluster, recorder = self.cluster, self.cluster.recorder
        old = cluster.world_size
        cluster.world_size = n
        for vid, (pieces, rg) in snapshot(recorder.sources):
            store = recorder.live.get(vid)
            if store is None:
                continue
            recorder.sources[vid] = (resplit(pieces, store.placement.dim, n), rg)
        for store in list(recorder.live.values()):
            p = store.placement
            if isinstance(p, Shard):
                store.placement = Shard(p.dim, pl.split_sizes(sum(p.sizes), n))
        if rec is not None:
            _resplit_inputs(rec, old, n)
        recorder.take()                       # a fresh recording for n workers
        cluster.executor.restart(n)
        cluster.sizing.reset()

    def rehydrate(self, new_ranks, resharded, source, exclude=()):
        """Give new workers the replicated values (from worker ``source``) and every worker
        that needs it its shards (from the driver's sources); the rest is marked lost."""
        cluster, recorder = self.cluster, self.cluster.recorder
        control = cluster.executor.control
        live = {vid: st for vid, st in list(recorder.live.items())
                if vid not in exclude and vid not in recorder.lost}
        replicated = [vid for vid, st in live.items() if isinstance(st.placement, Replicate)]
        exported = control([source], {"control": "export", "vids": replicated})[0] if new_ranks else {}
        shard_ranks = range(cluster.world_size) if resharded else new_ranks
        imports = {r: dict(exported) if r in new_ranks else {} for r in shard_ranks}
        # Datasets the workers read: opened again where needed, batches still held read again.
        broken, reread = data_sources.rehydrate(cluster, live, list(shard_ranks), resharded)
        for vid, st in live.items():
            if isinstance(st.placement, Replicate) or vid in reread:
                continue
            src = recorder.sources.get(vid) if isinstance(st.placement, Shard) else None
            if src is None:
                if isinstance(st.placement, Partial) or new_ranks or resharded:
                    recorder.lost[vid] = "was lost with a failed worker"
                continue
            pieces, rg = src
            for r in shard_ranks:
                imports[r][vid] = [pieces[r], rg]
        for r, values in imports.items():
            if values:
                control([r], {"control": "import", "values": values})
        cluster.executor.reset_mirrors()
        if broken:
            raise broken[0]


def _resplit_inputs(rec, old, n):
    """Re-split the inputs of ``rec`` (recorded for ``old`` workers) over ``n`` workers:
    shards evenly, batches of worker-side datasets by their source's split."""
    shard_inputs = {idx: store for idx, store in rec.shard_puts}
    inputs = [[] for _ in range(n)]
    for idx in range(len(rec.inputs[0])):
        store = shard_inputs.get(idx)
        if store is None:
            per = [rec.inputs[0][idx]] * n
        else:
            per = resplit([rec.inputs[r][idx] for r in range(old)], store.placement.dim, n)
        for r in range(n):
            inputs[r].append(per[r])
    for idx, src, rows, stores in rec.source_reads:
        per, sizes = src.split(rows, n)       # the same rows, split over n workers
        for r in range(n):
            inputs[r][idx] = per[r]
        for store in stores:
            store.placement = Shard(0, sizes)
    rec.inputs = inputs
