"""Benchmark ``parambounds check`` and ``clamp`` on a synthetic multi-GB checkpoint.

Run ``python benchmarks/bench_checkpoints.py`` (``--gb 2`` sets the size, ``--format
safetensors`` or ``--format dcp`` the format, ``--dir`` where the files go; they are
removed afterwards). ``--format dcp`` writes each checkpoint as a DCP folder
(``dcp.save``: one ``.distcp`` file and a ``.metadata``); its start-up includes importing
``torch.distributed.checkpoint``, which any DCP folder costs.

The checkpoint holds float32 tensors of 64 MiB, a few with values outside their bounds
(so ``clamp`` has work to do, in a few pieces only); a second one of the same size has a
value outside in every 4 KiB page (every piece of the scan is counted and clamped: the
worst case for private memory, which must stay under 5% of the file: #22 item 11). Each
command runs as the CLI's ``main()`` in a fresh interpreter, best of ``--repeat`` runs,
against ``cat FILE > /dev/null`` (warm cache, same run, best of the runs before and
after).

``--against OTHER/src`` times ``check`` of this tree and of another tree's sources in
turns (``--rounds`` rounds, the order alternating, medians and their ratio), on the same
file in the same run: what a change did to ``check``'s speed; and ``clamp`` of the file
with a value outside in every page, both trees in turns (two rounds): their memory.

Time: the command's own (``main()`` timed in the child after its imports). The
interpreter's start-up (Python, torch and parambounds imported: what ``check`` imports)
is the same for every file size and is shown on its own row.

Memory: private memory is ``RssAnon`` of ``/proc/PID/status``, sampled every 2 ms by
this process (pages of the file mapped from the page cache are not private and do not
count). The child reports its ``RssAnon`` after the imports (the start-up, about 150
MiB: torch's code and data, the same for any file); the target (peak private memory of
``check`` under 25% of the file size) is measured on what the command allocates *above*
that, ``(peak - start-up) / file``; the total peak over the file size is shown too.

Below the table, the floor, component by component, in the same run: reading the file
alone (``readinto`` a reused 4 MiB buffer, as ``cat`` does), scanning alone (``aminmax``
over a cache-hot buffer, as many bytes as the file), the page faults of a fresh mapping
alone (one byte touched per 4 KiB page), and reading through the mapping with the scan
(what ``check`` does), on one thread.

Targets (issue #11): peak private memory of ``check`` under 25% of the file size;
throughput within 2x of reading the file once.
"""

from __future__ import annotations

import argparse
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

# The command in a fresh interpreter: imports timed apart from ``main()``; its RssAnon
# after the imports (the start-up) reported, so that the parent can subtract it.
TIMED = (
    "import sys, time\n"
    "t0 = time.perf_counter()\n"
    "from parambounds.cli import main\n"
    "import parambounds.checkpoints._apply, parambounds.checkpoints  # what check imports\n"
    "{extra}"
    "t1 = time.perf_counter()\n"
    "rss = [ln for ln in open('/proc/self/status') if ln.startswith('RssAnon:')]\n"
    "start = int(rss[0].split()[1]) * 1024 if rss else 0\n"
    "sys.argv[0] = 'parambounds'\n"
    "code = main()  # as the program runs it (no arguments: sys.argv)\n"
    "t2 = time.perf_counter()\n"
    "print(f'timing {t1 - t0} {t2 - t1} {start}', file=sys.stderr)\n"
    "sys.exit(code)\n"
)
TENSOR = 16 * 2**20  # float32 elements per tensor: 64 MiB


def make(path: Path, gb: float, fmt: str, scattered: bool = False) -> None:
    """The checkpoint; ``scattered``: one value outside in every 4 KiB page of every tensor."""
    n = max(1, round(gb * 2**30 / (TENSOR * 4)))
    g = torch.Generator().manual_seed(0)
    sd = {}
    for i in range(n):
        t = torch.rand(TENSOR, generator=g) * 0.03 + 0.006  # inside [0.005, 0.04]
        if scattered:
            t[i % 1024 :: 1024] = 0.5  # float32: 1024 per page, one of them outside
        elif i % 8 == 0:
            t[i * 1000 : i * 1000 + 100] = 0.5  # outside: one chunk to clamp
        sd[f"layer{i}.tau_mem"] = t.view(4096, -1)
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    elif fmt == "dcp":
        import warnings

        import torch.distributed.checkpoint as dcp

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save(sd, checkpoint_id=str(path), no_dist=True)
    else:
        torch.save(sd, path)


@dataclass
class Run:
    """One run of a command: its time, and memory."""

    wall: float  # the command's own time (after its imports), else the whole process's
    peak: int  # peak RssAnon, bytes
    startup: float = 0.0  # seconds to import what the command needs
    start_rss: int = 0  # RssAnon after the imports, bytes


def in_turns(
    cmds: dict[str, tuple[list[str], dict[str, str]]], rounds: int
) -> dict[str, list[Run]]:
    """Run each command once per round, in turns (the order alternating every round)."""
    runs: dict[str, list[Run]] = {k: [] for k in cmds}
    names = list(cmds)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            cmd, env = cmds[name]
            runs[name].append(run(cmd, env))
    return runs


