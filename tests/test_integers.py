"""Integer parameters compare exactly everywhere (issue 21, item 8).

float32 holds every integer only up to 2**24 and float64 up to 2**53: an int32 element
of 2**24 + 1 above a bound of 2**24 cost 0 (computed in float32) while the report
counted it and ``project_`` moved it. Now ``cost``, ``report``, ``check`` and
``project_`` (and the Rockpool drop-in) agree, against a reference in Python integers.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import parambounds.rockpool as pr
from parambounds import Bounds, bounds_cost


def ref(values, lo, hi):
    """Exact Python-integer reference: (cost as float64, elements outside, projected)."""
    lo_i = None if lo is None else math.ceil(lo)
    hi_i = None if hi is None else math.floor(hi)
    cost, outside, projected = 0.0, 0, []
    for v in values:
        e = 0
        if hi_i is not None and v > hi_i:
            e = v - hi_i
        if lo_i is not None and v < lo_i:
            e = lo_i - v
        if e:
            outside += 1
            cost += math.exp(min(float(e), 700.0))
        p = v if hi_i is None else min(v, hi_i)
        projected.append(p if lo_i is None else max(p, lo_i))
    return cost, outside, projected


def check(values, dtype, lo, hi):
    x = torch.tensor(values, dtype=dtype)
    want_cost, want_outside, want_projected = ref(values, lo, hi)
    spec = Bounds({"x": (lo, hi)})
    report = spec.report({"x": x})
    got = [spec.cost({"x": x}).item(), bounds_cost({"x": x}, {"x": lo}, {"x": hi}).item()]
    rock = pr.bounds_cost(
        {"x": x}, {"x": -math.inf if lo is None else lo}, {"x": math.inf if hi is None else hi}
    )
    got.append(rock.item())
    for c in got:
        assert (c == 0) == (want_cost == 0), (got, want_cost)
        if want_cost < 1e30:
            assert c == pytest.approx(want_cost, rel=1e-5)
    outside = sum(e.below + e.above for e in report.entries)  # no entry when unbounded
    assert outside == want_outside
    assert report.ok == (want_outside == 0)
    y = x.clone()
    spec.project_({"x": y})
    assert y.tolist() == want_projected
    assert spec.report({"x": y}).ok and spec.cost({"x": y}).item() == 0


@pytest.mark.parametrize(
    ("dtype", "big"),
    [(torch.int32, 2**24), (torch.int64, 2**53), (torch.int64, 2**62)],
    ids=["int32-2**24", "int64-2**53", "int64-2**62"],
)
@pytest.mark.parametrize("kind", ["int", "float", "upper", "lower"])
def test_past_float_resolution_everything_agrees(dtype, big, kind):
    values = [big + 1, big - 1, -big - 3, big, -big]
    lo, hi = {
        "int": (-big - 2, big),
        "float": (float(-big - 2), float(big)),
        "upper": (None, big),
        "lower": (-big, None),
    }[kind]
    check(values, dtype, lo, hi)


def test_extremes_of_int64():
    info = torch.iinfo(torch.int64)
    check([info.max, info.min, 0], torch.int64, info.min + 1, info.max - 1)
    check([info.max, info.min, 0], torch.int64, -1, 1)  # excesses past 2**63


def test_integer_tensor_bounds_are_exact():
    big = 2**53
    x = torch.tensor([big + 1, big + 3, 5], dtype=torch.int64)
    hi = torch.tensor([big, big + 3, 5], dtype=torch.int64)
    spec = Bounds({"x": (None, hi)})
    assert spec.report({"x": x}).entries[0].above == 1
    assert spec.cost({"x": x}).item() == pytest.approx(math.e, rel=1e-6)
    y = x.clone()
    spec.project_({"x": y})
    assert y.tolist() == [big, big + 3, 5]


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    dtype=st.sampled_from([torch.int32, torch.int64, torch.int16]),
)
def test_integers_against_python_integers(data, dtype):
    """Property: cost, report and project_ agree with exact Python integers."""
    info = torch.iinfo(dtype)
    ints = st.integers(info.min, info.max)
    values = data.draw(st.lists(ints, min_size=1, max_size=12))
    a, b = sorted(data.draw(st.lists(ints, min_size=2, max_size=2)))
    lo = data.draw(st.sampled_from([None, a, float(a)]))
    hi = data.draw(st.sampled_from([None, b, float(b)]))
    if isinstance(lo, float) and lo > info.max:  # rounded past the range: no value inside
        return
    if isinstance(lo, float) and isinstance(hi, float) and lo > hi:
        return
    if isinstance(lo, float) and isinstance(hi, int) and math.ceil(lo) > hi:
        return
    if isinstance(hi, float) and isinstance(lo, int) and lo > math.floor(hi):
        return
    check(values, dtype, lo, hi)
