"""Bounds in a Lightning Trainer: projection after every optimizer step, metrics logged.

Run: python examples/lightning_bounds.py   (needs `pip install parambounds[lightning]`)
"""

import csv
import tempfile
import warnings

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger

from parambounds import Bounds
from parambounds.lightning import BoundsCallback

torch.set_num_threads(1)
torch.manual_seed(0)
warnings.filterwarnings("ignore", ".*does not have many workers.*")


class Regressor(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)
        )

    def training_step(self, batch, _batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.05)


x = torch.randn(256, 4)
y = 3.0 * x[:, :1] - 2.0 * x[:, 1:2]  # needs weights larger than the bounds allow
data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)

bounds = Bounds({"net.*.weight": (-0.5, 0.5), "net.2.bias": (-0.1, 0.1)})
model = Regressor()
with tempfile.TemporaryDirectory() as logs:
    logger = CSVLogger(logs, name="bounds")
    trainer = pl.Trainer(
        max_epochs=2,
        callbacks=[BoundsCallback(bounds, check_on_fit_end=True)],
        logger=logger,
        log_every_n_steps=4,
        accelerator="cpu",
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, data)
    rows = list(csv.DictReader(open(f"{logger.log_dir}/metrics.csv")))
rows = [r for r in rows if r.get("bounds/outside")]
keys = sorted(k for k in rows[0] if k.startswith("bounds/"))
print(f"logged bounds metrics at {len(rows)} steps, e.g. {keys[:3]}")
print(bounds.report(model).summary())
