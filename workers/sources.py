"""Data sources on a worker: the rows of a dataset that the driver never holds.

The driver registers a source on every worker once (``Worker.add_source``) and then, per
step, sends only which rows each worker reads (the ``source`` instruction, see
``distgrad.program``). Every kind answers the same two questions, so every source is read
by the same instruction:

- ``schema()``: its columns, ``[name, dtype, row shape, rows or -1]`` each;
- ``read(rows)``: one array per column holding those rows, in that order.

Kinds: ``arrays`` (arrays sent once, this worker keeping every W-th row), ``npy`` (``.npy``
files or directories of ``.npy`` shards, memory-mapped: only the rows read are paged in),
``generator`` (a function computing row i from a generator seeded by (seed, i), so a row
is the same whichever worker computes it) and ``stream`` (this worker's split of a Ray
Data stream, read ahead by a thread; rows are its stream positions, taken in order).

Example::

    table = make_table({"kind": "npy", "columns": [["x", ["/data/x"]]]}, rank=0)
    table.schema()                   # [["x", "<f4", [784], 600000]]
    x, = table.read(np.array([5, 2]))
"""
import collections
import concurrent.futures as cf
import os
import threading
import time

import numpy as np


class SourceError(ValueError):
    """A data source cannot be set up or read (names the file or column and the rank)."""


def make_table(spec, obj=None, rank=0, timeout_s=60.0):
    """The table for a registration message ``spec`` (a plain dict); ``obj`` is what only
    Ray's serializer can carry (a generator function, a Ray Data iterator).

    Example: ``make_table({"kind": "arrays", "columns": [...], "start": 0, "step": 2}, rank=0)``.
    """
    kind = spec.get("kind")
    if kind == "arrays":
        return ArrayTable(spec, rank)
    if kind == "npy":
        return NpyTable(spec, rank)
    if kind == "generator":
        return GeneratorTable(spec, obj, rank)
    if kind == "stream":
        return StreamTable(spec, obj, rank, timeout_s)
    raise SourceError(f"unknown data source kind {kind!r}")


class Table:
    """What every source kind provides; ``streaming`` kinds also report ``status()``.
    ``fetch`` reads the rows of this step and starts reading the next step's in a thread,
    so the read overlaps the step's compute."""

    streaming = False

    def __init__(self, rank):
        self.rank = rank
        self._pool = None
        self._ahead = None            # (rows as bytes, future) of the rows read ahead

    def fetch(self, rows, ahead=None):
        """``read(rows)``, from the read-ahead when it holds those rows; then read ``ahead``."""
        got, pending = None, self._ahead
        self._ahead = None
        if pending is not None:
            key, future = pending
            if key == rows.tobytes():
                got = future.result()     # its error, if any, is this read's error
            else:
                cf.wait([future])         # one read at a time: a user's function need not be thread-safe
        if got is None:
            got = self.read(rows)
        if ahead is not None and len(ahead):
            if self._pool is None:
                self._pool = cf.ThreadPoolExecutor(1, thread_name_prefix=f"distgrad-read-{self.rank}")
            self._ahead = (ahead.tobytes(), self._pool.submit(self.read, ahead))
        return got

    def schema(self):
        raise NotImplementedError

    def read(self, rows):
        raise NotImplementedError

    def status(self):
        return None

    def close(self):
        self._ahead = None
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def fail(self, what):
        raise SourceError(f"worker {self.rank}: {what}")


def _schema_of(names, arrays, nrows):
    return [[n, a.dtype.str, list(a.shape[1:]), int(nrows)] for n, a in zip(names, arrays)]


class ArrayTable(Table):
    """Arrays sent once: this worker holds global rows ``start, start + step, ...``."""

    def __init__(self, spec, rank):
        super().__init__(rank)
        self.names = [c[0] for c in spec["columns"]]
        self.arrays = [np.asarray(c[1]) for c in spec["columns"]]
        self.start, self.step, self.nrows = spec["start"], spec["step"], spec["rows"]

    def schema(self):
        return _schema_of(self.names, self.arrays, self.nrows)

    def read(self, rows):
        local, bad = np.divmod(rows - self.start, self.step)
        held = len(self.arrays[0])
        if rows.size and (bad.any() or local.min() < 0 or local.max() >= held):
            self.fail(f"rows {rows[:8].tolist()}... are not all among the rows this worker "
                      f"holds (every {self.step}th from row {self.start})")
        return [np.take(a, local, axis=0) for a in self.arrays]


