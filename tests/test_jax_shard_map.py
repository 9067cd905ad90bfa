"""parambounds.jax inside ``jax.shard_map``, eager and jitted, as Rockpool's ``jax_loss``.

Inside an eager ``shard_map`` every new array is a tracer of its trace, even under
``jax.ensure_compile_time_eval``: a plan that read its bounds on the host raised
``TracerArrayConversionError``. The values are checked against a plain float64
reference; one test runs on two (host) devices in a fresh interpreter.
"""

import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import parambounds.jax as pj
from parambounds.jax import Bounds, BoundsError

X = np.array([0.5, 2.0, 3.0, -1.0, 0.25, -4.0], dtype=np.float32)


def ref_cost(values, lo, hi):
    """Plain float64 reference: exp of the excess of each element outside."""
    total = 0.0
    for v in np.asarray(values, dtype=np.float64).ravel().tolist():
        e = max(v - (math.inf if hi is None else hi), (-math.inf if lo is None else lo) - v)
        if e > 0:
            total += math.exp(e)
    return total


def ref_clip(values, lo, hi):
    return np.clip(np.asarray(values, np.float64), lo, hi)


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((1,), ("x",))


def sharded(mesh, x):
    return jax.device_put(jnp.asarray(x), NamedSharding(mesh, P("x")))


REPLICATED = P()


def smap(mesh, f, out_specs=REPLICATED):
    return jax.shard_map(f, mesh=mesh, in_specs=(P("x"),), out_specs=out_specs)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_every_cost_entry_point_runs_inside_shard_map(mesh, jit):
    wrap = jax.jit if jit else (lambda f: f)
    w = sharded(mesh, X)
    spec = Bounds({"w": (0.0, 1.0)})
    fns = {
        "bounds_cost": lambda x: pj.bounds_cost({"w": x}, {"w": 0.0}, {"w": 1.0}),
        "summed_exp_boundary_loss": lambda x: pj.summed_exp_boundary_loss(x, 0.0, 1.0),
        "Bounds.cost": lambda x: spec.cost({"w": x}),
        "array bounds": lambda x: pj.bounds_cost(
            {"w": x}, {"w": jnp.zeros(X.shape)}, {"w": jnp.ones(X.shape)}
        ),
    }
    want = ref_cost(X, 0.0, 1.0)
    for name, fn in fns.items():
        got = wrap(smap(mesh, lambda x, fn=fn: jax.lax.psum(fn(x), "x")))(w)
        assert float(got) == pytest.approx(want, rel=1e-6), name
        grad = wrap(smap(mesh, jax.grad(fn), out_specs=P("x")))(w)
        assert np.isfinite(np.asarray(grad)).all(), name


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_projections_and_reparametrization_inside_shard_map(mesh, jit):
    wrap = jax.jit if jit else (lambda f: f)
    w = sharded(mesh, X)
    spec = Bounds({"w": (0.0, 1.0)})
    clipped = wrap(
        smap(mesh, lambda x: pj.bounds_clip({"w": x}, {"w": 0.0}, {"w": 1.0})["w"], P("x"))
    )(w)
    np.testing.assert_array_equal(np.asarray(clipped, np.float64), ref_clip(X, 0.0, 1.0))
    projected = wrap(smap(mesh, lambda x: spec.project({"w": x})["w"], P("x")))(w)
    np.testing.assert_array_equal(np.asarray(projected, np.float64), ref_clip(X, 0.0, 1.0))
    inside = jnp.asarray(np.clip(X, 0.05, 0.95))
    back = wrap(smap(mesh, lambda x: spec.constrain(spec.unconstrain({"w": x}))["w"], P("x")))(
        sharded(mesh, inside)
    )
    np.testing.assert_allclose(np.asarray(back), np.asarray(inside), rtol=1e-5, atol=1e-6)


def test_a_plan_made_inside_shard_map_holds_no_tracer(mesh):
    """The plan cached inside the eager shard_map serves a call outside it."""
    lower, upper = {"q": jnp.full(X.shape, -0.5)}, {"q": 0.75}
    inside = smap(mesh, lambda x: jax.lax.psum(pj.bounds_cost({"q": x}, lower, upper), "x"))
    want = ref_cost(X, -0.5, 0.75)
    assert float(inside(sharded(mesh, X))) == pytest.approx(want, rel=1e-6)
    assert float(pj.bounds_cost({"q": jnp.asarray(X)}, lower, upper)) == pytest.approx(
        want, rel=1e-6
    )
    assert float(jax.jit(pj.bounds_cost)({"q": jnp.asarray(X)}, lower, upper)) == pytest.approx(
        want, rel=1e-6
    )


def test_errors_inside_shard_map_are_bounds_errors(mesh):
    w = sharded(mesh, X)
    with pytest.raises(BoundsError, match="lower bound for 'w' exceeds its upper bound"):
        smap(mesh, lambda x: pj.bounds_cost({"w": x}, {"w": 2.0}, {"w": 1.0}))(w)
    with pytest.raises(BoundsError, match="report"):
        smap(mesh, lambda x: (Bounds({"w": (0.0, 1.0)}).report({"w": x}), x.sum())[1])(w)


def test_two_devices_as_rockpool_jax_loss():
    """On two host devices (a fresh interpreter): the same cost as Rockpool's, eager and jitted."""
    script = textwrap.dedent(
        """
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import NamedSharding, PartitionSpec as P
        from rockpool.training import jax_loss
        import parambounds.jax as pj
        assert jax.device_count() == 2
        mesh = jax.make_mesh((2,), ("x",))
        x = jnp.asarray(np.array(VALUES, np.float32))
        w = jax.device_put(x, NamedSharding(mesh, P("x")))
        def ours(v):
            return jax.lax.psum(pj.bounds_cost({"w": v}, {"w": 0.0}, {"w": 1.0}), "x")
        def theirs(v):
            return jax.lax.psum(jax_loss.bounds_cost({"w": v}, {"w": 0.0}, {"w": 1.0}), "x")
        out = []
        for wrap in (lambda f: f, jax.jit):
            for fn in (ours, theirs):
                out.append(float(wrap(jax.shard_map(fn, mesh=mesh, in_specs=(P("x"),), out_specs=P()))(w)))
        print(out)
        """
    ).replace("VALUES", repr(X.tolist()))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=1800
    )
    assert out.returncode == 0, out.stderr[-3000:]
    ours_eager, theirs_eager, ours_jit, theirs_jit = eval(out.stdout.strip().splitlines()[-1])
    want = ref_cost(X, 0.0, 1.0)
    assert ours_eager == pytest.approx(want, rel=1e-6) and ours_jit == pytest.approx(want, rel=1e-6)
    assert ours_eager == pytest.approx(theirs_eager, rel=1e-6)
    assert ours_jit == pytest.approx(theirs_jit, rel=1e-6)
