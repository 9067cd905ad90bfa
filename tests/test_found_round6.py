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
