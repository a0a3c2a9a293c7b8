"""``backend="ray"``: one Ray actor per worker, gang-scheduled in placement groups.

Besides running programs, the gang can replace dead or hung workers, grow and shrink
(each change re-forms the collective group), and send recovery control messages; what
to restore is decided by the driver (``distgrad.scheduler.recovery``).
"""
import logging
import os
import secrets
import shutil
import time
import uuid

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

import distgrad
from distgrad import _backend, program as prog
from distgrad._interrupt import atomic
from distgrad.workers.actor import WorkerActor

from . import socket_channel
from .errors import ResizeError, WorkerError, WorkerTimeoutError
from .socket_channel import SocketChannel, Ticket

log = logging.getLogger("distgrad.scheduler")

# Booting a worker process is not a wait on resources: on a loaded 2-core machine it takes
# seconds, and a short timeout_s (for quick hang detection) must not fail start-up.
START_FLOOR_S = 30.0


def _package_root():
    return os.path.dirname(os.path.dirname(os.path.abspath(distgrad.__file__)))


def ensure_ray(address=None, num_cpus=None, log_to_driver=True):
    """Connect to Ray: a new local instance when ``address`` is None (unless this process
    is already connected), else the cluster at ``address`` ("auto" inside a Ray job).
    ``log_to_driver``: print the workers' stdout/stderr here, each line prefixed with the
    worker's rank. Returns True when this call started Ray (so the caller shuts it down).

    Example: ``started = ensure_ray(None, num_cpus=2)``.
    """
    if ray.is_initialized():
        return False
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join(
        p for p in [_package_root(), os.environ.get("PYTHONPATH", "")] if p)}}
    if address is None:
        ray.init(address="local", include_dashboard=False, num_cpus=num_cpus,
                 log_to_driver=log_to_driver, configure_logging=False, runtime_env=env)
    else:
        ray.init(address=address, log_to_driver=log_to_driver, configure_logging=False)
    return True


def describe_resources(res, keys=("CPU", "GPU")):
    """Resource amounts as words: ``{"CPU": 2.0}`` -> ``"2 CPUs and no GPU"``.

    Example: ``describe_resources(ray.available_resources())``.
    """
    parts = []
    for k in keys:
        n = float(res.get(k, 0))
        if n == 0:
            parts.append(f"no {k}")
        else:
            parts.append(f"{n:g} {k}{'' if n == 1 else 's'}")
    return " and ".join([", ".join(parts[:-1]), parts[-1]] if len(parts) > 1 else parts)


def describe_nodes(address):
    """The nodes of the Ray cluster at ``address``: address, alive, CPUs and GPUs of each.

    Example: ``describe_nodes("auto")``.
    """
    started = ensure_ray(address)
    try:
        return [{"address": n["NodeManagerAddress"], "alive": n["Alive"],
                 "cpus": n.get("Resources", {}).get("CPU", 0),
                 "gpus": n.get("Resources", {}).get("GPU", 0)} for n in ray.nodes()]
    finally:
        if started:
            ray.shutdown()


def _putter():
    """``put(array)``: ``ray.put`` once per array object, the same reference for every
    worker a message sends it to (a replicated value is stored once, not once per worker).
    Arrays are told apart by ``id``: the caller keeps them all alive while it sends.

    Example: ``put = _putter(); refs = [put(a) for a in side]``.
    """
    refs = {}

    def put(a):
        ref = refs.get(id(a))
        if ref is None:
            ref = refs[id(a)] = ray.put(a)
        return ref
    return put


def _open_channel(actor, rank, tcp, timeout_s, start_timeout_s):
    """A socket channel to ``actor`` (TCP if ``tcp``: it runs on another node), or None if
    it cannot open one: its programs then go by Ray calls, slower but the same."""
    token, address = secrets.token_bytes(32), None
    try:
        address = ray.get(actor.open_channel.remote(token, tcp), timeout=start_timeout_s)
        return SocketChannel(address, token, rank, timeout_s)
    except Exception as e:
        if isinstance(address, str) and os.path.basename(os.path.dirname(address)).startswith(
                "distgrad-ch-"):
            shutil.rmtree(os.path.dirname(address), ignore_errors=True)   # a name left behind
        log.warning("worker %d: no direct channel (%s: %s); programs go by Ray calls",
                    rank, type(e).__name__, e)
        return None


