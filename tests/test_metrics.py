"""Bounds.metrics: 0-d tensors for any logger, read on the host by nobody but the logger."""

import re

import pytest
import torch

from parambounds import Bounds, BoundsError, get_verify


def model_outside():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    with torch.no_grad():
        m[0].weight.copy_(torch.linspace(-3, 3, 12).view(4, 3))  # 8 of 12 outside (-1, 1)
        m[1].bias.copy_(torch.tensor([-5.0, float("nan")]))  # one below 0, one NaN
        m[1].weight.copy_(torch.linspace(-0.5, 0.5, 8).view(2, 4))
    return m


SPEC = {"0.weight": (-1.0, 1.0), "1.bias": (0.0, None), "1.weight": (None, torch.full((4,), 0.1))}


def test_keys_totals_first_then_each_parameter_in_model_order():
    m = Bounds(SPEC).metrics(model_outside())
    names = ["0.weight", "1.weight", "1.bias"]
    assert list(m) == ["bounds/outside", "bounds/excess", "bounds/penalty"] + [
        f"bounds/{n}/{k}" for n in names for k in ("outside", "excess", "penalty")
    ]


def test_values_by_hand():
    m = Bounds(SPEC, penalty="quadratic").metrics(model_outside())
    w = torch.linspace(-3, 3, 12)
    over = (w.abs() - 1).clamp_min(0)
    assert m["bounds/0.weight/outside"].item() == 8
    assert m["bounds/0.weight/excess"].item() == pytest.approx(2.0)
    assert m["bounds/0.weight/penalty"].item() == pytest.approx(float((over**2).sum()), rel=1e-6)
    # 1.weight: linspace(-0.5, 0.5, 8) > 0.1 for 3 elements (0.21, 0.36, 0.5)
    assert m["bounds/1.weight/outside"].item() == 3
    assert m["bounds/1.weight/excess"].item() == pytest.approx(0.4, rel=1e-6)
    # 1.bias: -5 below 0 and a NaN: two outside; the penalty is NaN, as cost's is
    assert m["bounds/1.bias/outside"].item() == 2
    assert m["bounds/1.bias/excess"].item() == pytest.approx(5.0)
    assert torch.isnan(m["bounds/1.bias/penalty"])
    assert m["bounds/outside"].item() == 13
    assert m["bounds/excess"].item() == pytest.approx(5.0)


@pytest.mark.parametrize("penalty", ["exp", "expm1", "quadratic", "linear"])
def test_agrees_with_report_and_cost(penalty):
    model = model_outside()
    with torch.no_grad():
        model[1].bias[1] = 3.0  # no NaN: the cost is finite
    bounds = Bounds(SPEC, penalty=penalty)
    m = bounds.metrics(model)
    report = bounds.report(model)
    for e in report.entries:
        assert m[f"bounds/{e.name}/outside"].item() == e.below + e.above + e.nan
        assert m[f"bounds/{e.name}/excess"].item() == e.max_excess
    assert m["bounds/outside"].item() == sum(e.below + e.above + e.nan for e in report.entries)
    assert m["bounds/excess"].item() == max(e.max_excess for e in report.entries)
    assert m["bounds/penalty"].item() == pytest.approx(bounds.cost(model).item(), rel=1e-5)
    for name in ("0.weight", "1.weight", "1.bias"):
        alone = Bounds({name: SPEC[name]}, penalty=penalty)
        assert m[f"bounds/{name}/penalty"].item() == pytest.approx(
            alone.cost(model).item(), rel=1e-5
        )


def test_inside_everything_is_zero():
    model = model_outside()
    bounds = Bounds(SPEC)
    with torch.no_grad():
        model[1].bias.zero_()
    bounds.project_(model)
    assert all(v.item() == 0 for v in bounds.metrics(model).values())


@pytest.mark.skipif(get_verify(), reason="verify mode reads every answer on the host")
def test_values_are_0d_tensors_on_the_parameters_device_and_never_read_on_the_host(monkeypatch):
    model = model_outside()
    bounds = Bounds(SPEC)
    bounds.metrics(model)  # the plan is checked (and read) once, on first use

    def refuse(*_args, **_kwargs):
        raise AssertionError("host synchronisation")

    for method in ("item", "tolist", "__bool__", "__float__", "__int__", "numpy"):
        monkeypatch.setattr(torch.Tensor, method, refuse)
    m = bounds.metrics(model)
    monkeypatch.undo()
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in m.values())
    assert {v.device for v in m.values()} == {torch.device("cpu")}
    assert not any(v.requires_grad for v in m.values())


def test_prefix_and_totals_only():
    m = Bounds(SPEC).metrics(model_outside(), prefix="train/b_", per_parameter=False)
    assert list(m) == ["train/b_outside", "train/b_excess", "train/b_penalty"]


def test_keys_are_accepted_by_loggers_as_they_are():
    # MLflow's rule for metric names (the strictest of TensorBoard, W&B, MLflow, Lightning)
    from rockpool.nn.combinators import Sequential
    from rockpool.nn.modules import LIFTorch, LinearTorch

    net = Sequential(LinearTorch((3, 5)), LIFTorch(5))
    m = Bounds({"*.tau_mem": (1e-3, 0.1), "*.weight": (-1, 1)}).metrics(net)
    assert "bounds/1_LIFTorch.tau_mem/excess" in m
    assert all(re.fullmatch(r"[\w./\- :]+", k) for k in m)


def test_a_state_dict_and_an_empty_parameter():
    sd = {"w": torch.tensor([2.0, 0.0]), "e": torch.empty(0)}
    m = Bounds({"*": (-1, 1)}).metrics(sd)
    assert m["bounds/w/outside"].item() == 1
    assert m["bounds/e/outside"].item() == 0 and m["bounds/e/penalty"].item() == 0
    assert m["bounds/outside"].item() == 1


def test_nothing_bounded_gives_zero_totals():
    m = Bounds({"nothing.*": (0, 1)}, strict=False).metrics(torch.nn.Linear(2, 2))
    assert {k: v.item() for k, v in m.items()} == {
        "bounds/outside": 0.0,
        "bounds/excess": 0.0,
        "bounds/penalty": 0.0,
    }


def test_errors_name_the_parameter():
    with pytest.raises(BoundsError, match=r"'0\.weight'.*does not broadcast"):
        Bounds({"0.weight": (torch.zeros(5), None)}).metrics(model_outside())


def test_jax_pytrees_are_refused():
    jnp = pytest.importorskip("jax.numpy")
    with pytest.raises(BoundsError, match="metrics is for torch models and state_dicts, got dict"):
        Bounds({"w": (0, 1)}).metrics({"w": jnp.ones(2)})


def test_a_reparametrized_model_reports_under_the_original_names():
    model = model_outside()
    bounds = Bounds({"0.weight": (-1.0, 1.0)})
    bounds.reparametrize_(model)
    m = bounds.metrics(model)
    assert list(m)[3:] == [f"bounds/0.weight/{k}" for k in ("outside", "excess", "penalty")]
    assert all(v.item() == 0 for v in m.values())
    assert not any(v.requires_grad for v in m.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_host_synchronisation_on_cuda():
    model = model_outside().cuda()
    with torch.no_grad():
        model[1].bias.zero_()
    bounds = Bounds(SPEC)
    bounds.metrics(model)  # the plan is checked (and read) once, on first use
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        m = bounds.metrics(model)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert {v.device.type for v in m.values()} == {"cuda"}
    assert m["bounds/outside"].item() == 8 + 3
