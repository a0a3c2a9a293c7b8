"""PyTorch idioms of 2017-2025 that distgrad accepts as PyTorch does (issue 14), each
checked against PyTorch when it is installed, or against PyTorch's documented result."""
import warnings

import numpy as np
import pytest

import distgrad as dg
import distgrad.nn as nn
import distgrad.nn.functional as F
from distgrad.autograd import Variable
from distgrad.compat import MissingFeatureError

RNG = np.random.default_rng(14)


def _np(t):
    return t.detach().numpy() if hasattr(t, "detach") else np.asarray(t)


# ---------------------------------------------------------------- 0.3/0.4 idioms

def test_data_index_0_of_a_0dim_loss_warns_and_gives_the_value():
    loss = (dg.ones(3) * 2).sum()
    with pytest.warns(UserWarning, match="invalid index of a 0-dim tensor"):
        v = loss.data[0]
    assert v.shape == () and float(v) == 6.0
    with pytest.warns(UserWarning):
        assert loss[0].item() == 6.0
    with pytest.raises(RuntimeError):           # any other index of a 0-dim tensor still fails
        loss[1]
    total = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        total += loss.data[0]                   # a 0.3 running loss
    assert "%.3f" % total == "6.000"


@pytest.mark.parametrize("size_average,reduce,reduction", [
    (False, None, "sum"), (True, None, "mean"), (None, False, "none"), (False, True, "sum"),
    (True, False, "none")])
@pytest.mark.parametrize("name", ["mse_loss", "l1_loss", "smooth_l1_loss", "nll_loss",
                                  "cross_entropy", "binary_cross_entropy",
                                  "binary_cross_entropy_with_logits"])
def test_size_average_and_reduce_warn_and_mean_what_they_meant(name, size_average, reduce,
                                                                reduction):
    x = RNG.uniform(0.1, 0.9, (4, 3)).astype(np.float32)
    t = RNG.uniform(0.1, 0.9, (4, 3)).astype(np.float32)
    if name in ("nll_loss", "cross_entropy"):
        t = np.array([0, 2, 1, 2])
    fn = getattr(F, name)
    with pytest.warns(UserWarning, match="size_average and reduce args will be deprecated"):
        legacy = fn(dg.from_numpy(x), dg.from_numpy(t), size_average=size_average, reduce=reduce)
    modern = fn(dg.from_numpy(x), dg.from_numpy(t), reduction=reduction)
    np.testing.assert_allclose(_np(legacy), _np(modern), rtol=1e-6)
    torch = pytest.importorskip("torch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = getattr(torch.nn.functional, name)(
            torch.from_numpy(x), torch.from_numpy(t), size_average=size_average, reduce=reduce)
    np.testing.assert_allclose(_np(legacy), expected.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls,args", [("MSELoss", ()), ("L1Loss", ()), ("SmoothL1Loss", ()),
                                      ("NLLLoss", (None,)), ("CrossEntropyLoss", (None,)),
                                      ("BCELoss", (None,)), ("BCEWithLogitsLoss", (None,))])
def test_loss_modules_take_size_average_positionally_as_pytorch(cls, args):
    with pytest.warns(UserWarning, match="size_average"):
        m = getattr(nn, cls)(*args, False)          # e.g. nn.NLLLoss(None, False)
    assert m.reduction == "sum"
    assert getattr(nn, cls)(reduction="none").reduction == "none"


def test_tensor_type_casts_like_pytorch():
    x = dg.tensor([[1.5, -2.0]])
    assert x.type() == "distgrad.FloatTensor"
    assert x.type(dg.DoubleTensor).dtype == np.float64
    assert x.type("torch.DoubleTensor").dtype == np.float64
    assert x.type("distgrad.LongTensor").tolist() == [[1, -2]]
    assert x.type(dg.float64).dtype == np.float64
    assert x.type(dg.IntTensor).dtype == np.int32
    with pytest.raises(TypeError, match="invalid type"):
        x.type("torch.NoSuchTensor")
    v = Variable(dg.randn(3, 2).type(dg.FloatTensor), requires_grad=True)   # 0.3's dtype idiom
    assert v.requires_grad and v.dtype == np.float32


