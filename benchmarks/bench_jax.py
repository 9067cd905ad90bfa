"""Benchmark ``parambounds.jax.bounds_cost`` against Rockpool 3.1.0's ``jax_loss.bounds_cost``.

Run ``python benchmarks/bench_jax.py`` (``--quick`` for tiny sizes). Workloads as in
``bench_bounds.py``:

- ``many``: 200 arrays of (256,) and 50 of (256, 256), bounds [-2, 2];
- ``large``: 24 arrays of (2048, 2048) float32, bounds [-2, 2].

Rows: ``jit v&g`` is ``jax.jit(jax.value_and_grad(cost))`` (the training step's bounds
term); ``eager`` is the plain call, un-jitted (value only); ``eager v&g`` is
``jax.value_and_grad`` un-jitted. Medians of repeated calls, each waited for with
``block_until_ready``; compilation is excluded (one warm-up call). ``compile`` is the
time to trace, lower and compile ``jit v&g`` (``jax.jit(...).lower(params).compile()``),
once, on a fresh function, after both sides have compiled a one-leaf tree (so that
neither pays JAX's own first-use costs).

The second table puts ``jit v&g`` beside XLA's floor (one read of the parameters for a
sum, the gradient tree written once: ``(sum(jnp.sum(x)), tree_map(lambda x: 2 * x))``),
its two halves, the exponential cost's value and gradient written by hand in ``jnp``
(one ``exp`` per element: what any implementation computes), ours with the native
kernel switched off (``PARAMBOUNDS_JAX_KERNEL=jnp``) and Rockpool's, all timed in turns
(each round runs every one once, the order rotating).

The third table is the first call in a fresh process: the imports, then the first
jitted value and gradient (tracing, compiling and, with an empty cache folder, building
the native kernel), then a later call.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from rockpool.training import jax_loss

from parambounds.jax import bounds_cost


def workload(case: str, quick: bool) -> tuple[dict[str, Any], dict[str, float], dict[str, float]]:
    if case == "many":
        k, s = (20, 64) if quick else (200, 256)
        shapes = [(s,)] * k + [(s, s)] * (k // 4)
    else:
        shapes = [(256, 256)] * 4 if quick else [(2048, 2048)] * 24
    key = jax.random.PRNGKey(0)
    params = {}
    for i, shape in enumerate(shapes):
        key, sub = jax.random.split(key)
        params[f"p{i}"] = jax.random.normal(sub, shape, jnp.float32)
    return params, dict.fromkeys(params, -2.0), dict.fromkeys(params, 2.0)


def timeit(fn: Callable[[], Any], reps: int) -> float:
    jax.block_until_ready(fn())  # warm-up (compiles)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def compile_time(fn: Callable[[Any], Any], params: Any) -> float:
    tiny = {"w": jnp.zeros(3)}
    jax.jit(jax.value_and_grad(lambda p: fn(p, {"w": -1.0}, {"w": 1.0}))).lower(tiny).compile()
    bounds = dict.fromkeys(params, -2.0), dict.fromkeys(params, 2.0)
    t0 = time.perf_counter()
    jax.jit(jax.value_and_grad(lambda p: fn(p, *bounds))).lower(params).compile()
    return time.perf_counter() - t0


def compile_rows(case: str, quick: bool, rounds: int = 4) -> list[tuple[float, float]]:
    """``compile_time`` of ours and of Rockpool's, in turns (the order rotating).

    JAX's caches are cleared before each (``jax.clear_caches``): ours jits its per-leaf
    kernels, whose traces a later round would otherwise find cached.
    """
    params, _, _ = workload(case, quick)
    fns = {"ours": bounds_cost, "theirs": jax_loss.bounds_cost}
    out = []
    for r in range(rounds):
        got = {}
        for name in ("ours", "theirs") if r % 2 == 0 else ("theirs", "ours"):
            jax.clear_caches()
            got[name] = compile_time(fns[name], params)
        out.append((got["ours"], got["theirs"]))
    return out


def in_turns(fns: dict[str, Callable[[], Any]], reps: int) -> dict[str, float]:
    """Median seconds of each ``fn``, timed in turns (each round runs every one once, in
    an order rotating from round to round), so that a shared machine's load falls on all
    alike."""
    names = list(fns)
    for fn in fns.values():
        jax.block_until_ready(fn())  # warm-up (compiles)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(reps):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            jax.block_until_ready(fns[name]())
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def _exp_grad(x: Any) -> Any:
    """The exponential cost's gradient on [-2, 2], written out (no overflow guard needed)."""
    above, below = x - 2.0, -2.0 - x
    e = jnp.maximum(above, below)
    slope = jnp.where(e <= 0, 0, jnp.exp(e))
    return jnp.where(above >= below, slope, -slope)


