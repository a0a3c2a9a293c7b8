"""dg.nn: every layer against PyTorch (same weights copied in), gradcheck in float64,
the Module machinery (registration, state_dict, shapes errors, modes) and init/utils."""
import math

import numpy as np
import pytest

import distgrad as dg
import distgrad.nn as nn
import distgrad.nn.functional as F
from distgrad.autograd import Variable, gradcheck

RNG = np.random.default_rng(0)


def _np(t):
    return t.detach().numpy()


def _copy_into(dmod, tmod):
    """Copy a torch module's parameters and buffers into the distgrad module."""
    dmod.load_state_dict({k: dg.from_numpy(v.detach().numpy().copy())
                          for k, v in tmod.state_dict().items()})


# (name, distgrad builder, torch builder, input shape, input kind)
LAYERS = [
    ("linear", lambda m: m.Linear(5, 3), (4, 5)),
    ("linear_3d_nobias", lambda m: m.Linear(5, 3, bias=False), (2, 4, 5)),
    ("conv", lambda m: m.Conv2d(2, 4, 3), (2, 2, 7, 6)),
    ("conv_strided", lambda m: m.Conv2d(4, 6, (3, 2), stride=2, padding=1, groups=2), (2, 4, 8, 7)),
    ("conv_dilated", lambda m: m.Conv2d(3, 2, 3, dilation=2, padding=2, bias=False), (1, 3, 6, 6)),
    ("maxpool", lambda m: m.MaxPool2d(2), (2, 3, 6, 6)),
    ("maxpool_ceil", lambda m: m.MaxPool2d(3, 2, padding=1, ceil_mode=True), (2, 2, 7, 8)),
    ("avgpool", lambda m: m.AvgPool2d(2), (2, 3, 6, 6)),
    ("avgpool_pad", lambda m: m.AvgPool2d(3, 2, 1, count_include_pad=False), (1, 2, 7, 7)),
    ("adaptive_avgpool", lambda m: m.AdaptiveAvgPool2d(1), (2, 3, 4, 5)),
    ("relu", lambda m: m.ReLU(), (3, 4)),
    ("tanh", lambda m: m.Tanh(), (3, 4)),
    ("sigmoid", lambda m: m.Sigmoid(), (3, 4)),
    ("leaky_relu", lambda m: m.LeakyReLU(0.2), (3, 4)),
    ("softmax", lambda m: m.Softmax(dim=1), (3, 4)),
    ("log_softmax", lambda m: m.LogSoftmax(dim=-1), (3, 4)),
    ("flatten", lambda m: m.Flatten(), (2, 3, 4)),
    ("identity", lambda m: m.Identity(), (2, 3)),
    ("dropout_eval", lambda m: m.Dropout(0.5).eval(), (3, 4)),
    ("batchnorm1d", lambda m: m.BatchNorm1d(4), (6, 4)),
    ("batchnorm1d_3d", lambda m: m.BatchNorm1d(3, momentum=0.3), (4, 3, 5)),
    ("batchnorm2d", lambda m: m.BatchNorm2d(3), (4, 3, 5, 5)),
    ("batchnorm2d_eval", lambda m: m.BatchNorm2d(3).eval(), (4, 3, 5, 5)),
    ("layernorm", lambda m: m.LayerNorm(5), (3, 5)),
    ("layernorm_2d", lambda m: m.LayerNorm((4, 5)), (2, 4, 5)),
    ("sequential", lambda m: m.Sequential(m.Conv2d(1, 2, 3), m.ReLU(), m.MaxPool2d(2),
                                          m.Flatten(), m.Linear(8, 3)), (2, 1, 6, 6)),
]


def _randomize_buffers(tmod, torch):
    # Non-trivial running statistics and affine params, so eval mode is really tested.
    for name, b in tmod.named_buffers():
        if b.dtype.is_floating_point:
            b.copy_(torch.rand(b.shape) + 0.5)
    with torch.no_grad():
        for name, p in tmod.named_parameters():
            if "norm" in type(tmod).__name__.lower():
                p.add_(torch.randn(p.shape) * 0.1)