def wait_replies(refs, what, deadline, nodes):
    """The replies to ``refs`` (Ray refs or channel tickets, one per worker, in order).
    Both kinds are watched at once: a dead worker is reported as soon as it is seen,
    whichever way its messages go (its peers may wait for it in a collective meanwhile);
    ranks still running at ``deadline`` are reported as hung. ``nodes[i]`` names the node
    of the worker ``refs[i]`` went to.

    Example: ``wait_replies(gang.post(payloads, ranks), "its program", time.time() + 60, nodes)``.
    """
    tickets = {i: t for i, t in enumerate(refs) if isinstance(t, Ticket)}
    pending = {ref: i for i, ref in enumerate(refs) if i not in tickets}
    out = [None] * len(refs)
    while pending or tickets:
        left = max(deadline - time.time(), 0)
        socket_channel.poll(tickets, min(left, socket_channel.MIXED_POLL_S) if pending else left,
                            what, nodes)
        ready = ray.wait(list(pending), num_returns=1, timeout=0 if tickets else max(
            deadline - time.time(), 0))[0] if pending else []
        if time.time() >= deadline and not ready and (pending or tickets):
            late = sorted(list(pending.values()) + list(tickets))
            raise WorkerTimeoutError(f"workers {late} did not finish {what} within the timeout",
                                     ranks=late, nodes=[nodes[r] for r in late])
        for ref in ready:
            r = pending.pop(ref)
            try:
                out[r] = ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                    ray.exceptions.ActorUnavailableError) as e:
                raise WorkerError(f"worker {r} (node {nodes[r]}) died during {what}: "
                                  f"{type(e).__name__}", ranks=[r], nodes=[nodes[r]]) from None
    for i, t in enumerate(refs):
        if isinstance(t, Ticket):
            out[i] = t.reply
    return out


def pin_workers(gang):
    """The cores of each CPU worker of ``gang`` under ``dg.init(pin_cpus=True)``, or None
    for an unpinned one. The workers of each host (by IP address, so simulated nodes on
    one machine count as one host) are numbered and each takes its own share of the
    host's cores (``workers/cpu_pinning.py``), or none does where they do not all fit.

    Example: ``gang.pinned = pin_workers(gang)``.
    """
    if not gang.pin_cpus or gang.device != "cpu":
        return [None] * gang.n
    deadline, per = time.time() + gang.start_timeout_s, gang.blas_threads
    hosts = gang._get([a.host_address.remote() for a in gang.actors], "host lookup", deadline)
    pinned = gang._get([a.pin_cpus.remote(hosts[:r].count(h), hosts.count(h), per)
                        for r, (a, h) in enumerate(zip(gang.actors, hosts))], "CPU pinning", deadline)
    loose = [r for r, cores in enumerate(pinned) if cores is None]
    if loose:
        log.warning("pin_cpus: worker(s) %s left unpinned: their host has fewer cores than "
                    "its workers need (%d each)", loose, per)
    return pinned


