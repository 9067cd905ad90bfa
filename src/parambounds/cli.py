"""The command line: ``parambounds check | clamp | demo``.

Bad input (a missing or unreadable file, malformed TOML, a pattern that matches nothing,
``lower > upper``, an unknown penalty) gives one line on stderr and exit code 2, never a
traceback, and no file is written. The library never imports this module.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import signal
import sys
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from . import __version__
from .errors import BoundsError
from .report import ParamReport, Report
from .spec import Bounds

if TYPE_CHECKING:
    from .checkpoints import Checkpoint, Target

# torch is imported by the commands that need it, not here: ``--help`` and ``--version``
# answer at once, and ``check`` imports only what reading a checkpoint takes (not the
# training-time machinery: torch.compile, DTensor), which halves its start-up.

__all__ = ["main"]

EXIT_OK, EXIT_OUTSIDE, EXIT_BAD_INPUT = 0, 1, 2

_CHECK_EXAMPLE = """example:
  parambounds check model.pt --bounds bounds.toml
  parambounds check model.safetensors --bounds bounds.toml --json > report.json
  parambounds check model.pt --device xylo-audio-2 --dt 1e-3

exit codes: 0 everything inside, 1 something outside, 2 bad input"""

_CLAMP_EXAMPLE = """example:
  parambounds clamp model.pt --bounds bounds.toml -o model.clamped.pt
  parambounds clamp model.pt --bounds bounds.toml --in-place

Writes through a temporary file in the target folder and renames it, so a crash never
leaves a half-written file. Tensors that no pattern bounds, integer tensors and every
non-tensor entry (epoch, optimizer state) are written back exactly as they were."""

_DEMO_EXAMPLE = """example:
  parambounds demo --out demo-out --steps 80

Trains a small spiking network three times (no bounds, the penalty, projection after
every step), prints a table and writes DIR/time_constants.png."""

_BOUNDS_HELP = "TOML bounds file (see examples/bounds.toml)"


def _load_bounds(args: argparse.Namespace) -> Bounds:
    """The bounds file, with the mistakes that are the file's own blamed on it."""
    from .checkpoints import scalar

    path = Path(args.bounds)
    bounds = Bounds.from_toml(path, strict=not args.allow_unmatched)
    if not bounds.spec:
        raise BoundsError(f"{path}: nothing is bounded: the [bounds] table is empty")
    if all(
        (lo is None or scalar(lo, "lower", p) == -math.inf)
        and (hi is None or scalar(hi, "upper", p) == math.inf)
        for p, (lo, hi) in bounds.spec.items()
    ):
        raise BoundsError(f"{path}: nothing is bounded: every bound in it is open")
    return bounds


@dataclass
class _Loaded:
    bounds: Bounds
    ckpt: Checkpoint
    targets: list[Target]
    unmatched: list[str]


def _inspect(args: argparse.Namespace) -> _Loaded:
    """Load the bounds and the checkpoint, and resolve which tensors are bounded."""
    from .checkpoints import make_targets
    from .matching import matched_patterns

    bounds = _load_bounds(args)
    ckpt = _load_checkpoint(Path(args.checkpoint))
    names = ckpt.parameter_names()
    try:
        # names only: plain Python, no torch backend (nor its import) needed
        resolved = bounds._match(tuple([*ckpt.derived, *ckpt.tensors]))
        targets = make_targets(
            resolved.lower, resolved.upper, ckpt.tensors, ckpt.derived, ckpt.loaded_as
        )
    except BoundsError as err:
        raise BoundsError(_with_file(err, ckpt.path)) from None
    matched = matched_patterns(tuple(bounds.spec), tuple(names))  # compiled once
    unmatched = [p for p in bounds.spec if p not in matched]
    if not targets:
        raise BoundsError(
            f"{ckpt.path}: nothing is bounded: no floating-point parameter matches a pattern "
            "with a finite bound"
        )
    return _Loaded(bounds, ckpt, targets, unmatched)


def _load_checkpoint(path: Path) -> Checkpoint:
    """The checkpoint; a DCP directory lazily: its tensors are read one at a time."""
    if path.is_dir() and (path / ".metadata").is_file():
        from .checkpoints import load_dcp

        return load_dcp(path, lazy=True)
    from .checkpoints import load_checkpoint

    return load_checkpoint(path)


def _in_memory(ckpt: Checkpoint, t: Target) -> Target:
    """``t`` with its tensor in memory (read now from a lazy DCP checkpoint)."""
    if ckpt.format != "dcp" or t.derived is not None:
        return t
    from .checkpoints import read_tensor

    return replace(t, tensor=read_tensor(ckpt, t.name))


