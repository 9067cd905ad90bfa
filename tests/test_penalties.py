import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from parambounds import PENALTIES, BoundsError, overflow_threshold
from parambounds.penalties import get_penalty

NAMES = sorted(PENALTIES)

# Plain reference shapes for small excesses, written independently of the library.
REFERENCE = {
    "exp": math.exp,
    "expm1": math.expm1,
    "quadratic": lambda e: e * e,
    "linear": lambda e: e,
}


def test_registry_has_the_documented_shapes():
    assert set(PENALTIES) == set(REFERENCE)


def test_unknown_penalty_lists_valid_names():
    with pytest.raises(
        BoundsError, match=r"unknown penalty 'cubic'; expected one of 'exp', 'expm1'"
    ):
        get_penalty("cubic")


@pytest.mark.parametrize(
    "dtype,expected", [(torch.float32, 79.85), (torch.float64, 638.80), (torch.float16, 9.98)]
)
def test_threshold_values_as_documented(dtype, expected):
    assert overflow_threshold(dtype) == pytest.approx(expected, abs=0.01)


@pytest.mark.parametrize("name", NAMES)
@given(e=st.floats(min_value=0.0, max_value=50.0))
@settings(max_examples=50, deadline=None)
def test_value_matches_reference(name, e):
    got = PENALTIES[name].value(torch.tensor([e], dtype=torch.float64)).item()
    assert got == pytest.approx(REFERENCE[name](e), rel=1e-12, abs=1e-300)


@pytest.mark.parametrize("name", NAMES)
def test_slope_is_the_derivative_of_value(name):
    e = torch.linspace(0.01, 700.0, 997, dtype=torch.float64, requires_grad=True)
    pen = PENALTIES[name]
    (grad,) = torch.autograd.grad(pen.value(e).sum(), e)
    torch.testing.assert_close(grad, pen.slope(e.detach()))
    v, s = pen.value_and_slope(e.detach())
    torch.testing.assert_close(v, pen.value(e.detach()))
    torch.testing.assert_close(s, pen.slope(e.detach()))


@pytest.mark.parametrize("name", ["exp", "expm1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_overflow_guard_is_finite_continuous_and_monotone(name, dtype):
    pen = PENALTIES[name]
    t = overflow_threshold(dtype)
    e = torch.tensor(sorted([t - 1, t, t + 1e-3 * t, 2 * t, 1000.0]), dtype=dtype)
    v = pen.value(e)
    assert torch.isfinite(v).all()
    assert (v[1:] >= v[:-1]).all()
    # Continuous at T, with the slope of exp at T beyond it, in the computing dtype.
    rel = 1e-5 if dtype == torch.float32 else 1e-12
    at_t = pen.value(torch.tensor([t], dtype=dtype)).item()
    assert at_t == pytest.approx(REFERENCE[name](t), rel=rel)
    beyond = pen.value(torch.tensor([t + 2.0], dtype=dtype)).item()
    assert beyond == pytest.approx(REFERENCE[name](t) + 2.0 * math.exp(t), rel=rel)


@pytest.mark.parametrize("name", ["exp", "expm1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_autograd_slope_at_exactly_the_threshold(name, dtype):
    # At e == T (as the dtype holds it) the clamped exponential and the linear tail meet;
    # autograd must count the slope exp(T) once, not once per branch.
    t = torch.tensor([overflow_threshold(dtype)], dtype=dtype)
    e = t.clone().requires_grad_()
    (grad,) = torch.autograd.grad(PENALTIES[name].value(e).sum(), e)
    assert grad.item() == pytest.approx(math.exp(t.item()), rel=4 * torch.finfo(dtype).eps)
