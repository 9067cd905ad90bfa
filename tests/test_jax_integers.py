"""parambounds.jax on integer leaves: compared in the integers, against exact Python integers.

float32 holds every integer only up to 2**24 and float64 up to 2**53; an int64 leaf of
2**62 under a lower bound of 2**62 + 1 cost 0 when both were converted to float64. The
reference here is plain Python: bounds rounded inward with ``Fraction`` and ``math.ceil``
/ ``math.floor``, the excess an exact ``int``, its penalty computed in float64 from it.
Every entry point that judges values is checked: ``bounds_cost`` (eager, jitted,
vmapped), ``summed_exp_boundary_loss``, ``Bounds.cost``, ``report``, ``check``,
``project`` and ``bounds_clip``. The torch side, given the same leaves and bounds, must
agree (imported lazily: the JAX API never imports torch).
"""

import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from parambounds.jax import (
    Bounds,
    BoundsError,
    BoundsViolationError,
    bounds_clip,
    bounds_cost,
    summed_exp_boundary_loss,
)

from .test_jax_fused import both, calls_kernel, kernel

NARROW = ["int8", "int16", "int32", "uint8", "uint16", "uint32"]
WIDE = ["int64", "uint64"]  # with jax_enable_x64 only
N = 6  # elements per leaf: one shape, so that examples share their traces


def limits(dtype):
    info = np.iinfo(dtype)
    return int(info.min), int(info.max)


def whole(b, side):
    """A bound rounded inward to a whole number, exactly; ``None`` when open."""
    if b is None:
        return None
    if isinstance(b, (np.ndarray, jax.Array)):
        b = np.asarray(b).item()
    if isinstance(b, float) and math.isinf(b):
        return None
    q = Fraction(int(b)) if isinstance(b, (int, np.integer)) else Fraction(b)
    return math.ceil(q) if side == "lower" else math.floor(q)


def expect(values, dtype, lo, hi):
    """``(excesses, below, above, projected)`` in Python integers, or ``None`` for an error."""
    low, high = limits(dtype)
    lo_i, hi_i = whole(lo, "lower"), whole(hi, "upper")
    if (lo_i is not None and lo_i > high) or (hi_i is not None and hi_i < low):
        return None  # no value of the dtype can satisfy it
    lo_c = low if lo_i is None else max(lo_i, low)
    hi_c = high if hi_i is None else min(hi_i, high)
    if lo_c > hi_c:
        return None  # no value between
    excesses = [v - hi_c if v > hi_c else lo_c - v if v < lo_c else 0 for v in values]
    below = sum(v < lo_c for v in values)
    above = sum(v > hi_c for v in values)
    projected = [min(max(v, lo_c), hi_c) for v in values]
    return excesses, below, above, projected


def penalty_ref(name, e, cost_dtype):
    """The penalty of an exact excess ``e``, in float64 (exp continued linearly past T)."""
    f = float(e)
    if name == "linear":
        return f
    if name == "quadratic":
        return f * f
    t = 0.9 * math.log(float(np.finfo(cost_dtype).max))  # docs: the overflow threshold
    return math.exp(min(f, t)) * (1 + max(f - t, 0.0))


def assert_cost(got, excesses, name, cost_dtype):
    got = float(got)
    want = math.fsum(penalty_ref(name, e, cost_dtype) for e in excesses if e)
    assert (got == 0) == (want == 0), (got, want, excesses)
    if want > float(np.finfo(cost_dtype).max):
        assert got == math.inf
        return
    rel = 2e-5 if cost_dtype == np.float32 else 1e-11
    assert math.isclose(got, want, rel_tol=rel), (got, want, excesses)


def x64(on):
    return jax.enable_x64(on)


def edges(low, high):
    """Values worth hitting: the dtype's ends, 0, and float resolutions around them."""
    out = {low, high, low + 1, high - 1, 0, 1, -1}
    for k in (24, 31, 32, 53, 62, 63, 64):
        out |= {2**k - 1, 2**k, 2**k + 1, -(2**k) - 1, -(2**k), -(2**k) + 1}
    return sorted(v for v in out if low <= v <= high)