class RayGang:
    """N worker actors; ``run`` sends one message to each and detects dead or hung ones."""

    def __init__(self, n, device="cpu", address=None, bucket_cap_mb=25.0, timeout_s=60.0,
                 num_cpus_per_worker=1, collective=None, strategy="PACK", place_timeout_s=None,
                 compress=None, log_to_driver=True, driver_socket=True, pin_cpus=False):
        self.timeout_s = timeout_s
        # Programs to CPU workers go over a socket (scheduler.socket_channel: Unix on the
        # driver's node, TCP to others), not one Ray call each; False: always Ray calls.
        self.driver_socket = driver_socket
        self.compress = compress
        self.device, self.bucket_cap_mb, self.pin_cpus = device, bucket_cap_mb, bool(pin_cpus)
        self.requested_collective, self.strategy = collective, strategy
        # timeout_s bounds the wait for resources too; booting the processes gets a floor.
        self.place_timeout_s = place_timeout_s or timeout_s
        self.start_timeout_s = max(self.place_timeout_s, START_FLOOR_S)
        self.bundle = {"CPU": num_cpus_per_worker, **({"GPU": 1} if device != "cpu" else {})}
        self.blas_threads = max(1, int(num_cpus_per_worker))
        # A local instance puts the workers on this machine: no cupy or no GPU here is a
        # certain failure, so say so before starting Ray rather than after a placement wait.
        self._local = address is None
        if device != "cpu" and self._local and not ray.is_initialized():
            _backend.cupy_module()
        num_cpus = max(n * num_cpus_per_worker, os.cpu_count() or 1)
        if not ray.is_initialized():
            log.info(f"starting a local Ray instance ({num_cpus} CPUs)" if self._local
                     else f"connecting to the Ray cluster at {address}")
        t0 = time.time()
        self._owns_ray = ensure_ray(address, num_cpus=num_cpus, log_to_driver=log_to_driver)
        if self._owns_ray:
            log.info("Ray is up (%.1f s)", time.time() - t0)
        self.actors, self.slots, self.nodes, self.pgs = [], [], [], []
        self.channels = []          # per rank: a SocketChannel, or None (Ray calls)
        self.collective = None
        try:
            t0 = time.time()
            log.info("placing %d workers (%s each)", n, describe_resources(self.bundle, self.bundle))
            self._add_workers(n)
            self._form_group()
            log.info("%d workers ready (%.1f s, %s collective)", n, time.time() - t0, self.collective)
        except BaseException:
            self.shutdown()
            raise

    @property
    def n(self):
        return len(self.actors)

    # ------------------------------------------------------------------ placement
    def _add_workers(self, count):
        """Reserve ``count`` bundles (one placement group) and start an actor in each."""
        if count <= 0:
            return
        more = "more " if self.actors else ""
        each = describe_resources(self.bundle, self.bundle)
        total = ray.cluster_resources()
        short = [k for k, v in self.bundle.items() if total.get(k, 0) < v * count]
        if short and self._local:
            # A local Ray instance never grows: waiting cannot help (a cluster may autoscale).
            fit = min(int(total.get(k, 0) // v) for k, v in self.bundle.items() if v)
            head = (f"could not place {count} {more}workers ({each} each): this Ray instance has "
                    f"{describe_resources(total)} in all")
            if "GPU" in short:
                raise ResizeError(f"{head}, and device='cuda' takes a GPU per worker: use "
                                  f"device='cpu', or run where {count} GPUs are.")
            raise ResizeError(f"{head}, room for {fit} worker(s): ask for at most {fit}, or fewer "
                              "CPUs per worker (num_cpus_per_worker).")
        pg = placement_group([dict(self.bundle) for _ in range(count)], strategy=self.strategy)
        try:
            ray.get(pg.ready(), timeout=self.place_timeout_s)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(pg)
            raise ResizeError(
                f"could not place {count} {more}workers ({each} each) within "
                f"{self.place_timeout_s:g} s: the cluster has {describe_resources(ray.available_resources())} "
                f"free, of {describe_resources(total)} in all. Free them (is another job or cluster "
                "holding them?), ask for fewer workers, or add nodes.") from None
        self.pgs.append(pg)
        for i in range(count):
            self.actors.append(None)
            self.channels.append(None)
            self.slots.append((pg, i))
            self.nodes.append(None)
            self._start(len(self.actors) - 1)

    def _start(self, rank):
        pg, i = self.slots[rank]
        actor = ray.remote(WorkerActor).options(
            num_cpus=self.bundle["CPU"], num_gpus=self.bundle.get("GPU", 0),
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i),
        ).remote(rank, self.n, self.device, self.bucket_cap_mb, self.timeout_s, self.compress,
                 self.blas_threads)
        self.actors[rank] = actor
        self.nodes[rank] = None
        self._close_channel(rank)

    def _form_group(self):
        """(Re)build the collective group over the current actors: shm inside one node,
        hierarchical (shm + tcp ring) across nodes."""
        self._drain()
        self.nodes = self._get([a.node_id.remote() for a in self.actors], "start",
                               time.time() + self.start_timeout_s)
        name = f"distgrad_{uuid.uuid4().hex[:12]}"
        if self.requested_collective:
            kind = self.requested_collective
        elif self.device != "cpu":
            kind = "nccl"                 # gradients stay on the GPUs
        else:
            kind = "shm" if len(set(self.nodes)) == 1 else "hierarchical"
        options = {"name": name} if kind == "shm" else {"group_name": name}
        self._get([a.reset_comm.remote(kind, options, r, self.n)
                   for r, a in enumerate(self.actors)], "collective setup",
                  time.time() + self.start_timeout_s)
        self.collective = kind
        self.pinned = pin_workers(self)         # per worker: its cores, or None
        self._open_channels()

    # ------------------------------------------------------------------ direct channels
    def _open_channels(self):
        """A socket channel to each CPU worker that lacks one: a Unix socket on this node,
        TCP to the others (a worker that cannot open one keeps Ray calls: slower, not
        wrong)."""
        if not self.driver_socket or self.device != "cpu":
            return
        here = ray.get_runtime_context().get_node_id()
        for r, actor in enumerate(self.actors):
            if self.channels[r] is None:
                self.channels[r] = _open_channel(actor, r, self.nodes[r] != here, self.timeout_s,
                                                 self.start_timeout_s)

    def _close_channel(self, rank):
        if rank < len(self.channels) and self.channels[rank] is not None:
            self.channels[rank].close()
            self.channels[rank] = None

    def _drain(self, ranks=None, wait_s=None):
        """Wait until the workers' channels answered all that was posted on them: a Ray
        call that changes a worker's state must run after the programs queued before it
        (as calls on one actor do), not beside them on the channel's thread."""
        deadline = time.time() + (self.timeout_s * 1.5 + 5 if wait_s is None else wait_s)
        for r in range(self.n) if ranks is None else ranks:
            if self.channels[r] is not None:
                socket_channel.drain(self.channels[r], deadline, "its queued messages",
                                     self.nodes[r])

    def replace(self, ranks):
        """Kill workers ``ranks`` (dead or hung) and start fresh ones in their bundles."""
        for r in ranks:
            self._close_channel(r)
            try:
                ray.kill(self.actors[r], no_restart=True)
            except Exception:
                pass
            self._start(r)
        deadline = time.time() + self.start_timeout_s
        for r in ranks:
            try:
                self.nodes[r] = ray.get(self.actors[r].node_id.remote(),
                                        timeout=max(deadline - time.time(), 1))
            except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError):
                raise ResizeError(f"could not start a replacement for worker {r} within "
                                  f"{self.start_timeout_s:g} s (no resources left?)") from None
        self._form_group()

    def resize(self, n):
        """Grow (new bundles) or shrink (drop the highest ranks) to ``n`` workers."""
        if n < self.n:
            self.drop(list(range(n, self.n)))
        elif n > self.n:
            self._add_workers(n - self.n)
            self._form_group()

    def drop(self, ranks):
        """Remove workers ``ranks``; the others are renumbered 0..n-1 in order."""
        ranks = set(ranks)
        for r in sorted(ranks):
            self._close_channel(r)
            try:
                ray.kill(self.actors[r], no_restart=True)
            except Exception:
                pass
        keep = [r for r in range(self.n) if r not in ranks]
        self.actors = [self.actors[r] for r in keep]
        self.channels = [self.channels[r] for r in keep]
        for r, ch in enumerate(self.channels):
            if ch is not None:
                ch.rank = r
        self.slots = [self.slots[r] for r in keep]
        self.nodes = [self.nodes[r] for r in keep]
        used = {id(pg) for pg, _ in self.slots}
        for pg in [pg for pg in self.pgs if id(pg) not in used]:
            remove_placement_group(pg)
        self.pgs = [pg for pg in self.pgs if id(pg) in used]
        if self.actors:
            self._form_group()

    # ------------------------------------------------------------------ messages
    def _get(self, refs, what, deadline=None):
        """Wait for one reply per worker. A dead actor is reported at once; ranks still
        running at the deadline are reported as hung."""
        nodes = [self.nodes[r] if r < len(self.nodes) else None for r in range(len(refs))]
        return wait_replies(refs, what, deadline or time.time() + self.timeout_s, nodes)

    def run(self, payloads, ranks=None):
        """Send ``payloads[i]`` to worker ``ranks[i]`` (default: all) and return the replies."""
        ranks = list(range(self.n)) if ranks is None else list(ranks)
        refs = self.post(payloads, ranks)
        # Workers stuck in a collective with a dead peer give up after timeout_s themselves;
        # the extra slack lets them report that, so only the culprit counts as hung.
        try:
            replies = self._get(refs, "its program", time.time() + self.timeout_s * 1.5 + 5)
        except WorkerError as e:
            e.ranks = tuple(ranks[i] for i in e.ranks)
            raise
        return [prog.decode(data, side) for data, side in replies]

    def add_source(self, payloads, ranks):
        """Register a data source on workers ``ranks``: ``payloads[i]`` is (msgpack bytes,
        side arrays, the object only Ray's serializer carries, or None). Returns the replies."""
        self._drain(ranks)
        put = _putter()
        refs = [self.actors[r].add_source.remote(data, obj, *[put(a) for a in side])
                for r, (data, side, obj) in zip(ranks, payloads)]
        deadline, out = time.time() + self.timeout_s, []
        for r, ref in zip(ranks, refs):
            try:
                out.append(prog.decode(*ray.get(ref, timeout=max(deadline - time.time(), 0.1))))
            except ray.exceptions.GetTimeoutError:
                raise WorkerTimeoutError(f"worker {r} did not set up its data source within the "
                                         "timeout", ranks=[r], nodes=[self.nodes[r]]) from None
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                    ray.exceptions.ActorUnavailableError) as e:
                raise WorkerError(f"worker {r} (node {self.nodes[r]}) died during data source "
                                  f"setup: {type(e).__name__}", ranks=[r], nodes=[self.nodes[r]]) from None
            except ray.exceptions.RayTaskError as e:
                # The object could not be loaded in the worker (say, a function whose module
                # it cannot import): an error about the source, not a dead worker.
                last = [line for line in str(e).splitlines() if line.strip()][-1].strip()
                out.append({"schema": None, "error": f"worker {r}: the object sent with the data "
                            f"source could not be loaded there ({last}): define the function in "
                            "the script you run, or make its module importable on the workers"})
        return out

    def repair(self):
        """Re-form the collective group (a timed-out one stays broken); the actors join it
        after whatever they run now."""
        self._form_group()

    @atomic
    def post(self, payloads, ranks):
        """Queue messages behind whatever each actor runs now (actor calls run in order),
        to all of ``ranks`` or (on Ctrl-C) none; return the replies' refs (or a direct
        channel's tickets) without waiting."""
        put = _putter()
        return [self.channels[r].post(data, side) if self.channels[r] is not None
                else self.actors[r].execute.remote(data, *[put(a) for a in side])
                for r, (data, side) in zip(ranks, payloads)]

    def inject_failure(self, rank, kind, seconds=0.0):
        """Test hook: worker ``rank`` crashes or hangs at its next program."""
        self._drain([rank])
        ray.get(self.actors[rank].inject_failure.remote(kind, seconds), timeout=self.timeout_s)

    def pid(self, rank):
        return ray.get(self.actors[rank].pid.remote(), timeout=self.timeout_s)

    def stats(self):
        self._drain()
        return self._get([a.stats.remote() for a in self.actors], "stats")

    def spans(self):
        self._drain()
        return self._get([a.spans.remote() for a in self.actors], "spans")

    def shutdown(self):
        try:
            self._drain(wait_s=10)
        except WorkerError:           # a hung worker is killed below anyway
            pass
        for r in range(len(self.channels)):
            self._close_channel(r)
        for a in self.actors:
            try:
                ray.get(a.close.remote(), timeout=10)
            except Exception:            # a dead or hung actor has nothing left to close
                pass
            try:
                ray.kill(a, no_restart=True)
            except Exception:
                pass
        self.actors = []
        for pg in self.pgs:
            remove_placement_group(pg)
        self.pgs = []
        if self._owns_ray:
            ray.shutdown()
            self._owns_ray = False

    def __repr__(self):
        return f"RayGang({self.n} actors, {self.collective})"
