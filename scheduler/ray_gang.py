"""``backend="ray"``: one Ray actor per worker, gang-scheduled in one placement group."""
import logging
import os
import uuid

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

import distgrad
from distgrad import program as prog
from distgrad.workers.actor import WorkerActor

from .errors import WorkerError, WorkerTimeoutError

log = logging.getLogger("distgrad")


def _package_root():
    return os.path.dirname(os.path.dirname(os.path.abspath(distgrad.__file__)))


def ensure_ray(address=None, num_cpus=None):
    """Connect to Ray: a new local instance when ``address`` is None (unless this process
    is already connected), else the cluster at ``address`` ("auto" inside a Ray job).
    Returns True when this call started Ray (so the caller shuts it down)."""
    if ray.is_initialized():
        return False
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join(
        p for p in [_package_root(), os.environ.get("PYTHONPATH", "")] if p)}}
    if address is None:
        ray.init(address="local", include_dashboard=False, num_cpus=num_cpus,
                 log_to_driver=False, configure_logging=False, runtime_env=env)
    else:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    return True


class RayGang:
    """N worker actors in one placement group; ``run`` sends one message to each."""

    def __init__(self, n, device="cpu", address=None, bucket_cap_mb=25.0, timeout_s=60.0,
                 num_cpus_per_worker=1, collective=None, strategy="PACK"):
        self.n, self.timeout_s = n, timeout_s
        cuda = device != "cpu"
        self._owns_ray = ensure_ray(address, num_cpus=max(n * num_cpus_per_worker, os.cpu_count() or 1))
        bundle = {"CPU": num_cpus_per_worker, **({"GPU": 1} if cuda else {})}
        self.pg = placement_group([dict(bundle) for _ in range(n)], strategy=strategy)
        self.actors = []
        try:
            try:
                ray.get(self.pg.ready(), timeout=timeout_s)
            except ray.exceptions.GetTimeoutError:
                raise WorkerError(
                    f"could not place {n} workers of {bundle} each within {timeout_s:g}s: the "
                    f"cluster has {ray.available_resources()} available") from None
            cls = ray.remote(WorkerActor)
            self.actors = [cls.options(
                num_cpus=num_cpus_per_worker, num_gpus=1 if cuda else 0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=r),
            ).remote(r, n, device, bucket_cap_mb, timeout_s) for r in range(n)]
            self.nodes = self._get([a.node_id.remote() for a in self.actors], "start")
            kind, options = self._collective(collective)
            self._get([a.setup.remote(kind, options) for a in self.actors], "collective setup")
            self.collective = kind
        except BaseException:
            self.shutdown()
            raise

    def _collective(self, requested):
        """shm inside one node, hierarchical (shm + tcp ring) across nodes."""
        name = f"distgrad_{uuid.uuid4().hex[:12]}"
        kind = requested or ("shm" if len(set(self.nodes)) == 1 else "hierarchical")
        if kind == "shm":
            return kind, {"name": name}
        return kind, {"group_name": name}

    def _get(self, refs, what):
        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=self.timeout_s)
        if pending:
            late = [r for r, ref in enumerate(refs) if ref in pending]
            raise WorkerTimeoutError(f"workers {late} did not finish {what} within "
                                     f"{self.timeout_s:g}s", rank=late[0])
        out = []
        for r, ref in enumerate(refs):
            try:
                out.append(ray.get(ref))
            except ray.exceptions.RayActorError as e:
                node = self.nodes[r] if getattr(self, "nodes", None) else None
                raise WorkerError(f"worker {r} (node {node}) died during {what}: {e}", rank=r,
                                  node=node) from None
        return out

    def run(self, payloads):
        refs = []
        for actor, (data, side) in zip(self.actors, payloads):
            refs.append(actor.execute.remote(data, *[ray.put(a) for a in side]))
        return [prog.decode(r) for r in self._get(refs, "its program")]

    def stats(self):
        return self._get([a.stats.remote() for a in self.actors], "stats")

    def spans(self):
        return self._get([a.spans.remote() for a in self.actors], "spans")

    def shutdown(self):
        for a in self.actors:
            try:
                ray.get(a.close.remote(), timeout=10)
            except Exception:            # a dead actor has nothing left to close
                pass
            ray.kill(a, no_restart=True)
        self.actors = []
        if self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None
        if self._owns_ray:
            ray.shutdown()
            self._owns_ray = False

    def __repr__(self):
        return f"RayGang({self.n} actors)"
