"""Ray Data on the driver side of a worker-side stream: the dataset's schema, the per-epoch
``streaming_split`` handed to the workers, Parquet files. Imported only when a Ray
dataset or a Parquet path is given (the ``data`` extra installs Ray Data).

Example::

    ds, names, kinds = prepare(ray.data.read_parquet("train/"), ["x", "y"])
    iterators = split(ds, 2, epoch=0, shuffle=True, seed=0, nodes=None)
"""
import numpy as np

from distgrad.utils.data.sources import DataError

INSTALL = ("Ray Data is not installed (it needs pandas and pyarrow): "
           "pip install 'ray[data]' (or, in the distgrad checkout, pip install '.[data]')")


def _ray_data():
    try:
        import ray.data     # here: Ray Data is optional (the data extra), needed only now
    except ImportError as e:
        raise ImportError(f"{INSTALL} ({e})") from None
    return ray.data


def read_parquet(paths):
    """A Ray dataset over Parquet files (a file, a directory or a list of them).
    Example: ``read_parquet("train/")``."""
    return _ray_data().read_parquet(paths)


def prepare(ds, columns=None):
    """(the dataset with only ``columns``, names, [(dtype, row shape)]) from its schema,
    checked here, before any worker reads: missing and non-numeric columns are errors
    naming the column. Example: ``prepare(ds, ["x", "y"])[1] == ["x", "y"]``."""
    _ray_data()
    schema = ds.schema()
    if schema is None:
        raise DataError("the Ray dataset has no schema (is it empty?)")
    have = list(schema.names)
    names = list(columns) if columns is not None else have
    missing = [c for c in names if c not in have]
    if missing:
        raise DataError(f"columns {missing} are not in the Ray dataset (it has {have})")
    kinds = [_kind(name, schema.types[have.index(name)]) for name in names]
    if columns is not None and names != have:
        ds = ds.select_columns(names)
    return ds, names, kinds


def _kind(name, t):
    """numpy (dtype, row shape) of an Arrow column type."""
    shape = ()
    if hasattr(t, "shape") and hasattr(t, "value_type"):       # Ray's tensor extension type
        shape, t = tuple(t.shape), t.value_type
        if any(s is None or s < 0 for s in shape):
            raise DataError(f"column {name!r} holds tensors of varying shape {shape}; each "
                            "row must have the same shape")
    try:
        dtype = np.dtype(t.to_pandas_dtype())
    except (NotImplementedError, TypeError, AttributeError):
        dtype = np.dtype(object)
    if dtype.kind not in "biuf":
        raise DataError(f"column {name!r} has type {t}; only numeric columns (and tensors of "
                        "them) can be read into a batch")
    return dtype, shape


def split(ds, n, epoch, shuffle, seed, nodes):
    """``n`` iterators over one epoch of ``ds`` (no row dropped), for the workers on
    ``nodes``; ``shuffle``: blocks in a fresh random order each epoch (each worker also
    shuffles rows in a local buffer). Example: ``split(ds, 2, 0, True, 0, gang.nodes)``."""
    if shuffle:
        ds = ds.randomize_block_order(seed=(int(seed) * 1_000_003 + int(epoch)) % 2 ** 31)
    hints = list(nodes) if nodes and len(nodes) == n and all(nodes) else None
    return ds.streaming_split(n, equal=False, locality_hints=hints)
