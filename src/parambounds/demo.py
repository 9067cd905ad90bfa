"""``parambounds demo``: why bounds matter, on a small spiking network.

The task: eight input channels of Poisson spikes over 60 time steps; for class 0 the
first four fire faster than the last four, for class 1 the reverse. The network is
``Linear -> LIF -> Linear`` (Rockpool's ``LinearTorch``/``LIFTorch`` when Rockpool is
installed, otherwise a minimal leaky integrate-and-fire layer in plain PyTorch); the
readout summed over time gives two logits. Everything is generated from a fixed seed.

It trains three times with Adam: without bounds, with the penalty, and with projection
after every step (``attach``), then prints a table and plots the membrane time
constants over training against their bounds. The library never imports this module.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from .spec import Bounds

__all__ = ["SPEC", "make_data", "make_net", "parameters", "run_demo", "task_loss", "train"]

#: The bounds a chip might impose: time constants in [5 ms, 40 ms], thresholds in [0.5, 2].
SPEC = {
    "*.tau_mem": (5e-3, 40e-3),
    "*.tau_syn": (5e-3, 40e-3),
    "*.threshold": (0.5, 2.0),
}
RUNS = ("no bounds", "penalty", "projection")


def make_data(n: int = 64, steps: int = 60, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Spike trains ``(n, steps, 8)`` and their labels."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    fast, slow = 0.3, 0.05
    rates = torch.full((n, 8), slow)
    rates[labels == 0, :4] = fast
    rates[labels == 1, 4:] = fast
    spikes = (torch.rand(n, steps, 8, generator=g) < rates[:, None, :]).float()
    return spikes, labels


class _SpikeFn(torch.autograd.Function):
    """Heaviside forward, fast-sigmoid surrogate gradient."""

    @staticmethod
    def forward(ctx: Any, v: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(v)
        return (v > 0).to(v.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (v,) = ctx.saved_tensors
        return grad / (1 + 10 * v.abs()) ** 2


class LIF(torch.nn.Module):
    """A minimal leaky integrate-and-fire layer, used when Rockpool is not installed."""

    def __init__(self, n: int, dt: float = 1e-3) -> None:
        super().__init__()
        self.dt = dt
        self.tau_mem = torch.nn.Parameter(torch.full((n,), 0.02))
        self.tau_syn = torch.nn.Parameter(torch.full((n,), 0.02))
        self.threshold = torch.nn.Parameter(torch.ones(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Spikes ``(batch, time, n)`` for input currents ``(batch, time, n)``."""
        alpha = torch.exp(-self.dt / self.tau_mem)
        beta = torch.exp(-self.dt / self.tau_syn)
        i_syn = torch.zeros_like(x[:, 0])
        v = torch.zeros_like(x[:, 0])
        out = []
        for t in range(x.shape[1]):
            i_syn = beta * i_syn + x[:, t]
            v = alpha * v + (1 - alpha) * i_syn
            s = _SpikeFn.apply(v - self.threshold)
            v = v - s * self.threshold
            out.append(s)
        return torch.stack(out, dim=1)


def make_net(seed: int = 0) -> torch.nn.Module:
    """``Linear(8, 16) -> LIF(16) -> Linear(16, 2)``, Rockpool's when it is installed."""
    torch.manual_seed(seed)
    try:
        from rockpool.nn.combinators import Sequential
        from rockpool.nn.modules import LIFTorch, LinearTorch
    except ImportError:
        return torch.nn.Sequential(
            torch.nn.Linear(8, 16, bias=False), LIF(16), torch.nn.Linear(16, 2)
        )
    return Sequential(LinearTorch((8, 16)), LIFTorch(16), LinearTorch((16, 2)))


def parameters(net: torch.nn.Module) -> list[torch.Tensor]:
    """The tensors to optimise (a Rockpool module's ``.parameters()`` is a dict)."""
    return [p for _, p in net.named_parameters()]