@pytest.mark.parametrize("name,build,shape", LAYERS, ids=[c[0] for c in LAYERS])
def test_layer_matches_torch(name, build, shape):
    torch = pytest.importorskip("torch")
    tmod, dmod = build(torch.nn), build(nn)
    _randomize_buffers(tmod, torch)
    _copy_into(dmod, tmod)
    dmod.train(tmod.training)
    x = RNG.standard_normal(shape).astype(np.float32)
    tx = torch.tensor(x, requires_grad=True)
    dx = Variable(dg.from_numpy(x.copy()), requires_grad=True)
    tout, dout = tmod(tx), dmod(dx)
    np.testing.assert_allclose(_np(dout), tout.detach().numpy(), rtol=1e-4, atol=1e-5)
    cot = RNG.standard_normal(tuple(tout.shape)).astype(np.float32)
    tout.backward(torch.from_numpy(cot))
    dout.backward(dg.from_numpy(cot))
    np.testing.assert_allclose(_np(dx.grad), tx.grad.numpy(), rtol=1e-4, atol=1e-5)
    for (pname, tp), dp in zip(tmod.named_parameters(), dmod.parameters()):
        np.testing.assert_allclose(_np(dp.grad), tp.grad.numpy(), rtol=1e-4, atol=1e-4,
                                   err_msg=pname)
    for (bname, tb), db in zip(tmod.named_buffers(), dmod.buffers()):
        np.testing.assert_allclose(db.numpy(), tb.numpy(), rtol=1e-5, atol=1e-6, err_msg=bname)


GRADCHECK = [
    ("linear", lambda: nn.Linear(3, 2), (4, 3)),
    ("conv", lambda: nn.Conv2d(4, 2, 2, stride=2, padding=1, groups=2), (1, 4, 4, 3)),
    ("maxpool", lambda: nn.MaxPool2d(2), None),
    ("avgpool", lambda: nn.AvgPool2d(3, 2, 1), (1, 2, 5, 5)),
    ("batchnorm2d", lambda: nn.BatchNorm2d(2), (3, 2, 2, 2)),
    ("layernorm", lambda: nn.LayerNorm(4), (2, 4)),
    ("seq_tanh_sigmoid", lambda: nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2),
                                               nn.Sigmoid()), (2, 3)),
]


@pytest.mark.parametrize("name,build,shape", GRADCHECK, ids=[c[0] for c in GRADCHECK])
def test_layer_gradcheck_float64(name, build, shape):
    """Input and parameter gradients against central differences (no PyTorch needed)."""
    mod = build().double()
    if shape is None:       # max pooling: distinct values, so no tie sits within eps
        x = (RNG.permutation(2 * 4 * 4).reshape(1, 2, 4, 4) * 0.1).astype(np.float64)
    else:
        x = RNG.standard_normal(shape)
    xv = Variable(dg.from_numpy(x), requires_grad=True)
    params = list(mod.parameters())

    def run(inp, *ps):
        return mod(inp)
    assert gradcheck(run, (xv, *params), atol=1e-5, rtol=1e-4)


def test_embedding_matches_torch_and_skips_padding_row():
    torch = pytest.importorskip("torch")
    temb, demb = torch.nn.Embedding(7, 3, padding_idx=2), nn.Embedding(7, 3, padding_idx=2)
    _copy_into(demb, temb)
    ids = np.array([[0, 2, 5], [2, 2, 6]])
    tout, dout = temb(torch.from_numpy(ids)), demb(dg.from_numpy(ids))
    np.testing.assert_array_equal(_np(dout), tout.detach().numpy())
    cot = RNG.standard_normal((2, 3, 3)).astype(np.float32)
    tout.backward(torch.from_numpy(cot))
    dout.backward(dg.from_numpy(cot))
    np.testing.assert_allclose(_np(demb.weight.grad), temb.weight.grad.numpy(), rtol=1e-6)
    assert not _np(demb.weight.grad)[2].any()
    assert not nn.Embedding(4, 2, padding_idx=1).weight.detach().numpy()[1].any()


