"""parambounds.jax: bounds_cost, summed_exp_boundary_loss, bounds_clip, make_bounds."""

import math
import subprocess
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parambounds.jax import (
    BoundsError,
    bounds_clip,
    bounds_cost,
    make_bounds,
    summed_exp_boundary_loss,
)
from parambounds.penalties import threshold_for_max

T32 = threshold_for_max(float(np.finfo(np.float32).max))


def ref_penalty(e, penalty="exp", t=T32):
    """Plain-Python reference of the penalty shapes (float64)."""
    if penalty == "exp":
        return math.exp(e) if e <= t else math.exp(t) * (1 + e - t)
    if penalty == "expm1":
        return math.expm1(e) if e <= t else math.expm1(t) + math.exp(t) * (e - t)
    if penalty == "quadratic":
        return e * e
    return e


def ref_cost(values, lo, hi, penalty="exp"):
    total = 0.0
    for v in values:
        if math.isnan(v):
            return math.nan
        e = max(v - (math.inf if hi is None else hi), (-math.inf if lo is None else lo) - v)
        if e > 0:
            total += ref_penalty(e, penalty)
    return total


@pytest.mark.parametrize("penalty", ["exp", "expm1", "quadratic", "linear"])
def test_value_and_grad_match_a_plain_reference(penalty):
    rng = np.random.default_rng(0)
    x = rng.uniform(-3, 3, size=50).astype(np.float32)
    params = {"a": jnp.asarray(x), "b": [jnp.asarray(x[:7]), (jnp.asarray(x[:3]),)]}
    lower = {"a": -1.0, "b": [0.0, (None,)]}
    upper = {"a": 1.0, "b": [None, (2.0,)]}
    got = bounds_cost(params, lower, upper, penalty=penalty)
    ref = (
        ref_cost(x.tolist(), -1.0, 1.0, penalty)
        + ref_cost(x[:7].tolist(), 0.0, None, penalty)
        + ref_cost(x[:3].tolist(), None, 2.0, penalty)
    )
    assert got.shape == () and got.dtype == jnp.float32
    assert float(got) == pytest.approx(ref, rel=1e-5)
    g = jax.grad(lambda p: bounds_cost(p, lower, upper, penalty=penalty))(params)
    eps = 1e-3  # central differences in float64 on the reference
    for i in range(0, 50, 7):
        v = float(x[i])
        if abs(v - 1) < 2 * eps or abs(v + 1) < 2 * eps:
            continue
        num = (
            ref_cost([v + eps], -1.0, 1.0, penalty) - ref_cost([v - eps], -1.0, 1.0, penalty)
        ) / (2 * eps)
        assert float(g["a"][i]) == pytest.approx(num, rel=1e-3, abs=1e-4)


def test_zero_is_a_bound_and_result_is_0d():
    got = bounds_cost({"w": jnp.array([-0.5, 0.5])}, {"w": 0}, {"w": None})
    assert got.shape == () and float(got) == pytest.approx(math.exp(0.5))


def test_nan_propagates_and_infinities_on_the_open_side_cost_nothing():
    assert math.isnan(float(summed_exp_boundary_loss(jnp.array([math.nan, 0.5]), 0.0, 1.0)))
    # -inf with only an upper bound: exp(1.5 - 1) only
    assert float(summed_exp_boundary_loss(jnp.array([-math.inf, 1.5]), None, 1.0)) == pytest.approx(
        math.exp(0.5)
    )
    assert float(summed_exp_boundary_loss(jnp.array([math.inf]), 0.0, None)) == 0.0
    assert float(summed_exp_boundary_loss(jnp.array([math.inf]), None, 1.0)) == math.inf
    # per-element bounds with open (infinite) elements
    lo = jnp.array([0.0, -math.inf])
    x = jnp.array([-1.0, -math.inf])
    assert float(summed_exp_boundary_loss(x, lo, None)) == pytest.approx(math.e)
    g = jax.grad(lambda v: summed_exp_boundary_loss(v, lo, None))(x)
    assert np.isfinite(np.asarray(g)).all()


def test_overflow_guard():
    got = summed_exp_boundary_loss(jnp.array([100.0]), None, 0.0)
    assert float(got) == pytest.approx(ref_penalty(100.0), rel=1e-5)
    g = jax.grad(lambda v: summed_exp_boundary_loss(v, None, 0.0))(jnp.array([100.0]))
    assert float(g[0]) == pytest.approx(math.exp(T32), rel=1e-5)


def test_per_element_bounds_broadcast():
    x = jnp.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    got = bounds_cost({"x": x}, {"x": None}, {"x": jnp.array([0.0, 2.0, 4.0])})
    assert float(got) == pytest.approx(math.e)


