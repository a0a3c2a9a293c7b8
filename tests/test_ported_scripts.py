"""Tutorial-style PyTorch scripts of 2017-2025 (written here in their styles), run twice:
as PyTorch code, and with only their imports swapped to distgrad. Both runs start from
the same weights and data and must print and compute the same numbers (1e-5 relative,
float32, a few steps).

Each script gets ``X``/``Y`` (numpy data) and ``sync(model)`` from the harness: ``sync``
records the PyTorch model's initial weights and loads them into the distgrad one. Only
where PyTorch itself dropped a 0.3 idiom (``loss.data[0]`` on a 0-dim loss) does the
PyTorch run get the modern spelling; distgrad runs the script as written.
"""
import contextlib
import io
import re
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import distgrad as dg  # noqa: E402

RNG = np.random.default_rng(2017)

# ---------------------------------------------------------------- 2017: PyTorch 0.3
SCRIPT_03 = '''
import torch
from torch.autograd import Variable

dtype = torch.FloatTensor
N, D_in, H, D_out = 16, 10, 12, 3

x = Variable(torch.from_numpy(X).type(dtype), requires_grad=False)
y = Variable(torch.from_numpy(Y).type('torch.FloatTensor'), requires_grad=False)
model = torch.nn.Sequential(torch.nn.Linear(D_in, H), torch.nn.ReLU(), torch.nn.Linear(H, D_out))
sync(model)
loss_fn = torch.nn.MSELoss(size_average=False)
learning_rate = 1e-3
history = torch.FloatTensor(5).zero_()
scratch = torch.Tensor(5, 3)
for t in range(5):
    y_pred = model(x)
    loss = loss_fn(y_pred, y)
    print(t, loss.data[0])
    history[t] = loss.data[0]
    model.zero_grad()
    loss.backward()
    for param in model.parameters():
        param.data -= learning_rate * param.grad.data
result = history
'''

# ---------------------------------------------------------------- 2018: PyTorch 0.4 MNIST example
SCRIPT_04 = '''
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim
from torch.utils.data import DataLoader, TensorDataset


class Net(nn.Module):
    def __init__(self):
        super(Net, self).__init__()
        self.conv1 = nn.Conv2d(1, 4, kernel_size=3)
        self.conv1_drop = nn.Dropout2d(P_DROP)
        self.fc1 = nn.Linear(4 * 5 * 5, 16)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(F.max_pool2d(self.conv1_drop(self.conv1(x)), 2))
        x = x.view(-1, 4 * 5 * 5)
        x = F.relu(self.fc1(x))
        return F.log_softmax(self.fc2(x), dim=1)


use_cuda = torch.cuda.is_available()
device = torch.device("cuda" if use_cuda else "cpu")
torch.manual_seed(1)
kwargs = {'num_workers': 0, 'pin_memory': True} if use_cuda else {}
dataset = TensorDataset(torch.from_numpy(X), torch.from_numpy(Y))
train_loader = DataLoader(dataset, batch_size=16, shuffle=False, **kwargs)
test_loader = DataLoader(dataset, batch_size=32, shuffle=False, **kwargs)
model = Net().to(device)
sync(model)
optimizer = optim.Adadelta(model.parameters(), lr=1.0)
result = []
for epoch in range(1, 3):
    model.train()
    for batch_idx, (data, target) in enumerate(train_loader):
        data, target = data.to(device), target.to(device)
        optimizer.zero_grad()
        output = model(data)
        loss = F.nll_loss(output, target)
        loss.backward()
        optimizer.step()
        result.append(loss.item())
        if batch_idx % 2 == 0:
            print('Train Epoch: {} [{}/{}]\\tLoss: {:.6f}'.format(
                epoch, batch_idx * len(data), len(train_loader.dataset), loss.item()))
model.eval()
test_loss = 0
correct = 0
with torch.no_grad():
    for data, target in test_loader:
        data, target = data.to(device), target.to(device)
        output = model(data)
        test_loss += F.nll_loss(output, target, size_average=False).item()
        pred = output.max(1, keepdim=True)[1]
        correct += pred.eq(target.view_as(pred)).sum().item()
test_loss /= len(test_loader.dataset)
print('Test set: Average loss: {:.4f}, Accuracy: {}/{}'.format(
    test_loss, correct, len(test_loader.dataset)))
result.append(test_loss)
'''

