"""parambounds.jax plans: checked once, cached safely, compiled small."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parambounds.jax import Bounds, BoundsError, bounds_cost


def params_of(n, shape=(8,)):
    return {f"p{i}": jnp.full(shape, 3.0) for i in range(n)}


def test_a_changed_bound_is_used_never_a_stale_plan():
    params = {"w": jnp.array([3.0, -1.0])}
    lower, upper = {"w": 0.0}, {"w": 1.0}
    ref = math.exp(2) + math.exp(1)
    assert float(bounds_cost(params, lower, upper)) == pytest.approx(ref, rel=1e-6)
    upper["w"] = 2.0  # the same dict, mutated
    assert float(bounds_cost(params, lower, upper)) == pytest.approx(2 * math.e, rel=1e-6)
    lower["w"] = -1.0
    assert float(bounds_cost(params, lower, upper)) == pytest.approx(math.e, rel=1e-6)
    upper["w"] = None
    assert float(bounds_cost(params, lower, upper)) == 0.0


def test_a_numpy_bound_changed_in_place_is_used():
    params = {"w": jnp.array([3.0, 3.0])}
    hi = np.array([1.0, 1.0])
    assert float(bounds_cost(params, {"w": None}, {"w": hi})) == pytest.approx(2 * math.e**2)
    hi[:] = [2.0, 5.0]
    assert float(bounds_cost(params, {"w": None}, {"w": hi})) == pytest.approx(math.e, rel=1e-6)
    hi[0] = np.nan  # and checked again
    with pytest.raises(BoundsError, match="upper bound for 'w' contains NaN"):
        bounds_cost(params, {"w": None}, {"w": hi})


def test_a_cached_plan_still_rejects_what_it_would_reject():
    params = {"w": jnp.array([3.0])}
    assert float(bounds_cost(params, {"w": 1}, {"w": 2})) == pytest.approx(math.e, rel=1e-6)
    with pytest.raises(BoundsError, match="lower bound for 'w' must be a number"):
        bounds_cost(params, {"w": True}, {"w": 2})  # True == 1, but not a bound
    with pytest.raises(BoundsError, match="lower bound for 'w' is NaN"):
        bounds_cost(params, {"w": math.nan}, {"w": 2})
    with pytest.raises(BoundsError, match="has no entry for 'v'"):
        bounds_cost({"w": params["w"], "v": params["w"]}, {"w": 1}, {"w": 2})


def test_shapes_and_dtypes_are_part_of_the_plan():
    lower, upper = {"w": jnp.array([0.0, 0.0])}, {"w": 1.0}
    assert float(bounds_cost({"w": jnp.array([2.0, 2.0])}, lower, upper)) > 0
    with pytest.raises(BoundsError, match=r"has shape \(2,\), which does not broadcast"):
        bounds_cost({"w": jnp.zeros(3)}, lower, upper)
    half = bounds_cost({"w": jnp.array([2.0, 2.0], jnp.float16)}, lower, upper)
    assert half.dtype == jnp.float16  # the leaves' dtype, not the first plan's
    assert float(half) == pytest.approx(2 * math.e, rel=1e-3)


def test_spec_plans_follow_the_tree_and_numpy_bounds():
    hi = np.array([1.0, 1.0])
    bounds = Bounds({"w": (None, hi)})
    assert float(bounds.cost({"w": jnp.array([1.0, 1.0])})) == 0.0
    hi[:] = 0.0  # a NumPy array in a spec is read again each call
    assert float(bounds.cost({"w": jnp.array([1.0, 1.0])})) == pytest.approx(2 * math.e)
    spec = Bounds({"*": (0.0, 1.0)})
    assert float(spec.cost({"a": jnp.array([2.0])})) == pytest.approx(math.e, rel=1e-6)
    assert float(spec.cost({"a": jnp.array([2.0]), "b": jnp.array([-1.0])})) == pytest.approx(
        2 * math.e, rel=1e-6
    )


def test_a_plan_built_under_jit_holds_no_tracer():
    lower, upper = {"w": jnp.array([0.0, 0.5])}, {"w": jnp.array([1.0, 1.0])}
    params = {"w": jnp.array([2.0, 0.0])}
    traced = jax.jit(lambda p: bounds_cost(p, lower, upper))(params)  # builds the plan
    eager = bounds_cost(params, lower, upper)  # reuses it outside the trace
    assert float(traced) == float(eager) == pytest.approx(math.e + math.exp(0.5), rel=1e-6)


def hlo_ops(n, shapes=((8,),)):
    params = {f"p{i}": jnp.full(shapes[i % len(shapes)], 3.0) for i in range(n)}
    lower, upper = dict.fromkeys(params, -2.0), dict.fromkeys(params, 2.0)
    fn = jax.jit(jax.value_and_grad(lambda p: bounds_cost(p, lower, upper)))
    text = fn.lower(params).as_text()
    return len(re.findall(r"= \"?stablehlo\.", text)), text.count("func.func")


def test_lowered_program_grows_by_a_few_ops_per_leaf():
    """XLA compile time follows program size: each extra leaf of a shape already seen adds
    a call and its bound slices, not a copy of the penalty and its gradient."""
    small, funcs_small = hlo_ops(10, ((8,), (4, 4)))
    large, funcs_large = hlo_ops(40, ((8,), (4, 4)))
    per_leaf = (large - small) / 30
    assert per_leaf <= 12, per_leaf
    assert funcs_large == funcs_small  # one kernel per leaf signature, shared
