"""Train for a few steps with a deliberately large learning rate and assert the bounds
after every step, for the three uses of one spec."""

import pytest
import torch

from parambounds import Bounds

from .conftest import rockpool_net

STEPS = 8


def data():
    g = torch.Generator().manual_seed(0)
    return torch.rand(4, 20, 3, generator=g), torch.rand(4, 20, 2, generator=g)


def mlp_case():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    spec = {
        "0.weight": (-0.2, 0.2),
        "2.bias": (0.0, 0.5),
        "2.weight": (None, torch.full((16,), 0.05)),
    }

    def loss_fn(m, x, y):
        return torch.nn.functional.mse_loss(m(x), y)

    return model, spec, loss_fn


def snn_case():
    torch.manual_seed(0)
    net = rockpool_net()
    spec = {"*.tau_mem": (0.03, 0.06), "*.tau_syn": (0.02, 0.05), "*.threshold": (0.5, None)}

    def loss_fn(m, x, y):
        out, _, _ = m(30 * x)  # strong enough input to spike, so gradients flow
        return torch.nn.functional.mse_loss(out, y) + out.mean()

    return net, spec, loss_fn


CASES = {"mlp": mlp_case, "rockpool": snn_case}


def inside(bounds, model):
    return bounds.report(model).ok


@pytest.mark.parametrize("case", list(CASES))
def test_attach_keeps_every_parameter_inside_after_every_step(case):
    model, spec, loss_fn = CASES[case]()
    bounds = Bounds(spec)
    opt = torch.optim.Adam([p for _, p in model.named_parameters()], lr=0.5)
    bounds.attach(opt, model)
    x, y = data()
    for _ in range(STEPS):
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()
        assert inside(bounds, model)


@pytest.mark.parametrize("case", list(CASES))
def test_reparametrize_keeps_every_parameter_inside_and_gradients_flow(case):
    model, spec, loss_fn = CASES[case]()
    bounds = Bounds(spec)
    bounds.reparametrize_(model)
    opt = torch.optim.Adam([p for _, p in model.named_parameters()], lr=0.5)
    x, y = data()
    originals = [p for n, p in model.named_parameters() if n.endswith(".original")]
    assert originals
    for _ in range(STEPS):
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in originals)
        opt.step()
        assert inside(bounds, model)


@pytest.mark.parametrize("case", list(CASES))
def test_penalty_pulls_parameters_back_inside(case):
    model, spec, loss_fn = CASES[case]()
    bounds = Bounds(spec)  # Rockpool's exp: a pull of at least 1 at the bound
    with torch.no_grad():  # start outside: every bounded parameter pushed past a bound
        bounds.project_(model)
        lower, upper = bounds.bounds_of(model)
        for name, p in model.named_parameters():
            if lower[name] is not None or upper[name] is not None:
                edge = torch.as_tensor(lower[name] if lower[name] is not None else upper[name])
                direction = -1.0 if lower[name] is not None else 1.0
                size = 0.5 * edge.abs() + 1e-3  # a relative push: time constants stay positive
                p.copy_(edge + direction * size * (0.1 + torch.rand_like(p)))
    start = sum(e.below + e.above for e in bounds.report(model).entries)
    assert start > 0
    opt = torch.optim.Adam([p for _, p in model.named_parameters()], lr=0.02)
    x, y = data()
    counts = []
    for _ in range(20):  # inside after 5 steps here (mlp; rockpool after 2): 20 leave margin
        opt.zero_grad()
        (loss_fn(model, x, y) + 100.0 * bounds.cost(model)).backward()
        opt.step()
        counts.append(sum(e.below + e.above for e in bounds.report(model).entries))
    assert counts[-1] < start
    assert counts[-10:] == [0] * 10  # back inside, and staying there
