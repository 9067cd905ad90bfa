"""parambounds.jax math: exact hard constraints in every dtype, derivatives, edge values.

References are float64 NumPy (or plain Python): every projected or constrained element is
compared with its bound exactly in float64.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parambounds.jax import Bounds, BoundsError, bounds_clip, bounds_cost

HALF = [jnp.float16, jnp.bfloat16]
FLOATS = [*HALF, jnp.float32]


def f64(x):
    return np.asarray(jnp.asarray(x).astype(jnp.float32), dtype=np.float64)


def assert_inside(x, lo, hi):
    """Every element of ``x`` in ``[lo, hi]``, exactly in float64 (NaN excepted)."""
    v = f64(x)
    lo = np.broadcast_to(np.asarray(lo, np.float64), v.shape)
    hi = np.broadcast_to(np.asarray(hi, np.float64), v.shape)
    ok = np.isnan(v) | ((v >= lo) & (v <= hi))
    assert ok.all(), (v[~ok], lo[~ok], hi[~ok])


def random_bounds(rng, n, dtype):
    """Per-element bounds of ``dtype``, wide enough to hold a bfloat16 value."""
    lo = rng.uniform(-3, 1, n)
    hi = lo + rng.uniform(0.05, 2, n)
    return jnp.asarray(lo, dtype), jnp.asarray(hi, dtype)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("bound_dtype", [jnp.float32, jnp.float16, jnp.bfloat16, jnp.int32])
def test_array_bounds_are_rounded_inward_in_clip_and_project(dtype, bound_dtype):
    rng = np.random.default_rng(0)
    n = 400
    if bound_dtype == jnp.int32:
        lo = jnp.asarray(rng.integers(-3000, 0, n), jnp.int32)
        hi = lo + jnp.asarray(rng.integers(64, 3000, n), jnp.int32)  # room for a bfloat16
        x = jnp.asarray(rng.uniform(-4000, 4000, n), dtype)
    else:
        lo, hi = random_bounds(rng, n, bound_dtype)
        x = jnp.asarray(rng.uniform(-4, 4, n), dtype)
    x = x.at[:50].set(lo[:50].astype(dtype)).at[50:100].set(hi[50:100].astype(dtype))
    clipped = bounds_clip({"w": x}, {"w": lo}, {"w": hi})["w"]
    assert clipped.dtype == dtype
    assert_inside(clipped, f64(lo), f64(hi))
    projected = Bounds({"w": (lo, hi)}).project({"w": x})["w"]
    assert_inside(projected, f64(lo), f64(hi))
    # values already inside are kept as they are
    inside = (f64(x) >= f64(lo)) & (f64(x) <= f64(hi))
    np.testing.assert_array_equal(f64(projected)[inside], f64(x)[inside])


@pytest.mark.parametrize("dtype", HALF)
def test_array_bounds_rounded_inward_under_jit_with_traced_bounds(dtype):
    rng = np.random.default_rng(1)
    lo, hi = random_bounds(rng, 300, jnp.float32)
    x = jnp.asarray(rng.uniform(-4, 4, 300), dtype)
    clip = jax.jit(lambda p, lo, hi: bounds_clip(p, {"w": lo}, {"w": hi}))
    assert_inside(clip({"w": x}, lo, hi)["w"], f64(lo), f64(hi))


@pytest.mark.parametrize("dtype", FLOATS)
def test_constrain_is_inside_exactly_for_any_z(dtype):
    bounds = Bounds({"a": (0.1, 0.3), "b": {"lower": 0.1}, "c": (None, -0.7)})
    z = jnp.asarray([-1e4, -30.0, -1.0, 0.0, 1.0, 30.0, 1e4], dtype)
    out = bounds.constrain({"a": z, "b": z, "c": z})
    assert all(v.dtype == dtype for v in out.values())
    assert_inside(out["a"], 0.1, 0.3)
    assert_inside(out["b"], 0.1, math.inf)
    assert_inside(out["c"], -math.inf, -0.7)


@pytest.mark.parametrize("dtype", HALF)
def test_unconstrain_is_finite_and_round_trips_in_half_precision(dtype):
    bounds = Bounds({"a": (0.1, 0.3), "b": {"lower": 1.0}})
    x = jnp.asarray([0.0, 0.125, 0.2, 0.25, 5.0], dtype)  # two outside "a"
    z = bounds.unconstrain({"a": x, "b": x + 2})
    assert all(bool(jnp.isfinite(v).all()) for v in z.values())
    back = bounds.constrain(z)
    assert_inside(back["a"], 0.1, 0.3)
    # inside the bounds, constrain(unconstrain(x)) is x to a few units of the dtype
    eps = float(jnp.finfo(dtype).eps)
    np.testing.assert_allclose(f64(back["a"])[1:4], f64(x)[1:4], rtol=8 * eps)
    np.testing.assert_allclose(f64(back["b"]), f64(x + 2), rtol=8 * eps)


def test_integer_leaves_clip_to_the_integers_inside_array_bounds():
    x = jnp.array([0, 1, 5, -3])
    lo, hi = jnp.array([0.5, 0.5, 0.5, -2.5]), jnp.array([3.5, 3.5, 3.5, 3.5])
    out = bounds_clip({"w": x}, {"w": lo}, {"w": hi})["w"]
    assert out.dtype == x.dtype
    assert out.tolist() == [1, 1, 3, -2]  # ceil(lower), floor(upper)
    b = bounds_clip({"w": jnp.array([True, False])}, {"w": jnp.array([0.5, 0.5])}, {"w": None})
    assert b["w"].tolist() == [True, True]


@pytest.mark.parametrize(
    ("dtype", "lower", "message"),
    [
        (jnp.int8, jnp.array([0.0, 1e6]), r"lower bound for 'w' is 1000000.0 at index \(1,\)"),
        (jnp.float16, jnp.array([0.0, 1e5]), r"beyond the range of float16"),
    ],
)
def test_array_bound_beyond_the_dtype_is_an_error(dtype, lower, message):
    with pytest.raises(BoundsError, match=message):
        bounds_clip({"w": jnp.zeros(2, dtype)}, {"w": lower}, {"w": None})


@pytest.mark.parametrize("as_array", [False, True])
def test_bounds_with_no_value_of_the_dtype_between_them_are_an_error(as_array):
    lo, hi = 0.1001, 0.1002  # no bfloat16 between (its spacing there is 2**-10)
    if as_array:
        lo, hi = jnp.array([0.0, lo]), jnp.array([1.0, hi])
    x = {"w": jnp.zeros(2, jnp.bfloat16)}
    with pytest.raises(BoundsError, match="no value of bfloat16 lies between the bounds of 'w'"):
        bounds_clip(x, {"w": lo}, {"w": hi})
    assert float(bounds_cost({"w": jnp.zeros(2)}, {"w": lo}, {"w": hi})) > 0  # float32: fine


def test_negative_zero_bounds_and_values():
    x = jnp.array([-0.0, 0.0, -1.0, 1.0])
    assert float(bounds_cost({"w": x}, {"w": 0.0}, {"w": -0.0})) == pytest.approx(
        2 * math.e, rel=1e-6
    )
    out = bounds_clip({"w": x}, {"w": -0.0}, {"w": 0.0})["w"]
    assert f64(out).tolist() == [0.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("shape", [(0,), (0, 3), ()])
def test_empty_and_0d_arrays(shape):
    x = jnp.full(shape, 3.0)
    ref = 0.0 if math.prod(shape) == 0 else math.exp(2.0)
    cost = bounds_cost({"w": x}, {"w": 0.0}, {"w": 1.0})
    assert cost.shape == () and float(cost) == pytest.approx(ref, rel=1e-6)
    grad = jax.grad(lambda p: bounds_cost(p, {"w": 0.0}, {"w": 1.0}))({"w": x})["w"]
    assert grad.shape == shape
    assert bounds_clip({"w": x}, {"w": 0.0}, {"w": 1.0})["w"].shape == shape


def test_gradient_is_nan_at_nan_and_finite_past_the_overflow_threshold():
    x = jnp.array([jnp.nan, 500.0, -500.0, 0.5])
    g = jax.grad(lambda p: bounds_cost(p, {"w": 0.0}, {"w": 1.0}))({"w": x})["w"]
    assert math.isnan(float(g[0]))
    assert bool(jnp.isfinite(g[1:]).all())
    assert float(g[1]) > 0 > float(g[2]) and float(g[3]) == 0


def ref_grads(x, lo, hi, h=1e-6):
    """Central differences of the plain float64 exp cost, in x and in the bounds."""

    def cost(x, lo, hi):
        e = np.maximum(x - hi, lo - x)
        return np.where(e > 0, np.exp(np.where(e > 0, e, 0)), 0).sum()

    def diff(k):
        args = [np.array(a, np.float64) for a in (x, lo, hi)]
        out = np.zeros_like(args[k])
        for i in range(out.size):
            up = [a.copy() for a in args]
            dn = [a.copy() for a in args]
            up[k].flat[i] += h
            dn[k].flat[i] -= h
            out.flat[i] = (cost(*up) - cost(*dn)) / (2 * h)
        return out

    return diff(0), diff(1), diff(2)


def test_grad_in_x_and_in_array_bounds_match_finite_differences():
    x = np.array([-2.0, 0.3, 1.5, 2.2])
    lo = np.array([-1.0, 0.0, 0.0, 0.5])
    hi = np.array([1.0, 1.0, 1.0, 2.0])
    gx, glo, ghi = jax.grad(
        lambda x, lo, hi: bounds_cost({"w": x}, {"w": lo}, {"w": hi}), argnums=(0, 1, 2)
    )(*(jnp.asarray(a, jnp.float32) for a in (x, lo, hi)))
    rx, rlo, rhi = ref_grads(x, lo, hi)
    for got, ref in ((gx, rx), (glo, rlo), (ghi, rhi)):
        np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-4, atol=1e-5)


def test_forward_mode_and_hessian():
    x = jnp.array([2.0, -1.0, 0.5])
    fn = lambda v: bounds_cost({"w": v}, {"w": 0.0}, {"w": 1.0}, penalty="expm1")  # noqa: E731
    _, tangent = jax.jvp(fn, (x,), (jnp.array([1.0, 2.0, 3.0]),))
    assert float(tangent) == pytest.approx(math.e * 1 - math.e * 2, rel=1e-6)
    hess = np.asarray(jax.hessian(fn)(x))
    np.testing.assert_allclose(hess, np.diag([math.e, math.e, 0.0]), rtol=1e-6)


def test_vmap_over_a_batch_of_parameters_and_of_bounds():
    xs = jnp.array([[2.0, 0.5], [0.5, -1.0]])
    costs = jax.vmap(lambda p: bounds_cost({"w": p}, {"w": 0.0}, {"w": 1.0}))(xs)
    np.testing.assert_allclose(np.asarray(costs), [math.e, math.e], rtol=1e-6)
    his = jnp.array([[1.0, 1.0], [0.0, 0.0]])
    costs = jax.vmap(lambda p, h: bounds_cost({"w": p}, {"w": -5.0}, {"w": h}))(xs, his)
    np.testing.assert_allclose(np.asarray(costs), [math.e, math.exp(0.5)], rtol=1e-6)
    bounds = Bounds({"w": (0.0, 1.0)})
    projected = jax.vmap(bounds.project)({"w": xs})["w"]
    assert projected.tolist() == [[1.0, 0.5], [0.5, 0.0]]


def test_jit_with_donated_buffers_and_grad_through_constrain():
    bounds = Bounds({"w": (0.0, 1.0)})
    step = jax.jit(lambda p: bounds.project({"w": p["w"] + 0.75}), donate_argnums=0)
    p = {"w": jnp.array([0.0, 0.5])}
    for _ in range(3):
        p = step(p)
    assert p["w"].tolist() == [1.0, 1.0]

    def loss(z):  # a model of constrained parameters, and the cost of those parameters
        w = bounds.constrain({"w": z})["w"]
        return (w**2).sum() + bounds.cost({"w": w})

    z = jnp.array([-1.0, 2.0])
    sig = 1 / (1 + np.exp(-np.asarray(z, np.float64)))
    ref = 2 * sig * sig * (1 - sig)  # d/dz sigmoid(z)**2; the cost is 0 inside
    np.testing.assert_allclose(np.asarray(jax.grad(loss)(z)), ref, rtol=1e-5)


@pytest.mark.parametrize("bound", ["scalar", "full", "row"])
def test_large_arrays_summed_in_chunks_match_a_float64_reference(bound):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3, 100_003)) * 2  # 4.6 chunks of 2**16: a loop and a tail
    lo = {
        "scalar": -2.0,
        "full": rng.uniform(-3, -1, x.shape),
        "row": rng.uniform(-3, -1, 100_003),
    }[bound]
    e = np.maximum(x - 2.0, np.broadcast_to(lo, x.shape) - x)
    ref = np.where(e > 0, np.exp(np.where(e > 0, e, 0)), 0).sum()
    lo_j = lo if bound == "scalar" else jnp.asarray(lo, jnp.float32)
    fn = lambda p: bounds_cost({"w": p}, {"w": lo_j}, {"w": 2.0})  # noqa: E731
    xj = jnp.asarray(x, jnp.float32)
    assert float(fn(xj)) == pytest.approx(ref, rel=1e-5)
    assert float(jax.jit(fn)(xj)) == pytest.approx(ref, rel=1e-5)
    batched = jax.vmap(fn)(jnp.stack([xj, xj + 100]))
    assert float(batched[0]) == pytest.approx(ref, rel=1e-5)
    assert float(jax.grad(fn)(xj).sum()) == pytest.approx(
        np.where(x > 2, np.exp(x - 2), 0).sum()
        - np.where(np.broadcast_to(lo, x.shape) - x > 0, np.exp(e), 0).sum(),
        rel=1e-4,
    )
    nan = xj.at[2, 100_000].set(jnp.nan)  # in the tail
    assert math.isnan(float(fn(nan))) and math.isnan(float(fn(xj.at[0, 5].set(jnp.nan))))
