"""parambounds.jax against Rockpool's rockpool.training.jax_loss on real Rockpool JAX networks.

Parity where Rockpool is right; each Rockpool-jax defect pinned by a test that asserts the
right answer (and shows Rockpool's wrong one).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from rockpool.nn.combinators import Sequential
from rockpool.nn.modules import LIFJax, LinearJax
from rockpool.training import jax_loss

from parambounds.jax import Bounds, BoundsError, bounds_clip, bounds_cost, make_bounds


def jax_net():
    np.random.seed(0)
    return Sequential(LinearJax((3, 5)), LIFJax(5), LinearJax((5, 2)), LIFJax(2))


def bounded_net():
    net = jax_net()
    params = net.parameters()
    lower, upper = make_bounds(params)
    for key in params:
        if "LIFJax" in key:
            lower[key]["tau_mem"], upper[key]["tau_mem"] = 0.015, 0.03
            lower[key]["threshold"] = 0  # 0 is a bound
            upper[key]["tau_syn"] = 0.01
        else:
            lower[key]["weight"], upper[key]["weight"] = -0.2, 0.2
    return net, params, lower, upper


def test_rockpool_jax_modules_run_with_this_jax():
    net, params, _, _ = bounded_net()
    out, _, _ = net(jnp.ones((1, 4, 3)))
    assert out.shape == (1, 4, 2)
    assert set(params) == {"0_LinearJax", "1_LIFJax", "2_LinearJax", "3_LIFJax"}


def test_value_and_grad_match_rockpool_on_a_real_network():
    _, params, lower, upper = bounded_net()
    params = jax.tree_util.tree_map(jnp.asarray, params)
    params["1_LIFJax"]["threshold"] = params["1_LIFJax"]["threshold"] - 1.5  # below 0
    ours = bounds_cost(params, lower, upper)
    theirs = jax_loss.bounds_cost(params, lower, upper)
    assert float(theirs) > 1.0  # something is out of bounds
    assert float(ours) == pytest.approx(float(theirs), rel=1e-6)
    g_ours = jax.grad(lambda p: bounds_cost(p, lower, upper))(params)
    g_theirs = jax.grad(lambda p: jax_loss.bounds_cost(p, lower, upper))(params)
    for a, b in zip(jax.tree_util.tree_leaves(g_ours), jax.tree_util.tree_leaves(g_theirs)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=0)
    jitted = jax.jit(lambda p: bounds_cost(p, lower, upper))(params)
    assert float(jitted) == pytest.approx(float(theirs), rel=1e-6)


def test_the_same_names_as_rockpool_parameters():
    net, params, _, _ = bounded_net()
    spec = Bounds({"*.tau_mem": (0.015, 0.03), "*.weight": (-0.2, 0.2)})
    lower, _ = spec.bounds_of(params)
    assert "1_LIFJax.tau_mem" in lower and lower["0_LinearJax.weight"] == -0.2
    _, p2, lo, hi = bounded_net()
    lo = jax.tree_util.tree_map(lambda _: None, lo)
    hi = jax.tree_util.tree_map(lambda _: None, hi)
    for key in p2:
        if "LIFJax" in key:
            lo[key]["tau_mem"], hi[key]["tau_mem"] = 0.015, 0.03
        else:
            lo[key]["weight"], hi[key]["weight"] = -0.2, 0.2
    assert float(spec.cost(params)) == pytest.approx(
        float(jax_loss.bounds_cost(params, *_as_rockpool(lo, hi))), rel=1e-6
    )


def _as_rockpool(lo, hi):
    """Rockpool cannot take None (open): it needs -inf/inf."""
    return (
        jax.tree_util.tree_map(
            lambda b: -math.inf if b is None else b, lo, is_leaf=lambda b: b is None
        ),
        jax.tree_util.tree_map(
            lambda b: math.inf if b is None else b, hi, is_leaf=lambda b: b is None
        ),
    )


# ---------------------------------------------------------------- Rockpool-jax defects


def test_nan_is_not_hidden():
    params = {"w": jnp.array([math.nan, 0.5])}
    lo, hi = {"w": 0.0}, {"w": 1.0}
    assert float(jax_loss.bounds_cost(params, lo, hi)) == 0.0  # Rockpool: nansum hides it
    assert math.isnan(float(bounds_cost(params, lo, hi)))


def test_bound_trees_that_differ_are_an_error_not_a_positional_match():
    params = {"a": jnp.array([5.0]), "b": jnp.array([5.0])}
    lower = {"a": None, "c": None}
    upper = {"a": 1.0, "c": 1.0}  # 'b' has no bound, 'c' no parameter
    rl, ru = _as_rockpool(lower, upper)
    assert float(jax_loss.bounds_cost(params, rl, ru)) == pytest.approx(2 * math.exp(4))  # silent
    with pytest.raises(
        BoundsError, match=r"lower_bounds has no entry for 'b', a key of the parameters"
    ):
        bounds_cost(params, lower, upper)


def test_chained_length_check_lets_a_short_tree_through():
    params = {"a": jnp.array([5.0]), "b": jnp.array([5.0])}
    lower = {"a": -math.inf, "b": -math.inf}
    upper = {"a": 1.0}  # one leaf short: Rockpool's len(a) != len(b) != len(c) passes
    assert float(jax_loss.bounds_cost(params, lower, upper)) == pytest.approx(math.exp(4))
    with pytest.raises(BoundsError, match=r"upper_bounds has no entry for 'b'"):
        bounds_cost(params, lower, upper)


def test_exp_does_not_overflow():
    params = {"w": jnp.array([100.0])}
    assert math.isinf(float(jax_loss.bounds_cost(params, {"w": -math.inf}, {"w": 0.0})))
    ours = float(bounds_cost(params, {"w": -math.inf}, {"w": 0.0}))
    t = 0.9 * math.log(float(np.finfo(np.float32).max))
    assert ours == pytest.approx(math.exp(t) * (1 + 100 - t), rel=1e-5)
    g = jax.grad(lambda p: bounds_cost(p, {"w": None}, {"w": 0.0}))(params)
    assert math.isfinite(float(g["w"][0]))


def test_bounds_are_not_clipped_to_2_pow_31():
    # upper bound 3e9, parameter 1024 above it: excess 1024, not 3e9 + 1024 - 2**31
    params = {"w": jnp.array([3.0e9 + 1024.0])}
    assert math.isinf(float(jax_loss.bounds_cost(params, {"w": -math.inf}, {"w": 3.0e9})))
    ours = float(bounds_cost(params, {"w": None}, {"w": 3.0e9}, penalty="linear"))
    assert ours == pytest.approx(1024.0)


def test_nan_bound_is_an_error():
    params = {"w": jnp.array([-5.0])}
    assert float(jax_loss.bounds_cost(params, {"w": math.nan}, {"w": math.inf})) == 0.0
    with pytest.raises(BoundsError, match=r"lower bound for 'w' is NaN"):
        bounds_cost(params, {"w": math.nan}, {"w": None})


def test_bounds_clip_checks_its_bounds():
    params = {"w": jnp.array([0.5])}
    out = jax_loss.bounds_clip(params, {"w": 1.0}, {"w": 0.0})  # silently the upper bound
    assert float(out["w"][0]) == 0.0
    with pytest.raises(
        BoundsError, match=r"lower bound for 'w' exceeds its upper bound \(1\.0 > 0\.0\)"
    ):
        bounds_clip(params, {"w": 1.0}, {"w": 0.0})
    assert float(bounds_clip(params, {"w": None}, {"w": 0.0})["w"][0]) == 0.0
