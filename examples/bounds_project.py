"""Bounds as a projection: clamp into the bounds after every optimizer step.

Run: ``python examples/bounds_project.py``
"""

import torch

from parambounds import Bounds
from parambounds.demo import SPEC, make_data, make_net, parameters, task_loss

torch.set_num_threads(1)  # small tensors: one thread is fastest, and steady on a busy machine

bounds = Bounds(SPEC)
x, y = make_data()
net = make_net()
opt = torch.optim.Adam(parameters(net), lr=2e-3)
handle = bounds.attach(opt, net)  # projects after each opt.step(); handle.remove() stops it
for _ in range(60):
    opt.zero_grad()
    loss, accuracy = task_loss(net, x, y)
    loss.backward()
    opt.step()
    bounds.check(net)  # raises BoundsViolationError if anything were outside
print(f"loss {loss.item():.3f}, accuracy {accuracy:.2f}")
print(bounds.report(net))