def _with_file(err: BoundsError, path: Path) -> str:
    msg = str(err)
    return msg if msg.startswith(str(path)) else f"{path}: {msg}"


def _return_freed_memory() -> None:
    """Have glibc give every freed block of 1 MiB or more back to the system at once.

    The scan allocates temporaries of a piece (4 MiB) on each worker thread; by default
    glibc raises its mmap threshold after the first such block is freed and then keeps
    freed blocks in each thread's arena: tens of MiB that stay private (80 MiB with two
    workers on a file with a value outside in every page). A fixed threshold returns
    them at once. Elsewhere than glibc, nothing changes. Done only when the command
    line runs as a program (``main()`` with no arguments), never when a process calls
    ``main([...])`` as a function: the setting is the whole process's.
    """
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_mmap_threshold = -3
    mallopt(m_mmap_threshold, 1 << 20)


def cmd_check(args: argparse.Namespace) -> int:
    """Print the report of a checkpoint against a bounds file."""
    from .checkpoints import aliases, scan_targets

    if args.device is not None or args.dt is not None:
        return _check_device(args)
    if args.bounds is None:  # argparse's own message, as when --bounds was required
        args.usage_error("the following arguments are required: --bounds (or --device and --dt)")

    loaded = _inspect(args)
    try:
        if loaded.ckpt.format == "dcp":  # in its data files, else one tensor at a time
            from .checkpoints import scan_dcp

            found = scan_dcp(loaded.ckpt, loaded.targets)
            if found is None:
                found = [scan_targets([_in_memory(loaded.ckpt, t)])[0] for t in loaded.targets]
            entries = found
        else:
            entries = scan_targets(loaded.targets)
        report = Report(tuple(entries))
    except BoundsError as err:
        raise BoundsError(_with_file(err, loaded.ckpt.path)) from None
    if args.json:
        ckpt = loaded.ckpt
        out = {
            "file": str(ckpt.path),
            "format": ckpt.format,
            "ok": report.ok,
            "parameters": ckpt.parameter_names(),
            "not_parameters": ckpt.skipped,
            "aliases": [list(p) for p in aliases(ckpt.all_tensors())],
            "unmatched_patterns": loaded.unmatched,
            "report": report.to_dict(),
        }
        print(json.dumps(out, indent=2))
    else:
        print(report)
        if loaded.unmatched:
            print("note: patterns that match nothing here: " + ", ".join(loaded.unmatched))
    return EXIT_OK if report.ok else EXIT_OUTSIDE


def _check_device(args: argparse.Namespace) -> int:
    """``check --device``: the time constants of a checkpoint against a chip's export rules."""
    from .devices import deployability

    if args.bounds is not None:
        raise BoundsError("give --bounds or --device, not both")
    if args.device is None or args.dt is None:
        raise BoundsError("--device and --dt go together: give both")
    ckpt = _load_checkpoint(Path(args.checkpoint))
    if ckpt.format == "dcp":  # lazy: read the tensors now
        from .checkpoints import read_tensor

        tensors = {n: read_tensor(ckpt, n) for n in ckpt.tensors}
    else:
        tensors = dict(ckpt.tensors)
    try:
        report = deployability(tensors, args.device, dt=args.dt)
    except BoundsError as err:
        raise BoundsError(_with_file(err, ckpt.path)) from None
    if args.json:
        print(json.dumps({"file": str(ckpt.path), "format": ckpt.format, **report.to_dict()}))
    else:
        print(report)
    return EXIT_OK if report.ok else EXIT_OUTSIDE


def _output(args: argparse.Namespace) -> Path:
    """Where clamp writes, refused before anything is read when it is not safe."""
    source = Path(args.checkpoint)
    if args.output is None and not args.in_place:
        raise BoundsError("give -o OUT for the clamped copy, or --in-place to overwrite the input")
    if args.output is not None and args.in_place:
        raise BoundsError("give -o OUT or --in-place, not both")
    from .checkpoints import resolve_target

    if args.in_place:
        return resolve_target(source)
    if args.output == "":
        raise BoundsError("-o: the output path is empty")
    target = Path(args.output)
    if target.is_symlink() and not target.exists():  # as GNU cp: never create its target
        if not args.force:
            raise BoundsError(
                f"{target}: a dangling symlink; not writing through it (give --force to "
                "replace the link itself with the clamped copy)"
            )
        return Path(os.path.abspath(target))  # the rename replaces the link, not its target
    if target.exists():
        if source.exists() and target.samefile(source):
            raise BoundsError(
                f"{target}: refusing to overwrite the input checkpoint; give another -o "
                "or --in-place"
            )
        if Path(args.bounds).exists() and target.samefile(args.bounds):
            raise BoundsError(f"{target}: refusing to overwrite the bounds file")
        if not args.force:  # a file or a folder (a DCP checkpoint): never without --force
            raise BoundsError(f"{target}: exists; give --force to replace it")
    real = resolve_target(target)
    _same_format(source, target, real)
    return real


