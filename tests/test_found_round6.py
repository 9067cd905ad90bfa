"""Defects found in round 6 of attacking the caches and fast paths.

Each test compares the library with a plain reference written here (Python integers,
float64), never with values the library produced.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

import parambounds
from parambounds import Bounds, bounds_cost

BIG = 2**62  # float64 cannot tell BIG from BIG + 1


@pytest.fixture(params=[False, True], ids=["plain", "verify"], autouse=True)
def verify(request):
    before = parambounds.get_verify()
    parambounds.set_verify(request.param)
    yield request.param
    parambounds.set_verify(before)


def ref_int_cost(pairs):
    """The exp cost of int64 tensors under integer bounds, in Python integers."""
    total = 0.0
    for x, lo in pairs:
        for v in x.tolist():
            if v < lo:
                total += math.exp(lo - v)
    return total


def test_integer_bounds_equal_as_floats_are_not_merged():
    """Two Python int lower bounds that float64 cannot tell apart (2**62, 2**62 + 1) on
    two int64 parameters: each keeps its own bound, in either order (they were grouped by
    their float value, and the group kept the first one's exact bound)."""
    a = torch.tensor([BIG], dtype=torch.int64)
    b = torch.tensor([BIG], dtype=torch.int64)
    for lo_a, lo_b in ((BIG, BIG + 1), (BIG + 1, BIG)):
        want = ref_int_cost([(a, lo_a), (b, lo_b)])
        got = bounds_cost({"a": a, "b": b}, {"a": lo_a, "b": lo_b}, {"a": None, "b": None})
        assert math.isclose(float(got), want, rel_tol=1e-6), (float(got), want)
        sd = {"a": a.clone(), "b": b.clone()}
        spec = Bounds({"a": (lo_a, None), "b": (lo_b, None)})
        report = {e.name: e for e in spec.report(sd).entries}
        assert report["a"].below == int(BIG < lo_a)
        assert report["b"].below == int(BIG < lo_b)
        spec.project_(sd)
        assert int(sd["a"][0]) == max(BIG, lo_a)
        assert int(sd["b"][0]) == max(BIG, lo_b)


def test_numpy_integer_bound_is_not_served_a_float_bounds_plan():
    """A numpy int64 bound of 2**62 + 1 after a float bound of 2**62 on the same tree:
    the plan cache took them for the same key (numpy compares an int64 with a float in
    float64) and served the float bound's plan."""
    x = torch.tensor([BIG], dtype=torch.int64)
    assert float(bounds_cost({"x": x}, {"x": float(BIG)}, {"x": None})) == 0.0
    got = bounds_cost({"x": x}, {"x": np.int64(BIG + 1)}, {"x": None})
    assert math.isclose(float(got), math.e, rel_tol=1e-6), float(got)


def test_fraction_bound_after_float_bound_is_not_served_its_plan():
    """A Fraction bound whose float value equals an earlier float bound is another bound."""
    x = torch.tensor([BIG], dtype=torch.int64)
    assert float(bounds_cost({"x": x}, {"x": float(BIG)}, {"x": None})) == 0.0
    lo = Fraction(2 * BIG + 1, 2)  # BIG + 1/2: rounded up to a whole number, BIG + 1
    got = bounds_cost({"x": x}, {"x": lo}, {"x": None})
    assert math.isclose(float(got), math.e, rel_tol=1e-6), float(got)


@pytest.mark.parametrize(
    "lower",
    [torch.tensor(BIG + 1), Fraction(2 * BIG + 1, 2), np.int64(BIG + 1)],
    ids=["0d-int-tensor", "fraction", "numpy-int64"],
)
def test_exact_integer_bounds_of_every_number_type(lower):
    """An integer bound kept exactly whatever its type (a 0-d integer tensor was read as a
    float, a Fraction rounded to a float before being rounded inward), by cost, report,
    check and project_ alike."""
    sd = {"w": torch.tensor([BIG, BIG + 5], dtype=torch.int64)}
    want_lower = BIG + 1  # the whole numbers at or above the bound start here
    assert math.isclose(float(bounds_cost(sd, {"w": lower}, {"w": None})), math.e, rel_tol=1e-6)
    spec = Bounds({"w": (lower, None)})
    assert math.isclose(float(spec.cost(sd)), math.e, rel_tol=1e-6)
    (entry,) = spec.report(sd).entries
    assert (entry.below, entry.above, entry.max_excess) == (1, 0, 1.0)
    spec.project_(sd)
    assert sd["w"].tolist() == [want_lower, BIG + 5]


class _Double(torch.nn.Module):
    def forward(self, x):
        return 2 * x


def _ref_report(named, lo, hi):
    """(elements below, elements above, largest excess) of plain float64 tensors."""
    below = above = 0
    excess = 0.0
    for t in named.values():
        x = t.detach().double()
        below += int((x < lo).sum())
        above += int((x > hi).sum())
        excess = max(excess, float((lo - x).clamp_min(0).max()), float((x - hi).clamp_min(0).max()))
    return below, above, excess


@pytest.mark.parametrize("parametrized", [0, 1])
def test_weight_tied_then_parametrized_in_one_module_is_bounded(parametrized):
    """``m[1].weight = m[0].weight``, then a parametrization (``2 * w``) on one of them:
    the model sees two different weights, 0.4 and 0.8. ``named_parameters()`` lists the
    shared original once, so the parametrized ``weight`` was left out when the plain name
    came first: 0.8 outside [-0.5, 0.5] reported inside, cost 0."""
    import torch.nn.utils.parametrize as parametrize

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    with torch.no_grad():
        model[0].weight.fill_(0.4)
    model[1].weight = model[0].weight
    parametrize.register_parametrization(model[parametrized], "weight", _Double())
    seen = {"0.weight": model[0].weight, "1.weight": model[1].weight}  # what the model uses
    lo, hi = -0.5, 0.5
    want_cost = sum(
        float(torch.where(x.double() > hi, torch.exp(x.double() - hi), 0.0).sum())
        for x in seen.values()
    )
    bounds = Bounds({"*.weight": (lo, hi)})
    assert math.isclose(float(bounds.cost(model)), want_cost, rel_tol=1e-6)
    report = bounds.report(model)
    got = (
        sum(e.below for e in report.entries),
        sum(e.above for e in report.entries),
        max(e.max_excess for e in report.entries),
    )
    want = _ref_report(seen, lo, hi)
    assert got[:2] == want[:2] and math.isclose(got[2], want[2], rel_tol=1e-6), (got, want)


def test_shared_parametrized_module_is_listed_once():
    """One parametrized module under two names counts once, as a plain shared module."""
    import torch.nn.utils.parametrize as parametrize

    shared = torch.nn.Linear(2, 2)
    with torch.no_grad():
        shared.weight.fill_(0.4)  # seen as 0.8
    parametrize.register_parametrization(shared, "weight", _Double())
    model = torch.nn.Sequential(shared, shared)
    bounds = Bounds({"*.weight": (-0.5, 0.5)})
    want = 4 * math.exp(0.8 - 0.5)  # four elements, counted once
    assert math.isclose(float(bounds.cost(model)), want, rel_tol=1e-5)


def test_numpy_float64_bound_then_a_tensor_bound_in_its_place():
    """A numpy.float64 bound (a float subclass) was kept as is in the plan cache's key;
    the next key with a bound tensor in its place was compared with it by NumPy, which
    raised ``ValueError: setting an array element with a sequence``."""
    x = torch.tensor([2.0, -3.0, 0.5, 1.5])
    lower = torch.zeros(4)

    def ref(hi):
        x64 = x.double()
        below = torch.where(x64 < 0, torch.exp(-x64), 0.0).sum()
        return float(below + torch.where(x64 > hi, torch.exp(x64 - hi), 0.0).sum())

    for upper, hi in ((np.float64(1.0), 1.0), (torch.full((4,), 2.0), 2.0), (np.float64(1.0), 1.0)):
        got = bounds_cost({"x": x}, {"x": lower}, {"x": upper})
        assert math.isclose(float(got), ref(hi), rel_tol=1e-6), (float(got), ref(hi))


def test_jax_int64_leaves_under_integer_bounds_past_2_53():
    """Was a strict xfail: the leaf and its bound were compared in float64 (cost 0, inside)."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    from parambounds.jax import Bounds as JaxBounds
    from parambounds.jax import bounds_cost as jax_bounds_cost

    enable = getattr(jax, "enable_x64", None)
    if enable is None:
        from jax.experimental import enable_x64 as enable
    with enable(True):
        sd = {"w": jnp.array([BIG, BIG + 5], dtype=jnp.int64)}
        assert sd["w"].tolist() == [BIG, BIG + 5]  # int64 held exactly
        want = ref_int_cost([(torch.tensor(sd["w"].tolist()), BIG + 1)])  # e
        got = jax_bounds_cost(sd, {"w": BIG + 1}, {"w": None})
        assert math.isclose(float(got), want, rel_tol=1e-6), (float(got), want)
        (entry,) = JaxBounds({"w": (BIG + 1, None)}).report(sd).entries
        assert entry.below == 1
