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
"""

from __future__ import annotations

import argparse
import os
import statistics
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
    args = parser.parse_args()
    cpus = os.cpu_count()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {cpus} CPUs, load {load:.1f}")
    print("| case | call | parambounds.jax (ms) | Rockpool jax_loss (ms) | speed-up |")
    print("|---|---|---:|---:|---:|")
    for case in ("many", "large"):
        reps = args.reps or (5 if case == "large" and not args.quick else 20)
        for label, ours, theirs in run(case, args.quick, reps):
            cells = f"{ours * 1e3:.1f} | {theirs * 1e3:.1f} | {theirs / ours:.1f}x"
            print(f"| {case} | {label} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
