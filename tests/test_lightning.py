"""parambounds.lightning.BoundsCallback with a real Lightning Trainer (a few steps each)."""

import csv
import subprocess
import sys
import warnings

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")

from parambounds import Bounds, BoundsError, BoundsViolationError  # noqa: E402
from parambounds.lightning import BoundsCallback  # noqa: E402

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*GPU available but not used.*")

SPEC = {"net.0.weight": (-0.05, 0.05), "net.2.bias": (0.0, 0.01)}


def loader(n=8):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n * 4, 4, generator=g)
    y = torch.randn(n * 4, 1, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)


class Net(pl.LightningModule):
    """Trained with a large learning rate, away from the bounds; records every step."""

    def __init__(self, lr=2.0, poke=None, blow_up=None):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)
        )
        self.lr = lr
        self.poke = poke or set()  # batches at which the test pushes a weight outside
        self.blow_up = blow_up or set()  # batches whose loss is inf: GradScaler skips
        self.inside_after_step = []
        self.seen = {}

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if batch_idx in self.poke:
            with torch.no_grad():
                self.net[0].weight[0, 0] = 10.0
        loss = -((self(x) - y) ** 2).mean()  # diverges: parameters leave the bounds
        if batch_idx in self.blow_up:
            loss = loss * float("inf")
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):  # noqa: ARG002  (after the callbacks)
        self.seen[batch_idx] = self.net[0].weight[0, 0].item()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def on_fit_start(self):  # the module's hooks run after the callbacks': after projection
        for opt in self.trainer.optimizers:
            opt.register_step_post_hook(
                lambda *_: self.inside_after_step.append(Bounds(SPEC).report(self).ok)
            )


def trainer(**kw):
    kw.setdefault("logger", False)
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kw,
    )


def test_without_the_callback_training_leaves_the_bounds():
    model = Net()
    trainer().fit(model, loader())
    assert not Bounds(SPEC).report(model).ok


def test_every_step_ends_inside_and_fit_ends_inside():
    model = Net()
    cb = BoundsCallback(Bounds(SPEC), check_on_fit_end=True)
    trainer(callbacks=[cb]).fit(model, loader())
    assert model.inside_after_step == [True] * 8
    assert cb.steps == 8
    Bounds(SPEC).check(model)


def test_metrics_arrive_in_the_logger(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    model = Net()
    bounds = Bounds(SPEC)
    logger = CSVLogger(tmp_path, name="run")
    cb = BoundsCallback(bounds, project=False)
    trainer(callbacks=[cb], logger=logger, log_every_n_steps=2).fit(model, loader())
    rows = list(csv.DictReader(open(logger.log_dir + "/metrics.csv")))
    logged = [r for r in rows if r.get("bounds/outside")]
    assert [int(r["step"]) for r in logged] == [1, 3, 5, 7]  # every 2nd step, as the trainer logs
    for key in ("bounds/excess", "bounds/penalty", "bounds/net.0.weight/outside"):
        assert all(r[key] != "" for r in logged), key
    report = bounds.report(model)  # nothing changed after the last step: the last row is now
    assert float(logged[-1]["bounds/outside"]) == sum(
        e.below + e.above + e.nan for e in report.entries
    )
    assert float(logged[-1]["bounds/net.0.weight/excess"]) == pytest.approx(
        report.to_dict()["net.0.weight"]["max_excess"], rel=1e-6
    )
    assert float(logged[-1]["bounds/outside"]) > 0  # project=False: the numbers are real
    assert "bounds/outside" in trainer_metrics(model)


def trainer_metrics(model):
    return model.trainer.callback_metrics


def test_log_every_n_optimizer_steps(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(tmp_path, name="run")
    cb = BoundsCallback(Bounds(SPEC), log_every_n_steps=4, per_parameter=False)
    trainer(callbacks=[cb], logger=logger, log_every_n_steps=1).fit(Net(), loader())
    rows = list(csv.DictReader(open(logger.log_dir + "/metrics.csv")))
    assert [int(r["step"]) for r in rows if r.get("bounds/outside")] == [3, 7]
    assert "bounds/net.0.weight/outside" not in rows[0]


def test_gradient_accumulation_projects_only_on_real_steps():
    # batches 0-2 make one step; the weight pushed out at batch 0 stays out until batch 2
    model = Net(poke={0, 3})
    cb = BoundsCallback(Bounds(SPEC))
    trainer(callbacks=[cb], accumulate_grad_batches=3, limit_train_batches=6).fit(model, loader())
    assert cb.steps == 2
    assert model.seen[0] == 10.0 and model.seen[1] == 10.0  # no step yet: not projected
    assert model.seen[2] <= 0.05 and model.seen[3] == 10.0 and model.seen[5] <= 0.05
    assert model.inside_after_step == [True, True]


def test_bf16_mixed_precision_on_the_cpu():
    model = Net()
    cb = BoundsCallback(Bounds(SPEC))
    trainer(callbacks=[cb], precision="bf16-mixed").fit(model, loader())
    assert cb.steps == 8 and model.inside_after_step == [True] * 8
    Bounds(SPEC).check(model)


def test_a_step_the_grad_scaler_skips_is_not_projected():
    from lightning.pytorch.plugins import MixedPrecision

    model = Net(poke={2}, blow_up={2})
    cb = BoundsCallback(Bounds(SPEC))
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=1.0))
    trainer(callbacks=[cb], plugins=[plugin], limit_train_batches=4).fit(model, loader())
    assert cb.steps == 3  # batch 2's step was skipped (inf gradients)
    assert model.seen[2] == 10.0  # no step, no projection
    assert model.seen[3] <= 0.05
    assert model.inside_after_step == [True] * 3