LOSSES = [
    ("mse", lambda m: m.MSELoss(), "float"),
    ("mse_sum", lambda m: m.MSELoss(reduction="sum"), "float"),
    ("l1", lambda m: m.L1Loss(), "float"),
    ("ce", lambda m: m.CrossEntropyLoss(), "class"),
    ("ce_none", lambda m: m.CrossEntropyLoss(reduction="none"), "class"),
    ("ce_sum_ignore", lambda m: m.CrossEntropyLoss(reduction="sum", ignore_index=1), "class"),
    ("ce_weight_ignore", lambda m: m.CrossEntropyLoss(weight=m_weight(m), ignore_index=0), "class"),
    ("ce_smooth", lambda m: m.CrossEntropyLoss(label_smoothing=0.1), "class"),
    ("ce_smooth_weight", lambda m: m.CrossEntropyLoss(weight=m_weight(m), label_smoothing=0.2,
                                                      ignore_index=3), "class"),
    ("ce_probs", lambda m: m.CrossEntropyLoss(), "probs"),
    ("nll", lambda m: m.NLLLoss(), "class"),
    ("nll_weight", lambda m: m.NLLLoss(weight=m_weight(m), reduction="sum"), "class"),
    ("bce", lambda m: m.BCELoss(), "prob_target"),
    ("bce_logits", lambda m: m.BCEWithLogitsLoss(), "binary"),
    ("bce_logits_posw", lambda m: m.BCEWithLogitsLoss(pos_weight=m_posw(m)), "binary"),
]


def m_weight(m):
    w = np.array([0.5, 2.0, 1.0, 1.5], dtype=np.float32)
    return dg.from_numpy(w) if m is nn else __import__("torch").from_numpy(w)


def m_posw(m):
    w = np.array([2.0, 0.5, 1.0, 3.0], dtype=np.float32)
    return dg.from_numpy(w) if m is nn else __import__("torch").from_numpy(w)


@pytest.mark.parametrize("name,build,kind", LOSSES, ids=[c[0] for c in LOSSES])
def test_loss_matches_torch(name, build, kind):
    torch = pytest.importorskip("torch")
    x = RNG.standard_normal((6, 4)).astype(np.float32)
    if kind == "class":
        target = np.array([0, 1, 3, 2, 1, 3])
    elif kind == "probs":
        target = RNG.dirichlet(np.ones(4), 6).astype(np.float32)
    elif kind == "binary":
        target = (RNG.random((6, 4)) > 0.5).astype(np.float32)
    else:
        target = RNG.random((6, 4)).astype(np.float32)
    if kind == "prob_target":
        x = 1 / (1 + np.exp(-x))
    if name == "nll" or name == "nll_weight":
        x = x - np.log(np.exp(x).sum(1, keepdims=True))
    tx = torch.tensor(x, requires_grad=True)
    dx = Variable(dg.from_numpy(x.copy()), requires_grad=True)
    tl = build(torch.nn)(tx, torch.from_numpy(target))
    dl = build(nn)(dx, dg.from_numpy(target))
    np.testing.assert_allclose(_np(dl), tl.detach().numpy(), rtol=1e-5, atol=1e-6)
    cot = RNG.standard_normal(tuple(tl.shape)).astype(np.float32)
    tl.backward(torch.from_numpy(cot))
    dl.backward(dg.from_numpy(cot))
    np.testing.assert_allclose(_np(dx.grad), tx.grad.numpy(), rtol=1e-5, atol=1e-6)


def test_cross_entropy_spatial_and_unbatched_match_torch():
    torch = pytest.importorskip("torch")
    x = RNG.standard_normal((2, 3, 4)).astype(np.float32)
    t = np.array([[0, 2, 1, 1], [2, 2, 0, -100]])
    tl = torch.nn.functional.cross_entropy(torch.from_numpy(x), torch.from_numpy(t))
    dl = F.cross_entropy(dg.from_numpy(x), dg.from_numpy(t))
    assert dl.item() == pytest.approx(tl.item(), rel=1e-5)
    tl1 = torch.nn.functional.cross_entropy(torch.from_numpy(x[0, :, 0]), torch.tensor(2))
    dl1 = F.cross_entropy(dg.from_numpy(x[0, :, 0]), dg.tensor(2))
    assert dl1.item() == pytest.approx(tl1.item(), rel=1e-5)


