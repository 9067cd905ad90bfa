"""Train a small Rockpool network for Xylo with and without the device preset, then quantize.

Run: ``python examples/xylo_deploy.py [--plot docs/assets/xylo_deploy.png]``.

Both runs start from the same network, whose synaptic time constants were chosen for a
finer time step (0.3 to 5 ms at dt = 1 ms): some are <= dt, which Rockpool's Xylo mapper
refuses. One run trains with ``bounds_for("xylo-audio-2", dt=...)`` projected after every
step; the other trains unbounded and, because it cannot be exported as it is, is clamped
into the same bounds only at export. Each is then quantized with Rockpool's own
``global_quantize`` and simulated in Rockpool with the quantized parameters: integer
weights and thresholds, and the chip's bit-shift decays (``LIFTorch(leak_mode="bitshifts")``
with the integer dashes).
"""

from __future__ import annotations

import argparse
import copy

import numpy as np
import torch
from rockpool.nn.combinators import Sequential
from rockpool.nn.modules import LIFTorch, LinearTorch
from rockpool.transform.quantize_methods import global_quantize

from parambounds.devices import bounds_for, deployability

DT, DEVICE = 1e-3, "xylo-audio-2"
N_IN, N_HIDDEN, N_OUT, T = 4, 16, 2, 40
torch.set_num_threads(1)


def data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes: which pair of input channels fires more (Poisson spikes)."""
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, 2, (n,), generator=g)
    rate = torch.full((n, N_IN), 0.08)
    rate[label == 0, :2] = 0.25
    rate[label == 1, 2:] = 0.25
    x = (torch.rand(n, T, N_IN, generator=g) < rate[:, None, :]).float()
    return x, label


def make_net() -> Sequential:
    torch.manual_seed(0)
    net = Sequential(
        LinearTorch((N_IN, N_HIDDEN)),
        LIFTorch(N_HIDDEN, dt=DT),
        LinearTorch((N_HIDDEN, N_OUT)),
        LIFTorch(N_OUT, dt=DT),
    )
    with torch.no_grad():  # time constants carried over from a model at a finer dt
        net[1].tau_syn.copy_(torch.logspace(np.log10(3e-4), np.log10(5e-3), N_HIDDEN)[:, None])
        net[3].tau_syn.fill_(2e-3)
        net[3].threshold.fill_(20.0)  # the readout integrates; it seldom spikes
    return net


def readout(net: Sequential, x: torch.Tensor) -> torch.Tensor:
    """The output neurons' membrane potentials, summed over time (one score per class)."""
    net.reset_state()  # Rockpool modules keep their state between calls
    _, _, record = net(x, record=True)
    return record["3_LIFTorch"]["vmem"].sum(1)


