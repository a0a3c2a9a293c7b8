"""The ordinary PyTorch-style training loop (DESIGN.md section 1, "Distributed") runs
unchanged on sharded data and ends with the single-process parameters."""
import numpy as np
import pytest

import distgrad as dg
import distgrad.nn as nn
import distgrad.nn.functional as F

rng = np.random.default_rng(0)
X = rng.standard_normal((30, 6))
Y = rng.integers(0, 4, 30)


def mlp(batchnorm=False):
    dg.manual_seed(0)
    layers = [nn.Linear(6, 16)] + ([nn.BatchNorm1d(16)] if batchnorm else []) + [nn.ReLU(), nn.Linear(16, 4)]
    return nn.Sequential(*layers).double()


def train(model, opt, batches, cluster=None, sizes=None):
    losses = []
    for xb, yb in batches:
        if cluster is not None:
            xb, yb = cluster.shard(xb, sizes=sizes), cluster.shard(yb, sizes=sizes)
        else:
            xb, yb = dg.tensor(xb), dg.tensor(yb)
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def batches(steps=5):
    return [(X, Y)] * steps


def params(model):
    return {k: v.data.numpy().copy() for k, v in model.state_dict().items()}


def assert_same(a, b, rtol=1e-10):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=1e-12, err_msg=k)


def reference(make_opt, batchnorm=False, steps=5):
    model = mlp(batchnorm)
    losses = train(model, make_opt(model.parameters()), batches(steps))
    return params(model), losses


OPTIMIZERS = {
    "sgd-momentum": lambda p: dg.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "adam": lambda p: dg.optim.Adam(p, lr=0.01),
}


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("workers, sizes", [(2, None), (3, (4, 20, 6)), (4, (0, 10, 10, 10))])
def test_training_loop_matches_single_process(opt_name, workers, sizes):
    ref, ref_losses = reference(OPTIMIZERS[opt_name])
    with dg.init(workers=workers, backend="local") as cluster:
        model = cluster.replicate(mlp())
        opt = OPTIMIZERS[opt_name](model.parameters())
        losses = train(model, opt, batches(), cluster, sizes)
        assert all(p.placement == dg.Replicate() for p in model.parameters())
        assert_same(params(model), ref)
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-10)


def test_a_training_step_is_one_message_per_worker():
    with dg.init(workers=2, backend="local") as cluster:
        model = cluster.replicate(mlp(batchnorm=True))
        opt = OPTIMIZERS["adam"](model.parameters())
        train(model, opt, batches(2), cluster)
        before = cluster.messages_sent
        train(model, opt, batches(3), cluster)
        assert cluster.messages_sent - before == 3


def test_batchnorm_over_a_sharded_batch_uses_global_statistics():
    ref, _ = reference(OPTIMIZERS["sgd-momentum"], batchnorm=True)
    with dg.init(workers=3, backend="local") as cluster:
        model = cluster.replicate(mlp(batchnorm=True))
        train(model, OPTIMIZERS["sgd-momentum"](model.parameters()), batches(), cluster, (7, 3, 20))
        assert_same(params(model), ref)          # running_mean / running_var included


def test_cnn_gradients_match_on_sharded_images():
    imgs = rng.standard_normal((10, 1, 12, 12))
    labels = rng.integers(0, 3, 10)

    def cnn():
        dg.manual_seed(1)
        return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(4, 6, 3), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(6 * 2 * 2, 3)).double()
    local = cnn()
    F.cross_entropy(local(dg.tensor(imgs)), dg.tensor(labels)).backward()
    with dg.init(workers=3, backend="local") as cluster:
        model = cluster.replicate(cnn())
        F.cross_entropy(model(cluster.shard(imgs, sizes=(2, 5, 3))),
                        cluster.shard(labels, sizes=(2, 5, 3))).backward()
        for (name, p), q in zip(model.named_parameters(), local.parameters()):
            np.testing.assert_allclose(p.grad.data.numpy(), q.grad.numpy(), rtol=1e-9, err_msg=name)


@pytest.mark.ray
def test_training_loop_on_ray_matches_single_process(ray_session):
    ref, ref_losses = reference(OPTIMIZERS["adam"])
    with dg.init(workers=2, backend="ray") as cluster:
        model = cluster.replicate(mlp())
        losses = train(model, OPTIMIZERS["adam"](model.parameters()), batches(), cluster, (11, 19))
        assert_same(params(model), ref)
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-10)


@pytest.mark.ray
def test_checkpoint_resumes_on_a_different_number_of_workers(ray_session, tmp_path):
    ref, _ = reference(OPTIMIZERS["adam"], steps=6)
    path = str(tmp_path / "ckpt.dg")
    with dg.init(workers=2, backend="ray") as cluster:
        model = cluster.replicate(mlp())
        opt = OPTIMIZERS["adam"](model.parameters())
        train(model, opt, batches(3), cluster)
        cluster.save_checkpoint(path, model, opt, step=3)
    with dg.init(workers=3, backend="ray") as cluster:
        model = cluster.replicate(mlp())
        opt = OPTIMIZERS["adam"](model.parameters())
        state = cluster.load_checkpoint(path, model, opt)
        assert state["step"] == 3 and state["world_size"] == 2
        train(model, opt, batches(3), cluster)
        assert_same(params(model), ref)


def test_checkpoint_from_another_model_is_refused_with_the_differences(tmp_path):
    path = str(tmp_path / "ckpt.dg")
    with dg.init(workers=2, backend="local") as cluster:
        model = cluster.replicate(mlp())
        cluster.save_checkpoint(path, model, step=0)
        other = cluster.replicate(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)).double())
        with pytest.raises(RuntimeError, match="size mismatch for 0.weight"):
            cluster.load_checkpoint(path, other)
    with open(path, "r+b") as f:
        f.seek(-20, 2)
        f.write(b"\x00" * 8)
    with pytest.raises(Exception, match="(?i)checksum|corrupt"):
        dg.load(path)


@pytest.mark.parametrize("backend", ["local", pytest.param("ray", marks=pytest.mark.ray)])
def test_auto_shard_sizes_follow_worker_speed_and_stay_exact(backend, request):
    if backend == "ray":
        request.getfixturevalue("ray_session")
    ref, _ = reference(OPTIMIZERS["sgd-momentum"], steps=6)
    with dg.init(workers=2, backend=backend) as cluster:
        if backend == "local":
            cluster.gang.workers[1].slowdown_s = 0.05
        else:
            import ray
            ray.get(cluster.gang.actors[1].set_slowdown.remote(0.05))
        model = cluster.replicate(mlp())
        opt = OPTIMIZERS["sgd-momentum"](model.parameters())
        seen = []
        for xb, yb in batches(6):
            X = cluster.shard(xb, sizes="auto")
            seen.append(X.placement.sizes)
            loss = F.cross_entropy(model(X), cluster.shard(yb, sizes=X.placement.sizes))
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss.item()
        assert seen[0] == (15, 15)                       # no measurement yet: even
        assert seen[-1][1] < seen[-1][0]                 # the slow worker gets fewer rows
        assert_same(params(model), ref)                  # and the result does not change
    with dg.init(workers=2, backend="local") as cluster, pytest.raises(ValueError, match="auto"):
        cluster.shard(np.ones((4, 2)), sizes="fast")
