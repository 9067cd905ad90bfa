"""The report's numbers per group (native, segment-reduced and per-tensor paths).

Every path is checked against plain Python (float64 comparisons with the bounds as
given) and against ``project_``: an element is reported outside exactly when the
projection moves it.
"""

import math

import pytest
import torch

from parambounds import Bounds, BoundsError
from parambounds.torch import _native
from parambounds.torch import _plan as P
from parambounds.torch import _report as TR

INF, NAN = math.inf, math.nan
SPECIAL = [INF, -INF, NAN, -0.0, 0.0, 1.5, -1.5, 2.0, 3.0, -7.25, 1e30, -1e30]


def _no_native(wait=False):  # noqa: ARG001 - the signature of _native.get
    return None


def _batching(on):
    return lambda device: on and device is not None


@pytest.fixture(params=["native", "batched", "per-tensor"])
def path(request, monkeypatch):
    """Force one of the report's paths (tiny batches, so that every branch runs)."""
    monkeypatch.setattr(TR, "_SMALL", 16)
    if request.param == "native":
        try:
            _native.build(verbose=False)
        except RuntimeError as err:  # pragma: no cover - no compiler here
            pytest.skip(f"native kernel unavailable: {err}")
    else:
        monkeypatch.setattr(TR._native, "get", _no_native)
    monkeypatch.setattr(TR, "_batched", _batching(request.param == "batched"))
    return request.param


def model_values(dtype):
    g = torch.Generator().manual_seed(0)
    shapes = [(), (0,), (3,), (2, 5), (7,), (40,), (4, 4), (1,), (0, 3), (33,)]
    out = {}
    for k, shape in enumerate(shapes):
        x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2.5).flatten()
        if x.numel() >= 3:
            special = torch.tensor(SPECIAL[k % 4 :: 2], dtype=torch.float64)[: x.numel()]
            x[: special.numel()] = special
        out[f"p{k}"] = x.reshape(shape).to(dtype)
    return out


def reference(x, lo, hi):
    """[below, above, max excess, nan] in plain Python, with the bounds as given."""
    values = [float(v) for v in x.to(torch.float64).flatten().tolist()]
    below = sum(1 for v in values if lo is not None and v < lo)
    above = sum(1 for v in values if hi is not None and v > hi)
    nan = sum(1 for v in values if math.isnan(v))
    return below, above, nan


def check(report, params, lo, hi, dtype):
    for e in report.entries:
        x = params[e.name]
        below, above, nan = reference(x, lo, hi)
        assert (e.below, e.above, e.nan) == (below, above, nan), e.name
        big = torch.finfo(dtype).max if dtype.is_floating_point else torch.finfo(torch.float64).max
        diffs = [
            v - hi if hi is not None and v > hi else lo - v
            for v in x.to(torch.float64).flatten().tolist()
            if (hi is not None and v > hi) or (lo is not None and v < lo)
        ]
        want = min(max(diffs, default=0.0), big)
        rel = 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-6
        assert e.max_excess == pytest.approx(want, rel=rel), e.name


DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.mark.usefixtures("path")
@pytest.mark.parametrize("dtype", DTYPES)
def test_counts_and_excess_against_plain_python(dtype):
    params = model_values(dtype)
    for lo, hi in [(-1.5, 2.0), (None, 2.0), (-1.5, None), (0.0, 3.0)]:
        report = Bounds({"*": (lo, hi)}).report(params)
        check(report, params, lo, hi, dtype)


@pytest.mark.usefixtures("path")
@pytest.mark.parametrize("dtype", DTYPES)
def test_bounds_between_values_of_the_dtype_are_exact(dtype):
    """0.1 is no float value: counts compare with 0.1 itself, as float64 does."""
    params = model_values(dtype)
    params = {k: v * 0.05 for k, v in params.items()}
    report = Bounds({"*": (-0.1, 0.1)}).report(params)
    for e in report.entries:
        assert (e.below, e.above, e.nan) == reference(params[e.name], -0.1, 0.1), e.name


@pytest.mark.usefixtures("path")
def test_integer_and_empty_tensors():
    params = {"i": torch.tensor([1, 5, -7, 0, 2]), "e": torch.zeros(0), "s": torch.tensor(9.0)}
    r = Bounds({"*": (-1.5, 2.5)}).report(params).to_dict()
    # integers: the bounds rounded inward to whole numbers (-1, 2), as project_ uses them
    assert (r["i"]["below"], r["i"]["above"], r["i"]["max_excess"]) == (1, 1, 6.0)
    assert (r["e"]["below"], r["e"]["above"], r["e"]["nan"], r["e"]["max_excess"]) == (0, 0, 0, 0)
    assert (r["s"]["above"], r["s"]["max_excess"]) == (1, 6.5)