def accuracy(net: Sequential, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((readout(net, x).argmax(1) == y).float().mean())


def train(net: Sequential, bounded: bool, steps: int = 40) -> Sequential:
    x, y = data(256, seed=1)
    named = dict(net.named_parameters())
    taus = [p for n, p in named.items() if ".tau_" in n]
    rest = [p for n, p in named.items() if n.endswith("weight")]  # thresholds stay at 1
    opt = torch.optim.Adam([{"params": rest, "lr": 1e-2}, {"params": taus, "lr": 2e-4}])
    if bounded:
        bounds_for(DEVICE, dt=DT).attach(opt, net)  # projection after every step
    for step in range(steps):
        idx = torch.arange(step * 32, step * 32 + 32) % len(y)
        loss = torch.nn.functional.cross_entropy(readout(net, x[idx]) / T, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net


def spec_of(net: Sequential) -> dict:
    """The float specification Rockpool's mapper builds for Linear-LIF-Linear-LIF."""

    def dash(tau: torch.Tensor) -> np.ndarray:  # xylo_graph_modules: log2(tau / dt)
        return np.log2(tau.detach().numpy().reshape(-1) / DT).astype(np.float64)

    def f64(t: torch.Tensor) -> np.ndarray:
        return t.detach().numpy().astype(np.float64)

    return {
        "weights_in": f64(net[0].weight),
        "weights_rec": np.zeros((N_HIDDEN, N_HIDDEN)),
        "weights_out": f64(net[2].weight),
        "threshold": f64(net[1].threshold),
        "threshold_out": f64(net[3].threshold),
        "dash_mem": dash(net[1].tau_mem),
        "dash_mem_out": dash(net[3].tau_mem),
        "dash_syn": dash(net[1].tau_syn),
        "dash_syn_2": np.zeros(N_HIDDEN),
        "dash_syn_out": dash(net[3].tau_syn),
        "bias": f64(net[1].bias),
        "bias_out": f64(net[3].bias),
    }


def quantized_net(net: Sequential) -> Sequential:
    """Rockpool's global_quantize, simulated in Rockpool with the integer parameters."""
    q = global_quantize(**spec_of(net))

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(a, dtype=np.float32))

    return Sequential(
        LinearTorch((N_IN, N_HIDDEN), weight=t(q["weights_in"][:, :, 0]), has_bias=False),
        LIFTorch(
            N_HIDDEN,
            leak_mode="bitshifts",
            dash_mem=t(q["dash_mem"]),
            dash_syn=t(q["dash_syn"])[:, None],
            threshold=t(q["threshold"]),
            bias=t(q["bias"]),
            dt=DT,
        ),  # fmt: skip
        LinearTorch((N_HIDDEN, N_OUT), weight=t(q["weights_out"]), has_bias=False),
        LIFTorch(
            N_OUT,
            leak_mode="bitshifts",
            dash_mem=t(q["dash_mem_out"]),
            dash_syn=t(q["dash_syn_out"])[:, None],
            threshold=t(q["threshold_out"]),
            bias=t(q["bias_out"]),
            dt=DT,
        ),  # fmt: skip
    )


def main() -> dict[str, tuple[float, float]]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--plot", help="write a PNG of the results here")
    args = parser.parse_args()
    x_test, y_test = data(512, seed=2)
    start = make_net()
    print(deployability(start, DEVICE, dt=DT).errors[0].message)
    results, taus = {}, {}
    for name, bounded in (("with the preset", True), ("without", False)):
        net = train(copy.deepcopy(start), bounded)
        float_acc = accuracy(net, x_test, y_test)
        report = deployability(net, DEVICE, dt=DT)
        print(f"{name}: {'deployable' if report.ok else 'NOT deployable'} as trained")
        taus[name] = tau = net[1].tau_syn.detach().numpy().reshape(-1).copy()
        print(
            f"{name}: hidden tau_syn from {np.nanmin(tau) * 1e3:.3g} ms, {np.isnan(tau).sum()} NaN"
        )
        if not report.ok:  # the export refuses it: clamp into the bounds only now
            bounds_for(DEVICE, dt=DT).project_(net)
        quant_acc = accuracy(quantized_net(net), x_test, y_test)
        results[name] = (float_acc, quant_acc)
        print(f"{name}: float accuracy {float_acc:.3f}, quantized accuracy {quant_acc:.3f}")
    if args.plot:
        plot(results, taus, args.plot)
    return results


def plot(results: dict, taus: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    names = list(results)
    pos = np.arange(len(names))
    ax1.bar(pos - 0.18, [results[n][0] for n in names], 0.36, label="float (Rockpool)")
    ax1.bar(pos + 0.18, [results[n][1] for n in names], 0.36, label="quantized (Rockpool)")
    ax1.set_xticks(pos, names)
    ax1.set_ylim(0, 1)
    ax1.set_ylabel("test accuracy")
    ax1.legend(loc="lower right")
    lo, hi = bounds_for(DEVICE, dt=DT).spec["*.tau_syn"]
    for i, n in enumerate(names):
        shown = np.clip(taus[n], 1e-5, None)  # what crossed zero is drawn at the bottom
        ax2.scatter(np.full(len(shown), i), shown * 1e3, s=12)
        if np.isnan(taus[n]).any():
            ax2.text(i, 1.5, f"{np.isnan(taus[n]).sum()} NaN:\ntraining diverged", ha="center")
    ax2.axhline(DT * 1e3, color="k", lw=0.8, ls="--", label="dt: the mapper needs tau > dt")
    ax2.set_xticks(pos, names)
    ax2.set_xlim(-0.5, len(names) - 0.5)
    ax2.set_yscale("log")
    ax2.axhline(lo * 1e3, color="C2", lw=0.8, label="the preset's lower bound")
    ax2.set_ylabel("hidden tau_syn after training (ms)")
    ax2.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
