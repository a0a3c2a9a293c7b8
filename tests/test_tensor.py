"""Tensors and Variables: factories, dtypes, storage sharing, conversion, printing, devices."""
import os
import re

import numpy as np
import pytest

import distgrad as dg
from distgrad._backend import DeviceError
from distgrad.autograd import Variable

# A copy of ../shared/seed/autograd_tutorial.txt, so the suite runs wherever it is checked out.
SEED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "autograd_tutorial.txt")


def _has_gpu():
    try:
        dg._backend.cupy_module()
        return True
    except DeviceError:
        return False


# ---------------------------------------------------------------- factories and dtypes

@pytest.mark.parametrize("make", [dg.ones, dg.zeros, dg.randn, dg.rand, dg.empty])
def test_shape_factories(make):
    for args in [(2, 3), ((2, 3),), ([2, 3],)]:
        t = make(*args)
        assert t.shape == (2, 3) and t.size() == dg.Size([2, 3]) and t.dtype == np.float32
        assert not t.requires_grad and t.is_leaf and t.device == "cpu"
    assert make(3, dtype=dg.float64).dtype == np.float64
    assert make(2, requires_grad=True).requires_grad


def test_factory_values():
    np.testing.assert_array_equal(dg.ones(2, 2).numpy(), np.ones((2, 2)))
    np.testing.assert_array_equal(dg.zeros(3).numpy(), np.zeros(3))
    r = dg.rand(1000).numpy()
    assert r.min() >= 0 and r.max() < 1 and 0.4 < r.mean() < 0.6
    n = dg.randn(4000).numpy()
    assert abs(n.mean()) < 0.1 and 0.9 < n.std() < 1.1
    np.testing.assert_array_equal(dg.full((2,), 7.0).numpy(), [7.0, 7.0])
    np.testing.assert_array_equal(dg.eye(2).numpy(), np.eye(2))


def test_arange():
    a = dg.arange(5)
    assert a.dtype == np.int64
    np.testing.assert_array_equal(a.numpy(), np.arange(5))
    b = dg.arange(0.0, 1.0, 0.25)
    assert b.dtype == np.float32
    np.testing.assert_array_equal(b.numpy(), [0.0, 0.25, 0.5, 0.75])
    np.testing.assert_array_equal(dg.arange(2, 8, 3).numpy(), [2, 5])


def test_tensor_factory_dtypes_and_copy():
    assert dg.tensor([[1.0, 2.0], [3.0, 4.0]]).dtype == np.float32
    assert dg.tensor(1.5).dtype == np.float32 and dg.tensor(1.5).shape == ()
    assert dg.tensor([1, 2]).dtype == np.int64
    assert dg.tensor([True, False]).dtype == np.bool_
    assert dg.tensor([1, 2], dtype=dg.float64).dtype == np.float64
    assert dg.tensor(np.float64(1.5)).dtype == np.float64        # numpy scalars keep theirs
    assert dg.tensor(np.float32(1.5)).dtype == np.float32
    src = np.arange(3.0)
    t = dg.tensor(src)
    assert t.dtype == np.float64               # numpy arrays keep their dtype
    src[0] = 100
    assert t.numpy()[0] == 0                   # dg.tensor copies
    u = dg.tensor(t)
    u.add_(1)
    assert t.numpy()[1] == 1.0


def test_unsupported_dtypes_are_rejected():
    for bad in (lambda: dg.tensor(["a", "b"]), lambda: dg.tensor([None, 1.0]),
                lambda: dg.from_numpy(np.array(["x"])), lambda: dg.tensor([1], dtype="U2")):
        with pytest.raises(TypeError, match="unsupported dtype"):
            bad()


def test_from_numpy_shares_memory():
    a = np.zeros(3, dtype=np.float32)
    t = dg.from_numpy(a)
    assert t.dtype == np.float32
    a[1] = 5
    assert t.numpy()[1] == 5
    t.add_(1)
    np.testing.assert_array_equal(a, [1, 6, 1])
    assert dg.from_numpy(np.ones(2)).dtype == np.float64
    with pytest.raises(TypeError, match="numpy.ndarray"):
        dg.from_numpy([1.0, 2.0])