def _same_format(source: Path, target: Path, real: Path) -> None:
    """Refuse, before anything is read, an output whose name (resolved) says another format.

    A symlink ``x.pt`` to ``y.json`` is judged by ``y.json``: that is the file written.
    A resolved name with no suffix (a content-addressed blob, as in Hugging Face's
    cache, where ``model.safetensors`` links to ``blobs/<hash>``) says nothing: the
    link's name is judged.
    """
    from .checkpoints import format_of, is_dcp

    if is_dcp(source) or is_dcp(real):
        return  # a folder: checked when it is written
    named = real if real.suffix else target
    want, got = format_of(source), format_of(named)
    if want != got:
        via = f" (a symlink to {real})" if named is real and real.name != target.name else ""
        raise BoundsError(
            f"{target}{via}: the output must have the same format as the input "
            f"({source.name}: {want}; the output's name says {got})"
        )


def _refuse_conflicting_aliases(loaded: _Loaded) -> None:
    from .checkpoints import aliases

    bounds = {t.name: (t.lower, t.upper) for t in loaded.targets}
    for a, b in aliases(loaded.ckpt.all_tensors()):
        ba, bb = bounds.get(a, (None, None)), bounds.get(b, (None, None))
        if ba != bb:

            def show(x: tuple[Any, Any]) -> str:
                return "unbounded" if x == (None, None) else f"[{x[0]}, {x[1]}]"

            raise BoundsError(
                f"{loaded.ckpt.path}: '{a}' and '{b}' share memory (tied weights or views of "
                f"one tensor) but get different bounds ({show(ba)} and {show(bb)}); clamping "
                "one would change the other: give every alias the same bounds"
            )


def cmd_clamp(args: argparse.Namespace) -> int:
    """Write a copy of a checkpoint with every bounded tensor clamped into its bounds."""
    from .checkpoints import lock_target

    target = _output(args)
    with lock_target(target):  # a second run on the same target refuses: nothing lost
        return _clamp(args, target)


def _clamp(args: argparse.Namespace, target: Path) -> int:
    from .checkpoints import clamp_checkpoint

    loaded = _inspect(args)
    _refuse_conflicting_aliases(loaded)
    ckpt = loaded.ckpt
    try:
        if ckpt.format == "dcp":  # a folder: its data files patched, or tensor by tensor
            before = _clamp_dcp(loaded, target)
        else:  # the counts before clamping; the copy written as the pieces are clamped
            before = clamp_checkpoint(ckpt, loaded.targets, target)
    except BoundsError as err:
        raise BoundsError(_with_file(err, ckpt.path)) from None
    moved = sum(e.below + e.above for e in before)
    nan = sum(e.nan for e in before)
    touched = sum(1 for e in before if e.below or e.above)
    shown = args.output if args.output is not None else args.checkpoint
    print(f"clamped {moved} values in {touched} of {len(before)} bounded tensors; wrote {shown}")
    if nan:
        print(f"warning: {nan} NaN values left as they are (clamping keeps NaN)", file=sys.stderr)
    return EXIT_OK


def _clamp_dcp(loaded: _Loaded, target: Path) -> list[ParamReport]:
    """Write the clamped copy of a lazy DCP checkpoint; the reports before clamping.

    Its data files copied and patched where their layout is proven, else read, clamped
    and written one tensor at a time through DCP.
    """
    from .checkpoints import clamp_dcp, read_tensor, save_dcp, scan_targets

    ckpt = loaded.ckpt
    patched = clamp_dcp(ckpt, loaded.targets, target)
    if patched is not None:
        return patched
    targets = {t.name: t for t in loaded.targets}
    before: dict[str, ParamReport] = {}

    def fill(name: str) -> Any:
        x = read_tensor(ckpt, name)
        if name in targets:
            (before[name],) = scan_targets([replace(targets[name], tensor=x)], clamp=True)
            if before[name].below or before[name].above:
                ckpt.changed.add(name)
        return x

    save_dcp(ckpt, target, fill)
    return [before[name] for name in targets]