@pytest.mark.parametrize(
    "params,lower,upper,message",
    [
        (
            {"a": jnp.ones(2), "b": jnp.ones(2)},
            {"a": 0.0, "c": 0.0},
            {"a": 1.0, "b": 1.0},
            r"lower_bounds has no entry for 'b', a key of the parameters",
        ),
        (
            {"a": jnp.ones(2)},
            {"a": 0.0, "z": 1.0},
            {"a": 1.0},
            r"lower_bounds has an entry 'z' that the parameters do not have",
        ),
        (
            {"a": {"b": jnp.ones(2)}},
            {"a": 0.0},
            {"a": {"b": 1.0}},
            r"lower_bounds has a leaf at 'a' where the parameters have a subtree \(with 'a\.b'\)",
        ),
        (
            {"a": jnp.ones(2)},
            {"a": 2.0},
            {"a": 1.0},
            r"lower bound for 'a' exceeds its upper bound \(2\.0 > 1\.0\)",
        ),
        (
            {"a": jnp.ones(2)},
            {"a": jnp.array([0.0, 3.0])},
            {"a": jnp.array([1.0, 2.0])},
            r"lower bound for 'a' exceeds its upper bound at index \(1,\) \(3\.0 > 2\.0\)",
        ),
        ({"a": jnp.ones(2)}, {"a": math.nan}, {"a": 1.0}, r"lower bound for 'a' is NaN"),
        (
            {"a": jnp.ones(2)},
            {"a": jnp.array([0.0, math.nan])},
            {"a": 1.0},
            r"lower bound for 'a' contains NaN",
        ),
        (
            {"a": jnp.ones(2)},
            {"a": None},
            {"a": jnp.ones(3)},
            r"upper bound for 'a' has shape \(3,\), which does not broadcast to the parameter's shape \(2,\)",
        ),
        (
            {"a": jnp.ones(2)},
            {"a": "0"},
            {"a": 1.0},
            r"lower bound for 'a' must be a number, None or an array, got str",
        ),
        (
            {"a": jnp.ones(2)},
            {"a": math.inf},
            {"a": None},
            r"lower bound for 'a' is inf, which no value can satisfy",
        ),
        ({"a": "w"}, {"a": 0.0}, {"a": None}, r"parameter 'a' must be an array, got str"),
    ],
)
def test_path_named_errors(params, lower, upper, message):
    with pytest.raises(BoundsError, match=message):
        bounds_cost(params, lower, upper)


def test_jit_grad_vmap_without_host_transfers():
    params = {"w": jnp.linspace(-2, 2, 8), "b": [jnp.array([0.3, -0.2])]}
    lower = {"w": -1.0, "b": [0.0]}
    upper = {"w": 1.0, "b": [None]}
    eager = bounds_cost(params, lower, upper)
    f = jax.jit(jax.value_and_grad(lambda p, lo, hi: bounds_cost(p, lo, hi)))
    f(params, lower, upper)  # compile
    with jax.transfer_guard_device_to_host("disallow"):  # no host sync
        v, g = f(params, lower, upper)
        v.block_until_ready()
    assert float(v) == pytest.approx(float(eager), rel=1e-6)
    assert float(g["b"][0][1]) == pytest.approx(-math.exp(0.2), rel=1e-5)
    batch = jnp.stack([params["w"], params["w"] * 0.1])
    per = jax.vmap(lambda w: bounds_cost({"w": w}, {"w": -1.0}, {"w": 1.0}))(batch)
    assert per.shape == (2,)
    assert float(per[1]) == 0.0
    assert float(per[0]) == pytest.approx(
        ref_cost(np.asarray(params["w"]).tolist(), -1.0, 1.0), rel=1e-5
    )


@jax.tree_util.register_pytree_with_keys_class
class Box:
    """A registered custom node (what flax's FrozenDict and friends are)."""

    def __init__(self, tau, gain):
        self.tau, self.gain = tau, gain

    def tree_flatten_with_keys(self):
        return (
            (jax.tree_util.GetAttrKey("tau"), self.tau),
            (jax.tree_util.GetAttrKey("gain"), self.gain),
        ), None

    @classmethod
    def tree_unflatten(cls, aux, children):  # noqa: ARG003
        return cls(*children)


def test_any_pytree_equinox_and_custom_nodes():
    model = eqx.nn.MLP(2, 1, 4, 1, key=jax.random.PRNGKey(0))
    params = eqx.filter(model, eqx.is_array)
    lower, upper = make_bounds(params)
    lower = eqx.tree_at(lambda m: m.layers[0].weight, lower, 0.1)
    got = bounds_cost(params, lower, upper)
    w = np.asarray(model.layers[0].weight, dtype=np.float64)
    assert float(got) == pytest.approx(ref_cost(w.ravel().tolist(), 0.1, None), rel=1e-5)
    box = {"cells": [Box(jnp.array([0.5, 2.0]), jnp.array(3.0))]}
    lo, hi = make_bounds(box)
    assert isinstance(lo["cells"][0], Box) and lo["cells"][0].tau == -math.inf
    lo["cells"][0].tau = 1.0
    hi["cells"][0].gain = 2.0
    assert float(bounds_cost(box, lo, hi)) == pytest.approx(math.exp(0.5) + math.e, rel=1e-6)
    clipped = bounds_clip(box, lo, hi)
    assert isinstance(clipped["cells"][0], Box)
    np.testing.assert_array_equal(np.asarray(clipped["cells"][0].tau), [1.0, 2.0])
    assert float(clipped["cells"][0].gain) == 2.0