def test_cross_entropy_is_stable_for_huge_logits():
    logits = Variable(dg.tensor([[1e4, -1e4, 0.0], [0.0, 1e4, 1e4]]), requires_grad=True)
    loss = F.cross_entropy(logits, dg.tensor([1, 2]))
    loss.backward()
    # Row 0: -log p(1) = 2e4; row 1: two tied maxima, -log p(2) = log 2.
    assert np.isfinite(loss.item()) and loss.item() == pytest.approx((2e4 + math.log(2)) / 2)
    g = _np(logits.grad)
    assert np.isfinite(g).all()
    # Softmax minus one-hot, averaged: row 0 puts all mass on class 0.
    np.testing.assert_allclose(g, [[0.5, -0.5, 0.0], [0.0, 0.25, -0.25]], atol=1e-6)
    assert np.isfinite(F.log_softmax(logits * 10, 1).detach().numpy()).all()


def test_cross_entropy_rejects_float_class_targets_and_bad_shapes():
    with pytest.raises(TypeError, match="integer"):
        F.nll_loss(dg.randn(3, 4), dg.tensor([0.0, 1.0, 2.0, 3.0]).reshape(4)[:3].reshape(3, 1)
                   .squeeze(1))
    with pytest.raises(RuntimeError, match=r"target of shape \(3,\), got \(4,\)"):
        F.cross_entropy(dg.randn(3, 4), dg.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="reduction"):
        F.cross_entropy(dg.randn(3, 4), dg.tensor([0, 1, 2]), reduction="avg")


def test_dropout_train_and_eval():
    dg.manual_seed(0)
    drop = nn.Dropout(0.25)
    x = dg.ones(200, 50)
    y = _np(drop(x))
    np.testing.assert_allclose(np.unique(y), [0.0, 1 / 0.75], rtol=1e-6)
    assert abs((y == 0).mean() - 0.25) < 0.02
    assert drop.eval()(x) is x
    xv = Variable(dg.ones(4, 4), requires_grad=True)
    out = F.dropout(xv, 0.5, training=True)
    out.sum().backward()
    np.testing.assert_array_equal(_np(xv.grad), _np(out))       # gradient = mask
    assert F.dropout(x, 1.0).numpy().sum() == 0


def test_batchnorm_running_stats_and_errors():
    bn = nn.BatchNorm1d(3)
    x = dg.from_numpy(RNG.standard_normal((8, 3)).astype(np.float32) * 2 + 1)
    bn(x)
    assert bn.num_batches_tracked.item() == 1
    xs = x.numpy()
    np.testing.assert_allclose(bn.running_mean.numpy(), 0.1 * xs.mean(0), rtol=1e-5)
    np.testing.assert_allclose(bn.running_var.numpy(), 0.9 + 0.1 * xs.var(0, ddof=1), rtol=1e-5)
    with pytest.raises(RuntimeError, match="more than 1 value per channel"):
        bn(dg.randn(1, 3))
    with pytest.raises(RuntimeError, match=r"BatchNorm1d\(3.*got \(4, 5\)"):
        bn(dg.randn(4, 5))
    cma = nn.BatchNorm1d(2, momentum=None)
    a, b = dg.randn(5, 2), dg.randn(5, 2)
    cma(a), cma(b)
    np.testing.assert_allclose(cma.running_mean.numpy(),
                               (a.numpy().mean(0) + b.numpy().mean(0)) / 2, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- Module machinery

class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
        self.head = nn.Linear(2 * 4 * 4, 3)
        self.scale = nn.Parameter(dg.ones(1))
        self.register_buffer("count", dg.zeros(1))
        self.register_buffer("scratch", dg.zeros(2), persistent=False)

    def forward(self, x):
        return self.head(self.features(x).flatten(1)) * self.scale


def test_registration_names_and_traversal():
    net = _Net()
    names = [n for n, _ in net.named_parameters()]
    assert names == ["scale", "features.0.weight", "features.0.bias", "head.weight", "head.bias"]
    assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in net.parameters())
    assert [n for n, _ in net.named_buffers()] == ["count", "scratch"]
    assert list(net.state_dict()) == names[:1] + ["count"] + names[1:]
    assert [n for n, _ in net.named_modules()] == ["", "features", "features.0", "features.1", "head"]
    assert [type(m).__name__ for m in net.children()] == ["Sequential", "Linear"]
    # A parameter shared by two layers is listed once.
    shared = nn.Sequential(net.head, net.head)
    assert len(list(shared.parameters())) == 2
    net.eval()
    assert not any(m.training for m in net.modules())
    net.train()
    assert all(m.training for m in net.modules())
    assert "(head): Linear(in_features=32, out_features=3, bias=True)" in repr(net)
    assert repr(net.scale).startswith("Parameter containing:")