def bound_value(draw, dtype, side):
    """A bound of any accepted kind, near or beyond the dtype's range."""
    low, high = limits(dtype)
    base = draw(
        st.one_of(
            st.sampled_from(edges(low, high)),
            st.integers(low, high),
            st.sampled_from([low - 1, high + 1, low - 2**70, high + 2**70, -(10**400), 10**400]),
        )
    )
    kind = draw(st.sampled_from(["none", "int", "float", "fraction", "numpy", "array", "inf"]))
    if kind == "none":
        return None
    if kind == "inf":
        return -math.inf if side == "lower" else math.inf
    if kind == "float":
        return float(base) if abs(base) < 2**1000 else None
    if kind == "fraction":
        return Fraction(base) + draw(st.sampled_from([Fraction(1, 3), Fraction(-1, 3)]))
    if kind == "numpy":
        for t in (np.int64, np.uint64):
            if limits(t)[0] <= base <= limits(t)[1]:
                return t(base)
        return base
    if low <= base <= high:  # a 0-d array of the leaf's dtype (made in the test's x64 mode)
        return Scalar(base)
    return base


class Scalar:
    """A 0-d JAX array bound to be: made inside the test's ``jax_enable_x64`` mode."""

    def __init__(self, value):
        self.value = value


@st.composite
def cases(draw):
    wide = draw(st.booleans())
    dtype = draw(st.sampled_from(NARROW + WIDE if wide else NARROW))
    low, high = limits(dtype)
    value = st.one_of(st.sampled_from(edges(low, high)), st.integers(low, high))
    values = draw(st.lists(value, min_size=N, max_size=N))
    lo = bound_value(draw, dtype, "lower")
    hi = bound_value(draw, dtype, "upper")
    penalty = draw(st.sampled_from(["exp", "linear", "quadratic"]))
    return wide, dtype, values, lo, hi, penalty


def judge_all(values, dtype, lo, hi, penalty):
    """Every JAX entry point against the exact reference (inside the caller's x64 mode)."""
    x = jnp.asarray(np.asarray(values, dtype=dtype))
    assert x.tolist() == values  # held exactly
    lo, hi = (jnp.asarray(b.value, dtype) if isinstance(b, Scalar) else b for b in (lo, hi))
    want = expect(values, dtype, lo, hi)
    tree, lower, upper = {"x": x}, {"x": lo}, {"x": hi}
    spec_bounds = (lo, hi)
    calls = {
        "bounds_cost": lambda: bounds_cost(tree, lower, upper, penalty=penalty),
        "jit": lambda: jax.jit(lambda t: bounds_cost(t, lower, upper, penalty=penalty))(tree),
        "spec": lambda: Bounds({"x": spec_bounds}, penalty=penalty).cost(tree),
    }
    if want is None:
        for name, call in calls.items():
            with pytest.raises(BoundsError):
                call()
                pytest.fail(name)
        with pytest.raises(BoundsError):
            bounds_clip(tree, lower, upper)
        with pytest.raises(BoundsError):
            Bounds({"x": spec_bounds}).report(tree)
        return
    excesses, below, above, projected = want
    cost_dtype = np.float64 if jax.config.jax_enable_x64 else np.float32
    for call in calls.values():
        got = call()
        assert got.dtype == cost_dtype
        assert_cost(got, excesses, penalty, cost_dtype)
    assert_cost(summed_exp_boundary_loss(x, lo, hi), excesses, "exp", cost_dtype)
    batch = jax.vmap(lambda v: bounds_cost({"x": v}, lower, upper, penalty=penalty))(
        jnp.stack([x, x])
    )
    assert float(batch[0]) == float(batch[1])
    assert_cost(batch[0], excesses, penalty, cost_dtype)
    spec = Bounds({"x": spec_bounds})
    report = spec.report(tree)
    if lo is None and hi is None or not report.entries:  # open on both sides
        assert below == above == 0
    else:
        (entry,) = report.entries
        assert (entry.below, entry.above) == (below, above)
        assert math.isclose(entry.max_excess, float(max(excesses)), rel_tol=1e-6)
    if below + above:
        with pytest.raises(BoundsViolationError):
            spec.check(tree)
    else:
        spec.check(tree)
    for out in (spec.project(tree)["x"], bounds_clip(tree, lower, upper)["x"]):
        assert out.dtype == x.dtype
        assert out.tolist() == projected


