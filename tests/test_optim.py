"""dg.optim: 50-step runs against PyTorch from the same weights, bad parameter lists,
state_dict round trips and learning-rate schedules."""
import numpy as np
import pytest

import distgrad as dg
import distgrad.nn as nn
import distgrad.nn.functional as F
import distgrad.optim as optim
from distgrad.autograd import Variable

RNG = np.random.default_rng(0)
X = RNG.standard_normal((32, 6)).astype(np.float32)
Y = RNG.integers(0, 3, 32)


def _mlp(m):
    return m.Sequential(m.Linear(6, 16), m.Tanh(), m.Linear(16, 16), m.ReLU(), m.Linear(16, 3))


def _pair(torch):
    """The same MLP in both libraries, distgrad's weights copied from torch's."""
    torch.manual_seed(0)
    tm, dm = _mlp(torch.nn), _mlp(nn)
    dm.load_state_dict({k: dg.from_numpy(v.detach().numpy().copy())
                        for k, v in tm.state_dict().items()})
    return tm, dm


def _train(model, opt, lib, loss_fn, steps, sched=None):
    x, y = lib.from_numpy(X), lib.from_numpy(Y)
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
    return loss.item()


def _assert_close_params(tm, dm, rtol=1e-4):
    for (name, tp), dp in zip(tm.named_parameters(), dm.parameters()):
        t, d = tp.detach().numpy(), dp.detach().numpy()
        # Relative to the tensor's scale, so entries near zero don't need 1e-4 of themselves.
        err = np.abs(t - d).max() / np.abs(t).max()
        assert err < rtol, f"{name}: relative difference {err:.2e} after 50 steps"


OPTIMIZERS = [
    ("sgd_momentum", lambda o, p: o.SGD(p, lr=0.05, momentum=0.9)),
    ("sgd_nesterov_wd", lambda o, p: o.SGD(p, lr=0.05, momentum=0.9, nesterov=True,
                                           weight_decay=1e-3)),
    ("sgd_dampening", lambda o, p: o.SGD(p, lr=0.1, momentum=0.5, dampening=0.3)),
    ("sgd_plain", lambda o, p: o.SGD(p, lr=0.1)),
    ("adam", lambda o, p: o.Adam(p, lr=1e-2)),
    ("adam_wd_amsgrad", lambda o, p: o.Adam(p, lr=1e-2, betas=(0.8, 0.99), weight_decay=1e-2,
                                            amsgrad=True)),
    ("adamw", lambda o, p: o.AdamW(p, lr=1e-2, weight_decay=0.1)),
]


@pytest.mark.parametrize("name,make", OPTIMIZERS, ids=[o[0] for o in OPTIMIZERS])
def test_50_steps_match_torch(name, make):
    torch = pytest.importorskip("torch")
    tm, dm = _pair(torch)
    tl = _train(tm, make(torch.optim, tm.parameters()), torch,
                torch.nn.functional.cross_entropy, 50)
    dl = _train(dm, make(optim, dm.parameters()), dg, F.cross_entropy, 50)
    assert dl == pytest.approx(tl, rel=1e-3)
    _assert_close_params(tm, dm)


def test_param_groups_and_schedulers_match_torch():
    torch = pytest.importorskip("torch")
    tm, dm = _pair(torch)

    def make(o, m):
        return o.SGD([{"params": m[0].parameters(), "lr": 0.2},
                      {"params": list(m[2].parameters()) + list(m[4].parameters())}],
                     lr=0.05, momentum=0.9)
    topt, dopt = make(torch.optim, tm), make(optim, dm)
    tsched = torch.optim.lr_scheduler.CosineAnnealingLR(topt, T_max=20, eta_min=1e-3)
    dsched = optim.lr_scheduler.CosineAnnealingLR(dopt, T_max=20, eta_min=1e-3)
    _train(tm, topt, torch, torch.nn.functional.cross_entropy, 30, tsched)
    _train(dm, dopt, dg, F.cross_entropy, 30, dsched)
    np.testing.assert_allclose(dsched.get_last_lr(), tsched.get_last_lr(), rtol=1e-6)
    _assert_close_params(tm, dm)


