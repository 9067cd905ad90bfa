"""Parity with Rockpool 3.1.0 on real Rockpool networks."""

import math

import pytest
import torch

from parambounds import bounds_cost, make_bounds

from .conftest import rockpool_net


def _bounded_net(dtype):
    net = rockpool_net(dtype)
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(torch.randn_like(p) * 0.05 + (0.02 if "tau" in name else 0.0))
    lower, upper = make_bounds(net.parameters())
    for layer in ("1_LIFTorch", "3_LIFTorch"):
        lower[layer]["tau_mem"], upper[layer]["tau_mem"] = 0.01, 0.05
        lower[layer]["tau_syn"], upper[layer]["tau_syn"] = 0.015, 0.04
        lower[layer]["threshold"] = 0.02
    upper["0_LinearTorch"]["weight"] = 0.06
    return net, lower, upper


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_value_and_gradients_equal_rockpool(dtype):
    from rockpool.training.torch_loss import bounds_cost as rp_bounds_cost

    net, lower, upper = _bounded_net(dtype)
    theirs = rp_bounds_cost(net.parameters(), lower, upper)
    g_theirs = torch.autograd.grad(
        theirs, [p for _, p in net.named_parameters()], allow_unused=True
    )
    ours = bounds_cost(net.parameters(), lower, upper)
    g_ours = torch.autograd.grad(ours, [p for _, p in net.named_parameters()], allow_unused=True)
    assert ours.dtype == dtype
    assert ours.item() > 0  # the set-up really violates bounds
    torch.testing.assert_close(ours, theirs.to(dtype))
    for (name, p), a, b in zip(net.named_parameters(), g_ours, g_theirs):
        a = torch.zeros_like(p) if a is None else a  # ours: no gradient for unbounded leaves
        torch.testing.assert_close(a, b, msg=name)


def test_module_and_its_parameter_dict_agree():
    net, lower, upper = _bounded_net(torch.float32)
    flat_lower = {f"{k}.{kk}": v for k, d in lower.items() for kk, v in d.items()}
    flat_upper = {f"{k}.{kk}": v for k, d in upper.items() for kk, v in d.items()}
    assert bounds_cost(net, flat_lower, flat_upper).item() == pytest.approx(
        bounds_cost(net.parameters(), lower, upper).item()
    )
    assert not math.isnan(bounds_cost(net, flat_lower, flat_upper).item())
