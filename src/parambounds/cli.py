"""The command line: ``parambounds check | clamp | demo``.

Bad input (a missing or unreadable file, malformed TOML, a pattern that matches nothing,
``lower > upper``, an unknown penalty) gives one line on stderr and exit code 2, never a
traceback, and no file is written. The library never imports this module.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from .errors import BoundsError
from .spec import Bounds

__all__ = ["main"]

EXIT_OK, EXIT_OUTSIDE, EXIT_BAD_INPUT = 0, 1, 2

_CHECK_EXAMPLE = """example:
  parambounds check model.pt --bounds bounds.toml
  parambounds check model.safetensors --bounds bounds.toml --json > report.json

exit codes: 0 everything inside, 1 something outside, 2 bad input"""

_CLAMP_EXAMPLE = """example:
  parambounds clamp model.pt --bounds bounds.toml -o model.clamped.pt
  parambounds clamp model.pt --bounds bounds.toml --in-place

Writes through a temporary file in the target folder and renames it, so a crash never
leaves a half-written file. Tensors that no pattern bounds, integer tensors and every
non-tensor entry (epoch, optimizer state) are written back exactly as they were."""

_DEMO_EXAMPLE = """example:
  parambounds demo --out demo-out --steps 150

Trains a small spiking network three times (no bounds, the penalty, projection after
every step), prints a table and writes DIR/time_constants.png."""

_BOUNDS_HELP = "TOML bounds file (see examples/bounds.toml)"


def _load(args: argparse.Namespace) -> tuple[Bounds, object]:
    bounds = Bounds.from_toml(args.bounds)
    ckpt = load_checkpoint(args.checkpoint)
    return bounds, ckpt


def _with_file(err: BoundsError, path: Path) -> str:
    msg = str(err)
    return msg if msg.startswith(str(path)) else f"{path}: {msg}"


def cmd_check(args: argparse.Namespace) -> int:
    """Print the report of a checkpoint against a bounds file."""
    bounds, ckpt = _load(args)
    try:
        report = bounds.report(ckpt.tensors)  # type: ignore[attr-defined]
    except BoundsError as err:
        raise BoundsError(_with_file(err, Path(args.checkpoint))) from None
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report)
    return EXIT_OK if report.ok else EXIT_OUTSIDE


def cmd_clamp(args: argparse.Namespace) -> int:
    """Write a copy of a checkpoint with every bounded tensor clamped into its bounds."""
    source = Path(args.checkpoint)
    if args.output is None and not args.in_place:
        raise BoundsError("give -o OUT for the clamped copy, or --in-place to overwrite the input")
    target = Path(args.output) if args.output is not None else source
    if not args.in_place and target.exists() and source.exists() and target.samefile(source):
        raise BoundsError(
            f"{target}: refusing to overwrite the input checkpoint; give another -o or --in-place"
        )
    bounds, ckpt = _load(args)
    try:
        before = bounds.report(ckpt.tensors)  # type: ignore[attr-defined]
        bounds.project_(ckpt.tensors)  # type: ignore[attr-defined]
    except BoundsError as err:
        raise BoundsError(_with_file(err, source)) from None
    save_checkpoint(ckpt, target)  # type: ignore[arg-type]
    moved = sum(e.below + e.above for e in before.entries)
    nan = sum(e.nan for e in before.entries)
    touched = sum(1 for e in before.entries if e.below or e.above)
    total = len(before.entries)
    print(f"clamped {moved} values in {touched} of {total} bounded tensors; wrote {target}")
    if nan:
        print(f"warning: {nan} NaN values left as they are (clamping keeps NaN)", file=sys.stderr)
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    """Train a small spiking network with and without bounds, and plot its time constants."""
    if args.steps < 1:
        raise BoundsError(f"--steps must be at least 1, got {args.steps}")
    from .demo import run_demo

    run_demo(Path(args.out), steps=args.steps, progress=not args.no_progress)
    return EXIT_OK


def cmd_build_kernels(args: argparse.Namespace) -> int:  # noqa: ARG001
    """Build the native CPU kernel now (cached), so that no training step waits for it."""
    from . import _native

    try:
        _native.build(verbose=True)
    except RuntimeError as err:
        print(f"parambounds: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"parambounds: native kernel {_native.module_name()} ready")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, with an example in every command's ``--help``."""
    parser = argparse.ArgumentParser(
        prog="parambounds",
        description="Check and clamp checkpoints against parameter bounds; a demo.",
        epilog="run 'parambounds COMMAND --help' for a command's options and an example",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, epilog: str, func: Any) -> argparse.ArgumentParser:  # noqa: A002
        p = sub.add_parser(
            name, help=help, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        p.set_defaults(func=func)
        if name not in ("demo", "build-kernels"):
            p.add_argument("checkpoint", help="a .pt/.pth, .safetensors or Rockpool .json file")
            p.add_argument("--bounds", required=True, metavar="FILE", help=_BOUNDS_HELP)
        return p

    check = command(
        "check", "report bounded tensors outside their bounds", _CHECK_EXAMPLE, cmd_check
    )
    check.add_argument("--json", action="store_true", help="print the report as JSON instead")

    clamp = command("clamp", "write a copy clamped into the bounds", _CLAMP_EXAMPLE, cmd_clamp)
    clamp.add_argument("-o", "--output", metavar="OUT", help="where to write the clamped copy")
    clamp.add_argument("--in-place", action="store_true", help="allow overwriting the input")

    demo = command(
        "demo", "show what bounds do on a small spiking network", _DEMO_EXAMPLE, cmd_demo
    )
    demo.add_argument(
        "--out",
        default="parambounds-demo",
        metavar="DIR",
        help="folder for the plot (default: %(default)s)",
    )
    demo.add_argument(
        "--steps",
        type=int,
        default=150,
        metavar="N",
        help="training steps per run (default: %(default)s)",
    )
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    command(
        "build-kernels",
        "build the native CPU kernel ahead of time (C++ compiler and ninja needed)",
        "example:\n  parambounds build-kernels",
        cmd_build_kernels,
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (BoundsError, CheckpointError) as err:
        print(f"parambounds: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as err:  # e.g. permission denied while writing
        where = f"{err.filename}: " if getattr(err, "filename", None) else ""
        print(f"parambounds: error: {where}{err.strerror or err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