@settings(max_examples=150)
@given(case=cases())
def test_every_entry_point_against_python_integers(case):
    """Property: cost, report, check, project agree with exact Python integers."""
    wide, dtype, values, lo, hi, penalty = case
    with x64(wide):
        judge_all(values, dtype, lo, hi, penalty)


@pytest.mark.parametrize("dtype", NARROW + WIDE)
def test_ends_of_every_integer_dtype(dtype):
    low, high = limits(dtype)
    values = [low, high, 0, low + 1, high - 1, high]
    with x64(dtype in WIDE):
        judge_all(values, dtype, low + 1, high - 1, "linear")
        judge_all(values, dtype, -1, 1, "linear")  # excesses up to the whole range
        judge_all(values, dtype, high, None, "quadratic")
        judge_all(values, dtype, None, low, "exp")
        judge_all(values, dtype, Fraction(high) - Fraction(1, 2), None, "linear")


def test_int64_past_2_53_minimal():
    """The defect: an int64 leaf of 2**62 under a lower bound of 2**62 + 1 cost 0."""
    big = 2**62
    with x64(True):
        x = {"w": jnp.array([big, big + 5], jnp.int64)}
        got = bounds_cost(x, {"w": big + 1}, {"w": None})
        assert float(got) == pytest.approx(math.e, rel=1e-12)
        (entry,) = Bounds({"w": (big + 1, None)}).report(x).entries
        assert (entry.below, entry.above) == (1, 0)
        assert bounds_clip(x, {"w": big + 1}, {"w": None})["w"].tolist() == [big + 1, big + 5]


@pytest.mark.parametrize("wide", [False, True])
def test_int32_past_2_24_without_x64(wide):
    """float32 holds 2**24 + 1 as 2**24: compared in float32 it was inside 2**24."""
    with x64(wide):
        x = {"w": jnp.array([2**24 + 1, 2**24, -(2**31)], jnp.int32)}
        assert float(bounds_cost(x, {"w": None}, {"w": 2**24}, penalty="linear")) == 1.0
        got = bounds_cost(x, {"w": -(2**31) + 1}, {"w": 2**24}, penalty="linear")
        assert float(got) == 2.0
        (entry,) = Bounds({"w": (None, 2**24)}).report(x).entries
        assert entry.above == 1


@pytest.mark.parametrize("wide", [False, True])
def test_per_element_bounds_of_every_kind(wide):
    dtypes = NARROW + (WIDE if wide else [])
    rng = np.random.default_rng(0)
    with x64(wide):
        for dtype in dtypes:
            low, high = limits(dtype)
            values = [int(v) for v in rng.integers(low, high, N, dtype=dtype, endpoint=True)]
            values[:2] = [low, high]
            lo_vals = [int(v) for v in rng.integers(low, high, N, dtype=dtype, endpoint=True)]
            more = rng.integers(low, high, N, dtype=dtype, endpoint=True)
            hi_vals = [max(v, int(w)) for v, w in zip(lo_vals, more)]
            for lo_b, hi_b in (
                (np.asarray(lo_vals, dtype), np.asarray(hi_vals, dtype)),  # NumPy, own dtype
                (jnp.asarray(np.asarray(lo_vals, dtype)), None),  # JAX, own dtype
                (None, np.asarray(hi_vals, np.float64) + 0.5),  # floats, floored
                (np.asarray(lo_vals, np.float64) - 0.5, None),  # floats, ceiled
            ):
                x = jnp.asarray(np.asarray(values, dtype))
                lo_w = (
                    None if lo_b is None else [whole(v, "lower") for v in np.asarray(lo_b).tolist()]
                )
                hi_w = (
                    None if hi_b is None else [whole(v, "upper") for v in np.asarray(hi_b).tolist()]
                )
                exc, proj = [], []
                for k, v in enumerate(values):
                    lo_k = low if lo_w is None else min(max(lo_w[k], low), high)
                    hi_k = high if hi_w is None else min(max(hi_w[k], low), high)
                    exc.append(v - hi_k if v > hi_k else lo_k - v if v < lo_k else 0)
                    proj.append(min(max(v, lo_k), hi_k))
                cost_dtype = np.float64 if wide else np.float32
                fns = [bounds_cost]
                if wide or all(b is None or b.dtype != np.float64 for b in (lo_b, hi_b)):
                    # traced bounds (float64 NumPy arrays would enter jit as float32)
                    fns.append(jax.jit(bounds_cost, static_argnames="penalty"))
                for fn in fns:
                    got = fn({"x": x}, {"x": lo_b}, {"x": hi_b}, penalty="linear")
                    assert_cost(got, exc, "linear", cost_dtype)
                assert bounds_clip({"x": x}, {"x": lo_b}, {"x": hi_b})["x"].tolist() == proj
                (entry,) = Bounds({"x": (lo_b, hi_b)}).report({"x": x}).entries
                assert entry.below + entry.above == sum(e != 0 for e in exc)


