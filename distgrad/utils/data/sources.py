"""Datasets the workers read themselves: the rows never pass through the driver.

One mechanism for every source. A source is registered on every worker once: arrays
sent once (worker r keeping every W-th row), ``.npy`` files memory-mapped there, a
generator run there, or that worker's split of a Ray Data stream. Then each step the
driver records one ``source`` instruction naming, per worker, which rows it reads (a small
int64 array, a program input, so the cached step program is reused); the worker reads
them and the result is a ``Shard(0)`` value per column. The driver keeps no per-row
state (its shuffle is a permutation computed position by position), so its memory does
not grow with the dataset.

Global-batch semantics: ``batch_size`` is the GLOBAL batch, split across the workers
(uneven allowed: a mean loss is the mean over all its rows); an epoch reads every row
exactly once (the last batch keeps the remainder unless ``drop_last``). For arrays, files
and generators the sequence of global batches depends only on ``(seed, epoch)``, not on
the worker count, so 2 and 3 workers train to the same parameters (up to summation
order), and a resize or a recovered worker keeps the position in the epoch. A Ray Data
stream reads every row once per epoch too, but which rows form a batch is Ray Data's
scheduling (see :class:`StreamSource`).

Example::

    train = cluster.shard_dataset({"x": "data/x", "y": "data/y.npy"}, batch_size=256,
                                  shuffle=True, seed=0)
    for epoch in range(3):
        for xb, yb in train:                       # Shard(0) values, read by the workers
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(); loss.backward(); opt.step()
    acc = val.evaluate(lambda x, y: model(x).argmax(dim=1) == y)   # only the metric comes back
"""
import os
import time
import weakref

import numpy as np

from ... import _backend, _hints, program as prog
from ...autograd import no_grad
from ...errors import RecoveryError, ResizeError
from ...lazy import snapshot
from ...placement import Shard, split_sizes
from ...tensor import Tensor, Variable


class DataError(ValueError):
    """A dataset that cannot be read as asked: a missing file or column, a shard or
    column whose shape or dtype differs (the message names it, and the worker rank)."""


def _schema(entries):
    return [(str(n), np.dtype(d), tuple(int(k) for k in s)) for n, d, s, _rows in entries]