def test_legacy_constructors_are_shapes_or_data_as_in_pytorch():
    torch = pytest.importorskip("torch")
    for args in [(5,), (5, 3), (2, 3, 4), ([1, 2],), ([[1.5, 2]],), ()]:
        d, t = dg.Tensor(*args), torch.Tensor(*args)
        assert tuple(d.shape) == tuple(t.shape), args
        assert d.dtype == np.float32 and t.dtype == torch.float32
    assert dg.Tensor([1, 2]).tolist() == [1.0, 2.0]
    assert dg.Tensor(dg.Size([2, 3])).shape == (2, 3)
    for name, tdt in [("FloatTensor", torch.float32), ("DoubleTensor", torch.float64),
                      ("LongTensor", torch.int64), ("ByteTensor", torch.uint8),
                      ("IntTensor", torch.int32), ("BoolTensor", torch.bool)]:
        d, t = getattr(dg, name)(2, 3), getattr(torch, name)(2, 3)
        assert tuple(d.shape) == tuple(t.shape) and str(d.dtype) == str(tdt).split(".")[1]
        assert isinstance(d, getattr(dg, name))
        data = getattr(dg, name)([1, 0, 2])
        assert data.tolist() == getattr(torch, name)([1, 0, 2]).tolist()
    assert not isinstance(dg.ones(2), dg.LongTensor)
    assert repr(dg.FloatTensor) == "<class 'distgrad.FloatTensor'>"
    with pytest.raises(TypeError, match="integer sizes or one piece of data"):
        dg.Tensor([1, 2], 3)


def test_tensor_of_an_int_is_a_size_not_a_scalar():
    """dg.Tensor(5) used to give a 0-dim int64 5: a silent wrong answer."""
    t = dg.Tensor(5)
    assert t.shape == (5,) and t.dtype == np.float32
    assert dg.tensor(5).shape == () and dg.tensor(5).item() == 5     # dg.tensor is data


def test_device_objects_and_cuda_queries():
    dev = dg.device("cuda" if dg.cuda.is_available() else "cpu")
    assert dev == str(dev) and dev.type in ("cpu", "cuda")
    assert dg.device("cuda", 1) == "cuda:1" and dg.device("cuda:1").index == 1
    assert dg.device("cpu").index is None and repr(dg.device("cpu")) == "device(type='cpu')"
    with pytest.raises(ValueError, match="unknown device"):
        dg.device("tpu")
    assert dg.cuda.is_available() == (dg.cuda.device_count() > 0)
    acc = dg.accelerator.current_accelerator()
    assert (acc is None) == (not dg.accelerator.is_available())
    x = dg.ones(2, 2).to(dg.device("cpu"))
    model = nn.Linear(2, 2).to(dg.device("cpu"))
    assert str(model(x).device) == "cpu"
    assert dg.zeros(2, device=dg.device("cpu")).shape == (2,)


def test_cuda_manual_seed_seeds_what_is_drawn():
    dg.cuda.manual_seed(3)
    a = dg.randn(4).numpy()
    dg.manual_seed(3)
    np.testing.assert_array_equal(a, dg.randn(4).numpy())
    dg.cuda.manual_seed_all(3)
    np.testing.assert_array_equal(a, dg.randn(4).numpy())


def test_out_keyword_writes_into_the_given_tensor():
    torch = pytest.importorskip("torch")
    a = RNG.standard_normal((2, 3)).astype(np.float32)
    b = RNG.standard_normal((2, 3)).astype(np.float32)
    for name in ["add", "sub", "mul", "div", "maximum", "minimum"]:
        out = dg.empty(2, 3)
        res = getattr(dg, name)(dg.from_numpy(a), dg.from_numpy(b), out=out)
        expected = getattr(torch, name)(torch.from_numpy(a), torch.from_numpy(b))
        assert res is out
        np.testing.assert_allclose(out.numpy(), expected.numpy(), rtol=1e-6)
    out = dg.empty(2, 2)
    dg.matmul(dg.from_numpy(a), dg.from_numpy(b).t(), out=out)
    np.testing.assert_allclose(out.numpy(), a @ b.T, rtol=1e-5)
    out = dg.empty(3)
    dg.sum(dg.from_numpy(a), 0, out=out)
    np.testing.assert_allclose(out.numpy(), a.sum(0), rtol=1e-6)
    out = dg.empty(4, 3)
    dg.cat([dg.from_numpy(a), dg.from_numpy(b)], out=out)
    np.testing.assert_array_equal(out.numpy(), np.concatenate([a, b]))
    values, indices = dg.empty(2), dg.zeros(2, dtype=dg.int64)
    dg.max(dg.from_numpy(a), 1, out=(values, indices))
    np.testing.assert_array_equal(indices.numpy(), a.argmax(1))
    c = a.copy()
    dg.exp(dg.from_numpy(c), out=dg.from_numpy(c))          # into its own input
    np.testing.assert_allclose(c, np.exp(a), rtol=1e-6)