def cmd_demo(args: argparse.Namespace) -> int:
    """Train a small spiking network with and without bounds, and plot its time constants."""
    from .demo import STEPS, run_demo

    steps = STEPS if args.steps is None else args.steps
    if steps < 1:
        raise BoundsError(f"--steps must be at least 1, got {steps}")
    run_demo(Path(args.out), steps=steps, progress=not args.no_progress)
    return EXIT_OK


def cmd_build_kernels(args: argparse.Namespace) -> int:  # noqa: ARG001
    """Build the native CPU kernels now (cached), so that no training step waits for them.

    The torch kernel always; the JAX kernel too where jax is installed.
    """
    from .torch import _native

    try:
        _native.build(verbose=True)
    except RuntimeError as err:
        print(f"parambounds: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"parambounds: native kernel {_native.module_name()} ready")
    if importlib.util.find_spec("jax") is None:
        return EXIT_OK
    from .jax import _native as jax_native

    try:
        path = jax_native.build()
    except BoundsError as err:
        print(f"parambounds: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"parambounds: JAX kernel {path.name} ready")
    return EXIT_OK


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr, like every other bad input, and exit code 2."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.partition(" ")[2]
        where = f"{command}: " if command else ""
        self.exit(
            EXIT_BAD_INPUT,
            f"parambounds: error: {where}{message} (see '{self.prog} --help')\n",
        )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, with an example in every command's ``--help``."""
    parser = _Parser(
        prog="parambounds",
        description="Check and clamp checkpoints against parameter bounds; a demo.",
        epilog="run 'parambounds COMMAND --help' for a command's options and an example",
    )
    parser.add_argument("--version", action="version", version=f"parambounds {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, epilog: str, func: Any) -> argparse.ArgumentParser:  # noqa: A002
        p = sub.add_parser(
            name, help=help, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        p.set_defaults(func=func)
        if name not in ("demo", "build-kernels"):
            p.add_argument("checkpoint", help="a .pt/.pth, .safetensors or Rockpool .json file")
            p.add_argument("--bounds", required=name != "check", metavar="FILE", help=_BOUNDS_HELP)
            p.add_argument(
                "--allow-unmatched",
                action="store_true",
                help="a pattern that matches nothing is not an error (one file, several models)",
            )
        return p

    check = command(
        "check", "report bounded tensors outside their bounds", _CHECK_EXAMPLE, cmd_check
    )
    check.add_argument("--json", action="store_true", help="print the report as JSON instead")
    check.add_argument("--device", metavar="NAME", help="check a chip's export rules instead "
                       "(xylo-audio-2, xylo-audio-3, xylo-imu)")  # fmt: skip
    check.add_argument("--dt", type=float, metavar="SECONDS", help="the time step, with --device")
    check.set_defaults(usage_error=check.error)

    clamp = command("clamp", "write a copy clamped into the bounds", _CLAMP_EXAMPLE, cmd_clamp)
    clamp.add_argument("-o", "--output", metavar="OUT", help="where to write the clamped copy")
    clamp.add_argument("--in-place", action="store_true", help="allow overwriting the input")
    clamp.add_argument("--force", action="store_true", help="allow replacing an existing -o file")

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
        default=None,
        metavar="N",
        help="training steps per run (default: 80)",
    )
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    command(
        "build-kernels",
        "build the native CPU kernels now (torch, and JAX where installed; C++ compiler needed)",
        "example:\n  parambounds build-kernels",
        cmd_build_kernels,
    )
    return parser


def _terminate(signum: int, frame: Any) -> None:  # noqa: ARG001
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit code (no command at all: the help, and 0)."""
    parser = build_parser()
    if not (sys.argv[1:] if argv is None else argv):  # as pip and most argparse tools do
        parser.print_help()
        return 0
    args = parser.parse_args(argv)
    if argv is None and args.command in ("check", "clamp"):
        _return_freed_memory()
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:  # a kill cleans up its temp file
        signal.signal(signal.SIGTERM, _terminate)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # one line on stderr, never torch's notes
            return int(args.func(args))
    except BoundsError as err:  # CheckpointError too
        print(f"parambounds: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as err:  # e.g. permission denied while writing
        where = f"{err.filename}: " if getattr(err, "filename", None) else ""
        print(f"parambounds: error: {where}{err.strerror or err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (RecursionError, MemoryError) as err:
        print(f"parambounds: error: input too large or nested too deeply ({err})", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
