"""Benchmark ``parambounds check`` and ``clamp`` on a synthetic multi-GB checkpoint.

Run ``python benchmarks/bench_checkpoints.py`` (``--gb 2.5`` sets the size, ``--format
safetensors`` the format, ``--dir`` where the files go; they are removed afterwards).

The checkpoint holds float32 tensors of 64 MiB, a few with values outside their bounds
(so ``clamp`` has work to do, in some chunks only). Each command runs as the real console
script in a fresh process; its private memory (``RssAnon`` in ``/proc/PID/status``,
sampled every 5 ms: pages of the file mapped from the page cache do not count) is
reported against the file size. The baseline is ``cat FILE > /dev/null`` in the same run
with a warm cache (run before and after; the faster counts). Times are the command's own
(``main()`` timed in the child after its imports): the interpreter's start-up (importing
torch, the same for every file size) is shown on its own row. Each command runs with
torch's default threads and with one thread.

Targets (issue #11): peak private memory of ``check`` under 25% of the file size;
throughput within 2x of reading the file once.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

SCRIPT = [sys.executable, "-m", "parambounds"]
# The command in-process after the imports, timed: the interpreter's start-up (importing
# torch, seconds on a loaded machine) is the same for every file size and is left out.
TIMED = (
    "import sys, time\n"
    "from parambounds.cli import main\n"
    "t = time.perf_counter()\n"
    "code = main(sys.argv[1:])\n"
    "print(f'work {time.perf_counter() - t}', file=sys.stderr)\n"
    "sys.exit(code)\n"
)
TENSOR = 16 * 2**20  # float32 elements per tensor: 64 MiB


def make(path: Path, gb: float, fmt: str) -> None:
    n = max(1, round(gb * 2**30 / (TENSOR * 4)))
    g = torch.Generator().manual_seed(0)
    sd = {}
    for i in range(n):
        t = torch.rand(TENSOR, generator=g) * 0.03 + 0.006  # inside [0.005, 0.04]
        if i % 8 == 0:
            t[i * 1000 : i * 1000 + 100] = 0.5  # outside: one chunk to clamp
        sd[f"layer{i}.tau_mem"] = t.view(4096, -1)
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:
        torch.save(sd, path)


def run(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, int, int]:
    """Time (the command's own, when it reports one), peak RssAnon (bytes), exit code."""
    peak = 0
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, **(env or {})}
    )
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        status = f"/proc/{proc.pid}/status"
        while not done.is_set():
            try:
                with open(status) as f:
                    for line in f:
                        if line.startswith("RssAnon:"):
                            peak = max(peak, int(line.split()[1]) * 1024)
            except (OSError, ValueError):
                pass
            time.sleep(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    _, err = proc.communicate()
    wall = time.perf_counter() - start
    done.set()
    thread.join()
    if proc.returncode not in (0, 1):
        raise SystemExit(f"{cmd}: exit {proc.returncode}: {err.decode()[-500:]}")
    lines = err.decode().splitlines()
    if lines and lines[-1].startswith("work "):
        wall = float(lines[-1].split()[1])
    return wall, peak, proc.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.5, help="checkpoint size in GiB")
    parser.add_argument("--format", choices=["torch", "safetensors"], default="torch")
    parser.add_argument("--dir", default=None, help="folder for the files (default: a temp dir)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-ckpt-", dir=args.dir))
    try:
        suffix = ".safetensors" if args.format == "safetensors" else ".pt"
        ckpt, out, bounds = work / f"m{suffix}", work / f"c{suffix}", work / "b.toml"
        bounds.write_text('[bounds]\n"*.tau_mem" = [0.005, 0.04]\n')
        t0 = time.perf_counter()
        make(ckpt, args.gb, args.format)
        size = ckpt.stat().st_size
        print(f"made {size / 2**30:.2f} GiB {args.format} in {time.perf_counter() - t0:.1f} s")
        cat = ["sh", "-c", f"cat '{ckpt}' > /dev/null"]
        run(cat)  # warm the page cache
        timed = [sys.executable, "-c", TIMED]
        check = [*timed, "check", str(ckpt), "--bounds", str(bounds)]
        clamp = [*timed, "clamp", str(ckpt), "--bounds", str(bounds), "-o", str(out), "--force"]
        one = {"OMP_NUM_THREADS": "1"}
        rows = [
            ("cat FILE > /dev/null", run(cat)),
            ("interpreter start-up (import parambounds.cli)", run([*timed, "--version"])),
            ("check", run(check)),
            ("check, 1 thread", run(check, one)),
            ("clamp -o", run(clamp)),
            ("clamp -o, 1 thread", run(clamp, one)),
            ("cat FILE > /dev/null (again)", run(cat)),
        ]
        cat_s = min(rows[0][1][0], rows[-1][1][0])
        base = rows[1][1][1]
        print(f"\nfile: {size / 2**30:.2f} GiB ({args.format}), {os.cpu_count()} CPUs\n")
        print(
            "| what | time s | GB/s | time / cat | peak RssAnon MiB "
            "| above start-up MiB | RssAnon / file |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name, (wall, peak, _) in rows:
            extra = f"{(peak - base) / 2**20:.0f}" if peak else "-"
            print(
                f"| {name} | {wall:.2f} | {size / 1e9 / wall:.2f} | {wall / cat_s:.2f} "
                f"| {peak / 2**20:.0f} | {extra} | {peak / size:.1%} |"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