def test_out_keyword_resizes_with_a_warning_and_refuses_what_pytorch_refuses():
    out = dg.zeros(1)
    with pytest.warns(UserWarning, match="resized"):
        dg.add(dg.ones(2, 2), 1, out=out)
    assert out.shape == (2, 2) and out.numpy().tolist() == [[2, 2], [2, 2]]
    empty = dg.zeros(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                 # an empty out resizes silently
        dg.ones(3, out=empty)
    assert empty.shape == (3,)
    w = Variable(dg.ones(2), requires_grad=True)
    with pytest.raises(RuntimeError, match="don't support automatic differentiation"):
        dg.mul(w, 2, out=dg.zeros(2))
    with pytest.raises(RuntimeError, match="can't be cast"):
        dg.add(dg.ones(2), 0.5, out=dg.zeros(2, dtype=dg.int64))


def test_new_factories_keep_dtype_and_device():
    torch = pytest.importorskip("torch")
    d, t = dg.ones(2, dtype=dg.float64), torch.ones(2, dtype=torch.float64)
    for name, args in [("new_zeros", (2, 3)), ("new_ones", ((2, 3),)), ("new_empty", (4,)),
                       ("new_full", ((2, 2), 7.5)), ("new_tensor", ([1, 2, 3],))]:
        dv, tv = getattr(d, name)(*args), getattr(t, name)(*args)
        assert dv.dtype == np.float64 and tuple(dv.shape) == tuple(tv.shape), name
        if name != "new_empty":
            np.testing.assert_array_equal(dv.numpy(), tv.numpy())
    assert d.new_zeros(2, dtype=dg.int64).dtype == np.int64
    assert d.new_ones(2, requires_grad=True).requires_grad
    src = [1.0, 2.0]
    copy = d.new_tensor(src)
    src[0] = 9
    assert copy.tolist() == [1.0, 2.0]


def test_format_of_a_0dim_tensor_is_the_number():
    torch = pytest.importorskip("torch")
    for value in [0.123456, 3.0, -2.5e-7]:
        d, t = dg.tensor(value), torch.tensor(value)
        for spec in ["{:.4f}", "{}", "{:8.3e}", "{:>10.2f}"]:
            assert spec.format(d) == spec.format(t), spec
    assert "{:d}".format(dg.tensor(7)) == "7"
    assert f"{dg.ones(2, 2).sum():.1f}" == "4.0"
    assert "FloatTensor of size 2" in "{}".format(dg.ones(2))    # not 0-dim: printed as before


# ---------------------------------------------------------------- missing pieces, added

def test_smooth_l1_loss_matches_pytorch_values_and_gradients():
    torch = pytest.importorskip("torch")
    x = RNG.standard_normal((5, 3)) * 2
    y = RNG.standard_normal((5, 3))
    for beta in [1.0, 0.5, 0.0, 3.0]:
        for reduction in ["mean", "sum", "none"]:
            dx = Variable(dg.tensor(x), requires_grad=True)
            tx = torch.tensor(x, requires_grad=True)
            dl = F.smooth_l1_loss(dx, dg.tensor(y), reduction=reduction, beta=beta)
            tl = torch.nn.functional.smooth_l1_loss(tx, torch.tensor(y), reduction=reduction,
                                                    beta=beta)
            np.testing.assert_allclose(_np(dl), tl.detach().numpy(), rtol=1e-10)
            dl.sum().backward()
            tl.sum().backward()
            np.testing.assert_allclose(_np(dx.grad), tx.grad.numpy(), rtol=1e-10)
    assert nn.SmoothL1Loss(beta=0.5)(dg.tensor(x), dg.tensor(y)).item() == pytest.approx(
        F.smooth_l1_loss(dg.tensor(x), dg.tensor(y), beta=0.5).item())
    assert dg.autograd.gradcheck(lambda a: F.smooth_l1_loss(a, dg.tensor(y), beta=0.7),
                                 [Variable(dg.tensor(x), requires_grad=True)])
    with pytest.raises(ValueError, match="beta"):
        F.smooth_l1_loss(dg.tensor(x), dg.tensor(y), beta=-1)


def test_dropout2d_zeroes_whole_channels_and_scales_the_rest():
    x = dg.ones(6, 5, 3, 4)
    layer = nn.Dropout2d(0.4)
    out = layer(x).numpy()
    per_channel = out.reshape(6, 5, -1)
    assert np.all(per_channel.min(-1) == per_channel.max(-1))      # a channel is all or nothing
    assert set(np.unique(out)) <= {0.0, np.float32(1 / 0.6)}
    assert 0 < (per_channel[..., 0] == 0).sum() < 30
    layer.eval()
    assert layer(x) is x
    unbatched = F.dropout2d(dg.ones(5, 3, 4), 0.5).numpy().reshape(5, -1)
    assert np.all(unbatched.min(-1) == unbatched.max(-1))
    with pytest.raises(nn.InputShapeError, match="dropout2d"):
        F.dropout2d(dg.ones(3, 4), 0.5)
    v = Variable(dg.randn(2, 3, 2, 2), requires_grad=True)
    dg.manual_seed(1)
    F.dropout2d(v, 0.5).sum().backward()
    dg.manual_seed(1)
    mask = F.dropout2d(dg.ones(2, 3, 2, 2), 0.5)
    np.testing.assert_array_equal(v.grad.numpy(), mask.numpy())


def test_dropout2d_on_a_sharded_batch_drops_what_a_single_process_drops():
    x = RNG.standard_normal((5, 3, 2, 2)).astype(np.float32)
    dg.manual_seed(4)
    local = F.dropout2d(dg.from_numpy(x), 0.5).numpy()
    dg.manual_seed(4)
    with dg.init(workers=2, backend="local") as cluster:
        out = F.dropout2d(cluster.shard(x), 0.5)
        np.testing.assert_array_equal(out.detach().numpy(), local)


def test_adadelta_steps_like_pytorch():
    torch = pytest.importorskip("torch")
    w0 = RNG.standard_normal((3, 4)).astype(np.float32)
    x = RNG.standard_normal((5, 3)).astype(np.float32)
    for kw in [dict(), dict(lr=0.5, rho=0.8, eps=1e-5, weight_decay=0.1), dict(maximize=True)]:
        dw = nn.Parameter(dg.from_numpy(w0.copy()))
        tw = torch.nn.Parameter(torch.from_numpy(w0.copy()))
        dopt, topt = dg.optim.Adadelta([dw], **kw), torch.optim.Adadelta([tw], **kw)
        for _ in range(4):
            for w, opt, lib in ((dw, dopt, dg), (tw, topt, torch)):
                opt.zero_grad()
                ((lib.from_numpy(x) @ w).tanh() ** 2).sum().backward()
                opt.step()
        np.testing.assert_allclose(dw.detach().numpy(), tw.detach().numpy(), rtol=1e-5,
                                   atol=1e-7, err_msg=str(kw))
    with pytest.raises(ValueError, match="rho"):
        dg.optim.Adadelta([nn.Parameter(dg.ones(1))], rho=1.5)


def test_bmm_rand_like_and_inference_mode():
    a, b = dg.randn(2, 3, 4), dg.randn(2, 4, 5)
    np.testing.assert_allclose(dg.bmm(a, b).numpy(), a.numpy() @ b.numpy(), rtol=1e-5)
    with pytest.raises(RuntimeError, match="3-D"):
        dg.bmm(dg.ones(3, 4), dg.ones(4, 5))
    r = dg.rand_like(dg.ones(3, 2, dtype=dg.float64))
    assert r.shape == (3, 2) and r.dtype == np.float64 and 0 <= r.numpy().min()
    w = Variable(dg.ones(2), requires_grad=True)
    with dg.inference_mode():
        assert not (w * 2).requires_grad


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("make", [lambda: np.ones((2, 3), np.float32), "torch"])
def test_a_foreign_array_into_a_module_is_a_type_error_that_says_how_to_convert(make):
    if make == "torch":
        torch = pytest.importorskip("torch")
        value, fix = torch.ones(2, 3), "dg.from_numpy(t.detach().cpu().numpy())"
    else:
        value, fix = make(), "dg.from_numpy(a)"
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU())
    with pytest.raises(TypeError, match="a distgrad tensor was expected") as err:
        model(value)
    assert fix in str(err.value) and "Sequential: input 0" in str(err.value)
    with pytest.raises(TypeError, match="a distgrad tensor was expected"):
        F.linear(value, dg.ones(2, 3))


@pytest.mark.parametrize("where,name,alternative", [
    ("nn", "LSTM", "nn.Linear"), ("utils.data", "DistributedSampler", "cluster=cluster"),
    ("optim", "RMSprop", "Adam"), ("", "compile", "run the model as it is"),
    ("optim.lr_scheduler", "ReduceLROnPlateau", None), ("nn.functional", "gelu", None)])
def test_a_pytorch_feature_we_lack_is_one_clear_error_with_the_alternative(where, name,
                                                                             alternative):
    module = dg
    for part in filter(None, where.split(".")):
        module = getattr(module, part)
    torch_name = ".".join(filter(None, ["torch", where, name]))
    with pytest.raises(MissingFeatureError) as err:
        getattr(module, name)
    message = str(err.value)
    assert message.startswith(torch_name) and "PyTorch feature distgrad does not have" in message
    assert (alternative or "compatibility table") in message
    assert not hasattr(module, name)                     # still an AttributeError for hasattr


def test_a_typo_is_not_called_a_pytorch_feature():
    with pytest.raises(AttributeError, match="torch.nn.Lineer is not in distgrad.nn"):
        dg.nn.Lineer
