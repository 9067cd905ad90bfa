"""Cost of a ``bounds_cost`` step (forward + backward) on 1 and 2 CPU processes.

Run ``python benchmarks/bench_distributed.py`` (``--quick`` for tiny sizes). It launches
itself under ``torch.distributed.run`` (gloo) and times, median of repeated steps:

- 1 process, plain tensors (no torch.distributed);
- N processes, the same tensors as ``DTensor``s sharded ``Shard(0)`` over an N-rank mesh
  (what FSDP2 does to parameters): each rank computes its shard and one all-reduce per
  step combines the cost.

and ``Bounds.report`` on the same tensors (collective: a header exchange and one gather
of the counts per mesh dimension).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time

import torch


def tensors(quick: bool) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    shape, count = ((64, 64), 4) if quick else ((1024, 1024), 16)
    return {f"p{i}": torch.randn(shape) for i in range(count)}


def time_steps(params, lower, upper, reps) -> float:
    from parambounds import bounds_cost

    def step():
        for p in params.values():
            p.grad = None
        bounds_cost(params, lower, upper).backward()

    step()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def time_report(params, reps) -> float:
    """Median ms of ``Bounds.report`` (collective under torch.distributed)."""
    from parambounds import Bounds

    bounds = Bounds({"*": (-2.0, 2.0)})
    bounds.report(params)  # builds the plan
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        bounds.report(params)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def worker(quick: bool) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo")
    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    full = tensors(quick)
    params = {k: distribute_tensor(v, mesh, [Shard(0)]).requires_grad_() for k, v in full.items()}
    lower = dict.fromkeys(params, -2.0)
    upper = dict.fromkeys(params, 2.0)
    ms = time_steps(params, lower, upper, 5 if quick else 15)
    report = time_report(params, 5 if quick else 15)
    worst = torch.tensor([ms, report])
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    if dist.get_rank() == 0:
        print(f"RESULT {world} {worst[0].item():.3f} {worst[1].item():.3f}")
    dist.destroy_process_group()


def launch(nproc: int, quick: bool) -> tuple[float, float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={port}",
        __file__,
        "--worker",
    ] + (["--quick"] if quick else [])
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    for line in out.stdout.splitlines():
        if line.startswith("RESULT"):
            return float(line.split()[2]), float(line.split()[3])
    raise RuntimeError(out.stdout[-2000:] + out.stderr[-2000:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.quick)
        return
    full = tensors(args.quick)
    for p in full.values():
        p.requires_grad_()
    numel = sum(p.numel() for p in full.values())
    torch.set_num_threads(1)
    plain_1t = time_steps(full, dict.fromkeys(full, -2.0), dict.fromkeys(full, 2.0), 15)
    torch.set_num_threads(2)
    plain_2t = time_steps(full, dict.fromkeys(full, -2.0), dict.fromkeys(full, 2.0), 15)
    report_1t = time_report(full, 15)
    one, one_report = launch(1, args.quick)
    two, two_report = launch(2, args.quick)
    print(f"torch {torch.__version__}; {len(full)} tensors, {numel / 1e6:.1f}M float32 values")
    print("| setup | ms per step | vs 1 process, 1 thread | ms per report |")
    print("|---|---|---|---|")
    rows = [
        ("1 process, plain tensors, 1 thread", plain_1t, report_1t),
        ("1 process, plain tensors, 2 threads", plain_2t, float("nan")),
        ("1 process, DTensor on a 1-rank mesh (gloo)", one, one_report),
        ("2 processes x 1 thread, DTensor Shard(0) (gloo)", two, two_report),
    ]
    for name, ms, rep in rows:
        print(f"| {name} | {ms:.2f} | {plain_1t / ms:.2f}x | {rep:.2f} |")


if __name__ == "__main__":
    main()
