"""Verify mode: every cache has an oracle (issue 21).

Each test breaks one cache or fast path on purpose (a plan served for other bounds, a
kernel's gradient, the report's statistics, the projection, a module's cached
parameters, the JAX plan cache) and checks that verify mode raises a BoundsError naming
both answers, where without it the wrong answer would pass silently.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import parambounds
import parambounds.rockpool as pr
from parambounds import Bounds, BoundsError, bounds_cost
from parambounds.torch import _kernels, _plan, _report, _spec


@pytest.fixture
def verify():
    before = parambounds.get_verify()
    parambounds.set_verify(True)
    yield
    parambounds.set_verify(before)


@pytest.mark.parametrize(
    ("value", "expected"), [("1", True), ("on", True), ("0", False), ("", False)]
)
def test_the_environment_variable_turns_it_on(value, expected):
    code = "import parambounds; print(parambounds.get_verify())"
    env = {**os.environ, "PARAMBOUNDS_VERIFY": value}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == str(expected), out.stderr


def test_a_bogus_environment_variable_is_an_error_naming_it():
    code = (
        "import parambounds, torch\n"
        "try:\n"
        "    parambounds.bounds_cost({'w': torch.zeros(1)}, {'w': 0.0}, {'w': None})\n"
        "except parambounds.BoundsError as err:\n"
        "    print(err)\n"
    )
    env = {**os.environ, "PARAMBOUNDS_VERIFY": "maybe"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert "PARAMBOUNDS_VERIFY='maybe'" in out.stdout, out.stderr


def test_set_verify_turns_it_on_and_off():
    before = parambounds.get_verify()
    try:
        parambounds.set_verify(True)
        assert parambounds.get_verify() is True
        parambounds.set_verify(False)
        assert parambounds.get_verify() is False
    finally:
        parambounds.set_verify(before)


@pytest.mark.usefixtures("verify")
@pytest.mark.parametrize("cost", [bounds_cost, pr.bounds_cost])
def test_a_stale_plan_is_caught(monkeypatch, cost):
    monkeypatch.setattr(_plan, "_same", lambda *_: True)  # a front end gone wrong
    params = {"a": {"w": torch.randn(4, requires_grad=True)}}
    lower, upper = {"a": {"w": -0.1}}, {"a": {"w": 0.1}}
    cost(params, lower, upper)
    lower["a"]["w"] = -5.0
    with pytest.raises(BoundsError, match=r"lower bound of 'a.w' in the plan is -0.1.* -5.0"):
        cost(params, lower, upper)


@pytest.mark.usefixtures("verify")
def test_a_stale_plan_is_caught_by_the_spec(monkeypatch):
    model = torch.nn.Linear(2, 2)
    lo = torch.zeros(2)
    bounds = Bounds({"bias": (lo, None)})
    bounds.report(model)
    monkeypatch.setattr(_plan, "_tensor_state", lambda *_: 0)  # versions no longer seen
    _plan._SEEN.clear()
    bounds.report(model)
    monkeypatch.setattr(_plan, "_keyed_plan", lambda *_: plan_of_before)
    plan_of_before = _spec.plan(bounds, model)[0]
    with torch.no_grad():
        lo.fill_(3.0)
    for use in (bounds.cost, bounds.report, bounds.check, bounds.project_):
        with pytest.raises(BoundsError, match="lower bound of 'bias' in the plan"):
            use(model)


@pytest.mark.usefixtures("verify")
def test_a_wrong_gradient_is_caught_in_backward(monkeypatch):
    before = _kernels.get_kernel()
    _kernels.set_kernel("eager")
    right = _kernels.value_and_grad

    def doubled(*args, **kwargs):
        value, grad = right(*args, **kwargs)
        return value, grad * 2

    monkeypatch.setattr(_kernels, "value_and_grad", doubled)
    try:
        x = torch.tensor([3.0, 0.0, -3.0], requires_grad=True)
        cost = bounds_cost({"x": x}, {"x": -1.0}, {"x": 1.0}, penalty="quadratic")
        with pytest.raises(BoundsError, match=r"gradient of 'x' at index \(0,\).* 8.0.* 4.0"):
            cost.backward()
    finally:
        _kernels.set_kernel(before)


@pytest.mark.usefixtures("verify")
def test_a_wrong_cost_is_caught(monkeypatch):
    before = _kernels.get_kernel()
    _kernels.set_kernel("eager")
    right = _kernels.value_and_grad
    monkeypatch.setattr(
        _kernels, "value_and_grad", lambda *a, **k: (right(*a, **k)[0] + 1, right(*a, **k)[1])
    )
    try:
        with pytest.raises(BoundsError, match="the cost is 5.0, but the float64 reference"):
            bounds_cost({"x": torch.tensor([3.0])}, {"x": None}, {"x": 1.0}, penalty="quadratic")
    finally:
        _kernels.set_kernel(before)


@pytest.mark.usefixtures("verify")
def test_wrong_report_statistics_are_caught(monkeypatch):
    monkeypatch.setattr(_report, "_native_rows", lambda *_: [])
    monkeypatch.setattr(_report, "tensor_stats", lambda *_: torch.zeros(4, dtype=torch.float64))
    sd = {"w": torch.tensor([-2.0, 0.0, 2.0])}
    with pytest.raises(BoundsError, match=r"report of 'w'.* is \(3, 0, 0, 0, -1.0, 1.0\)"):
        Bounds({"w": (-1.0, 1.0)}).report(sd)


@pytest.mark.usefixtures("verify")
def test_a_projection_that_misses_is_caught(monkeypatch):
    monkeypatch.setattr(_spec, "run_projection_", lambda *_: None)
    monkeypatch.setattr(_spec, "project_plan_", lambda *_: None)
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.fill_(5.0)
    with pytest.raises(BoundsError, match=r"projection of 'weight' at index \(0, 0\)"):
        Bounds({"weight": (-1.0, 1.0)}).project_(model)


@pytest.mark.usefixtures("verify")
def test_stale_module_parameters_are_caught(monkeypatch):
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    bounds = Bounds({"*.weight": (-1.0, 1.0)})
    bounds.cost(model)
    monkeypatch.setattr(_spec, "_unchanged", lambda *_: True)
    model._modules["0"] = torch.nn.Linear(2, 2)
    with pytest.raises(BoundsError, match="module's parameters"):
        bounds.cost(model)


@pytest.mark.usefixtures("verify")
def test_a_stale_jax_plan_is_caught(monkeypatch):
    jnp = pytest.importorskip("jax.numpy")
    from parambounds.jax import _cost as jax_cost
    from parambounds.jax import bounds_cost as jax_bounds_cost

    monkeypatch.setattr(jax_cost, "bounds_key", lambda *_: ("the same",))
    params = {"w": jnp.array([0.0, 2.0])}
    jax_bounds_cost(params, {"w": 1.0}, {"w": None})
    with pytest.raises(BoundsError, match="lower bound of 'w' in the JAX plan cache"):
        jax_bounds_cost(params, {"w": -1.0}, {"w": None})


@pytest.mark.usefixtures("verify")
def test_verify_mode_passes_on_right_answers():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)).double()
    bounds = Bounds(
        {"0.weight": (-0.1, 0.1), "1.bias": (torch.tensor([0.0, -1.0]), None), "*": (None, 0.2)}
    )
    for _ in range(3):
        bounds.cost(model).backward()
        bounds.report(model)
        bounds.project_(model)
        bounds.check(model)
    x = torch.randn(100, dtype=torch.float16, requires_grad=True)
    for penalty in ("exp", "expm1", "quadratic", "linear"):
        bounds_cost({"x": x}, {"x": -0.5}, {"x": 0.25}, penalty=penalty).backward()
    pr.bounds_cost({"x": x}, {"x": -0.5}, {"x": 0.25}).backward()
    pr.summed_exp_boundary_loss(x, None, 0.1).backward()
