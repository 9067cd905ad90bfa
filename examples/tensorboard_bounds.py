"""A plain training loop: projection after each step, the bounds' metrics in TensorBoard.

Run: python examples/tensorboard_bounds.py   (needs `pip install parambounds[tensorboard]`),
then `tensorboard --logdir runs` when run with a folder of your own.
"""

import tempfile

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from parambounds import Bounds

torch.set_num_threads(1)
torch.manual_seed(0)

model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
bounds = Bounds({"*.weight": (-0.5, 0.5)})
opt = torch.optim.Adam(model.parameters(), lr=0.05)
bounds.attach(opt, model)  # projects after every opt.step()
x = torch.randn(256, 4)
y = 3.0 * x[:, :1] - 2.0 * x[:, 1:2]

with tempfile.TemporaryDirectory() as logdir:
    writer = SummaryWriter(logdir)
    for step in range(20):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        writer.add_scalar("loss", loss, step)
        for key, value in bounds.metrics(model).items():  # 0-d tensors: no .item() here
            writer.add_scalar(key, value, step)
    writer.close()
    events = EventAccumulator(logdir)
    events.Reload()
    tags = [t for t in events.Tags()["scalars"] if t.startswith("bounds/")]
    print(f"TensorBoard has {len(tags)} bounds tags, e.g. {tags[:3]}")
    print("bounds/outside at the last step:", events.Scalars("bounds/outside")[-1].value)
print(bounds.report(model).summary())
