"""Hard bounds in a real Rockpool training loop that uses ``astorch()`` (issue 21, item 13).

``reparametrize_`` moved a bounded parameter under ``parametrizations.*``, out of
Rockpool's own parameter registry: ``net.parameters().astorch()`` (Rockpool's way to
hand parameters to an optimizer) listed 8 of 10 tensors, and the reparametrized ones
never trained. Now the unconstrained tensors are in the registry too, and the loops
below train every tensor, inside the bounds at every step (checked in float64), with
``reparametrize_`` and with ``attach``.
"""

import torch

from parambounds import Bounds

from .conftest import rockpool_net

SPEC = {"*.tau_mem": (2e-3, 50e-3), "*.threshold": (0.0, None)}


def _inside(net):
    for name, p in net.named_parameters():
        if "parametrizations" in name:
            continue
        v = p.detach().double()
        if name.endswith("threshold"):
            assert (v >= 0.0).all(), name
    for lif in (net[1], net[3]):
        tau = lif.tau_mem.detach().double()  # the constrained value the model uses
        assert (tau >= 2e-3).all() and (tau <= 50e-3).all()


def _train(net, opt, params, steps=5):
    start = [p.detach().clone() for p in params]
    x = torch.rand(2, 20, 3)
    target = torch.rand(2, 20, 2)
    for _ in range(steps):
        out, _, _ = net(x)
        loss = torch.nn.functional.mse_loss(out, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        _inside(net)
    return [not torch.equal(p.detach(), s) for p, s in zip(params, start)]


def test_astorch_lists_every_tensor_after_reparametrize():
    net = rockpool_net()
    Bounds(SPEC).reparametrize_(net)
    listed = list(net.parameters().astorch())
    torch_names = dict(net.named_parameters())
    assert len(listed) == len(torch_names) == 10
    assert {id(p) for p in listed} == {id(p) for p in torch_names.values()}
    assert all(p.is_leaf and p.requires_grad for p in listed)
    z = net.parameters()["1_LIFTorch"]["parametrizations"]["tau_mem"]["original"]
    assert z is torch_names["1_LIFTorch.parametrizations.tau_mem.original"]


def test_a_rockpool_training_loop_with_astorch_trains_the_reparametrized_tensors():
    torch.manual_seed(0)
    net = rockpool_net()
    Bounds(SPEC).reparametrize_(net)
    params = list(net.parameters().astorch())
    taus = [net[1].tau_mem.detach().clone(), net[3].tau_mem.detach().clone()]
    changed = _train(net, torch.optim.Adam(params, lr=1e-2), params)
    assert all(changed), changed
    assert not torch.equal(net[1].tau_mem.detach(), taus[0])
    assert not torch.equal(net[3].tau_mem.detach(), taus[1])


def test_a_rockpool_training_loop_with_astorch_and_attach():
    torch.manual_seed(0)
    net = rockpool_net()
    with torch.no_grad():
        net[1].tau_mem.fill_(0.1)  # outside: attach pulls it in after the first step
    bounds = Bounds(SPEC)
    params = list(net.parameters().astorch())
    assert len(params) == 10
    opt = torch.optim.Adam(params, lr=1e-2)
    bounds.attach(opt, net)
    changed = _train(net, opt, params)
    assert all(changed), changed
    assert bounds.report(net).ok
    assert all(p is q for p, q in zip(params, net.parameters().astorch()))