def test_numpy_bounds_are_not_wrapped_without_x64():
    """A NumPy int64 bound is rounded with NumPy: JAX would wrap it to int32 first."""
    x = {"w": jnp.array([0, 5, 2**31 - 1], jnp.int32)}
    upper = np.asarray([2**40, 2**40, 2**40], np.int64)  # wraps to 0 as int32
    assert float(bounds_cost(x, {"w": None}, {"w": upper})) == 0.0
    assert bounds_clip(x, {"w": None}, {"w": upper})["w"].tolist() == [0, 5, 2**31 - 1]
    upper_f = np.asarray([16777217.5] * 3)  # float32 rounds it to 2**24
    got = bounds_cost({"w": jnp.array([2**24 + 1] * 3, jnp.int32)}, {"w": None}, {"w": upper_f})
    assert float(got) == 0.0


@pytest.mark.parametrize(
    ("dtype", "lower", "upper", "message"),
    [
        ("int8", 128, None, r"lower bound for 'w' is 128, beyond the largest int8 value \(127\)"),
        ("int16", None, -(2**15) - 1, r"upper bound for 'w' is -32769, beyond the smallest int16"),
        ("uint8", None, -1, r"upper bound for 'w' is -1, beyond the smallest uint8 value \(0\)"),
        ("uint8", Fraction(511, 2), None, r"lower bound for 'w' is 511/2, beyond the largest"),
        ("int32", np.int64(2**31), None, r"lower bound for 'w' is 2147483648, beyond"),
        ("int8", np.asarray([0, 300]), None, r"lower bound for 'w' is 300 at index \(1,\)"),
        ("int8", Fraction(21, 4), Fraction(23, 4), r"no value of int8 lies between the bounds"),
    ],
)
def test_bounds_no_value_can_satisfy_name_the_parameter(dtype, lower, upper, message):
    x = {"w": jnp.zeros(2, dtype)}
    with pytest.raises(BoundsError, match=message):
        bounds_cost(x, {"w": lower}, {"w": upper})
    with pytest.raises(BoundsError, match=message):
        Bounds({"w": (lower, upper)}).report(x)


def test_uint64_near_2_64():
    top = 2**64 - 1
    with x64(True):
        x = {"w": jnp.array([top, top - 1, 0, 2**63], jnp.uint64)}
        assert float(bounds_cost(x, {"w": None}, {"w": top - 1}, penalty="linear")) == 1.0
        assert float(bounds_cost(x, {"w": top}, {"w": None}, penalty="linear")) == pytest.approx(
            1 + top + (top - 2**63), rel=1e-15
        )
        (entry,) = Bounds({"w": (1, top - 1)}).report(x).entries
        assert (entry.below, entry.above) == (1, 1)
        assert bounds_clip(x, {"w": 1}, {"w": top - 1})["w"].tolist() == [
            top - 1,
            top - 1,
            1,
            2**63,
        ]


def test_traced_bounds_and_gradients():
    """Traced bounds are rounded inside the kernel (NaN kept NaN); int leaves get float0."""
    x = jnp.array([0, 5, 9], jnp.int32)
    f = jax.jit(lambda lo: bounds_cost({"w": x}, {"w": lo}, {"w": None}, penalty="linear"))
    assert float(f(jnp.array([0.5, 0.5, 0.5]))) == 1.0  # ceil: 1 - 0
    assert math.isnan(float(f(jnp.array([0.5, math.nan, 0.5]))))
    tree = {"w": x, "f": jnp.array([3.0])}

    def cost(t):
        return bounds_cost(t, {"w": 6, "f": 0.0}, {"w": 8, "f": 1.0}, penalty="quadratic")

    grads = jax.grad(cost, allow_int=True)(tree)
    assert grads["w"].dtype == jax.dtypes.float0
    assert float(grads["f"][0]) == pytest.approx(4.0)  # 2 * (3 - 1)
    assert float(cost(tree)) == pytest.approx(6**2 + 1 + 1 + 4)


