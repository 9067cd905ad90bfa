"""One bounds spec, three uses, on a Rockpool LIFJax network trained with jax.jit + optax.

Run: ``python examples/jax_three_uses.py``

- penalty: ``loss + bounds.cost(params)`` (Rockpool's ``bounds_cost``, fixed);
- projection: ``params = bounds.project(optax.apply_updates(params, updates))``;
- reparametrization: train ``z = bounds.unconstrain(params)``, run ``bounds.constrain(z)``.

The penalty is soft: a large enough step takes parameters outside their bounds, and with
this learning rate it does. Projection and reparametrization hold at every step.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from rockpool.nn.combinators import Sequential
from rockpool.nn.modules import LIFJax, LinearJax

from parambounds.jax import Bounds

BOUNDS = Bounds(
    {
        "*.tau_mem": (0.01, 0.04),
        "*.tau_syn": (0.01, 0.04),
        "*.threshold": (0.5, 2.0),
        "*.weight": (-2.0, 2.0),
    }
)
STEPS = 40


def make_task():
    np.random.seed(0)
    net = Sequential(LinearJax((2, 8)), LIFJax(8), LinearJax((8, 1)), LIFJax(1))
    t = np.linspace(0, 1, 50)
    x = np.stack([np.sin(6 * t), np.cos(4 * t)], -1)[None] * 3.0  # (1, 50, 2)
    target = (np.sin(6 * t) > 0.3).astype(np.float32)[None, :, None]
    return net, jnp.asarray(x, jnp.float32), jnp.asarray(target)


def train(use: str) -> dict:
    net, x, target = make_task()
    params = net.parameters()

    def task_loss(p):
        out, _, _ = net.reset_state().set_attributes(p)(x)
        return jnp.mean((out - target) ** 2)

    if use == "reparametrize":
        trained = BOUNDS.unconstrain(params)

        def loss(z):
            return task_loss(BOUNDS.constrain(z))

        to_params = BOUNDS.constrain
    else:
        trained = params

        def loss(p):
            return task_loss(p) + (BOUNDS.cost(p) if use == "penalty" else 0.0)

        def to_params(p):
            return p

    opt = optax.adam(2e-2)
    state = opt.init(trained)

    @jax.jit
    def step(p, s):
        value, grads = jax.value_and_grad(loss)(p)
        updates, s = opt.update(grads, s, p)
        p = optax.apply_updates(p, updates)
        if use == "project":
            p = BOUNDS.project(p)
        return p, s, value

    held = True
    for _ in range(STEPS):
        trained, state, value = step(trained, state)
        held &= BOUNDS.report(to_params(trained)).ok  # the report between steps, for logging
    report = BOUNDS.report(to_params(trained))
    outside = sum(e.below + e.above + e.nan for e in report.entries)
    return {
        "loss": float(task_loss(to_params(trained))),
        "held": held,
        "outside": outside,
        "summary": report.summary(),
    }


if __name__ == "__main__":
    print("| use | final task loss | bounds held every step | elements outside at end |")
    print("|---|---|---|---|")
    results = {use: train(use) for use in ("penalty", "project", "reparametrize")}
    for use, r in results.items():
        print(f"| {use} | {r['loss']:.4f} | {'yes' if r['held'] else 'no'} | {r['outside']} |")
    for use in ("project", "reparametrize"):
        print(f"{use}: {results[use]['summary']}")