class NpyTable(Table):
    """Columns of ``.npy`` files, each a file or a directory of shards (read in name order),
    memory-mapped: a read pages in only the rows it gathers."""

    def __init__(self, spec, rank):
        super().__init__(rank)
        self.names, self.shards, self.bounds = [], [], []
        for name, paths in spec["columns"]:
            maps, counts, first = [], [], None
            for path in _npy_files(paths, name, self):
                try:
                    m = np.load(path, mmap_mode="r", allow_pickle=False)
                except (OSError, ValueError) as e:
                    self.fail(f"column {name!r}: cannot read {path}: {e}")
                if m.ndim == 0:
                    self.fail(f"column {name!r}: {path} holds a scalar, not rows")
                if m.dtype.kind not in "biuf":
                    self.fail(f"column {name!r}: {path} has dtype {m.dtype}; numeric data only")
                if first is None:
                    first = (path, m.dtype, m.shape[1:])
                elif (m.dtype, m.shape[1:]) != first[1:]:
                    self.fail(f"column {name!r}: shard {path} has rows of shape {m.shape[1:]} "
                              f"and dtype {m.dtype}, but {first[0]} has {first[2]} and {first[1]}")
                maps.append(m)
                counts.append(m.shape[0])
            self.names.append(name)
            self.shards.append(maps)
            self.bounds.append(np.cumsum([0] + counts))
        totals = {n: int(b[-1]) for n, b in zip(self.names, self.bounds)}
        if len(set(totals.values())) > 1:
            self.fail(f"the columns have different numbers of rows: {totals}")

    def schema(self):
        return [[n, m[0].dtype.str, list(m[0].shape[1:]), int(b[-1])]
                for n, m, b in zip(self.names, self.shards, self.bounds)]

    def read(self, rows):
        out = []
        # Sorted reads touch each page once and go forward through the file.
        order = np.argsort(rows, kind="stable")
        srows = rows[order]
        for name, maps, bounds in zip(self.names, self.shards, self.bounds):
            if srows.size and (srows[0] < 0 or srows[-1] >= bounds[-1]):
                self.fail(f"column {name!r}: rows up to {int(srows[-1])} asked, it has {bounds[-1]}")
            which = np.searchsorted(bounds, srows, side="right") - 1
            first = maps[0]
            got = np.empty((len(rows),) + first.shape[1:], first.dtype)
            for k in np.unique(which):
                sel = which == k
                got[order[sel]] = maps[k][srows[sel] - bounds[k]]
            out.append(got)
        return out

    def close(self):
        super().close()
        self.shards = []


def _npy_files(paths, name, table):
    files = []
    for p in paths:
        if os.path.isdir(p):
            found = sorted(os.path.join(p, f) for f in os.listdir(p) if f.endswith(".npy"))
            if not found:
                table.fail(f"column {name!r}: directory {p} holds no .npy file")
            files += found
        elif os.path.isfile(p):
            files.append(p)
        else:
            table.fail(f"column {name!r}: no such file or directory: {p}")
    return files


class GeneratorTable(Table):
    """Rows computed here: row i is ``fn(i, rng)`` with ``rng`` seeded by (seed, i), so a
    row is the same whichever worker computes it, and for any number of workers."""

    def __init__(self, spec, fn, rank):
        super().__init__(rank)
        if not callable(fn):
            self.fail(f"shard_from needs a function, got {type(fn).__name__}")
        self.fn, self.seed, self.nrows = fn, spec["seed"], spec["rows"]
        first = self._row(0)
        self.names = [f"column {k}" for k in range(len(first))]
        self.kinds = [(a.dtype, a.shape) for a in first]

    def _row(self, i):
        try:
            got = self.fn(int(i), np.random.default_rng([self.seed, int(i)]))
        except Exception as e:
            self.fail(f"shard_from: the function raised for row {i}: {type(e).__name__}: {e}")
        got = got if isinstance(got, (tuple, list)) else (got,)
        arrays = [np.asarray(a) for a in got]
        for a in arrays:
            if a.dtype.kind not in "biuf":
                self.fail(f"shard_from: row {i} has a value of dtype {a.dtype}; numeric data only")
        return arrays

    def schema(self):
        return [[n, d.str, list(s), self.nrows] for n, (d, s) in zip(self.names, self.kinds)]

    def read(self, rows):
        cols = [np.empty((len(rows),) + s, d) for d, s in self.kinds]
        for j, i in enumerate(rows.tolist()):
            got = self._row(i)
            if len(got) != len(cols) or any((a.dtype, a.shape) != k for a, k in zip(got, self.kinds)):
                self.fail(f"shard_from: row {i} is {[(a.dtype.str, a.shape) for a in got]}, but row "
                          f"0 was {[(d.str, s) for d, s in self.kinds]}")
            for c, a in zip(cols, got):
                c[j] = a
        return cols