def test_bool_leaves_are_compared_as_numbers():
    x = {"w": jnp.array([True, False])}
    assert float(bounds_cost(x, {"w": 0.5}, {"w": None}, penalty="linear")) == 0.5
    assert bounds_clip(x, {"w": 0.5}, {"w": None})["w"].tolist() == [True, True]
    (entry,) = Bounds({"w": (0.5, None)}).report(x).entries
    assert (entry.below, entry.above) == (1, 0)


TORCH_DTYPES = ["int8", "int16", "int32", "int64", "uint8"]


@settings(max_examples=60)
@given(data=st.data(), dtype=st.sampled_from(TORCH_DTYPES))
def test_the_torch_side_gives_the_same_answers(data, dtype):
    """Property: for the same leaves and bounds, torch and JAX agree (torch imported here)."""
    torch = pytest.importorskip("torch")
    from parambounds import Bounds as TorchBounds  # the spec dispatches on the model

    low, high = limits(dtype)
    value = st.one_of(st.sampled_from(edges(low, high)), st.integers(low, high))
    values = data.draw(st.lists(value, min_size=N, max_size=N))
    a, b = sorted(data.draw(st.lists(value, min_size=2, max_size=2)))
    lo = data.draw(st.sampled_from([None, a, Fraction(a) - Fraction(1, 3)]))
    hi = data.draw(st.sampled_from([None, b, Fraction(b) + Fraction(1, 3)]))
    penalty = data.draw(st.sampled_from(["linear", "exp"]))
    spec = TorchBounds({"x": (lo, hi)}, penalty=penalty)
    t = torch.tensor(values, dtype=getattr(torch, dtype))
    t_report = spec.report({"x": t})
    before = torch.get_default_dtype()
    # each side computes an integer's cost in its default float: float64 with x64
    torch.set_default_dtype(torch.float64 if dtype == "int64" else torch.float32)
    try:
        t_cost = float(spec.cost({"x": t}))
    finally:
        torch.set_default_dtype(before)
    t_proj = t.clone()
    spec.project_({"x": t_proj})
    with x64(dtype == "int64"):
        x = {"x": jnp.asarray(np.asarray(values, dtype))}
        j_report = spec.report(x)
        j_cost = float(spec.cost(x))
        j_proj = spec.project(x)["x"].tolist()
    assert [(e.below, e.above) for e in j_report.entries] == [
        (e.below, e.above) for e in t_report.entries
    ]
    assert j_proj == t_proj.tolist()
    assert (j_cost == 0) == (t_cost == 0)
    assert math.isclose(j_cost, t_cost, rel_tol=1e-6) or j_cost == t_cost, (j_cost, t_cost)


@pytest.mark.parametrize("dtype", ["int64", "uint64"])
def test_numpy_64_bit_leaves_that_jax_would_wrap_are_refused_without_x64(dtype):
    """Without x64 JAX casts a NumPy int64 leaf to int32: 2**40 was judged as 0."""
    x = {"w": np.asarray([2**40, 5], dtype)}
    message = rf"parameter 'w' is a NumPy {dtype} array holding 1099511627776 at index \(0,\)"
    for call in (
        lambda: bounds_cost(x, {"w": None}, {"w": 10}),
        lambda: bounds_clip(x, {"w": None}, {"w": 10}),
        lambda: Bounds({"w": (None, 10)}).report(x),
        lambda: Bounds({"w": (None, 10)}).cost(x),
    ):
        with pytest.raises(BoundsError, match=message):
            call()
    small = {"w": np.asarray([7, 5], dtype)}  # within 32 bits: judged as given
    assert float(bounds_cost(small, {"w": None}, {"w": 6}, penalty="linear")) == 1.0
    with x64(True):  # held exactly
        assert float(bounds_cost(x, {"w": None}, {"w": 2**40 - 1}, penalty="linear")) == 1.0