@pytest.mark.parametrize("name,kw", [
    ("StepLR", dict(step_size=3, gamma=0.5)),
    ("MultiStepLR", dict(milestones=[2, 5], gamma=0.1)),
    ("ExponentialLR", dict(gamma=0.9)),
    ("CosineAnnealingLR", dict(T_max=7)),
])
def test_scheduler_lr_sequence_matches_torch(name, kw):
    torch = pytest.importorskip("torch")
    tp, dp = torch.zeros(1, requires_grad=True), nn.Parameter(dg.zeros(1))
    topt, dopt = torch.optim.SGD([tp], lr=0.3), optim.SGD([dp], lr=0.3)
    ts = getattr(torch.optim.lr_scheduler, name)(topt, **kw)
    ds = getattr(optim.lr_scheduler, name)(dopt, **kw)
    tl, dl = [], []
    for _ in range(10):
        topt.step(), dopt.step()
        ts.step(), ds.step()
        tl.append(topt.param_groups[0]["lr"])
        dl.append(dopt.param_groups[0]["lr"])
    np.testing.assert_allclose(dl, tl, rtol=1e-9)


def test_lambda_lr():
    p = nn.Parameter(dg.zeros(1))
    opt = optim.SGD([p], lr=1.0)
    sched = optim.lr_scheduler.LambdaLR(opt, lambda e: 1 / (e + 1))
    sched.step(), sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1 / 3)


def test_bad_parameter_lists_raise():
    w = nn.Parameter(dg.randn(2, 2))
    non_leaf = w * 2
    with pytest.raises(ValueError, match="non-leaf"):
        optim.SGD([w, non_leaf], lr=0.1)
    with pytest.raises(ValueError, match="appears twice"):
        optim.Adam([w, w])
    with pytest.raises(ValueError, match="more than one parameter group"):
        optim.SGD([{"params": [w]}, {"params": [w]}], lr=0.1)
    with pytest.raises(ValueError, match="empty parameter list"):
        optim.SGD([], lr=0.1)
    with pytest.raises(TypeError, match="iterable"):
        optim.SGD(w, lr=0.1)
    with pytest.raises(ValueError, match="lr"):
        optim.SGD([w])
    with pytest.raises(ValueError, match="Nesterov"):
        optim.SGD([w], lr=0.1, nesterov=True)


def test_zero_grad_and_parameters_without_grad():
    a, b = nn.Parameter(dg.ones(2)), nn.Parameter(dg.ones(2))
    opt = optim.SGD([a, b], lr=0.5, momentum=0.9)
    (a * 3).sum().backward()
    opt.step()                      # b has no grad: untouched, no state
    np.testing.assert_allclose(a.detach().numpy(), [-0.5, -0.5])
    np.testing.assert_allclose(b.detach().numpy(), [1, 1])
    assert b not in opt.state
    opt.zero_grad()
    assert a.grad is None
    (a * 3).sum().backward()
    opt.zero_grad(set_to_none=False)
    assert not a.grad.numpy().any()


@pytest.mark.parametrize("make", [lambda p: optim.SGD(p, lr=0.05, momentum=0.9),
                                  lambda p: optim.Adam(p, lr=1e-2, amsgrad=True)],
                         ids=["sgd", "adam"])
def test_state_dict_resume_equals_uninterrupted_run(make, tmp_path):
    def fresh():
        dg.manual_seed(3)
        model = _mlp(nn)
        return model, make(model.parameters())
    ref, ref_opt = fresh()
    _train(ref, ref_opt, dg, F.cross_entropy, 10)

    model, opt = fresh()
    _train(model, opt, dg, F.cross_entropy, 5)
    path = tmp_path / "ckpt.dgt"
    dg.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)
    model2, opt2 = fresh()
    ckpt = dg.load(path)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    _train(model2, opt2, dg, F.cross_entropy, 5)
    for (name, p), q in zip(ref.named_parameters(), model2.parameters()):
        np.testing.assert_array_equal(p.detach().numpy(), q.detach().numpy(), err_msg=name)


def test_load_state_dict_rejects_mismatched_layout():
    a, b = nn.Parameter(dg.ones(2)), nn.Parameter(dg.ones(3))
    opt = optim.SGD([a, b], lr=0.1, momentum=0.9)
    (a.sum() + b.sum()).backward()
    opt.step()
    state = opt.state_dict()
    with pytest.raises(ValueError, match="2 parameters"):
        optim.SGD([a], lr=0.1).load_state_dict(state)
    with pytest.raises(ValueError, match="shape"):
        optim.SGD([b, a], lr=0.1).load_state_dict(state)


def test_step_with_closure_and_create_graph_free_update():
    w = nn.Parameter(dg.tensor([1.0, -2.0]))
    opt = optim.SGD([w], lr=0.25)

    def closure():
        opt.zero_grad()
        loss = (w * w).sum()
        loss.backward()
        return loss
    loss = opt.step(closure)
    assert loss.item() == pytest.approx(5.0)
    np.testing.assert_allclose(w.detach().numpy(), [0.5, -1.0])
    assert w.is_leaf and w.grad_fn is None       # the update is not recorded in the graph
    assert isinstance(w.grad, Variable)