def test_zero_grad_sets_none_by_default_and_to_keeps_identity():
    net = _Net()
    net(dg.randn(2, 1, 6, 6)).sum().backward()
    assert net.head.weight.grad is not None
    net.zero_grad(set_to_none=False)
    assert not net.head.weight.grad.numpy().any()
    net.zero_grad()
    assert net.head.weight.grad is None
    w = net.head.weight
    net.to(dg.float64)
    assert net.head.weight is w and w.dtype == np.float64 and net.count.dtype == np.float64
    assert net(dg.randn(2, 1, 6, 6, dtype=dg.float64)).dtype == np.float64
    net.float()
    assert w.dtype == np.float32


def test_state_dict_roundtrip_and_strict_errors():
    a, b = _Net(), _Net()
    b.load_state_dict(a.state_dict())
    for (k, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        np.testing.assert_array_equal(pa.numpy(), pb.numpy(), err_msg=k)
    state = a.state_dict()
    state["extra.weight"] = dg.zeros(2)
    del state["head.bias"]
    state["features.0.weight"] = dg.zeros(2, 1, 5, 5)
    before = b.head.weight.detach().numpy().copy()
    with pytest.raises(RuntimeError) as err:
        b.load_state_dict(state)
    msg = str(err.value)
    assert 'Missing key(s) in state_dict: "head.bias"' in msg
    assert 'Unexpected key(s) in state_dict: "extra.weight"' in msg
    assert "size mismatch for features.0.weight" in msg and "(2, 1, 5, 5)" in msg \
        and "(2, 1, 3, 3)" in msg
    np.testing.assert_array_equal(b.head.weight.detach().numpy(), before)   # nothing copied
    del state["features.0.weight"]
    result = b.load_state_dict(state, strict=False)
    assert result.missing_keys == ["features.0.weight", "head.bias"]
    assert result.unexpected_keys == ["extra.weight"]


def test_wrong_input_shape_names_layer_path_and_shapes():
    net = _Net()
    with pytest.raises(RuntimeError) as err:
        net(dg.randn(2, 3, 6, 6))
    msg = str(err.value)
    assert "Conv2d(1, 2, kernel_size=(3, 3)" in msg and "'features.0'" in msg
    assert "(N, 1, H, W)" in msg and "(2, 3, 6, 6)" in msg
    with pytest.raises(RuntimeError, match=r"Linear\(in_features=32.*'head'.*\(\*, 32\), got \(2, 50\)"):
        net(dg.randn(2, 1, 7, 7))
    with pytest.raises(RuntimeError, match=r"smaller than the kernel"):
        nn.Conv2d(1, 1, 5)(dg.randn(1, 1, 3, 3))
    with pytest.raises(RuntimeError, match=r"LayerNorm.*\(\*, 4\), got \(2, 5\)"):
        nn.LayerNorm(4)(dg.randn(2, 5))


def test_hooks_and_containers():
    seen = []
    lin = nn.Linear(2, 2)
    h = lin.register_forward_hook(lambda m, inp, out: seen.append(tuple(out.shape)))
    lin(dg.randn(3, 2))
    h.remove()
    lin(dg.randn(3, 2))
    assert seen == [(3, 2)]
    ml = nn.ModuleList([nn.Linear(2, 2) for _ in range(3)])
    md = nn.ModuleDict({"a": nn.Linear(2, 1)})
    assert len(list(ml.parameters())) == 6 and len(ml[1:]) == 2
    assert list(md.keys()) == ["a"] and len(list(md.parameters())) == 2
    seq = nn.Sequential(nn.Linear(2, 3), nn.ReLU())
    assert isinstance(seq[0], nn.Linear) and len(seq) == 2 and len(seq[:1]) == 1


# ---------------------------------------------------------------- init and utils

def test_default_initialisations_follow_pytorch_bounds():
    dg.manual_seed(1)
    lin = nn.Linear(400, 50)
    bound = 1 / math.sqrt(400)      # kaiming_uniform(a=sqrt(5)) on fan_in 400
    w = lin.weight.detach().numpy()
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.95 * bound
    assert abs(w.std() - bound / math.sqrt(3)) < 0.05 * bound
    assert np.abs(lin.bias.detach().numpy()).max() <= bound
    conv = nn.Conv2d(3, 8, 5)
    assert np.abs(conv.weight.detach().numpy()).max() <= 1 / math.sqrt(75)
    bn = nn.BatchNorm2d(4)
    assert (bn.weight.detach().numpy() == 1).all() and not bn.bias.detach().numpy().any()
    assert abs(nn.Embedding(1000, 10).weight.detach().numpy().std() - 1) < 0.05
    t = nn.Parameter(dg.empty(200, 100))
    nn.init.xavier_uniform_(t)
    assert np.abs(t.detach().numpy()).max() <= math.sqrt(6 / 300)
    nn.init.kaiming_normal_(t, nonlinearity="relu")
    assert abs(t.detach().numpy().std() - math.sqrt(2 / 100)) < 0.01
    nn.init.constant_(t, 0.5)
    assert (t.detach().numpy() == 0.5).all() and t.requires_grad
    assert nn.init.calculate_gain("tanh") == pytest.approx(5 / 3)


def test_clip_grad_norm_matches_torch():
    torch = pytest.importorskip("torch")
    gs = [RNG.standard_normal(s).astype(np.float32) * 3 for s in [(3, 4), (5,), (2, 2)]]
    for norm_type, max_norm in [(2.0, 1.0), (1.0, 2.5), (float("inf"), 0.5), (2.0, 1e3)]:
        tps = [torch.zeros(g.shape, requires_grad=True) for g in gs]
        dps = [nn.Parameter(dg.zeros(*g.shape)) for g in gs]
        for tp, dp, g in zip(tps, dps, gs):
            tp.grad = torch.from_numpy(g.copy())
            dp.grad = Variable(dg.from_numpy(g.copy()))
        tn = torch.nn.utils.clip_grad_norm_(tps, max_norm, norm_type)
        dn = nn.utils.clip_grad_norm_(dps, max_norm, norm_type)
        assert isinstance(dn, dg.Tensor)        # stays a tensor: no host sync needed
        assert dn.item() == pytest.approx(tn.item(), rel=1e-5)
        for tp, dp in zip(tps, dps):
            np.testing.assert_allclose(dp.grad.numpy(), tp.grad.numpy(), rtol=1e-5, atol=1e-6)
    p = nn.Parameter(dg.zeros(3))
    p.grad = Variable(dg.tensor([-2.0, 0.1, 3.0]))
    nn.utils.clip_grad_value_([p], 1.0)
    np.testing.assert_allclose(p.grad.numpy(), [-1.0, 0.1, 1.0])


def test_conv_second_derivative_through_create_graph():
    """A gradient penalty: d/dw of |d loss/dx|^2 runs the conv transposes' own VJPs."""
    conv = nn.Conv2d(2, 3, 3, padding=1).double()
    x = Variable(dg.from_numpy(RNG.standard_normal((1, 2, 5, 5))), requires_grad=True)

    def penalty(xx, w):
        out = F.max_pool2d(F.conv2d(xx, w, padding=1).tanh(), 2)
        gx, = dg.autograd.grad(out.sum(), xx, create_graph=True)
        return (gx * gx).sum()
    assert gradcheck(penalty, (x, conv.weight), atol=1e-5, rtol=1e-4)


def test_cnn_training_on_a_local_cluster_matches_single_process():
    """Conv, BatchNorm, pooling, cross-entropy and Adam on lazy sharded values (uneven split)."""
    def net():
        # No conv bias before BatchNorm: its true gradient is 0, and Adam would amplify the
        # rounding noise in it into different updates.
        return nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                             nn.MaxPool2d(2),
                             nn.Flatten(), nn.Linear(4 * 3 * 3, 3))
    dg.manual_seed(0)
    local, remote = net(), net()
    remote.load_state_dict(local.state_dict())
    xb = RNG.standard_normal((7, 1, 8, 8)).astype(np.float32)
    yb = RNG.integers(0, 3, 7)
    lopt = dg.optim.Adam(local.parameters(), lr=0.01)
    with dg.init(workers=2, backend="local") as cluster:
        model = cluster.replicate(remote)
        opt = dg.optim.Adam(model.parameters(), lr=0.01)
        for _ in range(3):
            loss = F.cross_entropy(model(cluster.shard(xb)), cluster.shard(yb))
            opt.zero_grad(), loss.backward(), opt.step()
            ref = F.cross_entropy(local(dg.from_numpy(xb)), dg.from_numpy(yb))
            lopt.zero_grad(), ref.backward(), lopt.step()
            assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
        for (name, p), q in zip(model.named_parameters(), local.parameters()):
            np.testing.assert_allclose(p.detach().numpy(), q.detach().numpy(), atol=1e-5,
                                       err_msg=name)