@pytest.mark.parametrize("wide", [False, True])
def test_integer_leaves_never_reach_the_native_kernel(wide):
    """The kernel takes float32/float64 only: integer leaves take the exact path, in both modes."""
    with x64(wide):
        big = 2**62 if wide else 2**30
        dtype = jnp.int64 if wide else jnp.int32
        tree = {"i": jnp.array([big, big + 5], dtype), "f": jnp.array([-3.0, 0.5])}
        lower, upper = {"i": big + 1, "f": 0.0}, {"i": None, "f": 1.0}

        def cost(t):
            return bounds_cost(t, lower, upper, penalty="linear")

        with kernel("native"):
            assert calls_kernel(cost, tree) == 1  # the float leaf only
        native, plain = both(lambda: jax.jit(cost)(tree))
        assert float(native) == float(plain) == 1.0 + 3.0  # big + 1 - big, 0 - (-3)


@settings(max_examples=25)
@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from(
                [2**62 - 1, 2**62, 2**62 + 1, float(2**62), Fraction(2**62) + Fraction(1, 3)]
            ),
            st.sampled_from(["lower", "upper"]),
        ),
        min_size=2,
        max_size=8,
    ),
    verify=st.booleans(),
)
def test_plan_cache_keeps_bounds_float64_cannot_tell_apart(steps, verify):
    """Property: a sequence of bounds equal in float64 (cached plans, verify mode on or off)."""
    import parambounds

    before = parambounds.get_verify()
    parambounds.set_verify(verify)
    try:
        with x64(True):
            values = [2**62 - 1, 2**62, 2**62 + 1]
            x = {"w": jnp.array(values, jnp.int64)}
            for b, side in steps:
                lo, hi = (b, None) if side == "lower" else (None, b)
                excesses, below, above, projected = expect(values, "int64", lo, hi)
                got = bounds_cost(x, {"w": lo}, {"w": hi}, penalty="linear")
                assert_cost(got, excesses, "linear", np.float64)
                assert bounds_clip(x, {"w": lo}, {"w": hi})["w"].tolist() == projected
    finally:
        parambounds.set_verify(before)


