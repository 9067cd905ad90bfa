"""The hard guarantees hold exactly, compared in float64, at every precision; loose
inputs give the right answer or a clear BoundsError.

References are plain float64 comparisons against the bounds as given.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.utils import parametrize

from parambounds import Bounds, BoundsError, bounds_cost, get_kernel
from parambounds.report import Report

INF = math.inf
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def inside_exactly(x, lo, hi):
    """Every element of ``x`` within ``[lo, hi]``, compared in float64."""
    x = x.detach().to(torch.float64)
    lo = torch.as_tensor(-INF if lo is None else lo, dtype=torch.float64)
    hi = torch.as_tensor(INF if hi is None else hi, dtype=torch.float64)
    return bool(((x >= lo) & (x <= hi)).all())


# ------------------------------------------------------------------ the cases


def test_float16_projection_onto_tiny_and_inexact_lower_bounds():
    m = {"w": torch.zeros(3, dtype=torch.float16)}
    b = Bounds({"w": (1e-8, None)})
    assert not b.report(m).ok  # 0 < 1e-8
    b.project_(m)
    assert inside_exactly(m["w"], 1e-8, None) and b.report(m).ok
    m = {"w": torch.full((4,), 0.0999755859375, dtype=torch.float16)}  # nearest fp16 to 0.1
    b = Bounds({"w": (0.1, None)})
    assert b.report(m).entries[0].below == 4  # a float16 0.0999 is below 0.1
    b.project_(m)
    assert inside_exactly(m["w"], 0.1, None) and b.report(m).ok


def test_low_precision_reparametrize_stays_inside_and_finite():
    for dtype in (torch.bfloat16, torch.float16):
        m = torch.nn.Linear(50, 1).to(dtype)
        with torch.no_grad():
            m.weight.copy_(torch.linspace(0.0, 0.004, 50))
        Bounds({"weight": (0.001, 0.003)}).reparametrize_(m)
        assert inside_exactly(m.weight, 0.001, 0.003)
        z = m.parametrizations.weight.original
        assert torch.isfinite(z).all()  # values at the upper bound are not stored as +inf
        with torch.no_grad():
            z.copy_(torch.linspace(-1e4, 1e4, 50))
        assert inside_exactly(m.weight, 0.001, 0.003)


def test_bounds_closer_than_the_dtype_resolution_are_an_error():
    m = {"w": torch.zeros(2, dtype=torch.float16)}
    with pytest.raises(BoundsError, match=r"no float16 value lies within the bounds of 'w'"):
        Bounds({"w": (0.1, 0.10001)}).project_(m)


def test_per_element_bounds_open_on_some_elements_keep_their_values():
    m = torch.nn.Module()
    m.w = torch.nn.Parameter(torch.tensor([0.5, 0.3, 7.0, -2.0]))
    lo = torch.tensor([0.0, -INF, 0.0, -INF])
    hi = torch.tensor([1.0, 1.0, INF, INF])
    Bounds({"w": (lo, hi)}).reparametrize_(m)
    torch.testing.assert_close(m.w, torch.tensor([0.5, 0.3, 7.0, -2.0]), rtol=1e-5, atol=1e-6)
    m.w.sum().backward()
    g = m.parametrizations.w.original.grad
    assert torch.isfinite(g).all() and g[3].item() == 1.0  # identity where both are open


def test_reparametrize_refuses_tied_weights_naming_both():
    enc, dec = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    dec.weight = enc.weight
    model = torch.nn.Sequential(enc, dec)
    x = torch.randn(2, 3)
    before = model(x)
    with pytest.raises(BoundsError, match=r"'0\.weight': it is tied to '1\.weight'"):
        Bounds({"*weight": (-1.0, 1.0)}).reparametrize_(model)
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    assert not parametrize.is_parametrized(enc)


def test_reparametrize_is_atomic():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    parametrize.register_parametrization(model[1], "bias", torch.nn.Identity())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(BoundsError, match=r"'1\.bias' is already parametrized"):
        Bounds({"0.weight": (-0.1, 0.1), "1.bias": (-1.0, 1.0)}).reparametrize_(model)
    assert not parametrize.is_parametrized(model[0])
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_project_on_parametrized_and_computed_tensors():
    lin = torch.nn.Linear(8, 8)
    torch.nn.utils.parametrizations.weight_norm(lin)
    with torch.no_grad():
        lin.parametrizations.weight.original0.mul_(10)  # |w| up to about 3 > 0.1
    with pytest.raises(BoundsError, match=r"cannot project 'weight': it is computed"):
        Bounds({"weight": (-0.1, 0.1), "bias": (-0.1, 0.1)}).project_(lin)
    Bounds({"weight": (-10.0, 10.0), "bias": (-0.1, 0.1)}).project_(lin)  # inside: passes
    assert inside_exactly(lin.bias, -0.1, 0.1)
    w = torch.nn.Parameter(torch.full((3,), 0.478))
    with pytest.raises(BoundsError, match=r"cannot project 'v': it is computed"):
        Bounds({"v": (-0.1, 0.1)}).project_({"v": w * 1.0})


def test_project_clamps_integers_to_whole_numbers_and_refuses_bool():
    sd = {"n": torch.tensor([-5, 0, 7]), "f": torch.tensor([True, False])}
    b = Bounds({"n": (-0.5, 3.7)})
    b.project_(sd)
    assert sd["n"].tolist() == [0, 0, 3]
    assert b.report(sd).ok
    with pytest.raises(BoundsError, match=r"cannot project 'f': it is a bool tensor"):
        Bounds({"f": (0.0, 1.0)}).project_(sd)


def test_bounds_beyond_the_dtype_range():
    x32 = {"w": torch.tensor([1.0, -3e38])}
    assert bounds_cost(x32, {"w": -1e300}, {"w": 1e300}).item() == 0.0  # open sides
    assert (
        bounds_cost({"w": torch.tensor([7e4], dtype=torch.float16)}, {"w": None}, {"w": 1e5}).item()
        == 0.0
    )
    with pytest.raises(
        BoundsError, match=r"lower bound for 'w' is 1e\+300, beyond the largest float32"
    ):
        bounds_cost(x32, {"w": 1e300}, {"w": None})
    with pytest.raises(
        BoundsError, match=r"upper bound for 'w' is -100000, beyond the largest float16"
    ):
        bounds_cost({"w": torch.zeros(1, dtype=torch.float16)}, {"w": None}, {"w": -1e5})


def test_float8_parameters():
    x = torch.tensor([0.0, 2.0, -3.0]).to(torch.float8_e4m3fn)
    cost = bounds_cost({"w": x}, {"w": -1.0}, {"w": 1.0})
    assert cost.dtype == torch.float32
    assert cost.item() == pytest.approx(math.exp(1.0) + math.exp(2.0))
    sd = {"w": x.clone()}
    Bounds({"w": (-0.3, 0.3)}).project_(sd)
    assert inside_exactly(sd["w"], -0.3, 0.3)


@pytest.mark.parametrize(
    "bound,match",
    [
        (
            torch.tensor(1 + 2j),
            r"lower bound for 'w' must be a real tensor, got dtype torch.complex64",
        ),
        (torch.tensor(True), r"lower bound for 'w' must be a real tensor, got dtype torch.bool"),
    ],
)
def test_zero_dim_complex_and_bool_bounds(bound, match):
    with pytest.raises(BoundsError, match=match):
        bounds_cost({"w": torch.zeros(2)}, {"w": bound}, {"w": None})


def test_bogus_kernel_environment_variable():
    import os
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", "import parambounds; parambounds.get_kernel()"],
        env={**os.environ, "PARAMBOUNDS_KERNEL": "bogus"},
        capture_output=True,
        text=True,
    )
    assert out.returncode != 0
    assert "BoundsError: PARAMBOUNDS_KERNEL='bogus' is not a kernel" in out.stderr
    assert get_kernel() in ("auto", "eager", "compiled")


def test_empty_report_prints_serialises_and_summarises():
    for spec in ({"weight": {}}, {"weight": (-INF, INF)}):
        report = Bounds(spec).report(torch.nn.Linear(2, 2))
        assert report.ok and report.entries == ()
        assert report.to_dict() == {}
        assert report.summary() == "all 0 bounded parameters are inside their bounds"
        assert str(report).splitlines()[0].split() == [
            "parameter",
            "numel",
            "below",
            "above",
            "max",
            "excess",
            "nan",
            "lower",
            "upper",
        ]
    assert str(Report(())).endswith("all 0 bounded parameters are inside their bounds")


# ------------------------------------------------------------------ properties

finite = st.floats(-1e3, 1e3, allow_nan=False, width=64)


def _above(b):
    """An upper bound with a value of every dtype between it and ``b`` (bfloat16 keeps 8 bits)."""
    return b + 1.0 + 0.01 * abs(b)


@st.composite
def bounded_case(draw):
    """A dtype, values (some far outside), and scalar or per-element, one- or two-sided bounds."""
    dtype = draw(st.sampled_from(DTYPES))
    n = draw(st.integers(1, 6))
    xs = draw(st.lists(finite, min_size=n, max_size=n))
    kind = draw(st.sampled_from(["two", "lower", "upper"]))
    per_element = draw(st.booleans())

    def side(present):
        if not present:
            return None
        if per_element:
            return draw(st.lists(finite, min_size=n, max_size=n))
        return draw(finite)

    lo, hi = side(kind != "upper"), side(kind != "lower")
    if lo is not None and hi is not None:  # order them, with room for a dtype value
        lo, hi = (
            ([min(a, b) for a, b in zip(lo, hi)], [_above(max(a, b)) for a, b in zip(lo, hi)])
            if per_element
            else (min(lo, hi), _above(max(lo, hi)))
        )
    as_bound = (
        (lambda b: None if b is None else torch.tensor(b, dtype=torch.float64))
        if per_element
        else (lambda b: b)
    )
    return dtype, xs, lo, hi, as_bound(lo), as_bound(hi)


def _model(dtype, xs):
    m = torch.nn.Module()
    m.w = torch.nn.Parameter(torch.tensor(xs, dtype=torch.float64).to(dtype))
    return m


@settings(max_examples=60, deadline=None)
@given(bounded_case())
def test_property_project_and_report_are_exact(case):
    dtype, xs, lo, hi, blo, bhi = case
    m = _model(dtype, xs)
    b = Bounds({"w": (blo, bhi)})
    assert b.report(m).ok == inside_exactly(m.w, lo, hi)
    b.project_(m)
    assert inside_exactly(m.w, lo, hi)
    assert b.report(m).ok


@settings(max_examples=40, deadline=None)
@given(bounded_case(), st.floats(0.0, 1e3), st.sampled_from([-1.0, 1.0]))
def test_property_attach_holds_after_every_step(case, lr, direction):
    dtype, xs, lo, hi, blo, bhi = case
    m = _model(dtype, xs)
    opt = torch.optim.SGD(m.parameters(), lr=lr)
    Bounds({"w": (blo, bhi)}).attach(opt, m)
    for _ in range(2):
        opt.zero_grad()
        (direction * m.w.float()).sum().backward()  # pushes every element one way
        opt.step()
        assert inside_exactly(m.w, lo, hi)


@settings(max_examples=40, deadline=None)
@given(bounded_case(), st.lists(st.floats(-1e4, 1e4), min_size=6, max_size=6))
def test_property_reparametrize_outputs_are_inside(case, zs):
    dtype, xs, lo, hi, blo, bhi = case
    m = _model(dtype, xs)
    Bounds({"w": (blo, bhi)}).reparametrize_(m)
    assert inside_exactly(m.w, lo, hi)
    z = m.parametrizations.w.original
    assert torch.isfinite(z).all()
    with torch.no_grad():
        z.copy_(torch.tensor(zs[: z.numel()]))
    assert inside_exactly(m.w, lo, hi)


def reference_cost(xs, lo, hi):
    """exp penalty and its gradient in plain Python floats (float64), with infinities."""
    total, grads = 0.0, []
    for x, low, high in zip(xs, lo, hi):
        if x > high:
            e = x - high
            total += math.exp(e) if e < 700 else INF
            grads.append(math.exp(min(e, 600.0)))
        elif x < low:
            e = low - x
            total += math.exp(e) if e < 700 else INF
            grads.append(-math.exp(min(e, 600.0)))
        else:
            grads.append(0.0)
    return total, grads


@settings(max_examples=80, deadline=None)
@given(
    st.lists(st.one_of(st.floats(-30, 30), st.sampled_from([INF, -INF])), min_size=1, max_size=8),
    st.one_of(st.none(), st.floats(-5, 0)),
    st.one_of(st.none(), st.floats(0, 5)),
    st.booleans(),
)
def test_property_cost_and_grad_against_float64_reference(xs, lo, hi, per_element):
    n = len(xs)
    lo_l = [-INF if lo is None else lo] * n
    hi_l = [INF if hi is None else hi] * n
    x = torch.tensor(xs, dtype=torch.float64, requires_grad=True)
    if per_element:
        blo, bhi = torch.tensor(lo_l, dtype=torch.float64), torch.tensor(hi_l, dtype=torch.float64)
    else:
        blo, bhi = lo, hi
    cost = bounds_cost({"x": x}, {"x": blo}, {"x": bhi})
    expected, expected_grad = reference_cost(xs, lo_l, hi_l)
    if math.isinf(expected):
        assert cost.item() == INF
        return
    assert cost.item() == pytest.approx(expected, rel=1e-12)
    (g,) = torch.autograd.grad(cost, x, allow_unused=True)
    g = torch.zeros_like(x) if g is None else g  # nothing bounded: no gradient
    assert g.tolist() == pytest.approx(expected_grad, rel=1e-12)
