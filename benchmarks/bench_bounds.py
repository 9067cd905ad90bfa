"""Benchmark ``bounds_cost`` (forward + backward per step) against Rockpool 3.1.0.

Run ``python benchmarks/bench_bounds.py`` (``--quick`` for tiny sizes, ``--json PATH`` to
write the figures). Cases:

- ``snn``: Rockpool's 16 x (LinearTorch((128, 128)), LIFTorch(128)), bounds on
  ``tau_mem``, ``tau_syn`` and ``threshold`` only;
- ``many``: 200 tensors of (256,) and 50 of (256, 256), all in [-2, 2];
- ``large``: 24 tensors of (2048, 2048) float32, all in [-2, 2].

Times are medians of repeated steps, gradients reset to ``None`` before each step
(untimed: in turns, the gradients left are another implementation's); the parameter
tree is built once outside the timed region, for both. What is compared is timed in
turns (each round runs every implementation, and the ``exp`` pass, once), so that the
load of a shared machine, which drifts by 2x over minutes here, falls on all alike.
``exp pass`` is one ``torch.exp`` over the same tensors, into outputs made once. Extra
peak memory is read from ``VmHWM`` in a fresh process per case and implementation
(after resetting it with ``/proc/self/clear_refs``),
as a multiple of the bounded parameters' bytes; the gradients themselves are 1.0x.

``ours`` is the default (``auto``: the native CPU kernel, built ahead of time here with
``parambounds build-kernels``); ``eager`` never compiles. Further tables, on the ``many``
case:

- the floor, measured component by component: the autograd engine (a do-nothing
  ``autograd.Function`` over the 250 tensors whose backward returns 250 ready-made
  gradients sharing one storage, made outside the timed region, and holds no reference
  to them: autograd adopts them as ``.grad``), one read+write pass over the tensors
  (copied into one buffer), and the front end (flattening the tree and finding the
  plan); beside it, our native kernel's call alone, our whole step and Rockpool's, all
  timed in turns: Rockpool over the floor is the most speed-up any implementation could
  show in those rounds;
- the spec API against hand-written equivalents over the same tensors, timed alternately
  (so that load on a shared machine falls on both alike):
  ``Bounds.cost(model)`` against ``bounds_cost(dict, lower, upper)`` (forward +
  backward), ``Bounds.project_`` against ``torch._foreach_clamp_min_``/``_max_``,
  ``Bounds.report`` against one ``bounds_cost`` forward + backward;
- time to the first step in a fresh process (imports done) against a later step;
- cold start (``--cold-only`` for this table alone): ``import parambounds`` and the first
  ``Bounds.cost`` step on 4 x 1M float32 in a fresh process, against a later step and
  against the same first step written with plain torch ops (fresh processes, in turns).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

# "auto" is parambounds' default (the native CPU kernel, built ahead of time in main());
# "eager" never compiles.
IMPLS = ("rockpool", "auto", "eager")
NAMES = {"rockpool": "Rockpool 3.1.0", "auto": "ours", "eager": "ours, eager only"}


def build(case: str, quick: bool, device: str) -> tuple[Any, Any, Any, list[torch.Tensor]]:
    """Return (params tree, lower, upper, bounded tensors) for a case."""
    torch.manual_seed(0)
    if case == "snn":
        from rockpool.nn.combinators import Sequential
        from rockpool.nn.modules import LIFTorch, LinearTorch
        from rockpool.training.torch_loss import make_bounds

        n, width = (2, 16) if quick else (16, 128)
        layers = []
        for _ in range(n):
            layers += [LinearTorch((width, width)), LIFTorch(width)]
        net = Sequential(*layers).to(device)
        with torch.no_grad():
            for name, p in net.named_parameters():
                if "tau" in name or "threshold" in name:
                    p.mul_(1 + 0.5 * torch.randn_like(p))
        params = net.parameters()
        lower, upper = make_bounds(params)
        bounded = []
        for key in params:
            if "LIFTorch" in key:
                lower[key]["tau_mem"], upper[key]["tau_mem"] = 0.015, 0.03
                lower[key]["tau_syn"], upper[key]["tau_syn"] = 0.015, 0.03
                lower[key]["threshold"], upper[key]["threshold"] = 0.8, 1.2
                bounded += [params[key][k] for k in ("tau_mem", "tau_syn", "threshold")]
        return params, lower, upper, bounded
    if case == "many":
        k, s = (20, 64) if quick else (200, 256)
        shapes = [(s,)] * k + [(s, s)] * (k // 4)
    else:
        shapes = [(256, 256)] * 4 if quick else [(2048, 2048)] * 24
    params = {
        f"p{i}": torch.randn(shape, device=device).requires_grad_()
        for i, shape in enumerate(shapes)
    }
    lower = dict.fromkeys(params, -2.0)
    upper = dict.fromkeys(params, 2.0)
    return params, lower, upper, list(params.values())


def cost_fn(impl: str) -> Callable[..., torch.Tensor]:
    if impl == "rockpool":
        from rockpool.training.torch_loss import bounds_cost

        return bounds_cost
    from parambounds import bounds_cost
    from parambounds.torch import _kernels

    def cost(*args: Any) -> torch.Tensor:
        _kernels.set_kernel(impl)  # per call: the implementations are timed in turns
        return bounds_cost(*args)

    return cost


def step(
    fn: Callable[..., torch.Tensor], params: Any, lower: Any, upper: Any, tensors: list
) -> None:
    for p in tensors:
        p.grad = None
    fn(params, lower, upper).backward()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_ms(
    fn: Callable[[], Any], device: str, reps: int, setup: Callable[[], Any] | None = None
) -> float:
    """Median time of ``fn`` in ms; ``setup`` (untimed) runs before each call."""
    return interleaved_ms({"fn": (fn, setup)}, device, reps)["fn"]


def interleaved_ms(
    fns: dict[str, tuple[Callable[[], Any], Callable[[], Any] | None]], device: str, reps: int
) -> dict[str, float]:
    """Median time of each ``fn`` in ms, timed in turns: each round runs every one once
    (the order rotating from round to round; ``setup``, untimed, before each call), so
    that a shared machine's load, which drifts by 2x over minutes here, falls on all alike.
    """
    names = list(fns)
    for fn, setup in fns.values():  # warm up (and compile)
        if setup is not None:
            setup()
        fn()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(reps):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fn, setup = fns[name]
            if setup is not None:
                setup()
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def all_tensors(params: Any) -> list[torch.Tensor]:
    from parambounds.torch._trees import flatten

    return [t for t in flatten(params)[1] if isinstance(t, torch.Tensor)]


def count_syncs(fn: Callable[[], Any]) -> int:
    """Host synchronisations in one call, counted by CUDA's sync debug mode warnings."""
    import warnings

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
            torch.cuda.synchronize()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_memory(case: str, impl: str, quick: bool) -> float:
    """In this (fresh) process: extra peak RSS of one step, in multiples of the bounded bytes."""
    import gc

    fn = cost_fn(impl)
    # Warm up (and compile) on the tiny variant of the case, so that neither imports nor
    # the compiler count, and the full-size step starts from fresh memory.
    small, s_lower, s_upper, _ = build(case, True, "cpu")
    if impl == "auto":  # load the native kernel the full-size step will use
        from parambounds.torch import _native

        _native.build(verbose=False)
    step(fn, small, s_lower, s_upper, all_tensors(small))
    del small
    params, lower, upper, bounded = build(case, quick, "cpu")
    tensors = all_tensors(params)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = status_kib("VmRSS")
    step(fn, params, lower, upper, tensors)
    extra = (status_kib("VmHWM") - base) * 1024
    nbytes = sum(t.numel() * t.element_size() for t in bounded)
    return extra / nbytes