@pytest.mark.parametrize("x64", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_report_counts_are_exact_past_2_to_the_24(dtype, x64):
    """Counts were carried as float32: 2**24 + 1 elements outside read 2**24."""
    n = 2**24 + 1
    with jax.enable_x64(x64):
        x = {"w": jnp.concatenate([jnp.full(n, 5, dtype), jnp.full(3, -5, dtype)])}
        entry = Bounds({"w": (-1, 1)}).report(x).entries[0]
    assert (entry.above, entry.below, entry.numel) == (n, 3, n + 3)
    assert entry.max_excess == 4.0


FLOAT_DTYPES = ["float16", "bfloat16", "float32", "float64"]


def _normal_float(dtype):
    """Finite values of ``dtype`` that are not subnormal (XLA:CPU flushes those)."""
    info = np.finfo(jnp.dtype(dtype))
    tiny, big = float(info.tiny), float(info.max)
    return st.floats(-big, big, allow_nan=False, allow_infinity=False, width=64).map(
        lambda v: 0.0 if abs(v) < tiny else v
    )


@settings(max_examples=80)
@given(data=st.data(), dtype=st.sampled_from(FLOAT_DTYPES))
def test_the_torch_side_reports_float_leaves_the_same(data, dtype):
    """Property: float leaves compared with bounds no float of the leaf's dtype holds
    (0.1, an int past 2**24, a Fraction) are reported alike by torch and JAX: each
    compares with the bound rounded inward to the dtype. The JAX report compared in the
    leaf's dtype with the bound rounded to nearest: a float32 0.1 read inside ``<= 0.1``."""
    torch = pytest.importorskip("torch")
    from parambounds import Bounds as TorchBounds

    with x64(dtype == "float64"):
        near = jnp.asarray(data.draw(_normal_float(dtype)), dtype)
        rounded = float(near.astype(jnp.float32 if dtype != "float64" else jnp.float64))
    bound = st.one_of(
        st.just(rounded),
        st.just(0.1),
        st.integers(-(2**30), 2**30),
        st.fractions(max_denominator=7).map(lambda f: f + Fraction(int(rounded))),
        _normal_float(dtype),
    )
    a, b = sorted(data.draw(st.lists(bound, min_size=2, max_size=2)))
    lo, hi = data.draw(st.sampled_from([(a, None), (None, b), (a, b)]))
    values = data.draw(
        st.lists(st.one_of(st.just(rounded), _normal_float(dtype)), min_size=1, max_size=6)
    )
    tdtype = getattr(torch, dtype)
    t = torch.tensor(values, dtype=torch.float64).to(tdtype)
    try:
        t_report = TorchBounds({"x": (lo, hi)}).report({"x": t})
    except BoundsError:  # no value of the dtype between the bounds: JAX must say so too
        with x64(dtype == "float64"), pytest.raises(BoundsError):
            TorchBounds({"x": (lo, hi)}).report({"x": jnp.asarray(t.double().numpy(), dtype)})
        return
    with x64(dtype == "float64"):
        x = {"x": jnp.asarray(t.double().numpy(), dtype)}
        j_report = TorchBounds({"x": (lo, hi)}).report(x)

    # a bound beyond the dtype's range is open: torch leaves such a parameter out of its
    # report, JAX lists it with nothing outside; the counts are what must agree
    def counts(report):
        got = {e.name: (e.below, e.above) for e in report.entries}
        return got.get("x", (0, 0))

    assert counts(j_report) == counts(t_report), (lo, hi, values)


@settings(max_examples=60)
@given(
    data=st.data(),
    dtype=st.sampled_from(["float16", "bfloat16", "float32"]),
    kind=st.sampled_from(["int32", "int64", "float64", "jax"]),
    side=st.sampled_from(["lower", "upper"]),
)
def test_array_bounds_the_leaf_dtype_cannot_hold_are_met_exactly(data, dtype, kind, side):
    """Property: per-element bounds (NumPy int32/int64/float64 or JAX arrays) that the
    leaf's dtype cannot hold are rounded inward exactly, without x64: every projected
    value is inside in exact arithmetic, values inside are kept, the report counts what
    an exact comparison counts. JAX rounded them in float32 (an upper bound of 0.1 let
    0.10000000149 stay; a lower bound of 16777217 let 16777216 stay)."""
    finfo = np.finfo(jnp.dtype(dtype))
    big = min(float(finfo.max) / 2, 2.0**62)
    if kind in ("int32", "int64", "jax"):
        limit = 2**31 - 1 if kind != "int64" else 2**62
        limit = min(limit, int(big))
        bounds = data.draw(st.lists(st.integers(-limit, limit), min_size=3, max_size=3))
        host = np.asarray(bounds, np.int32 if kind != "int64" else np.int64)
    else:
        floats = st.floats(-big, big, allow_nan=False, allow_infinity=False)
        # XLA:CPU flushes subnormals (docs/jax.md): a bound whose inward value is one
        # reads as 0 in the compiled clip; bounds of normal magnitude only
        tiny = 2 * float(finfo.tiny)
        floats = floats.map(lambda v: 0.0 if abs(v) < tiny else v)
        bounds = data.draw(st.lists(floats, min_size=3, max_size=3))
        host = np.asarray(bounds, np.float64)
    b = jnp.asarray(host) if kind == "jax" else host
    exact_b = [Fraction(int(v)) if host.dtype.kind == "i" else Fraction(float(v)) for v in host]
    near = [float(jnp.asarray(float(v), dtype)) for v in host]  # the bound rounded to nearest
    x = jnp.asarray(np.asarray(near, np.float64), dtype)
    with x64(False):
        spec = Bounds({"w": (b, None) if side == "lower" else (None, b)})
        projected = spec.project({"w": x})["w"]
        (entry,) = spec.report({"w": x}).entries
    out = [Fraction(float(v)) for v in np.asarray(projected.astype(jnp.float32), np.float64)]
    vals = [Fraction(v) for v in near]
    for v, p, lim in zip(vals, out, exact_b):
        inside = v >= lim if side == "lower" else v <= lim
        assert (p >= lim) if side == "lower" else (p <= lim), (v, p, lim)
        if inside:
            assert p == v
    outside = sum(not (v >= lim if side == "lower" else v <= lim) for v, lim in zip(vals, exact_b))
    assert (entry.below if side == "lower" else entry.above) == outside