class StreamTable(Table):
    """This worker's split of a Ray Data stream (one epoch). A thread reads ahead up to
    ``buffer_rows`` rows, so reading and decoding overlap training; ``read`` takes the next
    rows in stream order (rows are positions in this worker's stream, checked)."""

    streaming = True

    def __init__(self, spec, iterator, rank, timeout_s):
        super().__init__(rank)
        self.names = list(spec["names"])
        self.kinds = [(np.dtype(d), tuple(s)) for d, s in spec["kinds"]]
        self.timeout_s = timeout_s
        self.buffer_rows = int(spec["buffer_rows"])
        self.chunks = collections.deque()      # [arrays per column] in stream order
        self.buffered = 0
        self.position = 0                       # rows given out so far
        self.ended, self.error, self.stop = False, None, False
        self.cond = threading.Condition()
        self.args = dict(batch_size=int(spec["batch_rows"]), batch_format="numpy",
                         prefetch_batches=1, drop_last=False)
        if spec.get("shuffle_rows"):
            self.args.update(local_shuffle_buffer_size=int(spec["shuffle_rows"]),
                             local_shuffle_seed=int(spec["shuffle_seed"]))
        self.thread = threading.Thread(target=self._fill, args=(iterator,), daemon=True,
                                       name=f"distgrad-data-{rank}")
        self.thread.start()

    def schema(self):
        return [[n, d.str, list(s), -1] for n, (d, s) in zip(self.names, self.kinds)]

    def _check(self, batch):
        arrays = []
        for name, (dtype, shape) in zip(self.names, self.kinds):
            if name not in batch:
                raise SourceError(f"worker {self.rank}: column {name!r} is missing from a block "
                                  f"of the dataset (it has {sorted(batch)})")
            a = np.asarray(batch[name])
            if a.dtype != dtype or a.shape[1:] != shape:
                raise SourceError(f"worker {self.rank}: column {name!r} has rows of dtype "
                                  f"{a.dtype} and shape {a.shape[1:]} in a block, but the "
                                  f"dataset's schema says {dtype} and {shape}")
            arrays.append(a)
        return arrays

    def _fill(self, iterator):
        try:
            for batch in iterator.iter_batches(**self.args):
                arrays = self._check(batch)
                with self.cond:
                    while self.buffered >= self.buffer_rows and not self.stop:
                        self.cond.wait(1.0)
                    if self.stop:
                        return
                    self.chunks.append(arrays)
                    self.buffered += len(arrays[0])
                    self.cond.notify_all()
        except Exception as e:        # reported by the next read and status, never lost
            with self.cond:
                self.error = e if isinstance(e, SourceError) else SourceError(
                    f"worker {self.rank}: reading its split of the dataset failed: "
                    f"{type(e).__name__}: {e}")
        finally:
            with self.cond:
                self.ended = True
                self.cond.notify_all()

    def wait(self, want, timeout_s=None):
        """Block until ``want`` rows are buffered, the stream ended, or the timeout."""
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        with self.cond:
            while self.buffered < want and not self.ended and time.monotonic() < deadline:
                self.cond.wait(min(1.0, max(deadline - time.monotonic(), 0.0)))
        return self.status()

    def status(self):
        """[rows buffered, stream ended, error text or None] (sent back with each reply)."""
        with self.cond:
            return [self.buffered, self.ended, None if self.error is None else str(self.error)]

    def read(self, rows):
        k = len(rows)
        if k and (rows[0] != self.position or rows[-1] != self.position + k - 1):
            self.fail(f"stream rows {int(rows[0])}..{int(rows[-1])} asked, but the next row of "
                      f"this worker's split is {self.position}")
        self.wait(k)
        with self.cond:
            if self.error is not None and self.buffered < k:
                raise self.error
            if self.buffered < k:
                self.fail(f"its split of the dataset has {self.buffered} rows left, {k} asked"
                          if self.ended else f"no {k} rows of its split within {self.timeout_s:g} s")
            taken, n = [], 0
            while n < k:
                chunk = self.chunks.popleft()
                need = k - n
                if len(chunk[0]) > need:
                    self.chunks.appendleft([a[need:] for a in chunk])
                    chunk = [a[:need] for a in chunk]
                taken.append(chunk)
                n += len(chunk[0])
            self.buffered -= k
            self.position += k
            self.cond.notify_all()
        if not taken:
            return [np.empty((0,) + s, d) for d, s in self.kinds]
        return [np.concatenate(cols) if len(cols) > 1 else cols[0] for cols in zip(*taken)]

    def unread(self, arrays):
        """Put rows given out by a step that was rolled back in front again."""
        k = len(arrays[0])
        if not k:
            return
        with self.cond:
            self.chunks.appendleft(arrays)
            self.buffered += k
            self.position -= k
            self.cond.notify_all()

    def close(self):
        super().close()
        with self.cond:
            self.stop = True
            self.chunks.clear()
            self.buffered = 0
            self.cond.notify_all()
