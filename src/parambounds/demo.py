"""``parambounds demo``: why bounds matter, on a small spiking network.

The task: eight input channels of Poisson spikes over 60 time steps; for class 0 the
first four fire faster than the last four, for class 1 the reverse. The network is
``Linear -> LIF -> Linear`` (Rockpool's ``LinearTorch``/``LIFTorch`` when Rockpool is
installed, otherwise a minimal leaky integrate-and-fire layer in plain PyTorch); the
readout summed over time gives two logits. Everything is generated from a fixed seed.

It trains three times with Adam: without bounds, with the penalty, and with projection
after every step (``attach``), then prints a table and plots the membrane time
constants over training against their bounds: the whole run, a zoom on the early steps
where the runs differ, the values outside the bounds marked and counted. Training pins
torch to one CPU thread, so the demo takes about the same time on a busy machine.
The library never imports this module.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from .spec import Bounds

__all__ = [
    "SPEC",
    "STEPS",
    "THREADS",
    "make_data",
    "make_net",
    "parameters",
    "run_demo",
    "story",
    "task_loss",
    "train",
]

#: The bounds a chip might impose: time constants in [5 ms, 40 ms], thresholds in [0.5, 2].
SPEC = {
    "*.tau_mem": (5e-3, 40e-3),
    "*.tau_syn": (5e-3, 40e-3),
    "*.threshold": (0.5, 2.0),
}
RUNS = ("no bounds", "penalty", "projection")
#: Training steps per run: everything the plot shows happens in the first 40.
STEPS = 80
#: CPU threads for training: the network is small, one thread is as fast as two.
THREADS = 1


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


def story(tau: torch.Tensor, lower: float, upper: float) -> dict[str, Any]:
    """What a run's ``tau_mem`` history ``(steps, neurons)`` shows, for the plot's annotations.

    Steps are counted from 1. A step with a NaN counts as neither inside nor outside.

    Returns:
        ``outside_steps`` (steps where some value is outside ``[lower, upper]``),
        ``first_nan`` (the first step with a NaN, or ``None``), ``below_zero`` (steps
        where some value is negative), and ``min``/``max`` (over the finite values,
        ``nan`` if there are none).

    Examples:
        >>> tau = torch.tensor([[0.01, 0.02], [0.004, 0.02], [-0.001, 0.03], [float("nan"), 0.02]])
        >>> s = story(tau, 0.005, 0.04)
        >>> s["outside_steps"], s["first_nan"], s["below_zero"]
        ([2, 3], 4, [3])
    """
    finite = torch.isfinite(tau)
    outside = ((tau < lower) | (tau > upper)) & finite
    nan_steps = (~finite).any(dim=1).nonzero().flatten()
    values = tau[finite]
    return {
        "outside_steps": (outside.any(dim=1).nonzero().flatten() + 1).tolist(),
        "first_nan": int(nan_steps[0]) + 1 if len(nan_steps) else None,
        "below_zero": (((tau < 0) & finite).any(dim=1).nonzero().flatten() + 1).tolist(),
        "min": values.min().item() if len(values) else float("nan"),
        "max": values.max().item() if len(values) else float("nan"),
    }


def _caption(s: dict[str, Any], steps: int) -> str:
    if s["first_nan"] is not None:
        below = f"below 0 at step {s['below_zero'][0]}, " if s["below_zero"] else ""
        return f"Nothing holds it: {below}NaN from step {s['first_nan']}"
    n = len(s["outside_steps"])
    if n:
        return f"Pulled back, after the fact: outside on {n} of {steps} steps"
    return f"Clamped after every step: inside on all {steps} steps"


def _plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    lo, hi = (1e3 * b for b in SPEC["*.tau_mem"])  # ms
    steps = len(next(iter(results.values()))["tau_mem"])
    stories = {run: story(1e3 * r["tau_mem"], lo, hi) for run, r in results.items()}
    # the zoom: the early steps where the runs differ, near the lower bound
    events = [t for s in stories.values() for t in s["outside_steps"]]
    events += [s["first_nan"] for s in stories.values() if s["first_nan"] is not None]
    zoom_x = (0.5, min(steps, max(events, default=20) + 8) + 0.5)
    zoom_y = (-1.5, lo + 2.5)

    fig = plt.figure(figsize=(12, 7.2), layout="constrained")
    fig.suptitle(
        f"Membrane time constants tau_mem of 16 LIF neurons during training; "
        f"bounds [{lo:g} ms, {hi:g} ms]",
        fontsize=12,
    )
    columns = fig.subfigures(1, len(results), wspace=0.02, squeeze=False)[0]
    steps_axis = torch.arange(1, steps + 1).numpy()
    for column, (run, r) in zip(columns, results.items()):
        s = stories[run]
        taus = 1e3 * r["tau_mem"].numpy()
        status = "NaN" if r["loss"] != r["loss"] else f"final loss {r['loss']:.2f}"
        column.suptitle(f"{run} ({status})", fontweight="bold")
        column.supxlabel(_caption(s, steps), fontsize=9.5, color="0.15")
        full, zoom = column.subplots(2, 1, height_ratios=(3, 2))
        for ax in (full, zoom):
            ax.axhspan(lo, hi, color="tab:green", alpha=0.12, lw=0)
            for b in (lo, hi):
                ax.axhline(b, color="tab:green", ls="--", lw=1)
            ax.axhline(0, color="0.5", lw=0.6)
            ax.plot(steps_axis, taus, color="tab:blue", lw=0.9, alpha=0.55)
            outside = (taus < lo) | (taus > hi)
            t, n = outside.nonzero()
            ax.plot(steps_axis[t], taus[t, n], "x", color="tab:red", ms=5, mew=1.4)
            if s["first_nan"] is not None:
                ax.axvline(s["first_nan"], color="tab:red", lw=1.2)
        full.set_xlim(0, steps + 1)
        full.set_ylim(-5, 48)
        full.set_ylabel("tau_mem (ms)")
        full.set_title("whole run", fontsize=9, loc="left")
        full.indicate_inset((zoom_x[0], zoom_y[0], zoom_x[1] - zoom_x[0], zoom_y[1] - zoom_y[0]))
        zoom.set_xlim(*zoom_x)
        zoom.set_ylim(*zoom_y)
        zoom.set_ylabel("tau_mem (ms)")
        zoom.set_xlabel("training step")
        zoom.set_title(
            f"zoom: steps 1-{int(zoom_x[1])}, near the {lo:g} ms bound", fontsize=9, loc="left"
        )
        box = {"boxstyle": "round", "fc": "white", "ec": "0.7", "alpha": 0.9}
        if s["first_nan"] is not None:
            full.text(
                s["first_nan"] + 1,
                44,
                f"NaN from step {s['first_nan']}",
                color="tab:red",
                va="top",
                fontsize=9,
            )
            if s["below_zero"]:
                z = s["below_zero"][0]
                zoom.plot(z, taus[z - 1].min(), "o", color="tab:red", ms=7, mfc="none", mew=1.5)
                zoom.text(
                    0.04,
                    0.1,
                    f"below 0 at step {z}: {taus[z - 1].min():.2f} ms",
                    transform=zoom.transAxes,
                    color="tab:red",
                    fontsize=9,
                    bbox=box,
                )
        elif s["outside_steps"]:
            zoom.text(
                0.04,
                0.1,
                f"outside on {len(s['outside_steps'])} steps, min {s['min']:.2f} ms, "
                f"max {s['max']:.2f} ms",
                transform=zoom.transAxes,
                color="tab:red",
                fontsize=9,
                bbox=box,
            )
        else:
            zoom.text(
                0.04,
                0.1,
                f"inside on every step, min {s['min']:.2f} ms",
                transform=zoom.transAxes,
                color="tab:green",
                fontsize=9,
                bbox=box,
            )
    fig.legend(
        handles=[
            Line2D([], [], color="tab:blue", lw=1, alpha=0.7, label="tau_mem of one neuron"),
            Patch(color="tab:green", alpha=0.25, label="inside the bounds"),
            Line2D([], [], ls="", marker="x", color="tab:red", mew=1.4, label="outside the bounds"),
            Line2D([], [], color="tab:red", lw=1.2, label="network turned NaN"),
        ],
        loc="outside lower center",
        ncol=4,
        frameon=False,
        fontsize=9,
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_demo(
    out: Path, steps: int = STEPS, progress: bool = True, threads: int = THREADS
) -> dict[str, dict[str, Any]]:
    """Train the three runs, print the table, and write ``out/time_constants.png``.

    Training uses ``threads`` CPU threads (``torch.set_num_threads``, restored afterwards):
    the network is small, so one thread is as fast as several and takes the same time on
    a loaded machine.
    """
    out.mkdir(parents=True, exist_ok=True)
    try:
        from tqdm import tqdm
    except ImportError:  # the demo extra is not installed: no progress bar
        tqdm = None
    desc = f"training on {threads} CPU thread{'s' if threads > 1 else ''}"
    bar = (
        tqdm(total=steps * len(RUNS), desc=desc, unit="step", disable=not progress)
        if tqdm
        else None
    )
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    results = {}
    try:
        for run, use in zip(RUNS, ("none", "penalty", "project")):
            if bar is not None:
                bar.set_postfix_str(run)
            results[run] = train(use, steps=steps, on_step=bar.update if bar is not None else None)
    finally:
        torch.set_num_threads(before)
        if bar is not None:
            bar.close()
    print(_table(results))
    path = out / "time_constants.png"
    _plot(results, path)
    print(f"plot: {path}")
    return results
