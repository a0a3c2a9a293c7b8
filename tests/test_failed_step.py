"""A step that fails on one worker: its peers stop waiting for it at once (the failed worker
leaves the collective group; the driver re-forms it), and what the driver sent before the
failure (a model replicated, a batch sharded just before a failed first step) is sent again
with the next program, so training goes on from exactly where an undisturbed run would be."""
import numpy as np
import pytest

import distgrad as dg
from distgrad.errors import RemoteError

from training_loop import train_classifier  # noqa: E402  (tests/ is on sys.path under pytest)

X = np.random.default_rng(0).standard_normal((9, 4)).astype(np.float32)
GOOD = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2])
BAD = np.array([0, 1, 2, 0, 1, 2, 0, 1, 7])          # class 7: only the last worker fails


def _model():
    dg.manual_seed(3)
    return dg.nn.Sequential(dg.nn.Linear(4, 5), dg.nn.ReLU(), dg.nn.Linear(5, 3))


def _sgd(params):
    return dg.optim.SGD(params, lr=0.1, momentum=0.9)


def _check(backend, workers):
    model = _model()
    _, want_losses = train_classifier(None, model, X, [GOOD, GOOD], _sgd)
    want_params = [p.detach().numpy().copy() for p in model.parameters()]
    with dg.init(workers=workers, backend=backend, timeout_s=300) as cluster:
        # The model is replicated in the same program as the failing first step.
        model = _model()
        _, results = train_classifier(cluster, model, X, [BAD, GOOD, BAD, GOOD], _sgd)
        params = [p.detach().numpy().copy() for p in model.parameters()]
    for failed in (results[0], results[2]):
        assert isinstance(failed, RemoteError) and "index 7 is out of bounds" in str(failed)
    np.testing.assert_allclose([results[1], results[3]], want_losses, rtol=1e-5)
    for got, want in zip(params, want_params):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("workers", [2, 3])
def test_failed_steps_change_nothing_local(workers):
    # timeout_s=300: were the peers to wait out their timeout, this test would take
    # 20 minutes; with the failed worker leaving the group it takes a second.
    _check("local", workers)


def test_failed_steps_change_nothing_ray(ray_session):
    _check("ray", 2)