def task_loss(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Cross-entropy of the readout summed over time, and the accuracy."""
    out = net(x)
    if isinstance(out, tuple):  # Rockpool returns (output, state, record)
        out = out[0]
    logits = out.sum(dim=1)
    loss = torch.nn.functional.cross_entropy(logits, y)
    accuracy = (logits.argmax(dim=1) == y).float().mean().item()
    return loss, accuracy


def train(
    use: str,
    steps: int = 60,
    lr: float = 2e-3,
    weight: float = 100.0,
    on_step: Any = None,
) -> dict[str, Any]:
    """Train with one use of the bounds: "none", "penalty", "project" or "reparametrize".

    Returns the final loss and accuracy, whether the bounds held after every step, the
    number of elements outside (or NaN) at the end, the time per step, and the
    ``tau_mem`` values after every step.
    """
    x, y = make_data()
    net = make_net()
    bounds = Bounds(SPEC)
    if use == "reparametrize":
        bounds.reparametrize_(net)
    opt = torch.optim.Adam(parameters(net), lr=lr)
    if use == "project":
        bounds.attach(opt, net)
    held = True
    history = []
    start = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad()
        loss, accuracy = task_loss(net, x, y)
        total = loss + weight * bounds.cost(net) if use == "penalty" else loss
        total.backward()
        opt.step()
        report = bounds.report(net)
        held = held and report.ok
        history.append(_tau_mem(net))
        if on_step is not None:
            on_step()
    per_step = (time.perf_counter() - start) / steps
    return {
        "loss": loss.item(),
        "accuracy": accuracy,
        "held_every_step": held,
        "outside_at_end": sum(e.below + e.above + e.nan for e in report.entries),
        "ms_per_step": 1e3 * per_step,
        "tau_mem": torch.stack(history),
    }


def _tau_mem(net: torch.nn.Module) -> torch.Tensor:
    for name, _ in net.named_parameters():
        if name.endswith("tau_mem") or name.endswith("tau_mem.original"):
            owner: Any = net.get_submodule(name.split(".")[0])
            return owner.tau_mem.detach().clone()
    raise RuntimeError("the demo network has no tau_mem")


def _table(results: dict[str, dict[str, Any]]) -> str:
    head = "| run | final loss | accuracy | outside or NaN at end | inside after every step |"
    lines = [head, "|---|---|---|---|---|"]
    for run, r in results.items():
        held = "yes" if r["held_every_step"] else "no"
        lines.append(
            f"| {run} | {r['loss']:.3f} | {r['accuracy']:.2f} | {r['outside_at_end']} | {held} |"
        )
    return "\n".join(lines)


def _plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lo, hi = SPEC["*.tau_mem"]
    fig, axes = plt.subplots(
        1, len(results), figsize=(4.2 * len(results), 3.4), sharey=True, sharex=True
    )
    for ax, (run, r) in zip(axes, results.items()):
        taus = r["tau_mem"].numpy() * 1e3
        ax.plot(range(1, len(taus) + 1), taus, lw=0.8, alpha=0.7)
        broken = torch.isnan(r["tau_mem"]).any(dim=1).nonzero()
        if len(broken):  # mark where training turned to NaN
            step = int(broken[0]) + 1
            ax.axvline(step, color="tab:red", lw=1)
            ax.text(step, 70, f" NaN from step {step}", color="tab:red", fontsize=8)
        ax.axhline(lo * 1e3, color="k", ls="--", lw=1)
        ax.axhline(hi * 1e3, color="k", ls="--", lw=1)
        ax.axhspan(lo * 1e3, hi * 1e3, color="tab:green", alpha=0.08)
        status = "NaN" if r["loss"] != r["loss"] else f"loss {r['loss']:.2f}"
        ax.set_title(f"{run} ({status})")
        ax.set_xlabel("training step")
    axes[0].set_ylabel("membrane time constant tau_mem (ms)")
    axes[0].set_ylim(-20, 80)
    axes[0].set_xlim(0, len(next(iter(results.values()))["tau_mem"]))
    fig.suptitle("tau_mem of 16 LIF neurons over training; dashed: bounds [5 ms, 40 ms]")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_demo(out: Path, steps: int = 150, progress: bool = True) -> dict[str, dict[str, Any]]:
    """Train the three runs, print the table, and write ``out/time_constants.png``."""
    out.mkdir(parents=True, exist_ok=True)
    try:
        from tqdm import tqdm
    except ImportError:  # the demo extra is not installed: no progress bar
        tqdm = None
    bar = (
        tqdm(total=steps * len(RUNS), desc="training", unit="step", disable=not progress)
        if tqdm
        else None
    )
    results = {}
    for run, use in zip(RUNS, ("none", "penalty", "project")):
        if bar is not None:
            bar.set_postfix_str(run)
        results[run] = train(use, steps=steps, on_step=bar.update if bar is not None else None)
    if bar is not None:
        bar.close()
    print(_table(results))
    path = out / "time_constants.png"
    _plot(results, path)
    print(f"plot: {path}")
    return results