# ---------------------------------------------------------------- 2025: PyTorch 2.x
SCRIPT_2X = '''
import torch
from torch import nn
from torch.utils.data import Dataset, DataLoader

device = torch.accelerator.current_accelerator().type if torch.accelerator.is_available() else "cpu"
print(f"Using {device} device")


class Pairs(Dataset):
    def __init__(self, xs, ys):
        self.xs, self.ys = xs, ys

    def __len__(self):
        return len(self.xs)

    def __getitem__(self, i):
        return {"x": self.xs[i], "y": self.ys[i]}


loader = DataLoader(Pairs(X, Y), batch_size=8, shuffle=False, drop_last=False)
model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).to(device)
sync(model)
loss_fn = nn.SmoothL1Loss(beta=0.5)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
total = torch.zeros(1)
result = []
for epoch in range(2):
    model.train()
    for batch in loader:
        x, y = batch["x"].to(device), batch["y"].to(device)
        pred = model(x)
        loss = loss_fn(pred, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        torch.add(total, loss.detach(), out=total)
        result.append(float('{:.10f}'.format(loss)))
        print(f"loss: {loss.item():>7f}")
mask = pred.new_ones(pred.shape[0], dtype=torch.bool)
padding = pred.new_zeros(2, 2) + pred.new_full((2, 2), 0.5)
result.append(total.item() + padding.sum().item() + mask.sum().item())
'''

# ---------------------------------------------------------------- DataParallel / DDP wrappers
SCRIPT_PARALLEL = '''
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim
from torch.utils.data import DataLoader, TensorDataset


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


net = MLP()
sync(net)
model = WRAP(net)
optimizer = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
loader = DataLoader(TensorDataset(torch.from_numpy(X), torch.from_numpy(Y)), batch_size=10)
result = []
for epoch in range(2):
    for step, (data, target) in enumerate(loader):
        output = model(data)
        loss = F.cross_entropy(output, target)
        if step % 2 == 0:
            with model.no_sync():          # accumulate two batches per update
                loss.backward()
            continue
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        result.append(loss.item())
print(model.module.fc1.weight.shape)
'''


def _port(source):
    """Swap only the import lines, as a user would: ``torch`` becomes ``distgrad``."""
    lines = []
    for line in source.split("\n"):
        if line.strip() == "import torch":
            line = line.replace("import torch", "import distgrad as torch")
        elif re.match(r"\s*(import|from) torch\b", line):
            line = re.sub(r"\btorch\b", "distgrad", line)
        lines.append(line)
    return "\n".join(lines)


def _run(source, weights, **names):
    """Run a script with its data and ``sync``; return (namespace, printed text)."""
    def sync(model):
        state = model.state_dict()
        if not weights:                             # the PyTorch run goes first
            weights.update({k: v.detach().numpy().copy() for k, v in state.items()})
        else:
            model.load_state_dict({k: dg.from_numpy(v.copy()) for k, v in weights.items()})
    ns, out = dict(names, sync=sync), io.StringIO()
    with contextlib.redirect_stdout(out), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(source, "ported_script", "exec"), ns)
    return ns, out.getvalue()


def _numbers(text):
    return [float(v) for v in re.findall(r"-?\d+\.\d+(?:e-?\d+)?", text)]


def _both(script, torch_fixes=(), **names):
    torch.manual_seed(0)
    weights = {}
    tsrc = script
    for old, new in torch_fixes:
        tsrc = tsrc.replace(old, new)
    tns, tout = _run(tsrc, weights, **names)
    dsrc = _port(script)
    assert "import torch\n" not in dsrc and "from torch" not in dsrc
    dns, dout = _run(dsrc, weights, **names)
    return tns, tout, dns, dout


def _close(a, b):
    np.testing.assert_allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64),
                               rtol=1e-5, atol=1e-6)


def _as_list(v):
    return v.tolist() if hasattr(v, "tolist") else list(v)


def test_port_changes_only_import_lines():
    ported = _port(SCRIPT_2X)
    assert "import distgrad as torch" in ported and "from distgrad import nn" in ported
    assert "from distgrad.utils.data import Dataset, DataLoader" in ported
    changed = [(a, b) for a, b in zip(SCRIPT_2X.split("\n"), ported.split("\n")) if a != b]
    assert all(a.lstrip().startswith(("import", "from")) for a, _ in changed)