def test_flax_frozen_dict_and_linen_params():
    import flax.linen as nn
    from flax.core import FrozenDict

    from parambounds.jax import Bounds

    model = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(2)])
    params = model.init(jax.random.PRNGKey(0), jnp.ones((1, 3)))
    params = jax.tree_util.tree_map(lambda x: 4 * x, FrozenDict(params))
    assert isinstance(params, FrozenDict)
    bounds = Bounds({"params.layers_0.kernel": (-0.5, 0.5), "*.bias": {"lower": 0.1}})
    assert [r.name for r in bounds.report(params).entries] == [
        "params.layers_0.bias",
        "params.layers_0.kernel",
        "params.layers_2.bias",
    ]
    k = np.asarray(params["params"]["layers_0"]["kernel"], np.float64).ravel().tolist()
    b0 = np.asarray(params["params"]["layers_0"]["bias"], np.float64).ravel().tolist()
    b2 = np.asarray(params["params"]["layers_2"]["bias"], np.float64).ravel().tolist()
    ref = ref_cost(k, -0.5, 0.5) + ref_cost(b0, 0.1, None) + ref_cost(b2, 0.1, None)
    assert float(bounds.cost(params)) == pytest.approx(ref, rel=1e-5)
    projected = bounds.project(params)
    assert isinstance(projected, FrozenDict)
    assert bounds.report(projected).ok  # every bounded parameter inside
    z = bounds.unconstrain(projected)
    assert isinstance(z, FrozenDict)
    back = bounds.constrain(z)
    np.testing.assert_allclose(
        np.asarray(back["params"]["layers_0"]["kernel"]),
        np.asarray(projected["params"]["layers_0"]["kernel"]),
        atol=2e-6,
    )
    lower, upper = make_bounds(params)  # Rockpool's helpers on the same tree
    assert isinstance(lower, FrozenDict)
    lower = lower.copy({"params": {**lower["params"], "layers_2": {"bias": 0.1, "kernel": None}}})
    assert float(bounds_cost(params, lower, upper)) == pytest.approx(
        ref_cost(b2, 0.1, None), rel=1e-5
    )


def test_bounds_clip_exact_keeps_nan_dtype_and_unbounded_leaves():
    p = {"h": jnp.array([0.05, 0.5, math.nan], dtype=jnp.float16), "free": np.arange(3)}
    out = bounds_clip(p, {"h": 0.1, "free": None}, {"h": None, "free": math.inf})
    h = np.asarray(out["h"]).astype(np.float64)
    assert out["h"].dtype == jnp.float16
    assert h[0] >= 0.1 and h[1] == np.float16(0.5) and math.isnan(h[2])  # 0.1 rounded inward
    assert out["free"] is p["free"]
    bf = bounds_clip({"x": jnp.array([5.0], jnp.bfloat16)}, {"x": None}, {"x": 0.003})
    assert float(np.asarray(bf["x"], np.float64)[0]) <= 0.003
    with pytest.raises(BoundsError, match=r"lower bound for 'h' exceeds its upper bound"):
        bounds_clip(p, {"h": 1.0, "free": None}, {"h": 0.0, "free": None})


def test_make_bounds_is_rockpools_template():
    from rockpool.training import jax_loss

    params = {"a": jnp.zeros(2), "b": {"c": jnp.zeros(3)}, "d": [jnp.zeros(1)]}
    assert make_bounds(params) == jax_loss.make_bounds(params)


def test_import_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import jax.numpy as jnp\n"
        "import parambounds.jax as pbj\n"
        "b = pbj.Bounds({'*.w': (0.0, 1.0)})\n"
        "p = {'l': {'w': jnp.array([-1.0, 2.0])}}\n"
        "print(float(b.cost(p)), float(pbj.bounds_cost(p, {'l': {'w': 0.0}}, {'l': {'w': 1.0}})))\n"
        "print(b.report(b.project(p)).ok)\n"
        "lo, hi = pbj.make_bounds(p); lo['l']['w'] = 0.0\n"
        "assert abs(float(pbj.Bounds.from_trees(lo, hi).cost(p)) - 2.718281828) < 1e-5\n"
        "assert not any(m == 'torch' or m.startswith('torch.') for m in sys.modules if sys.modules[m] is not None)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.split()[:2]
    assert float(first) == pytest.approx(2 * math.e, rel=1e-6) and float(second) == float(first)
    assert out.stdout.split()[2] == "True"
