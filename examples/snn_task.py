"""A small spiking task shared by the examples: which of two input groups fires faster?

Eight input channels of Poisson spikes over 60 time steps; the first four fire faster
than the last four for class 0, slower for class 1. The network is Rockpool's
``LinearTorch -> LIFTorch -> LinearTorch``; the readout's output summed over time gives
the two logits. Everything is generated in code from a fixed seed.
"""

from __future__ import annotations

import time

import torch
from rockpool.nn.combinators import Sequential
from rockpool.nn.modules import LIFTorch, LinearTorch

from parambounds import Bounds

#: The bounds a chip might impose: time constants in [5 ms, 40 ms], thresholds in [0.5, 2].
SPEC = {
    "*.tau_mem": (5e-3, 40e-3),
    "*.tau_syn": (5e-3, 40e-3),
    "*.threshold": (0.5, 2.0),
}


def make_data(n: int = 64, steps: int = 60, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    fast, slow = 0.3, 0.05
    rates = torch.full((n, 8), slow)
    rates[labels == 0, :4] = fast
    rates[labels == 1, 4:] = fast
    spikes = (torch.rand(n, steps, 8, generator=g) < rates[:, None, :]).float()
    return spikes, labels


def make_net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return Sequential(LinearTorch((8, 16)), LIFTorch(16), LinearTorch((16, 2)))


def parameters(net: torch.nn.Module) -> list[torch.Tensor]:
    """The tensors to optimise (a Rockpool module's ``.parameters()`` is a dict)."""
    return [p for _, p in net.named_parameters()]


def task_loss(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float]:
    out, _, _ = net(x)
    logits = out.sum(dim=1)
    loss = torch.nn.functional.cross_entropy(logits, y)
    accuracy = (logits.argmax(dim=1) == y).float().mean().item()
    return loss, accuracy


def train(use: str, steps: int = 60, lr: float = 2e-3, weight: float = 100.0) -> dict[str, float]:
    """Train with one use of the bounds: "none", "penalty", "project" or "reparametrize"."""
    x, y = make_data()
    net = make_net()
    bounds = Bounds(SPEC)
    if use == "reparametrize":
        bounds.reparametrize_(net)
    opt = torch.optim.Adam(parameters(net), lr=lr)
    if use == "project":
        bounds.attach(opt, net)
    held = True
    start = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad()
        loss, accuracy = task_loss(net, x, y)
        total = loss + weight * bounds.cost(net) if use == "penalty" else loss
        total.backward()
        opt.step()
        held = held and bounds.report(net).ok
    per_step = (time.perf_counter() - start) / steps
    report = bounds.report(net)
    return {
        "loss": loss.item(),
        "accuracy": accuracy,
        "held_every_step": held,
        "outside_at_end": sum(e.below + e.above + e.nan for e in report.entries),
        "ms_per_step": 1e3 * per_step,
    }
