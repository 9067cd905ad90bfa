"""The native JAX kernel (an XLA FFI call) against the jax.numpy path and a float64 reference.

Every case runs twice in one process: with the kernel (``PARAMBOUNDS_JAX_KERNEL=native``)
and without it (``jnp``, the oracle), and the answers are compared; values are also
compared with a plain float64 NumPy reference. Derivatives of the kernel's gradient
(Hessians, forward mode) must be the ``jax.numpy`` path's.
"""

import contextlib
import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from parambounds.jax import Bounds, bounds_cost, summed_exp_boundary_loss
from parambounds.penalties import threshold_for_max

PENALTIES = ["exp", "expm1", "quadratic", "linear"]
TARGET = "parambounds_bounds_cost"


@contextlib.contextmanager
def kernel(mode):
    old = os.environ.get("PARAMBOUNDS_JAX_KERNEL")
    os.environ["PARAMBOUNDS_JAX_KERNEL"] = mode
    try:
        yield
    finally:
        if old is None:
            del os.environ["PARAMBOUNDS_JAX_KERNEL"]
        else:
            os.environ["PARAMBOUNDS_JAX_KERNEL"] = old


def both(fn):
    """``fn()`` with the native kernel and with the jnp path (fresh traces each)."""
    with kernel("native"):
        native = fn()
    with kernel("jnp"):
        plain = fn()
    return native, plain


def calls_kernel(fn, *args):
    """How many times the compiled ``jax.jit(fn)`` calls the native kernel."""
    text = jax.jit(lambda *a: fn(*a)).lower(*args).compile().as_text()  # a fresh trace
    return text.count(f'custom_call_target="{TARGET}"')


def ref_leaf(x, lo, hi, penalty):
    """float64 value and gradient of one float32 array (plain NumPy, element by element).

    XLA:CPU flushes float32 subnormals to zero (inputs and results), so the reference does.
    """
    x = np.asarray(x, np.float64).ravel()
    t = threshold_for_max(float(np.finfo(np.float32).max))
    tiny = float(np.finfo(np.float32).tiny)
    total, grad = 0.0, np.zeros_like(x)
    for i, v in enumerate(x.tolist()):
        if math.isnan(v) and (lo is not None or hi is not None):
            return math.nan, None
        v = 0.0 if abs(v) < tiny else v
        above = -math.inf if hi is None else v - hi
        below = -math.inf if lo is None else lo - v
        e = above if above >= below else below
        e = 0.0 if abs(e) < tiny else e
        if e <= 0:
            continue
        if penalty in ("exp", "expm1"):
            c = min(e, t)
            value = (math.exp(c) if penalty == "exp" else math.expm1(c)) + math.exp(c) * max(
                e - t, 0
            )
            slope = math.exp(c)
        elif penalty == "quadratic":
            value, slope = e * e, 2 * e
        else:
            value, slope = e, 1.0
        total += value
        grad[i] = slope if above >= below else -slope
    return total, grad


def assert_trees_close(a, b, rtol=2e-6, atol=0.0):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


# ------------------------------------------------------------------ the kernel runs


def test_value_and_grad_is_one_kernel_call_and_the_gradient_is_its_output():
    p = {"a": jnp.zeros((300,)), "b": jnp.zeros((17, 5)), "c": [jnp.zeros(()), jnp.zeros((0,))]}
    lo = {"a": -1.0, "b": None, "c": [0.0, 0.0]}
    hi = {"a": 1.0, "b": 2.0, "c": [None, 1.0]}
    vg = jax.value_and_grad(lambda q: bounds_cost(q, lo, hi))
    with kernel("native"):
        assert calls_kernel(vg, p) == 1
        text = jax.jit(lambda q: vg(q)).lower(p).compile().as_text()
        # no elementwise pass after the call: the gradients are the call's own outputs
        assert "multiply" not in text and "select" not in text
    with kernel("jnp"):
        assert calls_kernel(vg, p) == 0