def test_typed_tensor_constructors():
    g = dg.FloatTensor([0.1, 1.0, 0.0001])
    assert g.dtype == np.float32 and g.shape == (3,)
    np.testing.assert_allclose(g.numpy(), [0.1, 1.0, 0.0001], rtol=1e-7)
    z = dg.FloatTensor(2, 3)
    assert z.shape == (2, 3) and z.dtype == np.float32
    np.testing.assert_array_equal(z.numpy(), np.zeros((2, 3)))
    assert dg.FloatTensor([[1, 2]]).dtype == np.float32        # ints become floats
    assert dg.DoubleTensor([1.0]).dtype == np.float64
    assert dg.LongTensor([1.7]).dtype == np.int64
    assert dg.LongTensor(4).shape == (4,)


def test_manual_seed_reproducibility():
    dg.manual_seed(123)
    a, b = dg.randn(5).numpy().copy(), dg.rand(2, 2).numpy().copy()
    c = dg.randn(5).numpy().copy()
    dg.manual_seed(123)
    np.testing.assert_array_equal(dg.randn(5).numpy(), a)
    np.testing.assert_array_equal(dg.rand(2, 2).numpy(), b)
    assert not np.array_equal(a, c)
    dg.manual_seed(124)
    assert not np.array_equal(dg.randn(5).numpy(), a)


def test_dtype_names_and_casts():
    assert dg.float32 is np.float32 and dg.float64 is np.float64 and dg.long is np.int64
    x = dg.ones(2)
    assert x.double().dtype == np.float64 and x.long().dtype == np.int64
    assert x.to(dg.float64).dtype == np.float64 and x.float() is x
    assert x.type() == "distgrad.FloatTensor" and x.double().type() == "distgrad.DoubleTensor"
    assert dg.tensor([1]).type() == "distgrad.LongTensor"


# ---------------------------------------------------------------- Variable and .data

def test_variable_attributes():
    x = Variable(dg.ones(2, 2), requires_grad=True)
    assert x.grad is None and x.requires_grad and x.volatile is False
    assert x.is_leaf and x.grad_fn is None
    assert x.shape == (2, 2) and x.dtype == np.float32 and x.dim() == 2 and x.numel() == 4
    assert isinstance(x, dg.Tensor) and isinstance(x.data, dg.Tensor)
    assert not isinstance(x.data, Variable)


def test_data_shares_storage():
    t = dg.zeros(2, 2)
    x = Variable(t, requires_grad=True)
    assert x.data._store is t._store           # Variable(tensor) wraps, no copy
    x.data.add_(1)                             # not recorded, not an error
    np.testing.assert_array_equal(t.numpy(), np.ones((2, 2)))
    x.data[0, 1] = 7.0
    assert x.detach().numpy()[0, 1] == 7.0
    assert not x.data.requires_grad and x.data.grad_fn is None
    x.data = dg.full((2, 2), 3.0)
    np.testing.assert_array_equal(x.detach().numpy(), np.full((2, 2), 3.0))
    assert x.requires_grad


def test_data_has_tensor_methods():
    x = Variable(dg.tensor([3.0, 4.0]), requires_grad=True)
    assert abs(x.data.norm().item() - 5.0) < 1e-6
    assert x.data.size() == (2,) and x.data.size(0) == 2 and x.size(-1) == 2
    assert bool(x.data.norm() < 1000) and not bool(x.data.norm() > 1000)
    np.testing.assert_array_equal(x.data.numpy(), [3.0, 4.0])


def test_numpy_and_item():
    t = dg.tensor([[1.5, 2.0]])
    a = t.numpy()
    assert isinstance(a, np.ndarray) and a.dtype == np.float32
    a[0, 0] = 9                                 # numpy() shares memory, like torch
    assert t[0, 0].item() == 9
    x = Variable(t, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"detach\(\)\.numpy\(\)"):
        x.numpy()
    assert x.detach().numpy() is not None
    v = dg.tensor([2.5])
    assert v.item() == 2.5 and isinstance(v.item(), float)
    assert dg.tensor(3).item() == 3 and isinstance(dg.tensor(3).item(), int)
    assert float(v) == 2.5 and int(dg.tensor([7])) == 7
    with pytest.raises(ValueError, match=r"one element.*\(1, 2\)"):
        t.item()
    with pytest.raises(RuntimeError, match="ambiguous"):
        bool(t)
    assert t.tolist() == [[9.0, 2.0]]
    np.testing.assert_array_equal(np.asarray(t), [[9.0, 2.0]])