class DataSource:
    """The driver's handle of a source registered on the workers (one kind per subclass):
    ``payload`` says what a worker needs to open it; ``split`` which rows each reads.

    Example::

        src = NpySource(cluster, [("x", ["/data/x.npy"])])
        xb, = src.read(np.array([7, 3, 5]))          # rows 7, 3, 5 as one Shard(0) value
    """

    anywhere = True          # any worker can read any row (else: rows have an owner)
    streaming = False

    def __init__(self, cluster):
        self.cluster = cluster
        self.sid = cluster.recorder.new_id()             # an id from the values' space: freed like one
        self.schema = None                         # [(name, dtype, row shape)]
        self.rows = None
        self.registered_world = None
        cluster.recorder.data_sources[self.sid] = self
        weakref.finalize(self, _release, weakref.ref(cluster), self.sid)

    def payload(self, rank, world):
        """(spec dict, object for Ray's serializer or None) for worker ``rank``."""
        raise NotImplementedError

    def register(self, ranks=None):
        """Open the source on workers ``ranks`` (default: all); check they all see the same
        columns. Raises DataError naming the worker and what it could not read."""
        cluster = self.cluster
        world = cluster.world_size
        ranks = list(range(world)) if ranks is None else list(ranks)
        if not ranks:
            return
        msgs = []
        for r in ranks:
            spec, obj = self.payload(r, world)
            side = []
            msgs.append((prog.encode(dict(spec, sid=self.sid), side), side, obj))
        replies = cluster.gang.add_source(msgs, ranks)
        for r, rep in zip(ranks, replies):
            if rep.get("error"):
                err = rep["error"].split(": ", 1)[-1] if rep["error"].startswith("SourceError") \
                    else rep["error"]
                raise DataError(err if err.startswith("worker ") else f"worker {r}: {err}")
        seen = [(f"worker {r}", rep["schema"]) for r, rep in zip(ranks, replies)]
        if self.schema is not None:        # what the driver knows (a stream's length it does not)
            rows = -1 if self.streaming or self.rows is None else self.rows
            seen.insert(0, ("the driver", [[n, d.str, list(s), rows] for n, d, s in self.schema]))
        ref_who, ref = seen[0]
        for who, got in seen[1:]:
            if got != ref:
                raise DataError(f"{who} sees the dataset as {_describe(got)}, but {ref_who} as "
                                f"{_describe(ref)}: are the files the same on every node?")
        if self.schema is None:
            self.schema = _schema(ref)
            self.rows = ref[0][3] if ref[0][3] >= 0 else None
        self.registered_world = world

    def check(self, dtypes=None):
        """The dtypes the caller expects ({column: dtype}), checked before any step."""
        names = [n for n, _d, _s in self.schema]
        if dtypes:
            for name, want in dict(dtypes).items():
                if name not in names:
                    raise DataError(f"dtypes names column {name!r}, which the dataset lacks "
                                    f"(it has {names})")
                got = self.schema[names.index(name)][1]
                if got != np.dtype(want):
                    raise DataError(f"column {name!r} holds {got}, but {np.dtype(want)} is expected")

    def split(self, rows, world):
        """(rows each worker reads, in batch order; their counts) for one global batch."""
        sizes = split_sizes(len(rows), world)
        return np.split(rows, np.cumsum(sizes)[:-1]), sizes

    def read(self, rows, ahead=None):
        """Global rows ``rows`` (in batch order) as one Shard(0) Variable per column;
        ``ahead``: the next batch's rows, which the workers start reading now."""
        rows = np.asarray(rows, dtype=np.int64)
        world = self.cluster.world_size
        per, sizes = self.split(rows, world)
        if ahead is not None:
            ahead = self.split(np.asarray(ahead, dtype=np.int64), world)[0]
        return self.record(per, sizes, rows, ahead)

    def record(self, per, sizes, rows=None, ahead=None):
        """Record the read of ``per[r]`` on worker r (and of ``ahead[r]`` ahead); ``rows``
        (the batch, for a re-split after a resize) None where the split cannot change."""
        cluster = self.cluster
        cluster.recorder.check_open()
        if cluster.recorder.traced:
            raise RuntimeError(f"{cluster.recorder.traced[-1]} reads a batch of a dataset: read batches "
                               "outside traced functions and hooks")
        if self.schema is None or self.registered_world != cluster.world_size:
            self.register()
        for _name, dtype, _shape in self.schema:      # float64 data, float32 model: warn once
            _hints.check_sharded(cluster, np.empty(0, dtype))
        rec = cluster.recorder.rec
        idx = rec.add_input([np.ascontiguousarray(p, dtype=np.int64) for p in per])
        ahead_idx = -1 if ahead is None else rec.add_input(
            [np.ascontiguousarray(p, dtype=np.int64) for p in ahead])
        out, slots, stores = [], [], []
        total = int(sum(sizes))
        for _name, dtype, shape in self.schema:
            store = cluster.recorder.new_storage((total,) + shape, dtype, Shard(0, tuple(sizes)))
            slots.append(rec.new_slot(store.vid))
            out.append(Variable.from_storage(store))
            stores.append(store)
        rec.instrs.append(["source", slots, self.sid, idx, ahead_idx])
        rec.source_reads.append((idx, self, rows, stores))
        if rows is not None:          # re-readable after a failure or resize (see rehydrate)
            group = tuple(st.vid for st in stores)
            for st in stores:
                cluster.recorder.data_reads[st.vid] = (self, rows, group)
                weakref.finalize(st, cluster.recorder.data_reads.pop, st.vid, None)
        return tuple(out)

    def rehydrate(self, ranks, resharded):
        """After a failure or a resize: open the source on the workers that lack it."""
        if self.schema is None:
            return                       # never used: opened on first read
        self.register(None if resharded else ranks)   # a new split: every worker's rows change

    def check_resize(self):
        """Raise if the source cannot follow a change of the world size now."""

    def close(self):
        self.cluster.recorder.data_sources.pop(self.sid, None)