@pytest.mark.parametrize("penalty", PENALTIES)
def test_special_values_match_the_jnp_path_and_the_reference(penalty):
    x = np.array(
        [0.5, 2.5, -3.0, 1.0, math.inf, -math.inf, -0.0, 0.0, 2.0, 3.0, 1e30, -1e30, 1e-45],
        np.float32,
    )
    for lo, hi in ((-2.0, 2.0), (0.0, None), (None, 0.0), (-0.0, 0.0)):
        f = lambda q, lo=lo, hi=hi: bounds_cost({"w": q}, {"w": lo}, {"w": hi}, penalty=penalty)  # noqa: E731
        (v1, g1), (v2, g2) = both(lambda f=f: jax.jit(jax.value_and_grad(f))(jnp.asarray(x)))
        want, grad = ref_leaf(x, lo, hi, penalty)
        assert float(v1) == pytest.approx(want, rel=1e-6)
        np.testing.assert_allclose(np.asarray(g1), grad, rtol=2e-6)
        assert float(v1) == pytest.approx(float(v2), rel=1e-6)
        np.testing.assert_allclose(np.asarray(g1), np.asarray(g2), rtol=2e-6)


@pytest.mark.parametrize("penalty", PENALTIES)
def test_nan_gives_nan_value_and_gradient(penalty):
    x = jnp.array([0.0, math.nan, 5.0] + [0.0] * 20)
    f = lambda q: bounds_cost({"w": q}, {"w": -1.0}, {"w": 1.0}, penalty=penalty)  # noqa: E731
    (v1, g1), (v2, g2) = both(lambda: jax.jit(jax.value_and_grad(f))(x))
    assert math.isnan(float(v1)) and math.isnan(float(v2))
    assert math.isnan(float(g1[1])) and float(g1[0]) == 0.0
    assert float(g1[2]) == pytest.approx(float(g2[2]), rel=1e-6)


values = st.one_of(
    st.floats(-6, 6, width=32),
    st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 0.0, 1e30, -1e30]),
)
bound = st.one_of(st.none(), st.floats(-3, 3, width=32))


@settings(max_examples=25, deadline=None)
@given(
    shapes=st.lists(
        st.lists(st.integers(0, 9), min_size=0, max_size=3).map(tuple), min_size=1, max_size=4
    ),
    data=st.data(),
    penalty=st.sampled_from(PENALTIES),
)
def test_random_trees_match_the_jnp_path_and_a_float64_reference(shapes, data, penalty):
    params, lower, upper = {}, {}, {}
    for k, shape in enumerate(shapes):
        n = math.prod(shape)
        x = np.array(data.draw(st.lists(values, min_size=n, max_size=n)), np.float32)
        lo, hi = data.draw(bound), data.draw(bound)
        if lo is not None and hi is not None and lo > hi:
            lo, hi = hi, lo
        params[f"p{k}"] = jnp.asarray(x.reshape(shape))
        lower[f"p{k}"], upper[f"p{k}"] = lo, hi
    f = lambda q: bounds_cost(q, lower, upper, penalty=penalty)  # noqa: E731
    (v1, g1), (v2, g2) = both(lambda: jax.jit(jax.value_and_grad(f))(params))
    e1, e2 = both(lambda: f(params))  # eager value alone (the kernel without a gradient)
    parts = [ref_leaf(params[k], lower[k], upper[k], penalty) for k in params]
    with np.errstate(over="ignore"):
        want = float(np.float32(sum(v for v, _ in parts)))  # beyond float32: inf
    if math.isnan(want):
        assert math.isnan(float(v1)) and math.isnan(float(e1)) and math.isnan(float(v2))
    else:
        for got in (v1, e1):
            assert float(got) == pytest.approx(want, rel=1e-5, abs=1e-30) or float(got) == want
        for k, (_, grad) in zip(params, parts):
            if grad is not None:
                np.testing.assert_allclose(np.asarray(g1[k]).ravel(), grad, rtol=2e-6)
    np.testing.assert_allclose(float(v1), float(v2), rtol=1e-5)
    for k in params:
        a, b = np.asarray(g1[k]), np.asarray(g2[k])
        np.testing.assert_allclose(a, b, rtol=2e-6)  # NaN where the other has NaN
        inside = b == 0
        assert (a[inside] == 0).all()  # exactly zero inside


