"""Silent wrong answers of the per-step path: infinities, higher derivatives, torch.func,
learnable bounds, threads, the plan cache and the compiled kernel's variants.

References are plain Python (``math``) or Rockpool 3.1.0 where Rockpool is right.
"""

import math

import pytest
import torch

from parambounds import Bounds, bounds_cost, summed_exp_boundary_loss

INF = math.inf


def python_cost(xs, lower, upper):
    """Rockpool's exp penalty, element by element in plain Python (float64)."""
    total = 0.0
    for x, lo, hi in zip(xs, lower, upper):
        if math.isnan(x):
            return math.nan
        if x > hi:
            total += math.exp(min(x - hi, 700.0)) if x - hi < INF else INF
        elif x < lo:
            total += math.exp(min(lo - x, 700.0)) if lo - x < INF else INF
    return total


# ------------------------------------------------------------------ infinities


def test_infinite_parameter_on_its_open_side_costs_nothing():
    x = torch.tensor([-INF, 1.5])
    assert summed_exp_boundary_loss(x, None, 1.0).item() == pytest.approx(math.exp(0.5))
    assert summed_exp_boundary_loss(torch.tensor([INF, 1.5]), 1.0, None).item() == 0.0
    assert summed_exp_boundary_loss(torch.tensor([INF, 0.5]), 1.0, None).item() == pytest.approx(
        math.exp(0.5)
    )


def test_infinities_under_per_element_bounds_match_python():
    xs = [INF, -INF, INF, -INF, 0.5, -3.0]
    lo = [-INF, -INF, 0.0, -1.0, 0.0, -2.0]
    hi = [INF, 1.0, INF, 1.0, INF, INF]
    x = torch.tensor(xs, dtype=torch.float64, requires_grad=True)
    cost = bounds_cost(
        {"x": x}, {"x": torch.tensor(lo, dtype=torch.float64)}, {"x": torch.tensor(hi)}
    )
    assert cost.item() == python_cost(xs, lo, hi) == INF
    finite = [0, 2, 4, 5]  # elements inside (some of them infinite) and one finite violator
    sub = bounds_cost(
        {"x": x[finite]},
        {"x": torch.tensor([lo[i] for i in finite])},
        {"x": torch.tensor([hi[i] for i in finite])},
    )
    assert sub.item() == pytest.approx(math.exp(1.0))
    (g,) = torch.autograd.grad(cost, x)
    assert not g.isnan().any()
    assert g[[0, 2, 4]].tolist() == [0.0, 0.0, 0.0]


def test_report_agrees_with_cost_at_infinity():
    params = {"a": torch.tensor([INF, 2.0]), "b": torch.tensor([-INF, 0.0])}
    bounds = Bounds({"a": (1.0, None), "b": (None, 1.0)})
    assert bounds.cost(params).item() == 0.0
    report = bounds.report(params)
    assert report.ok
    assert [(e.below, e.above, e.nan) for e in report.entries] == [(0, 0, 0), (0, 0, 0)]
    params["a"][1] = -INF
    assert bounds.cost(params).item() == INF
    assert bounds.report(params).entries[0].below == 1