def rehydrate(cluster, live, ranks, resharded):
    """After a failure or a resize: open every source on the workers that need it, then
    read again the batches still held (their rows are known), split for the world as it
    is now. Returns (RecoveryErrors of sources that cannot resume, vids read again)."""
    broken = []
    for src in list(cluster.recorder.data_sources.values()):
        try:
            src.rehydrate(ranks, resharded)
        except RecoveryError as e:      # a stream cannot resume: the others still can
            broken.append(e)
    reread, world = set(), cluster.world_size
    groups = {group: (src, rows) for vid, (src, rows, group) in snapshot(cluster.recorder.data_reads)
              if vid in live}
    for group, (src, rows) in groups.items():
        per, sizes = src.split(rows, world)
        vids = [vid if vid in live else -1 for vid in group]
        for vid in vids:
            if vid >= 0:
                live[vid].placement = Shard(0, tuple(sizes))
                reread.add(vid)
        for r in (range(world) if resharded else ranks):
            cluster.executor.control([r], {"control": "source_read", "sid": src.sid, "rows": per[r],
                                   "vids": vids})
    return broken, reread


def _release(cluster_ref, sid):
    cluster = cluster_ref()
    if cluster is not None and not cluster.closed:
        cluster.recorder.release(sid)          # the workers drop the source with the next program


def _describe(schema):
    return ", ".join(f"{n}: {np.dtype(d)} rows of shape {tuple(s)}" +
                     (f" ({k} rows)" if k >= 0 else "") for n, d, s, k in schema)


class ArraySource(DataSource):
    """Arrays sent to the workers once, worker r keeping rows r, r + W, r + 2W...; a batch
    is split by who holds its rows (a shuffled batch of B gives each about B/W).

    Example: ``xb, yb = ArraySource(cluster, [X, y]).read([5, 0, 3])``.
    """

    anywhere = False

    def __init__(self, cluster, arrays, names=None):
        super().__init__(cluster)
        self.arrays = [_host(a) for a in arrays]
        n = len(self.arrays[0])
        if any(a.ndim == 0 or len(a) != n for a in self.arrays):
            raise DataError("the arrays of a dataset need the same number of rows, got shapes "
                            f"{[a.shape for a in self.arrays]}")
        self.names = list(names or [f"column {k}" for k in range(len(self.arrays))])

    def payload(self, rank, world):
        cols = [[n, np.ascontiguousarray(a[rank::world])] for n, a in zip(self.names, self.arrays)]
        return {"kind": "arrays", "columns": cols, "start": rank, "step": world,
                "rows": len(self.arrays[0])}, None

    def split(self, rows, world):
        owner = rows % world
        order = np.argsort(owner, kind="stable")
        sizes = tuple(np.bincount(owner, minlength=world).tolist())
        return np.split(rows[order], np.cumsum(sizes)[:-1]), sizes


def _host(a):
    if isinstance(a, Tensor):
        if a.store.lazy:
            raise DataError("a dataset's arrays must be local (a distributed tensor is on the "
                            "workers already)")
        return _backend.to_numpy(a.store.array)
    return np.asarray(a)


class NpySource(DataSource):
    """Columns of ``.npy`` files, each a file or a directory of shards (in name order),
    memory-mapped on the workers. On several nodes the paths must be readable on each.

    Example: ``NpySource(cluster, [("x", ["/data/x"]), ("y", ["/data/y.npy"])])``.
    """

    def __init__(self, cluster, columns):
        super().__init__(cluster)
        self.columns = [(n, [os.path.abspath(os.fspath(p)) for p in paths]) for n, paths in columns]

    def payload(self, rank, world):
        return {"kind": "npy", "columns": [[n, p] for n, p in self.columns]}, None


class GeneratorSource(DataSource):
    """Rows computed on the workers: row i is ``fn(i, rng)``, ``rng`` a numpy Generator
    seeded by (seed, i), so the data do not depend on which worker computes a row.

    Example: ``GeneratorSource(cluster, lambda i, rng: rng.random(3), rows=100, seed=0)``.
    """

    def __init__(self, cluster, fn, rows, seed):
        super().__init__(cluster)
        if not callable(fn):
            raise TypeError(f"shard_from: fn must be a function of (index, rng), got "
                            f"{type(fn).__name__}")
        self.fn, self.nrows, self.seed = fn, int(rows), int(seed)

    def payload(self, rank, world):
        return {"kind": "generator", "rows": self.nrows, "seed": self.seed}, self.fn