def test_large_arrays_split_over_threads_give_the_jnp_paths_answer_for_subnormals():
    # Pieces of a large array may run on XLA's other threads; each computes as the
    # calling thread does (XLA flushes float32 subnormals to zero), so no piece differs.
    x = jnp.full((1 << 20,), 1e-40, jnp.float32).at[::1000].set(0.5)
    f = lambda q: bounds_cost({"w": q}, {"w": None}, {"w": 0.0})  # noqa: E731
    (v1, g1), (v2, g2) = both(lambda: jax.jit(jax.value_and_grad(f))(x))
    assert float(v1) == pytest.approx(float(v2), rel=1e-6)
    assert float(v1) == pytest.approx(1049 * math.exp(0.5), rel=1e-5)
    np.testing.assert_array_equal(np.asarray(g1) != 0, np.asarray(g2) != 0)


# ------------------------------------------------------------- derivatives of derivatives


@pytest.mark.parametrize("penalty", PENALTIES)
def test_hessian_jacfwd_jvp_and_grad_of_grad_are_the_jnp_paths(penalty):
    x = jnp.array([-3.0, -0.5, 0.0, 0.7, 1.5, 2.5, 4.0])
    lo, hi = {"w": -1.0}, {"w": 1.0}

    def f(q):
        return bounds_cost({"w": q}, lo, hi, penalty=penalty)

    def run():
        return (
            jax.hessian(f)(x),
            jax.jacfwd(jax.grad(f))(x),
            jax.jacrev(jax.grad(f))(x),
            jax.jvp(f, (x,), (jnp.ones_like(x),)),
            jax.jvp(jax.grad(f), (x,), (jnp.arange(7.0),)),
            jax.grad(lambda q: jnp.sum(jax.grad(f)(q) ** 2))(x),
            jax.jit(jax.hessian(f))(x),
        )

    native, plain = both(run)
    assert_trees_close(native, plain, rtol=1e-6, atol=1e-6)
    h = np.asarray(native[0])
    assert np.count_nonzero(h - np.diag(np.diag(h))) == 0  # elementwise: a diagonal Hessian
    if penalty == "quadratic":  # f'' = 2 outside
        assert np.diag(h).tolist() == [2.0, 0, 0, 0, 2.0, 2.0, 2.0]


def test_bounds_that_are_differentiated_take_the_right_derivative():
    x = jnp.array([-3.0, 0.5, 2.0])

    def f(lo, hi):
        return bounds_cost({"w": x}, {"w": lo}, {"w": hi})

    native, plain = both(lambda: jax.grad(f, argnums=(0, 1))(jnp.float32(-1.0), jnp.float32(1.0)))
    assert_trees_close(native, plain)
    assert float(native[0]) == pytest.approx(math.exp(2.0))  # d/dl exp(l - x) at x = -3
    assert float(native[1]) == pytest.approx(-math.exp(1.0))


def test_a_cotangent_scales_the_gradient():
    x = jnp.array([-3.0, 0.5, 2.0, 0.0])
    f = lambda q: 2.5 * bounds_cost({"w": q}, {"w": -1.0}, {"w": 1.0})  # noqa: E731
    native, plain = both(lambda: jax.jit(jax.grad(f))(x))
    np.testing.assert_allclose(np.asarray(native), np.asarray(plain), rtol=1e-6)
    assert float(native[0]) == pytest.approx(-2.5 * math.exp(2.0), rel=1e-6)


@pytest.mark.parametrize("factor", [math.inf, -math.inf, math.nan])
def test_a_non_finite_cotangent_leaves_values_inside_at_exactly_zero(factor):
    x = jnp.array([-3.0, 0.5, 1.0, 0.0, -0.0] + [0.25] * 40)
    f = lambda q: factor * bounds_cost({"w": q}, {"w": -1.0}, {"w": 1.0})  # noqa: E731
    with kernel("native"):
        for g in (jax.grad(f)(x), jax.jit(jax.grad(f))(x)):
            g = np.asarray(g)
            assert (g[1:] == 0).all()  # 0 * inf would be NaN
            want = -math.exp(2.0) * factor
            assert (math.isnan(g[0]) and math.isnan(want)) or g[0] == want
    with kernel("jnp"):  # the jnp path multiplies: NaN inside (documented)
        assert math.isnan(float(jax.grad(f)(x)[1]))


