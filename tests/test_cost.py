import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from parambounds import PENALTIES, Bounds, BoundsError, bounds_cost, make_bounds

from .conftest import rockpool_net

NAMES = sorted(PENALTIES)
SHAPES = {
    "exp": math.exp,
    "expm1": math.expm1,
    "quadratic": lambda e: e * e,
    "linear": lambda e: e,
}


def reference_cost(values, lower, upper, name):
    """A plain, element-by-element reference written in Python."""
    total = 0.0
    for v in values:
        if upper is not None and v > upper:
            total += SHAPES[name](v - upper)
        elif lower is not None and v < lower:
            total += SHAPES[name](lower - v)
    return total


# ---------------------------------------------------------------- properties

finite = st.floats(min_value=-30, max_value=30, allow_nan=False)


@pytest.mark.parametrize("name", NAMES)
@given(values=st.lists(finite, min_size=0, max_size=20), a=finite, b=finite)
@settings(max_examples=60, deadline=None)
def test_equals_reference_and_is_nonnegative(name, values, a, b):
    lo, hi = min(a, b), max(a, b)
    x = torch.tensor(values, dtype=torch.float64)
    got = bounds_cost({"x": x}, {"x": lo}, {"x": hi}, penalty=name)
    assert got.item() >= 0
    assert got.item() == pytest.approx(reference_cost(values, lo, hi, name), rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("name", NAMES)
@given(values=st.lists(st.floats(min_value=-1, max_value=1), min_size=1, max_size=20))
@settings(max_examples=30, deadline=None)
def test_zero_inside_the_bounds(name, values):
    x = torch.tensor(values, dtype=torch.float64)
    assert bounds_cost([x], [-1.0], [1.0], penalty=name).item() == 0.0


@pytest.mark.parametrize("name", NAMES)
@given(e1=st.floats(min_value=1e-6, max_value=5e3), e2=st.floats(min_value=1e-6, max_value=5e3))
@settings(max_examples=60, deadline=None)
def test_monotone_in_the_excess(name, e1, e2):
    e1, e2 = min(e1, e2), max(e1, e2)
    for dtype in (torch.float32, torch.float64):
        up = [
            bounds_cost([torch.tensor([2.0 + e], dtype=dtype)], [None], [2.0], penalty=name)
            for e in (e1, e2)
        ]
        down = [
            bounds_cost([torch.tensor([-2.0 - e], dtype=dtype)], [-2.0], [None], penalty=name)
            for e in (e1, e2)
        ]
        assert up[0] <= up[1] and down[0] <= down[1]
        assert all(torch.isfinite(c) for c in up + down)


@pytest.mark.parametrize("name", NAMES)
def test_gradcheck(name):
    x = torch.tensor([-3.0, -1.5, 0.2, 0.7, 1.9, 4.0], dtype=torch.float64, requires_grad=True)
    lo_t = torch.tensor([-1.0, -1.0, 0.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    for lower, upper in [(-1.0, 1.0), (None, 1.0), (-1.0, None), (lo_t, lo_t + 2)]:
        assert torch.autograd.gradcheck(
            lambda t, lo=lower, hi=upper: bounds_cost({"x": t}, {"x": lo}, {"x": hi}, penalty=name),
            (x,),
        )


# ---------------------------------------------------------------- semantics


def test_reordered_keys_give_the_same_result():
    params = {"a": torch.tensor([3.0]), "b": torch.tensor([-3.0])}
    ordered = bounds_cost(params, {"a": None, "b": 0.0}, {"a": 1.0, "b": None})
    reordered = bounds_cost(params, {"b": 0.0, "a": None}, {"b": None, "a": 1.0})
    assert ordered.item() == pytest.approx(
        2 * math.exp(2.0) + 0 * 1 + math.exp(3.0) - math.exp(2.0)
    )
    assert reordered.item() == ordered.item()


def test_rockpool_misaligns_reordered_keys():
    from rockpool.training.torch_loss import bounds_cost as rp_bounds_cost

    params = {"a": torch.tensor([3.0]), "b": torch.tensor([-3.0])}
    lower, upper = {"b": 0.0, "a": -math.inf}, {"b": math.inf, "a": 1.0}
    expected = math.exp(2.0) + math.exp(3.0)
    assert rp_bounds_cost(params, lower, upper).item() != pytest.approx(expected)
    assert bounds_cost(params, lower, upper).item() == pytest.approx(expected)


def test_rockpool_accepts_mismatched_trees():
    from rockpool.training.torch_loss import bounds_cost as rp_bounds_cost

    params = {"a": torch.tensor([3.0]), "b": torch.tensor([-3.0])}
    lower = {"b": 0.0, "c": 0.0}  # same length, wrong keys
    upper = {"a": 1.0}  # wrong length: `len(a) != len(b) != len(c)` lets it through
    rp_bounds_cost(params, lower, upper)  # no error: bounds paired by position
    with pytest.raises(BoundsError, match=r"lower_bounds has no entry for 'a'"):
        bounds_cost(params, lower, upper)


def test_nested_mismatch_names_the_path():
    net = rockpool_net()
    lower, upper = make_bounds(net.parameters())
    del upper["1_LIFTorch"]["tau_syn"]
    with pytest.raises(BoundsError, match=r"upper_bounds has no entry for '1_LIFTorch\.tau_syn'"):
        bounds_cost(net.parameters(), lower, upper)


def test_zero_bound_is_a_bound():
    x = torch.tensor([-1.0, 0.5])
    assert bounds_cost([x], [0], [None]).item() == pytest.approx(math.e)
    assert bounds_cost([x], [None], [0.0]).item() == pytest.approx(math.exp(0.5))


def test_per_element_tensor_bounds():
    x = torch.tensor([[0.0, 5.0], [0.0, 5.0]])
    upper = torch.tensor([1.0, 4.0])  # broadcasts over rows
    assert bounds_cost({"x": x}, {"x": None}, {"x": upper}).item() == pytest.approx(2 * math.e)


def test_overflow_gives_finite_cost_and_gradient():
    from rockpool.training.torch_loss import bounds_cost as rp_bounds_cost

    x = torch.tensor([200.0], requires_grad=True)
    assert torch.isinf(rp_bounds_cost({"x": x}, {"x": -1.0}, {"x": 1.0}))
    cost = bounds_cost({"x": x}, {"x": -1.0}, {"x": 1.0})
    assert torch.isfinite(cost)
    assert (0 * cost).item() == 0.0  # a zero weight no longer poisons the loss with NaN
    cost.backward()
    assert torch.isfinite(x.grad).all() and x.grad.item() > 0


def test_nan_parameter_makes_the_cost_nan():
    x = torch.tensor([0.0, float("nan")])
    assert torch.isnan(bounds_cost({"x": x}, {"x": -1.0}, {"x": 1.0}))
    assert torch.isnan(bounds_cost({"x": x}, {"x": torch.tensor([-1.0, -1.0])}, {"x": None}))


def test_unbounded_leaves_cost_nothing_and_backward_works():
    w = torch.randn(3, requires_grad=True)
    cost = bounds_cost({"w": w}, {"w": -math.inf}, {"w": math.inf})
    assert cost.item() == 0.0 and cost.requires_grad
    cost.backward()
    assert w.grad is None  # no gradient from the cost for an unbounded parameter


def test_backward_works_when_everything_is_inside():
    w = torch.zeros(3, requires_grad=True)
    bounds_cost({"w": w}, {"w": -1.0}, {"w": 1.0}).backward()
    assert torch.equal(w.grad, torch.zeros(3))


def test_empty_tree_and_dtype_promotion():
    empty = bounds_cost({}, {}, {})
    assert empty.shape == () and empty.item() == 0.0 and empty.dtype == torch.get_default_dtype()
    params = {"a": torch.tensor([2.0]), "b": torch.tensor([2.0], dtype=torch.float64)}
    assert bounds_cost(params, {"a": None, "b": None}, {"a": 1.0, "b": 1.0}).dtype == torch.float64
    half = bounds_cost([torch.tensor([2.0], dtype=torch.bfloat16)], [None], [1.0])
    assert half.dtype == torch.bfloat16 and half.shape == ()


def test_module_means_named_parameters():
    lin = torch.nn.Linear(2, 2)
    with torch.no_grad():
        lin.bias.copy_(torch.tensor([2.0, 0.0]))
    cost = bounds_cost(lin, {"weight": None, "bias": None}, {"weight": None, "bias": 1.0})
    assert cost.item() == pytest.approx(math.e)


def test_bounds_edited_between_calls_take_effect():
    x = {"x": torch.tensor([2.0])}
    upper = {"x": 1.0}
    assert bounds_cost(x, {"x": None}, upper).item() == pytest.approx(math.e)
    upper["x"] = 0.0
    assert bounds_cost(x, {"x": None}, upper).item() == pytest.approx(math.exp(2.0))
    t = torch.tensor([1.0])
    assert bounds_cost(x, {"x": None}, {"x": t}).item() == pytest.approx(math.e)
    t.fill_(0.0)  # in-place edits of a tensor bound are seen too
    assert bounds_cost(x, {"x": None}, {"x": t}).item() == pytest.approx(math.exp(2.0))


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "lower,upper,message",
    [
        (2.0, 1.0, r"lower bound for 'x' exceeds its upper bound \(2\.0 > 1\.0\)"),
        (
            torch.tensor([0.0, 3.0]),
            torch.tensor([1.0, 2.0]),
            r"lower bound for 'x' exceeds its upper bound at index \(1,\) \(3\.0 > 2\.0\)",
        ),
        (float("nan"), None, r"lower bound for 'x' is NaN"),
        (None, torch.tensor([1.0, float("nan")]), r"upper bound for 'x' contains NaN"),
        (math.inf, None, r"lower bound for 'x' is inf, which no value can satisfy"),
        (None, -math.inf, r"upper bound for 'x' is -inf, which no value can satisfy"),
        ("1.0", None, r"lower bound for 'x' must be a number, None or a tensor, got str"),
        (True, None, r"lower bound for 'x' must be a number, None or a tensor, got bool"),
        (
            None,
            torch.ones(3),
            r"upper bound for 'x' has shape \(3,\), which does not broadcast to the parameter's shape \(2,\)",
        ),
        (
            torch.tensor([True, False]),
            None,
            r"lower bound for 'x' must be a real tensor, got dtype torch\.bool",
        ),
    ],
)
def test_invalid_bounds_are_named(lower, upper, message):
    with pytest.raises(BoundsError, match=message):
        bounds_cost({"x": torch.zeros(2)}, {"x": lower}, {"x": upper})


def test_non_tensor_parameter_is_named():
    with pytest.raises(BoundsError, match=r"parameter 'a\.0' must be a tensor, got float"):
        bounds_cost({"a": [1.0]}, {"a": [0.0]}, {"a": [None]})


def test_shape_mismatch_message_of_the_style_guide():
    net = rockpool_net()
    lower, upper = make_bounds(net.parameters())
    upper["1_LIFTorch"]["tau_syn"] = torch.ones(3)
    with pytest.raises(
        BoundsError,
        match=r"upper bound for '1_LIFTorch\.tau_syn' has shape \(3,\), which does not broadcast "
        r"to the parameter's shape \(5, 1\)",
    ):
        bounds_cost(net.parameters(), lower, upper)


def test_complex_parameter_is_named():
    with pytest.raises(BoundsError, match=r"parameter 'z' is complex; bounds need real values"):
        bounds_cost({"z": torch.zeros(2, dtype=torch.complex64)}, {"z": 0.0}, {"z": None})


@pytest.mark.parametrize(
    "lower,upper,message",
    [
        (
            torch.tensor([0.0, math.inf]),
            None,
            r"lower bound for 'x' contains inf, which no value can satisfy",
        ),
        (
            None,
            torch.tensor([-math.inf, 0.0]),
            r"upper bound for 'x' contains -inf, which no value can satisfy",
        ),
    ],
)
def test_infinite_tensor_bound_on_the_wrong_side(lower, upper, message):
    with pytest.raises(BoundsError, match=message):
        bounds_cost({"x": torch.zeros(2)}, {"x": lower}, {"x": upper})


def _plain_cost(params, lower, upper):
    """Rockpool's exp penalty in plain Python, for the identity-cache tests."""
    total = 0.0
    for k, p in params.items():
        lo, hi = lower[k], upper[k]
        los = lo.reshape(-1).tolist() if isinstance(lo, torch.Tensor) else [lo] * p.numel()
        for x, lo_i in zip(p.detach().reshape(-1).tolist(), los):
            if hi is not None and x > hi:
                total += math.exp(x - hi)
            elif lo_i is not None and x < lo_i:
                total += math.exp(lo_i - x)
    return total


def test_same_trees_each_step_see_every_change():
    """The per-step identity check notices replaced, resized and re-bounded parameters."""
    params = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([-4.0])}
    lower = {"a": -1.0, "b": torch.tensor([-1.0])}
    upper = {"a": 1.0, "b": None}

    def check():
        assert bounds_cost(params, lower, upper).item() == pytest.approx(
            _plain_cost(params, lower, upper)
        )

    check()
    check()  # the cached plan
    params["a"] = torch.tensor([5.0, 0.0, -3.0])  # replaced, another shape
    check()
    params["a"].data = torch.tensor([[2.0], [-2.5]])  # same object, resized
    check()
    lower["a"] = -2.0  # a bound changed in the same dict
    check()
    lower["b"].fill_(-5.0)  # a tensor bound changed in place
    check()
    upper["b"] = -4.5
    check()
    del params["b"], lower["b"], upper["b"]  # a parameter removed
    check()


def test_integer_bounds_beyond_float64_are_infinite_everywhere():
    """An integer bound too large for float64 is +-inf (open, or a named error) in the
    torch functions, the JAX functions and the spec alike, not an OverflowError."""
    import jax.numpy as jnp

    import parambounds.jax as pbj

    big = 10**400
    x = torch.tensor([-3.0, 3.0])
    assert bounds_cost({"x": x}, {"x": -big}, {"x": big}).item() == 0.0
    assert float(pbj.bounds_cost({"x": jnp.array([-3.0, 3.0])}, {"x": -big}, {"x": big})) == 0.0
    with pytest.raises(BoundsError, match=r"lower bound for 'x' is inf, which no value"):
        bounds_cost({"x": x}, {"x": big}, {"x": None})
    with pytest.raises(BoundsError, match=r"upper bound for 'x' is -inf, which no value"):
        pbj.bounds_cost({"x": jnp.array([1.0])}, {"x": None}, {"x": -big})
    with pytest.raises(BoundsError, match=r"lower bound for pattern 'w' is inf, which no"):
        Bounds({"w": (big, None)})
    with pytest.raises(BoundsError, match=r"lower bound for pattern 'w' exceeds its upper"):
        Bounds({"w": (3, 2)})
