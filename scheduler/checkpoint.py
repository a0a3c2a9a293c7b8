"""Values coming home from the workers: ``cluster.gather``, checkpoints, and the
replicated values a cluster hands back at shutdown.

Replicated values are read from worker 0 in one message; sharded ones through their
lazy storage (one fetch each).

Example::

    state = gather(cluster, model.state_dict())     # local tensors, one message
    save_checkpoint(cluster, "ckpt.dg", model, opt, step=100)
"""
import logging

import numpy as np

from distgrad import _backend
from distgrad.placement import Replicate
from distgrad.serialization import load, save
from distgrad.tensor import Tensor, Variable

log = logging.getLogger("distgrad")


def gather(cluster, obj, copy=True):
    """``obj`` (nested dicts/lists/tuples) with every distributed tensor replaced by a
    local copy; ``copy=False`` for callers that only read the arrays (checkpoints).

    Example: ``gather(cluster, {"w": W})["w"]`` is a local Variable.
    """
    cluster.sync()
    found = {}
    _collect(obj, found)
    rep = [vid for vid, t in found.items() if isinstance(t.store.placement, Replicate)]
    arrays = cluster.executor.control([0], {"control": "export", "vids": rep})[0] if rep else {}
    return _convert(obj, arrays, copy)


# Module functions, not closures: a closure that calls itself is a reference cycle, and
# the cycle would keep ``arrays`` (a whole model's parameters) until the collector ran.
def _collect(o, found):
    """The distributed tensors in ``o``, by vid, into ``found``."""
    if isinstance(o, Tensor) and o.store.lazy:
        found[o.store.vid] = o
    elif isinstance(o, dict):
        for v in o.values():
            _collect(v, found)
    elif isinstance(o, (list, tuple)):
        for v in o:
            _collect(v, found)


def _convert(o, arrays, copy):
    """``o`` with each distributed tensor replaced by a local one: its array from
    ``arrays`` (replicated values, by vid) or fetched."""
    if isinstance(o, Tensor) and o.store.lazy:
        vid = o.store.vid
        a = arrays[vid][0] if vid in arrays else o.store.array
        # Arrays from the object store are read-only views; copy=False is for
        # callers that only read them (checkpoints).
        a = np.array(a, copy=True) if copy else a
        return (Variable if isinstance(o, Variable) else Tensor).from_array(a)
    if isinstance(o, dict):
        return {k: _convert(v, arrays, copy) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return type(o)(_convert(v, arrays, copy) for v in o)
    return o


def save_checkpoint(cluster, path, model=None, optimizer=None, step=None, **extra):
    """Write model and optimizer state and the step to ``path`` (``dg.save``: atomic, with
    a checksum). Example: ``save_checkpoint(cluster, "ckpt.dg", model, opt, step=100)``."""
    state = {"step": step, "world_size": cluster.world_size, **extra}
    if model is not None:
        state["model"] = model.state_dict()
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    save(gather(cluster, state, copy=False), path)
    return path


def load_checkpoint(path, model=None, optimizer=None):
    """Read a checkpoint; load ``model``/``optimizer`` state from it if given (their values
    go to the workers as replicated values). Returns the dict.

    Example: ``step = load_checkpoint("ckpt.dg", model, opt)["step"]``.
    """
    state = load(path)
    if model is not None:
        model.load_state_dict(state["model"])
    if optimizer is not None and "optimizer" in state:
        optimizer.load_state_dict(state["optimizer"])
    return state


def bring_home(cluster):
    """Fetch every live replicated value from worker 0 and make it local, in place (at
    shutdown). Workers that are gone take the values with them: a warning, no error.

    Example: after ``bring_home(cluster)``, ``model.weight.store.lazy`` is False.
    """
    recorder = cluster.recorder
    stores = {vid: st for vid, st in list(recorder.live.items())
              if isinstance(st.placement, Replicate) and vid not in recorder.lost}
    if not stores:
        return
    try:
        arrays = cluster.executor.control([0], {"control": "export", "vids": sorted(stores)})[0]
    except Exception as e:     # the workers are gone: the values are lost with them
        log.warning("could not bring the replicated values home at shutdown: %s", e)
        return
    for vid, store in stores.items():
        got = arrays.get(vid)
        if got is not None:
            a = np.array(got[0], copy=True)
            store.bring_home(_backend.to_device(a, store.device) if store.device != "cpu" else a)
