"""One spec for both frameworks: Bounds on JAX pytrees and torch models; optax."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import parambounds.jax as pbj
from parambounds import Bounds, BoundsError, BoundsViolationError

SPEC = {"*.weight": (-0.5, 0.5), "0.bias": {"lower": 0.0}, "2.bias": (None, 0.1)}


def torch_mlp():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(4)
    return m


def as_jax(model):
    """The same values as a JAX pytree named like named_parameters()."""
    tree: dict = {}
    for name, p in model.named_parameters():
        mod, attr = name.split(".")
        tree.setdefault(mod, {})[attr] = jnp.asarray(p.detach().numpy())
    return tree


def test_one_spec_picks_the_backend_and_agrees_across_frameworks():
    assert pbj.Bounds is Bounds
    model = torch_mlp()
    tree = as_jax(model)
    bounds = Bounds(SPEC)
    t_cost = bounds.cost(model)
    j_cost = bounds.cost(tree)
    assert isinstance(t_cost, torch.Tensor) and isinstance(j_cost, jax.Array)
    assert float(j_cost) == pytest.approx(float(t_cost), rel=1e-5)
    assert float(t_cost) > 1
    t_rep, j_rep = bounds.report(model), bounds.report(tree)
    assert {e.name: (e.below, e.above, e.nan) for e in t_rep.entries} == {
        e.name: (e.below, e.above, e.nan) for e in j_rep.entries
    }
    for a, b in zip(
        sorted(t_rep.entries, key=lambda e: e.name), sorted(j_rep.entries, key=lambda e: e.name)
    ):
        assert a.max_excess == pytest.approx(b.max_excess, rel=1e-5)
    with pytest.raises(BoundsViolationError, match=r"bounded parameters are out of bounds"):
        bounds.check(tree)
    projected = bounds.project(tree)
    bounds.check(projected)
    bounds.project_(model)
    for name, p in model.named_parameters():
        mod, attr = name.split(".")
        # equal up to the inward rounding of the bound to float32 (0.1 -> 0.099999994)
        np.testing.assert_allclose(np.asarray(projected[mod][attr]), p.detach().numpy(), rtol=1e-6)
    assert tree["0"]["weight"] is not projected["0"]["weight"]  # a new tree; the input kept


def test_errors_name_pattern_and_path_on_jax_trees():
    tree = {"0": {"weight": jnp.zeros((2, 3))}}
    with pytest.raises(
        BoundsError,
        match=r"pattern '\*\.wieght' matches no parameter of the model \(its parameters: '0\.weight'\)",
    ):
        Bounds({"*.wieght": (0, 1)}).cost(tree)
    with pytest.raises(
        BoundsError,
        match=r"upper bound for '0\.weight' has shape \(2,\), which does not broadcast to the parameter's shape \(2, 3\) \(from pattern '0\.weight'\)",
    ):
        Bounds({"0.weight": (None, jnp.ones(2))}).cost(tree)
    with pytest.raises(
        BoundsError,
        match=r"project returns a new JAX pytree; for torch, use bounds\.project_\(model\)",
    ):
        Bounds(SPEC).project(torch_mlp())
    with pytest.raises(
        BoundsError, match=r"JAX arrays are immutable: project_ cannot change them in place"
    ):
        Bounds({"*": (0, 1)}).project_(tree)


def test_cost_and_project_trace_under_jit():
    tree = as_jax(torch_mlp())
    bounds = Bounds(SPEC, penalty="quadratic")
    eager = bounds.cost(tree)
    v, g = jax.jit(jax.value_and_grad(bounds.cost))(tree)
    assert float(v) == pytest.approx(float(eager), rel=1e-6)
    w = np.asarray(tree["0"]["weight"], np.float64)
    ref = 2 * np.where(w > 0.5, w - 0.5, np.where(w < -0.5, w + 0.5, 0))
    np.testing.assert_allclose(np.asarray(g["0"]["weight"]), ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(BoundsError, match=r"report\(\) reads values on the host"):
        jax.jit(lambda t: bounds.report(t).ok)(tree)


def test_unconstrain_constrain_pair():
    lower = jnp.array([0.0, -math.inf, 0.0, -1.0])
    upper = jnp.array([1.0, 1.0, math.inf, math.inf])
    tree = {"x": jnp.array([0.3, -2.0, 5.0, 7.0]), "s": jnp.array([0.2, 0.9]), "free": jnp.ones(2)}
    bounds = Bounds({"x": (lower, upper), "s": (0.1, 1.0)})
    z = bounds.unconstrain(tree)
    back = bounds.constrain(z)
    for k in tree:
        np.testing.assert_allclose(np.asarray(back[k]), np.asarray(tree[k]), rtol=1e-5, atol=1e-6)
    assert back["free"] is tree["free"] or np.array_equal(back["free"], tree["free"])
    zs = {
        "x": jnp.array([50.0, -50.0, -80.0, 3.0]),
        "s": jnp.array([-1e4, 1e4]),
        "free": jnp.zeros(2),
    }
    out = bounds.constrain(zs)
    x = np.asarray(out["x"], np.float64)
    assert np.all(x >= np.asarray(lower)) and np.all(x <= np.asarray(upper))
    s = np.asarray(out["s"], np.float64)
    assert np.all(s >= 0.1) and np.all(s <= 1.0)
    g = jax.grad(lambda z: bounds.constrain(z)["s"].sum())(z)
    assert np.all(np.asarray(g["s"]) > 0)
    with pytest.raises(BoundsError, match=r"for torch, use bounds\.reparametrize_\(model\)"):
        bounds.unconstrain(torch_mlp())


def test_optax_loop_keeps_every_parameter_inside_at_every_step():
    """The loss pulls the parameters out; project after each update keeps them in."""
    bounds = Bounds({"tau": (0.01, 0.05), "w": (-1.0, None), "h": (0.1, 0.3)})
    params = {
        "tau": jnp.array([0.02, 0.04]),
        "w": jnp.zeros(3),
        "h": jnp.array([0.2], dtype=jnp.float16),
    }
    target = {
        "tau": jnp.array([1.0, -1.0]),
        "w": jnp.array([-5.0, 0.0, 5.0]),
        "h": jnp.array([-1.0], jnp.float16),
    }
    opt = optax.adam(0.05)
    state = opt.init(params)

    def loss(p):
        return sum(((p[k].astype(jnp.float32) - target[k]) ** 2).sum() for k in p)

    @jax.jit
    def step(p, s):
        grads = jax.grad(loss)(p)
        updates, s = opt.update(grads, s, p)
        return bounds.project(optax.apply_updates(p, updates)), s

    for _ in range(40):
        params, state = step(params, state)
        assert bounds.report(params).ok
        for k, (lo, hi) in {"tau": (0.01, 0.05), "w": (-1.0, math.inf), "h": (0.1, 0.3)}.items():
            v = np.asarray(params[k], np.float64)  # exact, in float64
            assert np.all(v >= lo) and np.all(v <= hi), (k, v)
    assert float(params["tau"][0]) == pytest.approx(0.05) and float(params["w"][0]) == -1.0
    assert params["h"].dtype == jnp.float16


def test_report_to_dict_for_logging():
    bounds = Bounds({"a": (0.0, 1.0)})
    rep = bounds.report({"a": jnp.array([-1.0, 0.5, 3.0, math.nan])}).to_dict()
    assert rep == {
        "a": {
            "numel": 4,
            "below": 1,
            "above": 1,
            "max_excess": 2.0,
            "nan": 1,
            "lower": 0.0,
            "upper": 1.0,
        }
    }