def _exp_value(x: Any) -> Any:
    e = jnp.maximum(x - 2.0, -2.0 - x)
    return jnp.sum(jnp.where(e <= 0, 0, jnp.exp(e)))


def _jnp_path(fn: Callable[[Any], Any], params: Any) -> Any:
    """``fn`` jitted and compiled now with the native kernel switched off."""
    old = os.environ.get("PARAMBOUNDS_JAX_KERNEL")
    os.environ["PARAMBOUNDS_JAX_KERNEL"] = "jnp"
    try:
        return jax.jit(fn).lower(params).compile()
    finally:
        if old is None:
            del os.environ["PARAMBOUNDS_JAX_KERNEL"]
        else:
            os.environ["PARAMBOUNDS_JAX_KERNEL"] = old


_FIRST = """
import time
t0 = time.perf_counter()
import jax, jax.numpy as jnp
from {module} import bounds_cost
params = {{f"p{{i}}": jnp.full(s, 3.0, jnp.float32) for i, s in enumerate({shapes!r})}}
lo, hi = dict.fromkeys(params, -2.0), dict.fromkeys(params, 2.0)
t1 = time.perf_counter()
f = jax.jit(jax.value_and_grad(lambda p: bounds_cost(p, lo, hi)))
jax.block_until_ready(f(params))
t2 = time.perf_counter()
jax.block_until_ready(f(params))
t3 = time.perf_counter()
print(t1 - t0, t2 - t1, t3 - t2)
"""


def first_call_rows(case: str, quick: bool) -> list[tuple[str, float, float, float]]:
    """The first jitted value-and-gradient in a fresh process: imports, then the call.

    ``native, not built``: an empty cache folder (the kernel is compiled in that call);
    ``native, built``: the library found in the cache and loaded; ``jnp path``: the
    kernel switched off; Rockpool's ``jax_loss`` beside them.
    """
    params, _, _ = workload(case, quick)
    shapes = [tuple(x.shape) for x in params.values()]
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        for label, module, env in (
            ("ours, native, not built", "parambounds.jax", {"PARAMBOUNDS_JAX_KERNEL": "auto"}),
            ("ours, native, built", "parambounds.jax", {"PARAMBOUNDS_JAX_KERNEL": "auto"}),
            ("ours, jnp path", "parambounds.jax", {"PARAMBOUNDS_JAX_KERNEL": "jnp"}),
            ("Rockpool jax_loss", "rockpool.training.jax_loss", {}),
        ):
            script = _FIRST.format(module=module, shapes=shapes)
            full = {**os.environ, "PARAMBOUNDS_CACHE_DIR": cache, **env}
            out = subprocess.run(
                [sys.executable, "-c", script], capture_output=True, text=True, env=full, check=True
            )
            imp, first, later = map(float, out.stdout.split())
            rows.append((label, imp, first, later))
    return rows


def floor_rows(case: str, quick: bool, reps: int) -> list[tuple[str, float]]:
    """The jitted value-and-gradient against XLA's floor, component by component, in turns.

    The floor reads the parameters once for a sum and writes a gradient tree once
    (``2 * x``): memory traffic only. ``hand-written`` is the exponential cost's value
    and gradient as plain ``jnp`` (what any implementation must compute: one ``exp``
    per element), jitted as one function.
    """
    params, lower, upper = workload(case, quick)
    leaves = jax.tree_util.tree_leaves
    tree_map = jax.tree_util.tree_map
    fns = {
        "floor: sum + gradient tree (2 * x)": jax.jit(
            lambda q: (sum(jnp.sum(x) for x in leaves(q)), tree_map(lambda x: 2 * x, q))
        ),
        "floor, sum alone": jax.jit(lambda q: sum(jnp.sum(x) for x in leaves(q))),
        "floor, gradient tree alone": jax.jit(lambda q: tree_map(lambda x: 2 * x, q)),
        "hand-written exp gradient alone": jax.jit(lambda q: tree_map(_exp_grad, q)),
        "hand-written exp value + gradient": jax.jit(
            lambda q: (sum(_exp_value(x) for x in leaves(q)), tree_map(_exp_grad, q))
        ),
        "ours: jit value_and_grad": jax.jit(
            jax.value_and_grad(lambda p: bounds_cost(p, lower, upper))
        ),
        "ours, jnp path (PARAMBOUNDS_JAX_KERNEL=jnp)": _jnp_path(
            jax.value_and_grad(lambda p: bounds_cost(p, lower, upper)), params
        ),
        "Rockpool: jit value_and_grad": jax.jit(
            jax.value_and_grad(lambda p: jax_loss.bounds_cost(p, lower, upper))
        ),
    }
    got = in_turns({name: partial(fn, params) for name, fn in fns.items()}, reps)
    return list(got.items())