def test_pytorch_03_script_with_variables_data0_size_average_and_legacy_types():
    X = RNG.standard_normal((16, 10)).astype(np.float32)
    Y = RNG.standard_normal((16, 3)).astype(np.float32)
    tns, tout, dns, dout = _both(SCRIPT_03, [(".data[0]", ".item()")], X=X, Y=Y)
    _close(_as_list(dns["result"]), _as_list(tns["result"]))
    _close(_numbers(dout), _numbers(tout))
    assert len(_numbers(dout)) == 5 and tuple(dns["scratch"].shape) == (5, 3)


def test_pytorch_04_mnist_example_with_loaders_devices_adadelta_and_dropout2d():
    X = RNG.uniform(0, 1, (40, 1, 12, 12)).astype(np.float32)
    Y = RNG.integers(0, 10, 40)
    tns, tout, dns, dout = _both(SCRIPT_04, X=X, Y=Y, P_DROP=0.0)
    _close(dns["result"], tns["result"])
    assert dout.splitlines()[-1].split("Accuracy")[1] == tout.splitlines()[-1].split("Accuracy")[1]
    _close(_numbers(dout), _numbers(tout))
    assert isinstance(dns["model"].conv1_drop, dg.nn.Dropout2d)


def test_pytorch_04_mnist_example_trains_with_dropout2d_on():
    X = RNG.uniform(0, 1, (40, 1, 12, 12)).astype(np.float32)
    Y = RNG.integers(0, 10, 40)
    dns, dout = _run(_port(SCRIPT_04), {}, X=X, Y=Y, P_DROP=0.25)
    assert "Test set: Average loss" in dout and np.all(np.isfinite(dns["result"]))


def test_pytorch_2x_script_with_accelerator_dict_batches_smooth_l1_out_and_new():
    X = RNG.standard_normal((21, 4)).astype(np.float32)      # 21 = 2 batches of 8 and one of 5
    Y = RNG.standard_normal((21, 2)).astype(np.float32)
    tns, tout, dns, dout = _both(SCRIPT_2X, X=X, Y=Y)
    assert dout.splitlines()[0] == tout.splitlines()[0] == "Using cpu device"
    _close(dns["result"], tns["result"])
    _close(_numbers(dout), _numbers(tout))
    assert len(dns["result"]) == 7


@pytest.mark.parametrize("workers", [2, 3])
@pytest.mark.parametrize("wrap", ["nn.DataParallel", "nn.parallel.DistributedDataParallel"])
def test_data_parallel_scripts_train_as_one_pytorch_process(wrap, workers):
    X = RNG.standard_normal((47, 6)).astype(np.float32)      # batches of 10 and a last one of 7
    Y = RNG.integers(0, 3, 47)
    script = SCRIPT_PARALLEL.replace("WRAP(net)", f"{wrap}(net)")
    weights = {}
    # PyTorch without a process group: the plain model, and no_sync as a null context.
    plain = script.replace(f"{wrap}(net)", "net").replace("model.no_sync()", "torch.enable_grad()")
    tns, tout = _run(plain.replace("model.module.", "model."), weights, X=X, Y=Y)
    with dg.init(workers=workers, backend="local"):
        dns, dout = _run(_port(script), weights, X=X, Y=Y)
    _close(dns["result"], tns["result"])
    assert dout.strip() == tout.strip().replace("torch.Size", "distgrad.Size")


def test_sharded_loader_script_trains_as_one_pytorch_process():
    """The DDP loop users write by hand, in distgrad: one loader argument, nothing else."""
    X = RNG.standard_normal((47, 6)).astype(np.float32)
    Y = RNG.integers(0, 3, 47)
    script = SCRIPT_PARALLEL.replace("WRAP(net)", "net")
    weights = {}
    tns, _ = _run(script.replace("model.no_sync()", "torch.enable_grad()")
                  .replace("model.module.", "model."), weights, X=X, Y=Y)
    with dg.init(workers=3, backend="local") as cluster:
        sharded = _port(script).replace("model = net", "model = cluster.replicate(net)").replace(
            "batch_size=10)", "batch_size=10, cluster=cluster)").replace(
            "model.no_sync()", "torch.enable_grad()").replace("model.module.", "model.")
        dns, _ = _run(sharded, weights, X=X, Y=Y, cluster=cluster)
    _close(dns["result"], tns["result"])
