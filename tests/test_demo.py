import sys

import torch

from parambounds import demo


def test_without_rockpool_the_demo_uses_its_own_lif(monkeypatch):
    for name in [m for m in sys.modules if m == "rockpool" or m.startswith("rockpool.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "rockpool", None)  # makes `import rockpool...` fail
    net = demo.make_net()
    assert isinstance(net[1], demo.LIF)
    assert {"1.tau_mem", "1.tau_syn", "1.threshold"} <= {n for n, _ in net.named_parameters()}
    result = demo.train("project", steps=3)
    assert result["held_every_step"] and result["outside_at_end"] == 0
    assert torch.isfinite(torch.tensor(result["loss"]))


def test_lif_surrogate_gradient_flows():
    lif = demo.LIF(3)
    x = torch.full((2, 20, 3), 5.0)
    spikes = lif(x)
    assert spikes.sum() > 0 and set(spikes.unique().tolist()) <= {0.0, 1.0}
    spikes.sum().backward()
    assert lif.threshold.grad is not None and lif.threshold.grad.abs().sum() > 0
