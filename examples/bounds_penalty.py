"""Bounds as a penalty: add ``bounds.cost(net)`` to the loss (Rockpool's approach).

Run: ``python examples/bounds_penalty.py``
"""

import torch

from parambounds import Bounds
from parambounds.demo import SPEC, make_data, make_net, parameters, task_loss

torch.set_num_threads(1)  # small tensors: one thread is fastest, and steady on a busy machine

bounds = Bounds(SPEC)  # declared once, by name
x, y = make_data()
net = make_net()
opt = torch.optim.Adam(parameters(net), lr=2e-3)
for _ in range(60):
    opt.zero_grad()
    loss, accuracy = task_loss(net, x, y)
    (loss + 100.0 * bounds.cost(net)).backward()
    opt.step()
print(f"loss {loss.item():.3f}, accuracy {accuracy:.2f}")
print(bounds.report(net))
