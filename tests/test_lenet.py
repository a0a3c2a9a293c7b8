"""The LeNet example of the classic PyTorch "Neural Networks" tutorial, run on distgrad.

The tutorial's code is kept verbatim below with its PyTorch imports; the test swaps
only the import lines (as a user porting it would) and runs it.
"""
import contextlib
import io

import numpy as np
import pytest

TUTORIAL = '''
import torch
from torch.autograd import Variable
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim


class Net(nn.Module):

    def __init__(self):
        super(Net, self).__init__()
        # 1 input image channel, 6 output channels, 5x5 square convolution
        # kernel
        self.conv1 = nn.Conv2d(1, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        # an affine operation: y = Wx + b
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        # Max pooling over a (2, 2) window
        x = F.max_pool2d(F.relu(self.conv1(x)), (2, 2))
        # If the size is a square you can only specify a single number
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = x.view(-1, self.num_flat_features(x))
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        x = self.fc3(x)
        return x

    def num_flat_features(self, x):
        size = x.size()[1:]  # all dimensions except the batch dimension
        num_features = 1
        for s in size:
            num_features *= s
        return num_features


net = Net()
print(net)

params = list(net.parameters())
print(len(params))
print(params[0].size())  # conv1's .weight

input = Variable(torch.randn(1, 1, 32, 32))
out = net(input)
print(out)

net.zero_grad()
out.backward(torch.randn(1, 10))

output = net(input)
target = Variable(torch.arange(1, 11))  # a dummy target, for example
target = target.view(1, -1)  # make it the same shape as output
criterion = nn.MSELoss()

loss = criterion(output, target)
print(loss)

print(loss.grad_fn)  # MSELoss
print(loss.grad_fn.next_functions[0][0])  # Linear
print(loss.grad_fn.next_functions[0][0].next_functions[0][0])  # ReLU

net.zero_grad()     # zeroes the gradient buffers of all parameters

print('conv1.bias.grad before backward')
print(net.conv1.bias.grad)

loss.backward()

print('conv1.bias.grad after backward')
print(net.conv1.bias.grad)

learning_rate = 0.01
for f in net.parameters():
    f.data.sub_(f.grad.data * learning_rate)

# create your optimizer
optimizer = optim.SGD(net.parameters(), lr=0.01)

# in your training loop:
optimizer.zero_grad()   # zero the gradient buffers
output = net(input)
loss = criterion(output, target)
loss.backward()
optimizer.step()    # Does the update
'''

# The only change a user makes: the import lines.
IMPORTS_TORCH = """import torch
from torch.autograd import Variable
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim
"""
IMPORTS_DISTGRAD = """import distgrad as torch
from distgrad.autograd import Variable
import distgrad.nn as nn
import distgrad.nn.functional as F
import distgrad.optim as optim
"""


def _run(source):
    ns, out = {}, io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(source, "lenet_tutorial", "exec"), ns)
    return ns, out.getvalue()


def test_tutorial_runs_with_only_imports_changed():
    source = TUTORIAL.replace(IMPORTS_TORCH, IMPORTS_DISTGRAD)
    assert source != TUTORIAL and "import torch\n" not in source
    ns, printed = _run(source)
    assert "Conv2d(1, 6, kernel_size=(5, 5), stride=(1, 1))" in printed
    assert "distgrad.Size([6, 1, 5, 5])" in printed
    assert "conv1.bias.grad before backward\nNone" in printed
    net, loss = ns["net"], ns["loss"]
    assert len(ns["params"]) == 10
    assert tuple(ns["out"].shape) == (1, 10)
    assert np.isfinite(loss.item())
    assert tuple(net.conv1.bias.grad.shape) == (6,)


def test_tutorial_matches_pytorch_with_the_same_weights():
    """Both tutorials from the same weights and input: same outputs and one SGD step alike."""
    torch = pytest.importorskip("torch")
    import distgrad as dg
    tns, _ = _run(TUTORIAL.split("net = Net()")[0])
    dns, _ = _run(TUTORIAL.replace(IMPORTS_TORCH, IMPORTS_DISTGRAD).split("net = Net()")[0])
    tnet, dnet = tns["Net"](), dns["Net"]()
    dnet.load_state_dict({k: dg.from_numpy(v.detach().numpy().copy())
                          for k, v in tnet.state_dict().items()})
    x = np.random.default_rng(0).standard_normal((4, 1, 32, 32)).astype(np.float32)
    target = np.arange(40, dtype=np.float32).reshape(4, 10) / 40
    topt = torch.optim.SGD(tnet.parameters(), lr=0.01, momentum=0.9)
    dopt = dns["optim"].SGD(dnet.parameters(), lr=0.01, momentum=0.9)
    for _ in range(3):
        for net, opt, lib, nn in ((tnet, topt, torch, tns["nn"]), (dnet, dopt, dg, dns["nn"])):
            opt.zero_grad()
            loss = nn.MSELoss()(net(lib.from_numpy(x)), lib.from_numpy(target))
            loss.backward()
            opt.step()
    for (name, tp), dp in zip(tnet.named_parameters(), dnet.parameters()):
        np.testing.assert_allclose(dp.detach().numpy(), tp.detach().numpy(), rtol=1e-4, atol=1e-5,
                                   err_msg=name)