class TwoOptimizers(pl.LightningModule):
    """Manual optimization with two optimizers; only the first holds bounded parameters."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.automatic_optimization = False
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)
        )
        self.other = torch.nn.Linear(4, 1)
        self.inside = []

    def training_step(self, batch, batch_idx):  # noqa: ARG002
        x, y = batch
        opt_a, opt_b = self.optimizers()
        opt_a.zero_grad()
        self.manual_backward(-((self.net(x) - y) ** 2).mean())
        opt_a.step()
        self.inside.append(Bounds(SPEC).report(self).ok)
        opt_b.zero_grad()
        self.manual_backward(-((self.other(x) - y) ** 2).mean())
        opt_b.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.net.parameters(), lr=2.0), torch.optim.SGD(
            self.other.parameters(), lr=2.0
        )


def test_manual_optimization_with_two_optimizers():
    model = TwoOptimizers()
    cb = BoundsCallback(Bounds(SPEC))
    trainer(callbacks=[cb], limit_train_batches=4).fit(model, loader())
    assert model.inside == [True] * 4
    assert cb.steps == 4  # the steps of the optimizer that trains bounded parameters
    Bounds(SPEC).check(model)


def test_no_optimizer_holds_a_bounded_parameter():
    model = Net()
    model.net[0].weight.requires_grad_(False)
    model.net[2].bias.requires_grad_(False)
    model.configure_optimizers = lambda: torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=0.1
    )
    with pytest.raises(
        BoundsError,
        match=r"no optimizer of the trainer holds any bounded parameter \('net\.0\.weight', 'net\.2\.bias'\)",
    ):
        trainer(callbacks=[BoundsCallback(Bounds(SPEC))]).fit(model, loader())


def test_frozen_bounded_parameters_are_projected_too():
    model = Net()
    model.net[2].bias.requires_grad_(False)
    with torch.no_grad():
        model.net[2].bias.fill_(5.0)
    trainer(callbacks=[BoundsCallback(Bounds(SPEC))], limit_train_batches=2).fit(model, loader())
    Bounds(SPEC).check(model)


def test_check_on_fit_end_without_projection():
    cb = BoundsCallback(Bounds(SPEC), project=False, check_on_fit_end=True)
    with pytest.raises(BoundsViolationError, match="'net.0.weight'"):
        trainer(callbacks=[cb], limit_train_batches=2).fit(Net(), loader())


def test_a_reparametrized_module_is_left_to_its_parametrization():
    model = Net()
    bounds = Bounds(SPEC)
    bounds.reparametrize_(model)
    cb = BoundsCallback(bounds)  # projection of computed values: a check that passes
    trainer(callbacks=[cb], limit_train_batches=3).fit(model, loader())
    assert cb.steps == 3
    bounds.check(model)


def test_bad_arguments():
    with pytest.raises(BoundsError, match="bounds must be a parambounds.Bounds, got dict"):
        BoundsCallback(SPEC)
    with pytest.raises(
        BoundsError, match="log_every_n_steps must be None or an integer >= 0, got -1"
    ):
        BoundsCallback(Bounds(SPEC), log_every_n_steps=-1)


def test_with_pytorch_lightning_alone():
    pytest.importorskip("pytorch_lightning")
    script = """
import sys, torch
import pytorch_lightning as pl
from parambounds import Bounds
from parambounds.lightning import BoundsCallback
assert "lightning.pytorch" not in sys.modules
assert issubclass(BoundsCallback, pl.Callback)
torch.set_num_threads(1)
class M(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(4, 1)
    def training_step(self, batch, batch_idx):
        return -self.net(batch[0]).pow(2).mean()
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=5.0)
data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(12, 4)), batch_size=4)
m = M()
cb = BoundsCallback(Bounds({"net.weight": (-0.1, 0.1)}))
pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
           enable_model_summary=False, accelerator="cpu", callbacks=[cb]).fit(m, data)
assert cb.steps == 3, cb.steps
Bounds({"net.weight": (-0.1, 0.1)}).check(m)
print("ok")
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=1800
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")
