"""GPU paths of the distributed runtime (marked ``gpu``: skipped without cupy and a GPU)."""
import numpy as np
import pytest

import distgrad as dg
from distgrad.autograd import Variable

pytestmark = pytest.mark.gpu


def _case():
    rng = np.random.default_rng(0)
    return rng.standard_normal((12, 4)), rng.standard_normal((12, 1)), rng.standard_normal((4, 1))


def _loss(X, Y, W):
    return ((X @ W).tanh() - Y).pow(2).mean() + 0.1 * (W * W).sum()


def _check_against_cpu(cluster, sizes=None):
    """The weight gradient on sharded GPU data equals the CPU single-process one."""
    Xn, Yn, W0 = _case()
    W = Variable(dg.tensor(W0), requires_grad=True)
    _loss(cluster.shard(Xn, sizes=sizes), cluster.shard(Yn, sizes=sizes), W).backward()
    np.testing.assert_allclose(W.grad.data.cpu().numpy(), _cpu_grad(), rtol=1e-10)


def _cpu_grad():
    Xn, Yn, W0 = _case()
    W = Variable(dg.tensor(W0), requires_grad=True)
    _loss(dg.tensor(Xn), dg.tensor(Yn), W).backward()
    return W.grad.numpy()


def test_local_backend_on_cuda_gives_the_cpu_gradient():
    with dg.init(workers=2, backend="local", device="cuda") as c:
        _check_against_cpu(c, (5, 7))


@pytest.mark.ray
def test_ray_gpu_worker_gives_the_cpu_gradient(ray_session):
    import ray
    if ray.cluster_resources().get("GPU", 0) < 1:
        pytest.skip("the Ray instance has no GPU")
    with dg.init(workers=1, backend="ray", device="cuda") as c:
        _check_against_cpu(c)


@pytest.mark.ray
def test_nccl_all_reduce_between_two_gpu_workers(ray_session):
    import ray
    if ray.cluster_resources().get("GPU", 0) < 2:
        pytest.skip("NCCL between two ranks needs two GPUs")
    with dg.init(workers=2, backend="ray", device="cuda") as c:
        assert c.gang.collective == "nccl"
        _check_against_cpu(c, (3, 9))
