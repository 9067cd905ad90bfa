"""Benchmark ``parambounds check`` and ``clamp`` on a synthetic multi-GB checkpoint.

Run ``python benchmarks/bench_checkpoints.py`` (``--gb 2.5`` sets the size, ``--format
safetensors`` the format, ``--dir`` where the files go; they are removed afterwards).

The checkpoint holds float32 tensors of 64 MiB, a few with values outside their bounds
(so ``clamp`` has work to do, in some chunks only). Each command runs as the real console
script in a fresh process; its private memory (``RssAnon`` in ``/proc/PID/status``,
sampled every 5 ms: pages of the file mapped from the page cache do not count) is
reported against the file size. The baseline is ``cat FILE > /dev/null`` in the same run
with a warm cache, and ``parambounds --version`` gives the interpreter's start-up cost
(importing torch), which every command pays whatever the file size.

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


def run(cmd: list[str]) -> tuple[float, int, int]:
    """Wall time, peak RssAnon (bytes) and exit code of ``cmd``."""
    peak = 0
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
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
        rows = [
            ("cat FILE > /dev/null", run(cat)),
            ("parambounds --version (start-up)", run([*SCRIPT, "--version"])),
            ("parambounds check", run([*SCRIPT, "check", str(ckpt), "--bounds", str(bounds)])),
            (
                "parambounds clamp -o",
                run([*SCRIPT, "clamp", str(ckpt), "--bounds", str(bounds), "-o", str(out)]),
            ),
        ]
        startup = rows[1][1][0]
        cat_s = rows[0][1][0]
        print(f"\nfile: {size / 2**30:.2f} GiB ({args.format}), {os.cpu_count()} CPUs\n")
        print(
            "| command | wall s | GB/s | wall / cat | (wall - start-up) / cat "
            "| peak RssAnon MiB | RssAnon / file |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name, (wall, peak, _) in rows:
            net = wall - startup if name.startswith("parambounds c") else wall
            print(
                f"| {name} | {wall:.2f} | {size / 1e9 / wall:.2f} | {wall / cat_s:.2f} "
                f"| {net / cat_s:.2f} | {peak / 2**20:.0f} | {peak / size:.1%} |"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