def run(case: str, quick: bool, reps: int) -> list[tuple[str, float, float]]:
    params, lower, upper = workload(case, quick)
    ours = lambda p: bounds_cost(p, lower, upper)  # noqa: E731
    theirs = lambda p: jax_loss.bounds_cost(p, lower, upper)  # noqa: E731
    rows = [
        ("compile", compile_time(bounds_cost, params), compile_time(jax_loss.bounds_cost, params))
    ]
    v_ours, v_theirs = float(ours(params)), float(theirs(params))
    assert np.isclose(v_ours, v_theirs, rtol=1e-5), (v_ours, v_theirs)
    for label, wrap in (
        ("jit v&g", lambda f: jax.jit(jax.value_and_grad(f))),
        ("eager", lambda f: f),
        ("eager v&g", lambda f: jax.value_and_grad(f)),
    ):
        fo, ft = wrap(ours), wrap(theirs)
        rows.append((label, timeit(partial(fo, params), reps), timeit(partial(ft, params), reps)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for CI")
    parser.add_argument("--reps", type=int, default=0, help="repetitions (default 20, large 5)")
    parser.add_argument(
        "--floor-only",
        action="store_true",
        help="only the floor table, compile time on large in turns, and the first call",
    )
    args = parser.parse_args()
    cpus = os.cpu_count()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {cpus} CPUs, load {load:.1f}")
    if not args.floor_only:
        print("| case | call | parambounds.jax (ms) | Rockpool jax_loss (ms) | speed-up |")
        print("|---|---|---:|---:|---:|")
        for case in ("many", "large"):
            reps = args.reps or (5 if case == "large" and not args.quick else 20)
            for label, ours, theirs in run(case, args.quick, reps):
                cells = f"{ours * 1e3:.1f} | {theirs * 1e3:.1f} | {theirs / ours:.1f}x"
                print(f"| {case} | {label} | {cells} |", flush=True)
        print()
    else:
        print("Compile time on `large`, ours and Rockpool's in turns:")
        print()
        print("| round | ours ms | Rockpool ms | ours / Rockpool |")
        print("|---|---:|---:|---:|")
        for r, (ours, theirs) in enumerate(compile_rows("large", args.quick)):
            print(f"| {r + 1} | {ours * 1e3:.0f} | {theirs * 1e3:.0f} | {ours / theirs:.2f}x |")
        print()
    print("Jitted value and gradient against XLA's floor, component by component, in turns:")
    print()
    print("| case | component | ms | / floor |")
    print("|---|---|---:|---:|")
    for case in ("many", "large"):
        reps = args.reps or (7 if case == "large" and not args.quick else 21)
        rows = floor_rows(case, args.quick, reps)
        floor = rows[0][1]
        for label, sec in rows:
            print(f"| {case} | {label} | {sec * 1e3:.2f} | {sec / floor:.2f}x |", flush=True)
    print()
    print(f"load average after the floor table: {os.getloadavg()[0]:.1f}")
    print()
    print("The first jitted value and gradient in a fresh process (`many`):")
    print()
    print("| | imports ms | first call ms | later call ms |")
    print("|---|---:|---:|---:|")
    for label, imp, first, later in first_call_rows("many", args.quick):
        print(f"| {label} | {imp * 1e3:.0f} | {first * 1e3:.0f} | {later * 1e3:.1f} |", flush=True)


if __name__ == "__main__":
    main()
