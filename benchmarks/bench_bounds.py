"""Benchmark ``bounds_cost`` (forward + backward per step) against Rockpool 3.1.0.

Run ``python benchmarks/bench_bounds.py`` (``--quick`` for tiny sizes, ``--json PATH`` to
write the figures). Cases:

- ``snn``: Rockpool's 16 x (LinearTorch((128, 128)), LIFTorch(128)), bounds on
  ``tau_mem``, ``tau_syn`` and ``threshold`` only;
- ``many``: 200 tensors of (256,) and 50 of (256, 256), all in [-2, 2];
- ``large``: 24 tensors of (2048, 2048) float32, all in [-2, 2].

Times are medians of repeated steps, gradients reset to ``None`` before each step; the
parameter tree is built once outside the timed region, for both. ``exp pass`` is one
``torch.exp`` over the same tensors. Extra peak memory is read from ``VmHWM`` in a fresh
process per case and implementation (after resetting it with ``/proc/self/clear_refs``),
as a multiple of the bounded parameters' bytes; the gradients themselves are 1.0x.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

# "auto" is parambounds' default (the compiled kernel for tensors of at least 256K elements,
# eager below); "eager" never compiles.
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
    from parambounds import _kernels, bounds_cost

    _kernels.set_kernel(impl)
    return bounds_cost


def step(
    fn: Callable[..., torch.Tensor], params: Any, lower: Any, upper: Any, tensors: list
) -> None:
    for p in tensors:
        p.grad = None
    fn(params, lower, upper).backward()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_ms(fn: Callable[[], Any], device: str, reps: int) -> float:
    fn()  # warm up (and compile)
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def all_tensors(params: Any) -> list[torch.Tensor]:
    from parambounds.trees import flatten

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
    if impl == "auto":  # compile the kernel the full-size step will use
        from parambounds import _kernels

        _kernels.set_kernel("compiled")
        step(fn, small, s_lower, s_upper, all_tensors(small))
        _kernels.set_kernel("auto")
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

    def one_step(fn: Callable[..., torch.Tensor]) -> None:
        step(fn, params, lower, upper, tensors)

    for impl in impls:
        fn = cost_fn(impl)
        row[f"{impl}_ms"] = median_ms(lambda fn=fn: one_step(fn), device, reps)
        if device == "cuda":
            row[f"{impl}_syncs"] = count_syncs(lambda fn=fn: one_step(fn))
    if case == "large":
        row["exp_ms"] = median_ms(lambda: [torch.exp(t.detach()) for t in bounded], device, reps)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, seconds (CI smoke test)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    parser.add_argument("--memory-probe", nargs=2, metavar=("CASE", "IMPL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_probe:
        print(measure_memory(*args.memory_probe, quick=args.quick))
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
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