def test_value_and_grad_hands_the_kernels_gradient_over_in_place():
    x = jnp.linspace(-3, 3, 1000)
    f = lambda q: bounds_cost({"w": q}, {"w": -1.0}, {"w": 1.0})  # noqa: E731
    with kernel("native"):
        text = jax.jit(jax.value_and_grad(f)).lower(x).compile().as_text()
    scale = [line for line in text.splitlines() if 'custom_call_target="parambounds_scale"' in line]
    assert len(scale) == 1 and "output_to_operand_aliasing" in scale[0]


# ----------------------------------------------------------------------- fall-backs


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.int32, jnp.uint8])
def test_dtypes_the_kernel_does_not_take_use_the_jnp_path(dtype):
    p = {"h": jnp.array([0, 1, 2, 5], dtype) - 1 * jnp.issubdtype(dtype, jnp.signedinteger)}
    p["f"] = jnp.array([-3.0, 0.0, 5.0])
    lo, hi = {"h": 0.0, "f": 0.0}, {"h": 1.0, "f": 1.0}
    with kernel("native"):
        assert calls_kernel(lambda q: bounds_cost(q, lo, hi), p) == 1  # the float32 leaf
        assert calls_kernel(lambda q: bounds_cost({"h": q["h"]}, {"h": 0.0}, {"h": 1.0}), p) == 0
    native, plain = both(lambda: bounds_cost(p, lo, hi))
    assert float(native) == pytest.approx(float(plain), rel=1e-3)
    if jnp.issubdtype(dtype, jnp.floating):
        g1, g2 = both(lambda: jax.grad(lambda q: bounds_cost(q, lo, hi))(p))
        assert_trees_close(g1, g2)


def test_float64_is_computed_in_float64():
    with jax.enable_x64(True):
        x = jnp.array([-3.0, 0.5, 2.0 + 1e-12, 1000.0], jnp.float64)
        f = lambda q: bounds_cost({"w": q}, {"w": -1.0}, {"w": 2.0})  # noqa: E731
        with kernel("native"):
            assert calls_kernel(jax.value_and_grad(f), x) == 1
        (v1, g1), (v2, g2) = both(lambda: jax.jit(jax.value_and_grad(f))(x))
        t = threshold_for_max(float(np.finfo(np.float64).max))
        want = math.exp(2.0) + math.exp(1e-12) + math.exp(998.0 if 998 <= t else t) * (1 + 998 - t)
        assert v1.dtype == jnp.float64
        assert float(v1) == pytest.approx(want, rel=1e-12)
        assert float(v1) == pytest.approx(float(v2), rel=1e-13)
        np.testing.assert_allclose(np.asarray(g1), np.asarray(g2), rtol=1e-13)


def test_tensor_valued_bounds_use_the_jnp_path_beside_the_kernel():
    p = {"a": jnp.array([-3.0, 0.5, 2.0]), "b": jnp.array([[0.0, 5.0], [-5.0, 1.0]])}
    lo = {"a": jnp.array([-1.0, 1.0, -jnp.inf]), "b": -1.0}
    hi = {"a": jnp.array(1.5), "b": 1.0}
    f = lambda q: bounds_cost(q, lo, hi)  # noqa: E731
    with kernel("native"):
        assert calls_kernel(f, p) == 1  # "b" only
    native, plain = both(lambda: jax.jit(jax.value_and_grad(f))(p))
    assert_trees_close(native, plain)


