"""Warnings for code that runs but is probably not what the user meant; each shown once
per process, pointing at the user's line.

Example::

    cluster.shard(X.astype(np.float64))   # with a float32 model: warns once that the
                                          # computation runs in float64
"""
import os
import sys
import warnings

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
# Frames in these folders are distgrad's own (a checkout keeps workers/ and scheduler/
# beside distgrad/; an install puts them inside it).
_OWN = tuple(os.path.join(d, "") for d in (_HERE, os.path.join(os.path.dirname(_HERE), "workers"),
                                           os.path.join(os.path.dirname(_HERE), "scheduler")))
# A local tensor at least this large, copied whole to every worker, is most likely a batch.
BATCH_ROWS = 256
_shown = set()


def warn_once(key, message):
    """Warn (UserWarning) at the first frame outside distgrad, once per ``key`` per process.

    Example: ``warn_once("float64", "the data is float64 ...")``.
    """
    if key in _shown:
        return
    _shown.add(key)
    level, frame = 2, sys._getframe(1)      # level 2: the caller of warn_once
    while frame is not None and frame.f_code.co_filename.startswith(_OWN):
        level, frame = level + 1, frame.f_back
    warnings.warn(message, UserWarning, stacklevel=level)


def _model_is_float32(cluster):
    leaves = (ref() for ref in list(cluster.recorder.leaf_objects.values()))
    return any(t is not None and t.dtype == np.float32 for t in leaves)


def check_sharded(cluster, arr):
    """``cluster.shard`` of float64 data while the model's parameters are float32."""
    if arr.dtype == np.float64 and "float64" not in _shown and _model_is_float32(cluster):
        warn_once("float64", "cluster.shard: the data is float64 but the model is float32, so "
                  "the computation runs in float64 (slower, twice the memory): pass "
                  "x.astype(np.float32) to compute in float32.")


def check_implicit_replica(cluster, t, arr):
    """A driver-local tensor copied whole to every worker because it met distributed values:
    for a batch of data, every worker then computes the whole batch."""
    if (cluster.world_size > 1 and not t.requires_grad and arr.ndim >= 1
            and arr.shape[0] >= BATCH_ROWS):
        warn_once("replicated-batch", f"a local tensor of shape {tuple(arr.shape)} met distributed "
                  "values and was copied whole to every worker: every worker computes the whole "
                  "batch; did you mean cluster.shard(x)? (cluster.replicate(x) copies it on "
                  "purpose, without this warning)")
    if arr.dtype == np.float64 and "float64" not in _shown and _model_is_float32(cluster):
        warn_once("float64", "a float64 tensor meets a float32 model on the workers, so the "
                  "computation runs in float64 (slower, twice the memory): convert the data "
                  "with x.float() or x.astype(np.float32).")