def memory_in_fresh_process(case: str, impl: str, quick: bool) -> float | None:
    args = [sys.executable, __file__, "--memory-probe", case, impl] + (["--quick"] if quick else [])
    out = subprocess.run(args, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        print(out.stderr, file=sys.stderr)
        return None
    return float(out.stdout.strip().splitlines()[-1])


def run_case(case: str, quick: bool, device: str, impls: tuple[str, ...]) -> dict[str, Any]:
    reps = 3 if quick else 7
    params, lower, upper, bounded = build(case, quick, device)
    tensors = all_tensors(params)
    row: dict[str, Any] = {"case": case, "device": device}

    def clear() -> None:  # untimed: the last step's gradients may be another's to free
        for p in tensors:
            p.grad = None

    fns: dict[str, tuple[Callable[[], Any], Callable[[], Any] | None]] = {}
    for impl in impls:
        fn = cost_fn(impl)
        fns[impl] = (lambda fn=fn: fn(params, lower, upper).backward(), clear)
    if case == "large":
        # Into outputs made once: a pass over memory already mapped, as our step's
        # gradients are (from the native kernel's pool); torch.exp's own fresh outputs
        # page-faulted in some rounds and not in others (0.25-3x this pass).
        outs = [torch.empty_like(t) for t in bounded]
        fns["exp"] = (
            lambda: [torch.exp(t.detach(), out=o) for t, o in zip(bounded, outs)],
            None,
        )
    for name, ms in interleaved_ms(fns, device, reps).items():
        row[f"{name}_ms"] = ms
    if device == "cuda":
        for impl in impls:
            row[f"{impl}_syncs"] = count_syncs(fns[impl][0])
    from parambounds.torch import _kernels

    _kernels.set_kernel("auto")
    return row


def run(quick: bool, device: str, impls: tuple[str, ...]) -> list[dict[str, Any]]:
    rows = []
    for case in ("snn", "many", "large"):
        row = run_case(case, quick, device, impls)
        if device == "cpu" and sys.platform.startswith("linux"):
            for impl in impls:
                row[f"{impl}_peak_x"] = memory_in_fresh_process(case, impl, quick)
        rows.append(row)
    return rows


def fmt(v: Any, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def table(rows: list[dict[str, Any]], impls: tuple[str, ...]) -> str:
    ours = [i for i in impls if i != "rockpool"]
    head = ["case", f"{NAMES['rockpool']} ms"]
    for i in ours:
        head += [f"{NAMES[i]} ms", "speedup"]
    head += ["exp pass ms"] + [f"{NAMES[i]} / exp" for i in ours]
    head += [f"peak {NAMES[i]}" for i in impls]
    if any("rockpool_syncs" in r for r in rows):
        head += [f"syncs {NAMES[i]}" for i in impls]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"{r['case']} ({r['device']})", fmt(r.get("rockpool_ms"), ".2f")]
        for i in ours:
            cells += [
                fmt(r.get(f"{i}_ms"), ".2f"),
                fmt(r["rockpool_ms"] / r[f"{i}_ms"], ".1f") + "x",
            ]
        exp = r.get("exp_ms")
        cells.append(fmt(exp, ".2f"))
        cells += [fmt(r[f"{i}_ms"] / exp, ".2f") + "x" if exp else "-" for i in ours]
        cells += [
            fmt(r.get(f"{i}_peak_x"), ".2f") + "x" if r.get(f"{i}_peak_x") else "-" for i in impls
        ]
        if "rockpool_syncs" in r:
            cells += [str(r.get(f"{i}_syncs", "-")) for i in impls]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


class _Nothing(torch.autograd.Function):
    """The engine's floor: a do-nothing Function handing back ready-made gradients.

    It drops its own references before returning them, as ours does: AccumulateGrad
    adopts a gradient as ``.grad`` only when nothing else holds it, and copies it otherwise
    (a copy per tensor would be measured as the engine's cost).
    """

    @staticmethod
    def forward(ctx: Any, grads: list[torch.Tensor], *xs: torch.Tensor) -> torch.Tensor:
        ctx.grads = grads
        return xs[0].new_zeros(())

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:  # noqa: ARG004
        grads, ctx.grads = ctx.grads, None
        return (None, *grads)


def shared_grads(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Plain tensors (not views) sharing one fresh storage, shaped like ``tensors``."""
    buf = torch.empty(sum(t.numel() for t in tensors), dtype=tensors[0].dtype)
    out, offset = [], 0
    for t in tensors:
        out.append(torch.empty(0, dtype=t.dtype).set_(buf.untyped_storage(), offset, t.shape))
        offset += t.numel()
    return out


def floor_rows(quick: bool) -> list[tuple[str, float]]:
    """The floor of one step on ``many``, component by component, and ours beside it."""
    from parambounds import bounds_cost
    from parambounds.penalties import overflow_threshold
    from parambounds.torch import _kernels, _native
    from parambounds.torch._plan import get_plan
    from parambounds.torch._trees import as_tree, flatten

    reps = 5 if quick else 31
    params, lower, upper, _ = build("many", quick, "cpu")
    tensors = list(params.values())
    flat = [t.detach().reshape(-1) for t in tensors]
    buf = torch.empty(sum(t.numel() for t in tensors))
    ready: list[list[torch.Tensor]] = []

    def make_grads() -> None:  # untimed: ours makes its gradients inside the kernel (C++)
        for p in tensors:
            p.grad = None
        ready.append(shared_grads(tensors))

    def engine() -> None:
        _Nothing.apply(ready.pop(), *tensors).backward()

    def clear() -> None:  # untimed, as for the engine: another's gradients to free
        for p in tensors:
            p.grad = None

    def front_end() -> None:
        tree = as_tree(params)
        treedef, leaves = flatten(tree)
        get_plan(tree, treedef, leaves, lower, upper)

    _kernels.set_kernel("auto")
    module = _native.get()
    xs = [t.detach() for t in tensors]
    thr = overflow_threshold(torch.float32)
    names = {
        "engine": "engine: do-nothing Function, 250 storage-sharing grads (made untimed)",
        "copy": "one read+write pass (copy into one buffer)",
        "front": "front end (flatten + plan lookup)",
        "kernel": "ours, kernel alone: value + 250 grads (one C++ call)",
        "ours": "ours: bounds_cost forward + backward",
    }
    fns: dict[str, tuple[Callable[[], Any], Callable[[], Any] | None]] = {
        "engine": (engine, make_grads),
        "copy": (lambda: torch.cat(flat, out=buf), None),
        "front": (front_end, None),
        "ours": (lambda: bounds_cost(params, lower, upper).backward(), clear),
    }
    if module is not None:  # ours, piece by piece
        fns["kernel"] = (lambda: module.value_and_grad(xs, -2.0, 2.0, 0, thr), None)
    rockpool = cost_fn("rockpool")  # in the same rounds: the speed-up the floor allows
    fns["rockpool"] = (lambda: rockpool(params, lower, upper).backward(), clear)
    ms = interleaved_ms(fns, "cpu", reps)
    _kernels.set_kernel("auto")
    rows = [(names[k], ms[k]) for k in ("engine", "copy", "front")]
    rows.append(("floor (sum of the above)", sum(v for _, v in rows)))
    rows += [(names[k], ms[k]) for k in ("kernel", "ours") if k in ms]
    rows.append((f"{NAMES['rockpool']}: bounds_cost forward + backward", ms["rockpool"]))
    return rows


def as_module(params: dict[str, torch.Tensor]) -> torch.nn.Module:
    module = torch.nn.Module()
    for name, p in params.items():
        module.register_parameter(name, torch.nn.Parameter(p.detach().clone()))
    return module


def spec_rows(quick: bool) -> list[tuple[str, float, str, float]]:
    """The spec API against the hand-written equivalent over the same tensors."""
    from parambounds import Bounds, bounds_cost
    from parambounds.torch import _kernels

    reps = 5 if quick else 31
    _kernels.set_kernel("auto")
    params, lower, upper, _ = build("many", quick, "cpu")
    model = as_module(params)
    tensors = list(model.parameters())
    named = dict(model.named_parameters())
    bounds = Bounds({"*": (-2.0, 2.0)})

    def spec_cost() -> None:
        for p in tensors:
            p.grad = None
        bounds.cost(model).backward()

    def functional_cost() -> None:
        step(bounds_cost, named, lower, upper, tensors)

    @torch.no_grad()
    def foreach_clamp() -> None:
        torch._foreach_clamp_min_(tensors, -2.0)
        torch._foreach_clamp_max_(tensors, 2.0)

    cost = paired_ms(spec_cost, functional_cost, reps)
    # before any projection: ~4.5% of the values are outside, in every tensor
    report = paired_ms(lambda: bounds.report(model), functional_cost, reps)
    project = paired_ms(lambda: bounds.project_(model), foreach_clamp, reps)
    return [
        ("Bounds.cost + backward", cost[0], "bounds_cost + backward", cost[1]),
        ("Bounds.project_", project[0], "_foreach_clamp_min_/_max_", project[1]),
        ("Bounds.report", report[0], "bounds_cost + backward", report[1]),
    ]


def paired_ms(fn: Callable[[], Any], ref: Callable[[], Any], reps: int) -> tuple[float, float]:
    """Medians of ``fn`` and ``ref`` timed in turns."""
    ms = interleaved_ms({"fn": (fn, None), "ref": (ref, None)}, "cpu", reps)
    return ms["fn"], ms["ref"]


def first_step(case: str, quick: bool) -> tuple[float, float, float]:
    """In this (fresh) process: the first step, a later one and fresh memory, in ms."""
    from parambounds import bounds_cost

    params, lower, upper, _ = build(case, quick, "cpu")
    tensors = all_tensors(params)
    # torch's own thread pool starts with the first parallel op (the model's first
    # forward, in training): started here, so that it is not counted as ours.
    torch.ones(1 << 20).sum()
    t0 = time.perf_counter()
    step(bounds_cost, params, lower, upper, tensors)
    first = 1e3 * (time.perf_counter() - t0)
    later = median_ms(lambda: step(bounds_cost, params, lower, upper, tensors), "cpu", 7)
    return first, later, fresh_memory_ms(sum(t.numel() * t.element_size() for t in tensors))


def fresh_memory_ms(nbytes: int) -> float:
    """Writing ``nbytes`` of memory never touched before (new anonymous pages), in ms.

    A first step must put its gradients in memory the process has never used (later
    steps reuse what the allocator got back): this is that cost alone, a floor under
    the first step that no implementation avoids.
    """
    import mmap

    buf = mmap.mmap(-1, nbytes)
    t0 = time.perf_counter()
    torch.frombuffer(buf, dtype=torch.uint8).fill_(1)
    ms = 1e3 * (time.perf_counter() - t0)
    del buf
    return ms


COLD_SHAPE = (4, 1 << 20)  # 4 x 1M float32, as in the issue (#27)


def cold_step(mode: str, quick: bool) -> tuple[float, float, float]:
    """In this (fresh) process, ``import parambounds`` not done yet: the first step, a
    later one and the import alone, in ms.

    ``ours``: ``import parambounds`` + ``Bounds.cost(params).backward()`` (the torch
    backend is imported by that first step). ``plain``: the same step with plain torch
    ops (the exponential cost of the excess, autograd for the gradient). Both start
    torch's thread pool first and build the parameters untimed.
    """
    k, n = (4, 1 << 12) if quick else COLD_SHAPE
    torch.manual_seed(0)
    params = {f"w{i}": torch.randn(n, requires_grad=True) for i in range(k)}
    tensors = list(params.values())
    torch.ones(1 << 20).sum()
    t0 = time.perf_counter()
    if mode == "ours":
        import parambounds

        t_import = time.perf_counter()
        bounds = parambounds.Bounds({"w*": (-2.0, 2.0)})

        def fn() -> torch.Tensor:
            return bounds.cost(params)

    else:
        t_import = time.perf_counter()

        def fn() -> torch.Tensor:
            total = torch.zeros(())
            for x in tensors:
                total = total + (torch.exp((x - 2.0).clamp(min=0)) - 1).sum()
                total = total + (torch.exp((-2.0 - x).clamp(min=0)) - 1).sum()
            return total

    fn().backward()
    first = 1e3 * (time.perf_counter() - t0)

    def later_step() -> None:
        for p in tensors:
            p.grad = None
        fn().backward()

    later = median_ms(later_step, "cpu", 7)
    return first, later, 1e3 * (t_import - t0)


COLD_PARTS = (
    "import parambounds",
    "import the torch backend",
    "load the native kernel",
    "autograd engine: first backward (1 element)",
    "fresh memory: the gradients' bytes",
    "first step, all of the above done",
    "later step",
)


def cold_parts(quick: bool) -> list[float]:
    """In this (fresh) process: what a first step does beyond a later one, part by part.

    Each part done on its own, in order (ms), then the first step (which still writes
    its gradients into fresh pages: the mapping timed before is given back) and a later
    one. The rows of ``COLD_PARTS``.
    """
    import mmap

    k, n = (4, 1 << 12) if quick else COLD_SHAPE
    torch.manual_seed(0)
    params = {f"w{i}": torch.randn(n, requires_grad=True) for i in range(k)}
    torch.ones(1 << 20).sum()
    out = []

    def timed(fn: Callable[[], Any]) -> None:
        t0 = time.perf_counter()
        fn()
        out.append(1e3 * (time.perf_counter() - t0))

    def backend() -> None:
        from parambounds.torch import _cost, _kernels, _spec  # noqa: F401

    def engine() -> None:
        x = torch.ones(1, requires_grad=True)
        (x * 2).sum().backward()

    def fresh() -> None:
        buf = mmap.mmap(-1, 4 * k * n)
        torch.frombuffer(buf, dtype=torch.uint8).fill_(1)
        del buf

    timed(lambda: __import__("parambounds"))
    timed(backend)
    timed(lambda: __import__("parambounds.torch._native").torch._native.get(wait=True))
    timed(engine)
    timed(fresh)
    import parambounds

    bounds = parambounds.Bounds({"w*": (-2.0, 2.0)})

    def one_step() -> None:
        for p in params.values():
            p.grad = None
        bounds.cost(params).backward()

    timed(one_step)
    out.append(median_ms(one_step, "cpu", 7))
    return out


def probe_env() -> dict[str, str]:
    """The environment of the fresh processes: Python may cache byte code, as it does for
    any installed package (``pip`` compiles it at install time). Where
    ``PYTHONDONTWRITEBYTECODE`` is set (this workplace sets it), every fresh process
    would compile parambounds' source again: ~70 ms on a first step here, a cost of the
    setting, not of the library; torch's own files are compiled at install."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def probe(args: list[str]) -> list[float] | None:
    """The last line of ``bench_bounds.py ARGS`` in a fresh process, as numbers."""
    out = subprocess.run(
        [sys.executable, __file__, *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=probe_env(),
    )
    if out.returncode != 0:
        print(out.stderr, file=sys.stderr)
        return None
    return [float(v) for v in out.stdout.strip().splitlines()[-1].split()]


def cold_parts_table(quick: bool, rounds: int) -> list[str]:
    probe(["--cold-parts-probe"] + ["--quick"] * quick)  # writes the byte-code caches
    runs = [
        got for _ in range(rounds) if (got := probe(["--cold-parts-probe"] + ["--quick"] * quick))
    ]
    if not runs:
        return []
    med = [statistics.median(run[i] for run in runs) for i in range(len(COLD_PARTS))]
    later = med[-1]
    lines = ["", "What the first step does beyond a later one, part by part (medians of"]
    lines += [f"{len(runs)} fresh processes; each part done on its own, in this order):", ""]
    lines += ["| part | ms | / later step |", "|---|---|---|"]
    lines += [f"| {name} | {ms:.2f} | {ms / later:.2f}x |" for name, ms in zip(COLD_PARTS, med)]
    floor = later + med[4]
    lines.append(
        f"| floor of a first step: later step + fresh memory | {floor:.2f} | {floor / later:.2f}x |"
    )
    return lines


def cold_rows(quick: bool, rounds: int) -> dict[str, list[tuple[float, float, float]]]:
    """``cold_step`` for ``ours`` and ``plain``, each in fresh processes, in turns (after
    one untimed process of each, which writes the byte-code caches)."""
    got: dict[str, list[tuple[float, float, float]]] = {"ours": [], "plain": []}
    for mode in ("ours", "plain"):
        probe(["--cold-probe", mode] + ["--quick"] * quick)
    for r in range(rounds):
        for mode in ("ours", "plain") if r % 2 == 0 else ("plain", "ours"):
            row = probe(["--cold-probe", mode] + ["--quick"] * quick)
            if row is not None:
                first, later, imp = row
                got[mode].append((first, later, imp))
    return got


def cold_table(quick: bool) -> list[str]:
    got = cold_rows(quick, 3 if quick else 9)
    if not got["ours"] or not got["plain"]:
        return []

    def med(mode: str, i: int) -> float:
        return statistics.median(row[i] for row in got[mode])

    ours_first, ours_later, ours_import = med("ours", 0), med("ours", 1), med("ours", 2)
    plain_first, plain_later = med("plain", 0), med("plain", 1)
    ratios = statistics.median(first / later for first, later, _ in got["ours"])
    k, n = (4, 1 << 12) if quick else COLD_SHAPE
    lines = ["", f"Cold start ({k} x {n} float32, fresh processes, kernel built, medians of"]
    lines += [f"{len(got['ours'])} processes each, ours and plain in turns):", ""]
    lines += ["| | first step ms | later step ms | first / later |", "|---|---|---|---|"]
    lines.append(
        f"| ours: import parambounds + Bounds.cost + backward | {ours_first:.2f} "
        f"| {ours_later:.2f} | {ratios:.2f}x |"
    )
    lines.append(
        f"| ours: first step alone (import parambounds excluded) | "
        f"{ours_first - ours_import:.2f} | {ours_later:.2f} | "
        f"{(ours_first - ours_import) / ours_later:.2f}x |"
    )
    lines.append(
        f"| plain torch ops: the same step | {plain_first:.2f} | {plain_later:.2f} "
        f"| {plain_first / plain_later:.2f}x |"
    )
    lines.append(f"| ours - plain, first step | {ours_first - plain_first:+.2f} | | |")
    return lines + cold_parts_table(quick, 3 if quick else 9)


def first_step_in_fresh_process(case: str, quick: bool) -> tuple[float, float, float] | None:
    probe(["--first-step-probe", case] + ["--quick"] * quick)  # writes the byte-code caches
    row = probe(["--first-step-probe", case] + ["--quick"] * quick)
    if row is None:
        return None
    first, later, fresh = row
    return first, later, fresh


def extra_tables(quick: bool) -> str:
    lines = ["", "Floor of one step on `many` (CPU), component by component, in one run:", ""]
    lines += ["| component | ms |", "|---|---|"]
    floor = floor_rows(quick)
    lines += [f"| {name} | {ms:.3f} |" for name, ms in floor]
    got = dict(floor)
    floor_ms = got["floor (sum of the above)"]
    ours_ms = got["ours: bounds_cost forward + backward"]
    rockpool_ms = floor[-1][1]
    lines.append(f"| ours / floor | {ours_ms / floor_ms:.2f}x |")
    lines.append(f"| Rockpool / ours (speed-up, these rounds) | {rockpool_ms / ours_ms:.1f}x |")
    lines.append(
        f"| Rockpool / floor (the most speed-up the floor allows) | {rockpool_ms / floor_ms:.1f}x |"
    )
    lines += ["", "Spec API against hand-written equivalents (`many`, CPU):", ""]
    lines += ["| spec API | ms | hand-written | ms | ratio |", "|---|---|---|---|---|"]
    for name, ms, ref_name, ref_ms in spec_rows(quick):
        lines.append(f"| {name} | {ms:.3f} | {ref_name} | {ref_ms:.3f} | {ms / ref_ms:.2f}x |")
    lines += ["", "Time to the first step (fresh process, imports done, kernel built):", ""]
    lines += ["(torch's thread pool started, as the model's first forward would)", ""]
    lines += ["(fresh memory: writing the gradients' bytes into pages never touched before, a"]
    lines += ["floor under any first step; floor ratio = (later + fresh memory) / later)", ""]
    lines += ["| case | first step ms | later step ms | ratio | fresh memory ms | floor ratio |"]
    lines += ["|---|---|---|---|---|---|"]
    for case in ("snn", "many", "large"):
        got = first_step_in_fresh_process(case, quick)
        if got is not None:
            first, later, fresh = got
            lines.append(
                f"| {case} | {first:.2f} | {later:.2f} | {first / later:.2f}x | {fresh:.2f} "
                f"| {(later + fresh) / later:.2f}x |"
            )
    lines += cold_table(quick)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, seconds (CI smoke test)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    parser.add_argument("--memory-probe", nargs=2, metavar=("CASE", "IMPL"), help=argparse.SUPPRESS)
    parser.add_argument("--first-step-probe", metavar="CASE", help=argparse.SUPPRESS)
    parser.add_argument("--cold-probe", choices=("ours", "plain"), help=argparse.SUPPRESS)
    parser.add_argument("--cold-parts-probe", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--cold-only", action="store_true", help="only the cold-start table (fresh processes)"
    )
    args = parser.parse_args()
    if args.memory_probe:
        print(measure_memory(*args.memory_probe, quick=args.quick))
        return
    if args.cold_parts_probe:
        print(*cold_parts(args.quick))
        return
    if args.cold_probe:
        print(*cold_step(args.cold_probe, args.quick))
        return
    if args.first_step_probe:
        print(*first_step(args.first_step_probe, args.quick))
        return
    from parambounds.torch import _native

    try:  # ahead of time, as `parambounds build-kernels` does: no step waits for it
        _native.build(verbose=False)
    except RuntimeError as err:
        print(f"native kernel unavailable ({err}); 'ours' is eager", file=sys.stderr)
    if args.cold_only:
        print("\n".join(cold_table(args.quick)))
        return
    impls = IMPLS
    rows = run(args.quick, "cpu", impls)
    if torch.cuda.is_available():
        rows += run(args.quick, "cuda", impls)
    if args.quick:
        print("SMOKE TEST (--quick: tiny sizes, 3 repeats): checks that the benchmark runs;")
        print("these numbers are not a measurement. Run without --quick for the benchmark.")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(table(rows, impls))
    print(extra_tables(args.quick))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