class StreamSource(DataSource):
    """A Ray Data stream: each epoch is split over the workers with Ray Data's
    ``streaming_split`` (no row dropped), each worker reading ahead its split in a thread.
    Per step the driver takes ``batch_size`` rows from the workers' read-ahead (an even
    split while every split has rows, the rest from the others at the end), so every
    row is read once per epoch; the rows of a batch follow Ray Data's scheduling, so
    unlike files they depend on the worker count. A stream cannot hand a lost worker's
    split to another mid-epoch: a failure or resize then ends the epoch with an error.

    Example (what ``ShardedDataset`` does each epoch)::

        token = src.start_epoch(0)
        while (give := src.next_split(256)) is not None:
            xb, yb = src.take(give)
    """

    streaming = True

    def __init__(self, cluster, ds, columns, batch_size, shuffle, seed, timeout_s):
        super().__init__(cluster)
        from ...scheduler import ray_data     # Ray Data lives beside the scheduler
        self.ray_data = ray_data
        self.ds, self.names, self.kinds = ray_data.prepare(ds, columns)
        self.schema = [(n, d, s) for n, (d, s) in zip(self.names, self.kinds)]
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.timeout_s = timeout_s
        self.active = None            # the token of the epoch being read, if any
        self.iterators = None

    @property
    def count(self):
        if self.rows is None:
            self.rows = int(self.ds.count())
        return self.rows

    def start_epoch(self, epoch):
        """A fresh split of the stream for ``epoch``, opened on every worker; returns the
        epoch's token (an iterator of an older epoch stops)."""
        world = self.cluster.world_size
        self.iterators = self.ray_data.split(self.ds, world, epoch, self.shuffle, self.seed,
                                             getattr(self.cluster.gang, "nodes", None))
        self.epoch = epoch
        self.share = -(-self.batch_size // world)
        self.pos = [0] * world
        self.known = [0] * world
        self.ended = [False] * world
        self.errors = [None] * world
        self.register()
        self.active = token = object()
        return token

    def payload(self, rank, world):
        shuffle_rows = max(4 * self.share, 1024) if self.shuffle else 0
        return {"kind": "stream", "names": self.names,
                "kinds": [[d.str, list(s)] for d, s in self.kinds],
                "batch_rows": self.share, "buffer_rows": max(4 * self.share, 64),
                "shuffle_rows": shuffle_rows, "shuffle_seed": (self.seed * 1_000_003 +
                                                               self.epoch * 1009 + rank) % 2 ** 31
                }, self.iterators[rank]

    def observe(self, rank, status):
        buffered, ended, error = status
        self.known[rank], self.ended[rank] = int(buffered), bool(ended)
        self.errors[rank] = error

    def next_split(self, want, drop_last=False):
        """Rows each worker gives to the next global batch of ``want`` rows; None at the
        end of the epoch. Waits (bounded) for read-ahead that is not there yet."""
        deadline = time.monotonic() + self.timeout_s
        world = self.cluster.world_size
        while True:
            for r, err in enumerate(self.errors):
                if err and self.known[r] == 0:
                    raise DataError(err)
            give = _fill(want, [self.known[r] if self.ended[r] else None for r in range(world)])
            if give is None or (drop_last and sum(give) < want):
                return None
            short = [r for r in range(world) if not self.ended[r] and give[r] > self.known[r]]
            if not short:
                return give
            if self.cluster.recorder.rec.instrs:
                # Reads recorded but not run yet: run them, so that what the workers say
                # they hold is what is left for this batch (each reply carries it).
                self.cluster.sync()
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise DataError(f"worker(s) {short} got no rows from their split of the dataset "
                                f"within {self.timeout_s:g} s")
            wait = min(left, max(self.cluster.gang.timeout_s / 2, 0.1))
            msgs = [self.cluster.executor.encode({"v": prog.PROTOCOL, "control": "source_wait",
                                          "sid": self.sid, "want": give[r], "timeout_s": wait})
                    for r in short]
            for r, rep in zip(short, self.cluster.gang.run(msgs, ranks=short)):
                if rep.get("error"):
                    raise DataError(f"worker {r}: {rep['error']}")
                self.observe(r, rep["fetched"]["status"])

    def take(self, give):
        """Record the read of ``give[r]`` next rows of each worker's split."""
        per = [np.arange(p, p + k, dtype=np.int64) for p, k in zip(self.pos, give)]
        before = (list(self.pos), list(self.known))
        self.pos = [p + k for p, k in zip(self.pos, give)]
        self.known = [max(n - k, 0) for n, k in zip(self.known, give)]

        def restore(state=before):
            self.pos, self.known = list(state[0]), list(state[1])
        self.cluster.on_rollback(restore)
        return self.record(per, tuple(give))

    def split(self, rows, world):
        # Only asked when the world changed mid-step, which rehydrate() reports as an error.
        return [np.zeros(0, np.int64)] * world, (0,) * world

    def rehydrate(self, ranks, resharded):
        if self.active is not None:
            self.active = None
            raise RecoveryError(f"worker(s) {list(ranks)} lost their split of the Ray Data "
                                "stream mid-epoch (the rows they had read ahead are gone): "
                                "start the epoch again (files, arrays and generators resume "
                                "exactly)")

    def check_resize(self):
        if self.active is not None:
            raise ResizeError("a Ray Data stream is split over the workers for the whole epoch: "
                              "resize between epochs (after the loop over the dataset ends)")


def _fill(want, caps):
    """Split ``want`` rows as evenly as possible over workers with room (``caps[r]``: rows
    left, None for unbounded); None when no worker has any row left.

    Example: ``_fill(10, [None, 2, None]) == [4, 2, 4]``.
    """
    if not any(c is None or c > 0 for c in caps):
        return None
    give, left = [0] * len(caps), want
    while left > 0:
        # Each round either places every row left or fills some worker to its cap.
        open_ = [r for r, c in enumerate(caps) if c is None or give[r] < c]
        if not open_:
            break
        for r, s in zip(open_, split_sizes(left, len(open_))):
            g = s if caps[r] is None else min(s, caps[r] - give[r])
            give[r] += g
            left -= g
    return give


class Shuffle:
    """A pseudo-random permutation of ``range(n)`` for ``(seed, epoch)``, computed position
    by position (a 6-round Feistel network with cycle walking), so the driver holds no
    per-row state however many rows there are.

    Example: ``Shuffle(10, seed=0, epoch=0)(np.arange(10))`` is a permutation of 0..9.
    """

    def __init__(self, n, seed, epoch):
        self.n = int(n)
        bits = max(2, (self.n - 1).bit_length())
        self.half = np.uint64((bits + 1) // 2)
        self.mask = np.uint64((1 << int(self.half)) - 1)
        self.keys = np.random.SeedSequence([int(seed) & (2 ** 63 - 1), int(epoch)]).generate_state(6, np.uint64)

    def _mix(self, x, key):
        # splitmix64's finalizer: every input bit moves every output bit.
        z = x + key
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return (z ^ (z >> np.uint64(31))) & self.mask

    def _encrypt(self, x):
        left, right = x >> self.half, x & self.mask
        for key in self.keys:
            left, right = right, left ^ self._mix(right, key)
        return (left << self.half) | right

    def __call__(self, positions):
        with np.errstate(over="ignore"):
            x = self._encrypt(np.asarray(positions, dtype=np.uint64))
            out = x >= self.n
            while out.any():             # cycle walking: a bijection of the smaller range
                x[out] = self._encrypt(x[out])
                out = x >= self.n
        return x.astype(np.int64)


class ShardedDataset:
    """Global batches of a worker-side source, one epoch per iteration (from
    :meth:`Cluster.shard_dataset` / :meth:`Cluster.shard_from`). Each item is a tuple of
    ``Shard(0)`` values, one per column. ``state_dict()`` / ``load_state_dict()`` keep the
    position (epoch and batch) for a restart.

    Example::

        ds = cluster.shard_from(lambda i, rng: (rng.standard_normal(8, np.float32), i % 2),
                                rows=1000, batch_size=100, shuffle=True, seed=0)
        for xb, yb in ds:
            ...
    """

    def __init__(self, source, batch_size, shuffle=False, seed=0, drop_last=False):
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size <= 0:
            raise ValueError(f"batch_size should be a positive integer, got {batch_size!r}")
        self.source, self.batch_size = source, batch_size
        self.shuffle, self.seed, self.drop_last = bool(shuffle), int(seed), bool(drop_last)
        self.epoch, self.step = 0, 0

    @property
    def columns(self):
        """The column names, in the order of each batch's tuple. Example: ``['x', 'y']``."""
        return [n for n, _d, _s in self.source.schema]

    def __len__(self):
        n = self.source.count if self.source.streaming else self.source.rows
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def state_dict(self):
        """The position in the data: ``{"epoch": e, "step": batches of e already read}``.
        Example: ``cluster.save_checkpoint(path, model, opt, data=train.state_dict())``."""
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed}

    def load_state_dict(self, state):
        """Resume at a saved position (the next iteration continues that epoch).
        Example: ``train.load_state_dict(cluster.load_checkpoint(path)["data"])``."""
        if self.source.streaming and state.get("step", 0):
            raise DataError("a Ray Data stream cannot resume mid-epoch; save between epochs")
        self.epoch, self.step = int(state["epoch"]), int(state.get("step", 0))

    def __iter__(self):
        if self.source.streaming:
            return self._stream_epoch()
        return self._index_epoch()

    def batch_rows(self, epoch, k):
        """The global rows of batch ``k`` of ``epoch`` (the same for any worker count).
        Example: ``X[train.batch_rows(0, 0)]`` is the first batch, read in this process."""
        n = self.source.rows
        pos = np.arange(k * self.batch_size, min((k + 1) * self.batch_size, n), dtype=np.int64)
        return Shuffle(n, self.seed, epoch)(pos) if self.shuffle else pos

    def _index_epoch(self):
        epoch = self.epoch
        while self.step < len(self):
            k = self.step
            ahead = self.batch_rows(epoch, k + 1) if k + 1 < len(self) else None
            batch = self.source.read(self.batch_rows(epoch, k), ahead)
            self.step = k + 1

            def restore(k=k):        # the step failed and was rolled back: read it again
                self.epoch, self.step = epoch, k
            self.source.cluster.on_rollback(restore)
            yield batch
        self.epoch, self.step = epoch + 1, 0

    def _stream_epoch(self):
        src = self.source
        self.step = 0
        for batch in _stream_batches(src, src.start_epoch(self.epoch), self.batch_size,
                                     self.drop_last):
            self.step += 1
            yield batch
        self.epoch, self.step = self.epoch + 1, 0

    def evaluate(self, metric):
        """The mean of ``metric(*batch)`` over every row, in one pass in order (not moving
        the training position); ``metric`` returns a value per row. Only the metric comes
        back to the driver.

        Example::

            acc = val.evaluate(lambda x, y: model(x).argmax(dim=1) == y)
        """
        total, rows = None, 0
        with no_grad():
            for batch in self._pass():
                value = metric(*batch)
                if not isinstance(value, Tensor) or value.ndim == 0 or value.shape[0] != batch[0].shape[0]:
                    raise ValueError("evaluate: metric must return one value per row of the batch "
                                     f"(shape ({batch[0].shape[0]}, ...)), got "
                                     f"{getattr(value, 'shape', type(value).__name__)}")
                s = value.sum()
                total = s if total is None else total + s
                rows += int(np.prod(value.shape))
        if total is None:
            raise DataError("evaluate: the dataset has no rows")
        return float(total.item()) / rows

    def _pass(self):
        src = self.source
        if not src.streaming:
            starts = range(0, src.rows, self.batch_size)
            for a in starts:
                b = a + self.batch_size
                yield src.read(np.arange(a, min(b, src.rows)),
                               np.arange(b, min(b + self.batch_size, src.rows)) if b < src.rows else None)
            return
        if src.active is not None:
            raise DataError("evaluate: this stream is in the middle of an epoch")
        yield from _stream_batches(src, src.start_epoch(-1 - self.epoch), self.batch_size)


def _stream_batches(src, token, batch_size, drop_last=False):
    """The global batches of one epoch of a stream, until it ends or another epoch (or a
    failure) supersedes it."""
    try:
        while True:
            if src.active is not token:
                raise DataError("this epoch of the Ray Data stream was ended (a new epoch "
                                "started, or a worker was lost): start the epoch again")
            give = src.next_split(batch_size, drop_last)
            if give is None:
                return
            yield src.take(give)
    finally:
        if src.active is token:
            src.active = None


# ---------------------------------------------------------------- entry points (Cluster's)

def shard_dataset(cluster, data, batch_size, shuffle=False, seed=0, columns=None,
                  drop_last=False, dtypes=None, timeout_s=None):
    """See :meth:`distgrad.distributed.Cluster.shard_dataset`."""
    timeout_s = cluster.gang.timeout_s if timeout_s is None else timeout_s
    if _is_ray_dataset(data) or _is_parquet(data):
        if _is_parquet(data):
            from ...scheduler import ray_data
            data = ray_data.read_parquet(data)
        source = StreamSource(cluster, data, columns, batch_size, shuffle, seed, timeout_s)
        source.check(dtypes=dtypes)
        return ShardedDataset(source, batch_size, shuffle, seed, drop_last)
    if isinstance(data, (str, os.PathLike)) or (
            isinstance(data, (list, tuple, dict)) and data and
            all(isinstance(p, (str, os.PathLike)) for p in
                (data.values() if isinstance(data, dict) else data))):
        source = NpySource(cluster, _npy_columns(data, columns))
    else:
        arrays = getattr(data, "tensors", data)          # a TensorDataset, or arrays
        if isinstance(arrays, dict):
            names, arrays = list(arrays), list(arrays.values())
        else:
            arrays = list(arrays) if isinstance(arrays, (list, tuple)) else [arrays]
            names = None
        source = ArraySource(cluster, arrays, names)
        if columns is not None:
            raise DataError("columns= selects columns of files or of a Ray dataset; pass only "
                            "the arrays you need")
    source.register()                    # opens it everywhere now: bad input fails here
    if not source.rows:
        raise DataError("the dataset has no rows")
    source.check(dtypes=dtypes)
    return ShardedDataset(source, batch_size, shuffle, seed, drop_last)


def shard_from(cluster, fn, rows, batch_size, shuffle=False, seed=0, drop_last=False):
    """See :meth:`distgrad.distributed.Cluster.shard_from`."""
    if not isinstance(rows, int) or rows <= 0:
        raise ValueError(f"shard_from: rows must be a positive int, got {rows!r}")
    source = GeneratorSource(cluster, fn, rows, seed)
    source.register()
    return ShardedDataset(source, batch_size, shuffle, seed, drop_last)


def _npy_columns(data, columns):
    if isinstance(data, dict):
        cols = [(str(k), [v]) for k, v in data.items()]
    else:
        paths = [data] if isinstance(data, (str, os.PathLike)) else list(data)
        cols = [(os.path.splitext(os.path.basename(os.path.normpath(os.fspath(p))))[0], [p])
                for p in paths]
    for name, (path,) in cols:
        p = os.fspath(path)
        if not (p.endswith(".npy") or os.path.isdir(p) or not os.path.exists(p)):
            raise DataError(f"column {name!r}: {p} is not a .npy file or a directory of them "
                            "(Parquet goes through Ray Data: pass a .parquet path alone)")
    if columns is not None:
        have = [n for n, _ in cols]
        missing = [c for c in columns if c not in have]
        if missing:
            raise DataError(f"columns {missing} are not in the dataset (it has {have})")
        cols = [c for name in columns for c in cols if c[0] == name]
    return cols


def _is_ray_dataset(obj):
    return type(obj).__module__.startswith("ray.data") and hasattr(obj, "streaming_split")


def _is_parquet(data):
    paths = [data] if isinstance(data, (str, os.PathLike)) else \
        list(data) if isinstance(data, (list, tuple)) else []
    if not paths or not all(isinstance(p, (str, os.PathLike)) for p in paths):
        return False
    for p in map(os.fspath, paths):
        if p.endswith(".parquet"):
            continue
        if os.path.isdir(p) and any(f.endswith(".parquet") for f in os.listdir(p)):
            continue
        return False
    return True