def test_vmap_of_the_cost_and_of_its_gradient():
    xs = jnp.linspace(-4, 4, 5 * 33).reshape(5, 33)
    f = lambda q: bounds_cost({"w": q}, {"w": -1.0}, {"w": 1.0}, penalty="expm1")  # noqa: E731
    ts = jnp.cos(xs)
    native, plain = both(
        lambda: (
            jax.vmap(f)(xs),
            jax.vmap(jax.grad(f))(xs),
            jax.jit(jax.vmap(jax.grad(f)))(xs),
            jax.vmap(lambda x, t: jax.jvp(f, (x,), (t,)))(xs, ts),
            jax.vmap(lambda t: jax.jvp(f, (xs[1],), (t,)))(ts),  # the gradient unbatched
            jax.vmap(lambda c: jax.vjp(f, xs[2])[1](c))(jnp.array([1.0, -2.0, 0.5])),
        )
    )
    with kernel("native"):  # a batch of cotangents, one infinite: 0 inside all the same
        (g,) = jax.vmap(lambda c: jax.vjp(f, xs[2])[1](c))(jnp.array([1.0, jnp.inf]))
    inside = np.asarray(native[1][2]) == 0
    assert inside.any() and (np.asarray(g)[1][inside] == 0).all()
    assert_trees_close(native, plain)
    assert float(native[0][0]) == pytest.approx(ref_leaf(xs[0], -1.0, 1.0, "expm1")[0], rel=1e-6)


def test_bounds_spec_and_summed_exp_boundary_loss_use_the_kernel():
    p = {"layer": {"w": jnp.array([-3.0, 0.5, 2.0])}}
    spec = Bounds({"*.w": (-1.0, 1.0)})
    with kernel("native"):
        assert calls_kernel(spec.cost, p) == 1
        assert calls_kernel(lambda x: summed_exp_boundary_loss(x, 0.0, 1.0), p["layer"]["w"]) == 1
    native, plain = both(lambda: (spec.cost(p), summed_exp_boundary_loss(p["layer"]["w"], 0.0)))
    assert_trees_close(native, plain)


def test_other_platforms_lower_without_the_kernel():
    f = lambda q: bounds_cost({"w": q}, {"w": -1.0}, {"w": 1.0})  # noqa: E731
    x = jax.ShapeDtypeStruct((8,), jnp.float32)
    with kernel("native"):
        for platform, want in (("cpu", 1), ("cuda", 0), ("tpu", 0)):
            # (the kernel's call has no compatibility guarantee: exported only with the check off)
            exported = jax.export.export(
                jax.jit(jax.value_and_grad(f)),
                platforms=[platform],
                disabled_checks=[
                    jax.export.DisabledSafetyCheck.custom_call(name)
                    for name in (TARGET, "parambounds_scale")
                ],
            )(x)
            assert exported.mlir_module().count(TARGET) == want, platform


def test_sharded_inputs_under_jit_and_shard_map_on_two_devices():
    script = textwrap.dedent(
        """
        import os, jax, jax.numpy as jnp, numpy as np
        from jax.sharding import NamedSharding, PartitionSpec as P
        import parambounds.jax as pj
        assert jax.device_count() == 2
        mesh = jax.make_mesh((2,), ("x",))
        x = jnp.linspace(-4.0, 4.0, 64).reshape(8, 8)
        w = jax.device_put(x, NamedSharding(mesh, P("x")))
        f = lambda v: pj.bounds_cost({"w": v}, {"w": -1.0}, {"w": 2.0})
        def local(v):
            return jax.lax.psum(f(v), "x")
        out = []
        for mode in ("native", "jnp"):
            os.environ["PARAMBOUNDS_JAX_KERNEL"] = mode
            v, g = jax.jit(jax.value_and_grad(lambda v: f(v)))(w)
            s = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("x"),), out_specs=P()))(w)
            gs = jax.jit(jax.grad(jax.shard_map(local, mesh=mesh, in_specs=(P("x"),), out_specs=P())))(w)
            out.append([float(v), np.asarray(g).tolist(), float(s), np.asarray(gs).tolist()])
        print(repr(out))
        """
    )
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=1800
    )
    assert out.returncode == 0, out.stderr[-3000:]
    native, plain = eval(out.stdout.strip().splitlines()[-1])
    x = np.linspace(-4.0, 4.0, 64)
    want, grad = ref_leaf(x, -1.0, 2.0, "exp")
    for v, g, s, gs in (native, plain):
        assert v == pytest.approx(want, rel=1e-5) and s == pytest.approx(want, rel=1e-5)
        np.testing.assert_allclose(np.ravel(g), grad, rtol=1e-5)
        np.testing.assert_allclose(np.ravel(gs), grad, rtol=1e-5)