@pytest.mark.usefixtures("path")
def test_non_contiguous_and_per_element_bounds():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(6, 9, generator=g) * 3
    base[0, 0] = NAN
    params = {"t": base.t(), "w": torch.randn(5, generator=g) * 3}
    hi = torch.tensor([0.0, 1.0, INF, 2.0, 0.5])
    report = Bounds({"t": (-1.0, 1.0), "w": (None, hi)}).report(params)
    t, w = report.entries
    assert (t.below, t.above, t.nan) == reference(params["t"], -1.0, 1.0)
    wv = params["w"].tolist()
    assert w.above == sum(1 for v, h in zip(wv, hi.tolist()) if v > h)
    assert w.lower is None and w.upper == "tensor(5,)"


@pytest.mark.usefixtures("path")
@pytest.mark.parametrize("dtype", DTYPES)
def test_agrees_with_project(dtype):
    """Reported outside exactly when project_ moves the element; nothing after it."""
    params = {k: v.clone() for k, v in model_values(dtype).items()}
    bounds = Bounds({"*": (-0.3, 1.7)})
    before = {k: v.clone() for k, v in params.items()}
    report = bounds.report(params)
    bounds.project_(params)
    for e in report.entries:
        old, new = before[e.name], params[e.name]
        moved = int(((old != new) & ~torch.isnan(old)).sum())
        assert e.below + e.above == moved, e.name
    after = bounds.report(params)
    assert all(e.below == e.above == 0 for e in after.entries)


def test_every_path_gives_the_same_report(monkeypatch):
    """The native kernel, segment reductions and per-tensor reductions agree exactly."""
    params = model_values(torch.float32)
    params.update({f"q{k}": v.double() for k, v in model_values(torch.float64).items()})
    bounds = Bounds({"*": (-1.5, 2.0)})
    monkeypatch.setattr(TR, "_SMALL", 16)
    got = {}
    for name in ("native", "batched", "per-tensor"):
        with monkeypatch.context() as m:
            if name == "native":
                _native.build(verbose=False)
            else:
                m.setattr(TR._native, "get", _no_native)
            m.setattr(TR, "_batched", _batching(name == "batched"))
            got[name] = bounds.report(params).entries
    assert got["native"] == got["batched"] == got["per-tensor"]


def test_number_bounds_are_worked_out_once_and_keep_the_sign_of_zero():
    P._number_bounds_cached.cache_clear()
    params = {f"p{k}": torch.zeros(3) for k in range(50)}
    Bounds({"*": (-0.0, 1.0)}).report(params)
    assert P._number_bounds_cached.cache_info().misses == 1
    lo_neg = P._number_bounds(torch.zeros(2), -0.0, 1.0)
    lo_pos = P._number_bounds(torch.zeros(2), 0.0, 1.0)
    assert math.copysign(1.0, lo_neg[0]) == -1.0 and math.copysign(1.0, lo_pos[0]) == 1.0


@pytest.mark.parametrize(
    ("spec", "dtype", "message"),
    [
        ((2.0, 1.0), torch.float32, r"lower bound for 'w' exceeds its upper bound \(2.0 > 1.0\)"),
        ((NAN, 1.0), torch.float32, r"lower bound for 'w' is NaN"),
        (
            (0.10001, 0.10002),
            torch.float16,
            r"no float16 value lies within the bounds of 'w'",
        ),
        (
            (None, -1e6),
            torch.float16,
            r"upper bound for 'w' is -1e\+06, beyond the largest float16",
        ),
    ],
)
def test_invalid_number_bounds_still_name_the_parameter(spec, dtype, message):
    params = {"v": torch.zeros(2, dtype=dtype), "w": torch.zeros(2, dtype=dtype)}
    lower = {"v": 0.0, "w": spec[0]}
    upper = {"v": 1.0, "w": spec[1]}
    from parambounds import bounds_cost

    for _ in range(2):  # the second time from the cache
        with pytest.raises(BoundsError, match=message):
            bounds_cost(params, lower, upper)


@pytest.mark.usefixtures("path")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_tensors_across_pieces_against_plain_python(dtype):
    """Tensors larger than the native kernel's pieces (65536 values), small ones between
    them, specials at the piece boundaries and in the vector tails."""
    g = torch.Generator().manual_seed(3)
    sizes = {"a": 70_001, "b": 3, "c": 131_077, "d": 1, "e": 65_536}
    params = {k: torch.randn(n, generator=g, dtype=torch.float64) * 2 for k, n in sizes.items()}
    specials = [math.nan, math.inf, -math.inf, 1e30, -1e30]
    for x in params.values():
        for i, where in enumerate([0, 65_535, 65_536, x.numel() - 1, x.numel() // 2]):
            if where < x.numel():
                x[where] = specials[i]
    params = {k: v.to(dtype) for k, v in params.items()}
    for lo, hi in [(-1.5, 2.0), (None, 2.0), (-1.5, None)]:
        check(Bounds({"*": (lo, hi)}).report(params), params, lo, hi, dtype)