def test_size_and_shape():
    t = dg.ones(2, 3, 4)
    assert t.size() == (2, 3, 4) and isinstance(t.size(), dg.Size) and t.size(1) == 3
    assert repr(t.size()) == "distgrad.Size([2, 3, 4])" and t.size().numel() == 24
    assert len(t) == 2 and t.ndim == 3 and t.nelement() == 24


# ---------------------------------------------------------------- printing

def _seed_blocks():
    """Every printed FloatTensor in the seed tutorial: (values text, size text)."""
    with open(SEED, encoding="utf-8") as f:
        text = f.read()
    pattern = re.compile(r"((?:^[ \-\d.e+]+\n)+)\[torch\.FloatTensor of size ([\dx]+)\]", re.M)
    return pattern.findall(text)


def _from_block(values, size):
    shape = tuple(int(n) for n in size.split("x"))
    nums = [float(v) for v in values.split()]
    return dg.FloatTensor(nums).reshape(*shape)


def test_seed_has_blocks_to_check():
    sizes = [s for _, s in _seed_blocks()]
    assert sizes.count("2x2") >= 4 and sizes.count("3") >= 4 and "1" in sizes


@pytest.mark.parametrize("values,size", _seed_blocks())
def test_printing_matches_the_seed(values, size):
    """Same numbers as the seed printed give the seed's text, torch -> distgrad."""
    t = _from_block(values, size)
    body = values + f"[distgrad.FloatTensor of size {size}]"
    assert repr(Variable(t)) == "Variable containing:\n" + body
    assert repr(t) == "\n" + body + "\n"
    assert str(Variable(t)) == repr(Variable(t))


def test_printing_exact_examples():
    assert repr(Variable(dg.ones(2, 2))) == \
        "Variable containing:\n 1  1\n 1  1\n[distgrad.FloatTensor of size 2x2]"
    assert repr(dg.ones(2, 2)) == "\n 1  1\n 1  1\n[distgrad.FloatTensor of size 2x2]\n"
    assert repr(Variable(dg.full((2, 2), 4.5))) == \
        "Variable containing:\n 4.5000  4.5000\n 4.5000  4.5000\n[distgrad.FloatTensor of size 2x2]"
    assert repr(dg.tensor([1, -2])) == "\n 1\n-2\n[distgrad.LongTensor of size 2]\n"
    assert repr(dg.ones(2, dtype=dg.float64)).endswith("[distgrad.DoubleTensor of size 2]\n")
    assert repr(dg.zeros(0)) == "\n[distgrad.FloatTensor with no elements]\n"


def test_printing_wide_ranges_uses_scientific_notation():
    s = repr(dg.FloatTensor([1e-5, 1.0, 12345678.0]))
    assert "e-05" in s and "e+07" in s
    assert repr(dg.FloatTensor([0.5, 123.25])).splitlines()[1:3] == ["   0.5000", " 123.2500"]


def test_printing_higher_dims_shows_every_matrix():
    t = dg.arange(8.0).reshape(2, 2, 2)
    s = repr(t)
    assert "(0,.,.) =" in s and "(1,.,.) =" in s and "of size 2x2x2" in s
    for v in range(8):
        assert f" {v}" in s


def test_grad_fn_prints_like_a_node():
    x = Variable(dg.ones(2, 2), requires_grad=True)
    assert re.fullmatch(r"<distgrad\.autograd\.AddBackward object at 0x[0-9a-f]+>", repr((x + 2).grad_fn))


# ---------------------------------------------------------------- devices

