"""Shard sizing on the driver: how many rows each worker gets.

An even split by default, the caller's sizes when given, and ``sizes="auto"``: rows in
proportion to each worker's measured speed (rows per busy second in recent steps), so a
slower worker gets fewer rows and the gang finishes each step together. Re-splitting
after a resize or a lost worker lives here too.

Example::

    sizing = Sizing(cluster)
    sizes, pieces = sizing.split(np.ones((10, 3)), dim=0, sizes=None)   # (5, 5), two arrays
"""
import numpy as np

from distgrad import placement as pl


class Sizing:
    """Splits arrays into per-worker shards and measures each worker's speed.

    Example: ``cluster.sizing.auto_sizes(100)`` is ``None`` until every worker was timed.
    """

    def __init__(self, cluster):
        self.cluster = cluster
        self.speed = {}           # rank -> rows per busy second (an EMA)

    def split(self, arr, dim, sizes):
        """(sizes, one contiguous piece per worker) of ``arr`` along ``dim``.

        ``sizes``: None (even), a sequence (checked), or "auto" (by measured speed)."""
        world = self.cluster.world_size
        if isinstance(sizes, str):
            if sizes != "auto":
                raise ValueError(f"shard: sizes must be a list of {world} numbers or 'auto'")
            sizes = self.auto_sizes(arr.shape[dim])
        sizes = pl.split_sizes(arr.shape[dim], world, sizes)
        return sizes, _pieces(arr, dim, sizes)

    def measure(self, rec, results):
        """Rows per busy second of each worker, from programs with sharded inputs (EMA)."""
        world = self.cluster.world_size
        if not rec.shard_puts or len(results) != world:
            return
        sizes = rec.shard_puts[0][1].placement.sizes
        if len(sizes) != world:
            return
        for r, (rows, res) in enumerate(zip(sizes, results)):
            busy = res.get("busy_s")
            if not rows or not busy:
                continue                  # no rows, no information: keep the old estimate
            speed = rows / max(busy, 1e-6)
            old = self.speed.get(r)
            self.speed[r] = speed if old is None else 0.5 * old + 0.5 * speed

    def auto_sizes(self, n):
        """Split n rows in proportion to measured speeds (even until every worker is measured)."""
        world = self.cluster.world_size
        if len(self.speed) < world:
            return None
        speeds = np.array([self.speed[r] for r in range(world)])
        exact = n * speeds / speeds.sum()
        sizes = np.floor(exact).astype(int)
        for r in np.argsort(-(exact - sizes))[:n - sizes.sum()]:   # largest remainders
            sizes[r] += 1
        return tuple(int(s) for s in sizes)

    def reset(self):
        """Forget the speeds (the gang changed: ranks mean other workers now)."""
        self.speed = {}


def resplit(pieces, dim, n):
    """The same rows, split evenly over ``n`` workers.

    Example: ``resplit([a[:3], a[3:]], 0, 3)`` gives three pieces of ``a``.
    """
    whole = np.concatenate(pieces, axis=dim)
    return _pieces(whole, dim, pl.split_sizes(whole.shape[dim], n))


def _pieces(arr, dim, sizes):
    bounds = np.cumsum((0,) + tuple(sizes))
    return [np.ascontiguousarray(np.take(arr, np.arange(bounds[r], bounds[r + 1]), axis=dim))
            for r in range(len(sizes))]
