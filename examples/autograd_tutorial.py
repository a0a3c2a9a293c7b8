"""The classic "Autograd: automatic differentiation" tutorial, on distgrad.

Only the two import lines differ from the original (../shared/seed/autograd_tutorial.txt).
Run: python examples/autograd_tutorial.py   (or: distgrad tutorial)
"""
import distgrad as torch
from distgrad.autograd import Variable

x = Variable(torch.ones(2, 2), requires_grad=True)
print(x)

print("data: ", x.data)
print("grad: ", x.grad)
print("requires_grad", x.requires_grad)
print("volatile", x.volatile)
print("is_leaf", x.is_leaf)
print("grad_fn", x.grad_fn)

y = x + 2
print(y)

print(y.grad_fn)

z = y * y * 3
out = z.mean()

print(z, out)

out.backward()

print(x.grad)

x = torch.randn(3)
print(x)
x = Variable(x, requires_grad=True)

y = x * 2

c = 0
while y.data.norm() < 1000:
    y = y * 2
    c += 1

print(y)
print(c)

gradients = torch.FloatTensor([0.1, 1.0, 0.0001])
print(gradients)
y.backward(gradients)

print(x.grad)