def run(cmd: list[str], env: dict[str, str] | None = None) -> Run:
    """Run ``cmd`` once, sampling its RssAnon."""
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
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    _, err = proc.communicate()
    wall = time.perf_counter() - start
    done.set()
    thread.join()
    if proc.returncode not in (0, 1):
        raise SystemExit(f"{cmd}: exit {proc.returncode}: {err.decode()[-500:]}")
    lines = err.decode().splitlines()
    if lines and lines[-1].startswith("timing "):
        startup, work, rss = lines[-1].split()[1:]
        return Run(float(work), peak, float(startup), int(rss))
    return Run(wall, peak)


def best(cmd: list[str], repeat: int, env: dict[str, str] | None = None) -> Run:
    """The fastest of ``repeat`` runs, with the largest peak memory of them all."""
    runs = [run(cmd, env) for _ in range(repeat)]
    fastest = min(runs, key=lambda r: r.wall)
    fastest.peak = max(r.peak for r in runs)
    return fastest


def floor(path: Path) -> list[tuple[str, float]]:
    """The components of ``check``'s time, each alone, on one thread (best of 3)."""
    size = path.stat().st_size
    before = torch.get_num_threads()
    torch.set_num_threads(1)

    def timed(f: Any) -> float:
        times = []
        for _ in range(3):
            t = time.perf_counter()
            f()
            times.append(time.perf_counter() - t)
        return min(times)

    def read() -> None:
        buf = bytearray(4 << 20)
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass

    hot = torch.rand(1 << 20)  # 4 MiB: stays in cache

    def scan() -> None:
        for _ in range(size // hot.nbytes):
            torch.aminmax(hot)

    def mapped(touch: bool) -> Any:
        def f() -> None:
            with open(path, "rb") as fh:
                m = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
            if touch:
                pages = np.frombuffer(m, dtype=np.uint8)[:: mmap.PAGESIZE]
                pages.sum()
                del pages
            else:
                x = torch.frombuffer(m, dtype=torch.uint8)[: size // 4 * 4].view(torch.float32)
                for c in x.split(1 << 20):
                    torch.aminmax(c)
                del x, c
            m.close()

        return f

    try:
        return [
            ("read alone (readinto a 4 MiB buffer)", timed(read)),
            ("scan alone (aminmax, cache-hot)", timed(scan)),
            ("page faults alone (1 byte per 4 KiB page)", timed(mapped(touch=True))),
            ("read through the mapping + scan, 1 thread", timed(mapped(touch=False))),
        ]
    finally:
        torch.set_num_threads(before)


def against(args: argparse.Namespace, cmd: list[str], size: int, what: str, rounds: int) -> None:
    """``cmd`` with this tree and with ``--against``'s, in turns: medians and their ratio."""
    here = str(Path(__file__).resolve().parents[1] / "src")
    other = f"--against {args.against}"
    cmds = {"this tree": (cmd, {"PYTHONPATH": here}), other: (cmd, {"PYTHONPATH": args.against})}
    runs = in_turns(cmds, rounds)
    print(f"\n{what} in turns, {rounds} rounds (medians; the order alternates each round):\n")
    print(
        "| tree | time s (median) | min | max | GB/s | start-up s (median) "
        "| peak RssAnon above start-up MiB | / file |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    med = {}
    for name, rs in runs.items():
        walls = sorted(r.wall for r in rs)
        med[name] = statistics.median(walls)
        start = statistics.median(r.startup for r in rs)
        above = max(r.peak - r.start_rss for r in rs)
        print(
            f"| {name} | {med[name]:.3f} | {walls[0]:.3f} | {walls[-1]:.3f} "
            f"| {size / 1e9 / med[name]:.2f} | {start:.2f} | {above / 2**20:.0f} "
            f"| {above / size:.1%} |"
        )
    print(f"\nthis tree / --against: {med['this tree'] / med[other]:.3f}\n")


def _size(path: Path) -> int:
    """A file's size; a folder's (a DCP checkpoint): the sum of its files'."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.iterdir())
    return path.stat().st_size


def _files(path: Path) -> str:
    """``path`` for ``sh``; a folder's files, ``.metadata`` included."""
    return f"'{path}'/* '{path}'/.metadata" if path.is_dir() else f"'{path}'"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.0, help="checkpoint size in GiB")
    parser.add_argument("--format", choices=["torch", "safetensors", "dcp"], default="torch")
    parser.add_argument("--dir", default=None, help="folder for the files (default: a temp dir)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per command (the best)")
    parser.add_argument(
        "--against",
        metavar="SRC",
        help="also time `check` in turns against another tree's sources (its src/ folder)",
    )
    parser.add_argument("--rounds", type=int, default=7, help="rounds of --against (medians)")
    parser.add_argument("--skip-table", action="store_true", help="only the --against table")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-ckpt-", dir=args.dir))
    try:
        suffix = {"safetensors": ".safetensors", "dcp": ""}.get(args.format, ".pt")
        ckpt, out, bounds = work / f"m{suffix}", work / f"c{suffix}", work / "b.toml"
        bounds.write_text('[bounds]\n"*.tau_mem" = [0.005, 0.04]\n')
        many = work / "many.toml"  # 10 000 patterns: matching must not cost patterns x tensors
        many.write_text(
            '[bounds]\n"*.tau_mem" = [0.005, 0.04]\n'
            + "".join(f'"block.{i}.*.w" = [0, 1]\n"head.{i}" = [0, 1]\n' for i in range(4999))
            + '"*.nothing" = [0, 1]\n'
        )
        t0 = time.perf_counter()
        make(ckpt, args.gb, args.format)
        size = _size(ckpt)
        print(f"made {size / 2**30:.2f} GiB {args.format} in {time.perf_counter() - t0:.1f} s")
        extra = "import torch.distributed.checkpoint\n" if args.format == "dcp" else ""
        timed = [sys.executable, "-c", TIMED.replace("{extra}", extra)]
        check = [*timed, "check", str(ckpt), "--bounds", str(bounds)]
        run(["sh", "-c", f"cat {_files(ckpt)} > /dev/null"])  # warm the page cache
        if args.against:
            against(args, check, size, "check", args.rounds)
        if args.skip_table:
            return
        scattered = work / f"s{suffix}"
        make(scattered, args.gb, args.format, scattered=True)
        if args.against:  # the worst case for memory: a value outside in every page
            out_s = work / f"cs{suffix}"
            clamp_against = [*timed, "clamp", str(scattered), "--bounds", str(bounds)]
            clamp_against += ["-o", str(out_s), "--force"]
            what = "clamp -o, a value outside in every 4 KiB page,"
            against(args, clamp_against, size, what, 2)
            shutil.rmtree(out_s) if out_s.is_dir() else out_s.unlink(missing_ok=True)
        cat = ["sh", "-c", f"cat {_files(ckpt)} > /dev/null"]
        copy = ["sh", "-c", f"cp -r '{ckpt}' '{out}' && sync '{out}' && rm -r '{out}'"]
        run(["sh", "-c", f"cat {_files(scattered)} > /dev/null"])
        run(cat)  # warm the page cache
        clamp = [*timed, "clamp", str(ckpt), "--bounds", str(bounds), "-o", str(out), "--force"]
        check_s = [*timed, "check", str(scattered), "--bounds", str(bounds)]
        clamp_s = [*timed, "clamp", str(scattered), "--bounds", str(bounds), "-o", str(out)]
        clamp_s.append("--force")
        one = {"OMP_NUM_THREADS": "1"}
        k = args.repeat
        cat_before = best(cat, k)
        rows = [
            ("check", best(check, k)),
            ("check, 1 thread", best(check, k, one)),
            ("check, 10 000 patterns", best([*check[:-1], str(many), "--allow-unmatched"], k)),
            ("clamp -o (writes and syncs a copy)", best(clamp, max(1, k - 1))),
            ("cp FILE OUT && sync OUT", best(copy, max(1, k - 1))),
            ("check, a value outside in every 4 KiB page", best(check_s, k)),
            ("clamp -o, a value outside in every 4 KiB page", best(clamp_s, max(1, k - 1))),
        ]
        cat_run = min(cat_before, best(cat, k), key=lambda r: r.wall)
        cat_s = cat_run.wall
        start = rows[0][1]
        rows = [
            ("cat FILE > /dev/null", cat_run),
            ("interpreter start-up (Python, torch, parambounds)", Run(start.startup, 0)),
            *rows,
        ]
        gb = size / 1e9
        print(f"\nfile: {size / 2**30:.2f} GiB ({args.format}), {os.cpu_count()} CPUs")
        print(f"start-up RssAnon (after the imports): {start.start_rss / 2**20:.0f} MiB\n")
        print(
            "| what | time s | GB/s | time / cat | peak RssAnon MiB "
            "| above start-up MiB | (peak - start-up) / file | peak / file |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for name, r in rows:
            mem = "| - | - | - | -"
            if r.start_rss:
                above = r.peak - r.start_rss
                mem = (
                    f"| {r.peak / 2**20:.0f} | {above / 2**20:.0f} | {above / size:.1%} "
                    f"| {r.peak / size:.1%}"
                )
            print(f"| {name} | {r.wall:.2f} | {gb / r.wall:.2f} | {r.wall / cat_s:.2f} {mem} |")
        print("\nthe floor of check, component by component (this process, 1 thread):\n")
        print("| component | time s | GB/s | time / cat |")
        print("|---|---:|---:|---:|")
        data = max(ckpt.iterdir(), key=lambda p: p.stat().st_size) if ckpt.is_dir() else ckpt
        for name, t in floor(data):  # a DCP folder: its data file
            print(f"| {name} | {t:.2f} | {gb / t:.2f} | {t / cat_s:.2f} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