def test_cpu_device_is_numpy():
    t = dg.ones(2, device="cpu")
    assert t.device == "cpu" and not t.is_cuda and isinstance(t._store.array, np.ndarray)
    assert t.cpu() is t and t.to("cpu") is t
    assert dg.tensor([1.0], device="cpu").device == "cpu"


def test_unknown_device_is_an_error():
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        dg.ones(2, device="tpu")
    with pytest.raises(ValueError, match="unknown device"):
        dg.ones(2).to("tpu:0")


@pytest.mark.skipif(_has_gpu(), reason="this machine has a GPU")
def test_cuda_without_gpu_is_one_clear_error():
    x = Variable(dg.ones(2), requires_grad=True)
    for request in (lambda: x.to("cuda"), lambda: x.cuda(), lambda: dg.ones(2, device="cuda"),
                    lambda: dg.tensor([1.0], device="cuda:0"), lambda: dg.randn(2, device="cuda"),
                    lambda: Variable(dg.ones(2), device="cuda")):
        with pytest.raises(DeviceError, match=r"(?i)cupy.*GPU|GPU.*cupy") as e:
            request()
        assert isinstance(e.value, RuntimeError)      # catchable as a RuntimeError too
    assert x.grad is None and x.device == "cpu"


def test_import_does_not_load_cupy_or_ray():
    import subprocess
    import sys
    code = ("import sys, distgrad as dg; x = dg.ones(2) * 2; "
            "print('cupy' in sys.modules, 'ray' in sys.modules)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                         env={**os.environ, "PYTHONPATH": root}, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


@pytest.mark.gpu
def test_cuda_tensors_and_round_trip():
    cp = dg._backend.cupy_module()
    t = dg.ones(2, 3, device="cuda")
    assert t.is_cuda and t.device == "cuda" and isinstance(t._store.array, cp.ndarray)
    assert t.type() == "distgrad.cuda.FloatTensor" and "distgrad.cuda.FloatTensor" in repr(t)
    back = t.cpu()
    assert back.device == "cpu"
    np.testing.assert_array_equal(back.numpy(), np.ones((2, 3)))
    assert dg.tensor([1.0, 2.0]).cuda().is_cuda
    with pytest.raises(TypeError, match="cpu"):
        t.numpy()
    assert t.sum().item() == 6.0


@pytest.mark.gpu
def test_cuda_backward_keeps_gradients_on_the_device():
    x = Variable(dg.randn(3, 4, dtype=dg.float64).cuda(), requires_grad=True)
    w = Variable(dg.randn(4, 2, dtype=dg.float64, device="cuda"), requires_grad=True)
    loss = (x @ w).tanh().sum()
    loss.backward()
    assert x.grad.is_cuda and w.grad.is_cuda
    xc = Variable(x.detach().cpu(), requires_grad=True)
    wc = Variable(w.detach().cpu(), requires_grad=True)
    (xc @ wc).tanh().sum().backward()
    np.testing.assert_allclose(x.grad.cpu().numpy(), xc.grad.numpy(), rtol=1e-10)
    np.testing.assert_allclose(w.grad.cpu().numpy(), wc.grad.numpy(), rtol=1e-10)
    y = x * 2
    y.backward(dg.ones(3, 4, dtype=dg.float64))        # a CPU gradient for a CUDA output
    assert x.grad.is_cuda


@pytest.mark.gpu
def test_gradient_flows_across_devices():
    x = Variable(dg.randn(3, dtype=dg.float64), requires_grad=True)
    (x.cuda() * 3).cpu().sum().backward()
    assert x.grad.device == "cpu"
    np.testing.assert_allclose(x.grad.numpy(), [3.0] * 3)


@pytest.mark.gpu
def test_mixing_devices_is_an_error():
    with pytest.raises(RuntimeError, match="one device"):
        dg.ones(2) + dg.ones(2, device="cuda")


def test_clone_keeps_the_memory_layout():
    """As PyTorch's clone (preserve_format): a column-major tensor clones column-major."""
    t = dg.from_numpy(np.asfortranarray(np.arange(6.0).reshape(2, 3)))
    c = t.clone()
    assert c.numpy().flags.f_contiguous
    np.testing.assert_array_equal(c.numpy(), t.numpy())
