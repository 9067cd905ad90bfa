"""Bounds as a reparametrization: each bounded parameter is a smooth function of an
unconstrained one, so no optimizer step can leave the bounds.

Run: ``python examples/bounds_reparametrize.py``
"""

import torch
from torch.nn.utils import parametrize

from parambounds import Bounds
from parambounds.demo import SPEC, make_data, make_net, parameters, task_loss

torch.set_num_threads(1)  # small tensors: one thread is fastest, and steady on a busy machine

bounds = Bounds(SPEC)
x, y = make_data()
net = bounds.reparametrize_(make_net())
opt = torch.optim.Adam(parameters(net), lr=2e-3)  # optimises the unconstrained tensors
for _ in range(60):
    opt.zero_grad()
    loss, accuracy = task_loss(net, x, y)
    loss.backward()
    opt.step()
print(f"loss {loss.item():.3f}, accuracy {accuracy:.2f}")
print(bounds.report(net))
print("state_dict keys:", [k for k in net.state_dict() if "parametrizations" in k][:3], "...")
for name in ("tau_mem", "tau_syn", "threshold"):  # back to plain parameters for export
    parametrize.remove_parametrizations(net[1], name, leave_parametrized=True)
print("after removal:", [k for k in net.state_dict() if k.startswith("1_LIFTorch")])
