"""Bounds.bake_: a reparametrized model back to plain parameters, trained values kept;
and attach's refusal of an optimizer that trains none of the bounded parameters."""

import pytest
import torch
from torch.nn.utils import parametrize

from parambounds import Bounds, BoundsError

from .conftest import rockpool_net


def net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))


SPEC = {"0.weight": (-0.5, 0.5), "1.weight": (0.5, 1.5), "2.bias": (0.0, None)}


def train(model, steps=5):
    torch.manual_seed(1)
    opt = torch.optim.Adam(model.parameters(), lr=0.3)
    x = torch.randn(8, 3)
    for _ in range(steps):
        opt.zero_grad()
        (model(x) ** 2).mean().neg().backward()  # pushes against the bounds
        opt.step()


def values(model, names):
    return {
        n: model.get_parameter(n).detach().clone()
        if n in dict(model.named_parameters())
        else getattr(model.get_submodule(n.rpartition(".")[0]), n.rpartition(".")[2])
        .detach()
        .clone()
        for n in names
    }


def test_bake_gives_plain_parameters_under_the_original_names_with_the_trained_values(tmp_path):
    model = net()
    keys = list(model.state_dict())
    bounds = Bounds(SPEC)
    bounds.reparametrize_(model)
    train(model)
    trained = values(model, SPEC)
    assert bounds.bake_(model) is model
    assert list(model.state_dict()) == keys  # in the same order: optimizer states match
    for name, v in trained.items():
        p = model.get_parameter(name)
        assert type(p) is torch.nn.Parameter and p.requires_grad
        assert torch.equal(p.detach(), v), name
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    bounds.check(model)
    # torch.save / load_state_dict into a fresh model: the same values
    torch.save(model.state_dict(), tmp_path / "m.pt")
    fresh = net()
    fresh.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    for name, v in trained.items():
        assert torch.equal(fresh.get_parameter(name).detach(), v), name


def test_the_same_parameter_objects_stay_and_training_goes_on():
    model = net()
    bounds = Bounds(SPEC)
    bounds.reparametrize_(model)
    originals = {n: p for n, p in model.named_parameters()}
    bounds.bake_(model)
    by_id = {id(p) for p in originals.values()}
    assert all(id(p) in by_id for p in model.parameters())
    # a new optimizer and a projection keep training inside
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    bounds.attach(opt, model)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(4, 3)).pow(2).mean().neg().backward()
        opt.step()
        bounds.check(model)


def test_reparametrize_bake_reparametrize_again():
    model = net()
    bounds = Bounds(SPEC)
    bounds.reparametrize_(model)
    train(model, 3)
    bounds.bake_(model)
    baked = values(model, SPEC)
    bounds.reparametrize_(model)
    again = values(model, SPEC)
    for name in SPEC:  # sigmoid(logit(x)): equal up to rounding (values at a bound move inside)
        torch.testing.assert_close(again[name], baked[name], atol=2e-6, rtol=1e-5)
    train(model, 3)
    bounds.bake_(model)
    bounds.check(model)
    assert "0.weight" in model.state_dict()


def test_bake_without_reparametrization_changes_nothing():
    model = net()
    before = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
    Bounds(SPEC).bake_(model)
    for n, p in model.named_parameters():
        assert p is before[n][0] and torch.equal(p, before[n][1])


def test_bake_only_what_the_spec_bounds():
    model = net()
    Bounds(SPEC).reparametrize_(model)
    Bounds({"0.weight": (-0.5, 0.5)}).bake_(model)
    assert not parametrize.is_parametrized(model[0], "weight")
    assert parametrize.is_parametrized(model[1], "weight")


def test_bake_refuses_other_parametrizations_stacked_on_ours_and_changes_nothing():
    model = net()
    bounds = Bounds(SPEC)
    bounds.reparametrize_(model)
    parametrize.register_parametrization(model[1], "weight", torch.nn.Identity())
    with pytest.raises(
        BoundsError,
        match=r"cannot bake '1\.weight': its parametrizations are BoundedParametrization, Identity",
    ):
        bounds.bake_(model)
    assert parametrize.is_parametrized(model[0], "weight")  # checked first: nothing baked


def test_bake_needs_a_module():
    with pytest.raises(BoundsError, match="bake_ needs a torch.nn.Module, got dict"):
        Bounds({"w": (0, 1)}).bake_({"w": torch.ones(2)})


def test_rockpool_save_and_load_after_bake(tmp_path):
    model = rockpool_net()
    bounds = Bounds({"*.tau_mem": (0.01, 0.05), "*.threshold": (0.5, 2.0)})
    bounds.reparametrize_(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".original"):
                p.add_(0.7)
    names = ["1_LIFTorch.tau_mem", "1_LIFTorch.threshold", "3_LIFTorch.tau_mem"]
    trained = values(model, names)
    bounds.bake_(model)
    model.save(str(tmp_path / "net.json"))
    loaded = rockpool_net()
    loaded.load(str(tmp_path / "net.json"))
    for name in names:
        assert torch.equal(loaded.get_parameter(name).detach(), trained[name]), name


# ------------------------------------------------------------ attach


def test_attach_refuses_an_optimizer_without_bounded_parameters():
    model = net()
    other = torch.nn.Linear(2, 2)
    with pytest.raises(
        BoundsError,
        match=r"the optimizer holds none of the bounded parameters \('0\.weight', '1\.weight', "
        r"'2\.bias'\); attach the optimizer that trains them",
    ):
        Bounds(SPEC).attach(torch.optim.SGD(other.parameters(), lr=0.1), model)


def test_attach_takes_an_optimizer_with_some_bounded_parameters_and_projects_them_all():
    model = net()
    model[2].bias.requires_grad_(False)  # frozen, and outside
    with torch.no_grad():
        model[2].bias.fill_(-1.0)
    opt = torch.optim.SGD([model[0].weight], lr=0.1)
    Bounds(SPEC).attach(opt, model)
    train_step = model(torch.randn(2, 3)).sum()
    train_step.backward()
    opt.step()
    Bounds(SPEC).check(model)


def test_attach_on_a_reparametrized_model_knows_the_unconstrained_originals():
    model = net()
    bounds = Bounds(SPEC)
    bounds.reparametrize_(model)
    bounds.attach(torch.optim.SGD(model.parameters(), lr=0.1), model)  # no error
    with pytest.raises(BoundsError, match="holds none of the bounded parameters"):
        bounds.attach(torch.optim.SGD([model[2].weight], lr=0.1), model)