def test_dropout_on_sharded_input_drops_what_a_single_process_drops():
    x = RNG.standard_normal((5, 4)).astype(np.float32)
    dg.manual_seed(7)
    local = F.dropout(dg.from_numpy(x), 0.5).numpy()
    dg.manual_seed(7)
    with dg.init(workers=2, backend="local") as cluster:
        out = F.dropout(cluster.shard(x), 0.5)
        np.testing.assert_array_equal(out.detach().numpy(), local)


def test_mnist_like_example_learns(capsys):
    """The example script, shrunk: both models end well above chance (10%)."""
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples",
                        "train_mnist_like.py")
    spec = importlib.util.spec_from_file_location("train_mnist_like", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    acc = example.main(["--epochs", "2", "--train-size", "2000", "--test-size", "500",
                        "--lr", "3e-3"])
    assert acc["cnn"] > 0.5 and acc["mlp"] > 0.5
    assert "test accuracy" in capsys.readouterr().out


def test_linear_weight_gradient_and_optimizer_state_share_the_weight_layout():
    """Linear keeps its weight column-major (x @ weight.T is then a plain GEMM); the weight
    gradient and the optimizer state come in that layout, with PyTorch's values."""
    fc = nn.Linear(5, 3)
    opt = dg.optim.SGD(fc.parameters(), lr=0.1, momentum=0.9)
    x = dg.randn(4, 5)
    for _ in range(2):
        opt.zero_grad()
        fc(x).sum().backward()
        opt.step()
    w = fc.weight
    assert tuple(w.shape) == (3, 5)
    for arr in (w.data.numpy(), w.grad.numpy(), opt.state[w]["momentum_buffer"].numpy()):
        assert arr.flags.f_contiguous and not arr.flags.c_contiguous
    np.testing.assert_allclose(w.grad.numpy(), np.ones((3, 4)) @ x.numpy(), rtol=1e-6)
    # A checkpoint of it reads back with the same values (dg.save writes row-major bytes).
    state = fc.state_dict()
    other = nn.Linear(5, 3)
    other.load_state_dict(state)
    np.testing.assert_array_equal(other.weight.data.numpy(), w.data.numpy())


def test_cross_entropy_is_one_fused_op_each_way():
    """Class-index cross_entropy records one node (log_softmax + nll_loss fused) whose
    gradient is softmax minus the one-hot, divided by the batch."""
    logits = Variable(dg.randn(4, 3).double(), requires_grad=True)
    target = dg.tensor([0, 2, 1, 2])
    loss = F.cross_entropy(logits, target)
    assert type(loss.grad_fn).__name__ == "CrossEntropyBackward"
    loss.backward()
    z = logits.data.numpy()
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(4), target.numpy()] -= 1
    np.testing.assert_allclose(logits.grad.numpy(), p / 4, rtol=1e-12)


@pytest.mark.gpu
def test_linear_with_its_column_major_weight_on_cuda_matches_cpu():
    """The column-major weight gradient path (linear_weight_grad's f_order) on cupy."""
    fc = nn.Linear(5, 3)
    x = dg.randn(4, 5)
    y = dg.tensor([0, 2, 1, 2])
    F.cross_entropy(fc(x), y).backward()
    expected = fc.weight.grad.numpy().copy()
    fc.zero_grad()
    fc.to("cuda")
    F.cross_entropy(fc(x.to("cuda")), y.to("cuda")).backward()
    assert fc.weight.grad.is_cuda
    np.testing.assert_allclose(fc.weight.grad.cpu().numpy(), expected, rtol=1e-5, atol=1e-7)
