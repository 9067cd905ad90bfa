"""Hard bounds in a real Rockpool training loop that uses ``astorch()`` (issue 21, item 13).

``reparametrize_`` moved a bounded parameter under ``parametrizations.*``, out of
Rockpool's own parameter registry: ``net.parameters().astorch()`` (Rockpool's way to
hand parameters to an optimizer) listed 8 of 10 tensors, and the reparametrized ones
never trained. It now refuses a Rockpool module, naming the parameter and the way that
works (``attach``/``project_``); the loop below trains every tensor with ``attach``
and ends inside the bounds, checked in float64.
"""

import pytest
import torch

from parambounds import Bounds, BoundsError

from .conftest import rockpool_net

SPEC = {"*.tau_mem": (2e-3, 50e-3), "*.threshold": (0.0, None)}


def _inside(net):
    for name, p in net.named_parameters():
        v = p.detach().double()
        if name.endswith("tau_mem"):
            assert (v >= 2e-3).all() and (v <= 50e-3).all(), name
        if name.endswith("threshold"):
            assert (v >= 0.0).all(), name


def test_reparametrize_refuses_a_rockpool_module_and_changes_nothing():
    net = rockpool_net()
    before = {k: v.detach().clone() for k, v in net.named_parameters()}
    assert len(list(net.parameters().astorch())) == 10
    with pytest.raises(
        BoundsError, match=r"cannot reparametrize '1_LIFTorch.tau_mem'.*Rockpool"
    ) as err:
        Bounds(SPEC).reparametrize_(net)
    assert "astorch" in str(err.value) and "attach" in str(err.value)
    assert len(list(net.parameters().astorch())) == 10
    after = dict(net.named_parameters())
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_a_rockpool_training_loop_with_astorch_trains_every_tensor_inside_its_bounds():
    torch.manual_seed(0)
    net = rockpool_net()
    with torch.no_grad():
        net[1].tau_mem.fill_(0.1)  # outside: attach pulls it in after the first step
    bounds = Bounds(SPEC)
    params = list(net.parameters().astorch())
    assert len(params) == 10
    start = [p.detach().clone() for p in params]
    opt = torch.optim.Adam(params, lr=1e-2)
    bounds.attach(opt, net)
    x = torch.rand(2, 20, 3)
    target = torch.rand(2, 20, 2)
    for _ in range(5):
        out, _, _ = net(x)
        loss = torch.nn.functional.mse_loss(out, target) + bounds.cost(net)
        opt.zero_grad()
        loss.backward()
        opt.step()
        _inside(net)
    changed = [not torch.equal(p.detach(), s) for p, s in zip(params, start)]
    assert all(changed), changed  # every tensor trains
    assert bounds.report(net).ok
    assert all(p is q for p, q in zip(params, net.parameters().astorch()))
