"""Train a small Rockpool network with a bounds penalty on its time constants.

Run: ``python examples/rockpool_bounds.py``. Prints the task loss, the bounds cost and
the range of ``tau_mem`` every few steps: the penalty pulls time constants that start
outside [2 ms, 50 ms] back inside while the task trains.
"""

import torch
from rockpool.nn.combinators import Sequential
from rockpool.nn.modules import LIFTorch, LinearTorch

from parambounds import bounds_cost, make_bounds  # was: rockpool.training.torch_loss

torch.set_num_threads(1)  # small tensors: one thread is fastest, and steady on a busy machine

torch.manual_seed(0)
net = Sequential(LinearTorch((4, 16)), LIFTorch(16), LinearTorch((16, 2)), LIFTorch(2))
with torch.no_grad():  # start some time constants outside the bounds
    net[1].tau_mem.copy_(torch.linspace(1e-3, 0.08, 16))

lower, upper = make_bounds(net.parameters())
for layer in ("1_LIFTorch", "3_LIFTorch"):
    lower[layer]["tau_mem"], upper[layer]["tau_mem"] = 2e-3, 50e-3
    lower[layer]["threshold"] = 0.0

x = 0.5 * torch.rand(8, 50, 4)
target = (torch.rand(8, 50, 2) < 0.1).float()
opt = torch.optim.Adam(net.parameters().astorch(), lr=5e-4)
for step in range(60):
    out, _, _ = net(x)
    task = torch.nn.functional.mse_loss(out, target)
    cost = bounds_cost(net.parameters(), lower, upper)
    opt.zero_grad()
    (task + 100.0 * cost).backward()
    opt.step()
    if step % 10 == 0 or step == 59:
        tau = net[1].tau_mem.detach()
        print(
            f"step {step:3d}  task {task.item():.4f}  bounds cost {cost.item():8.3f}  "
            f"tau_mem in [{tau.min().item() * 1e3:.2f}, {tau.max().item() * 1e3:.2f}] ms"
        )
