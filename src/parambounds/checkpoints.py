"""Checkpoints on disk, for the command line: read their parameters, write them back safely.

Formats, by file name (the contents are checked too: a file is named for what it is):

- ``.pt``, ``.pth`` (and anything else): files written by ``torch.save``, read with
  ``torch.load(..., mmap=True, weights_only=True)`` (:mod:`._ckpt_torch`): nothing in the
  file can run, and tensors stay in the file's pages. The parameters are the
  floating-point tensors of the state_dict; optimizer, scheduler and scaler state are
  never parameters (:mod:`._ckpt_tree`). Everything else is written back as it was:
  the clamped copy is the original file with the changed storages patched
  (:mod:`._ckpt_patch`).
- ``.safetensors``: mapped lazily (:mod:`._ckpt_safetensors`); metadata kept.
- ``.json``: Rockpool's parameter files (:mod:`._ckpt_json`).

Parameters saved after ``Bounds.reparametrize_`` are found under their usual name
(:mod:`._ckpt_reparam`). The library never imports this module.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ._ckpt_json import JsonFile, load_json_file
from ._ckpt_patch import plan_patch
from ._ckpt_reparam import Reparametrized, find_reparametrized
from ._ckpt_safetensors import SafetensorsFile, open_safetensors
from ._ckpt_torch import load_torch_file
from ._ckpt_tree import Named, name_tensors, walk_tensors, where
from ._ckpt_write import atomic_write
from .errors import BoundsError

__all__ = ["Checkpoint", "CheckpointError", "load_checkpoint", "save_checkpoint"]


class CheckpointError(BoundsError):
    """A checkpoint that cannot be read or written; the message names the file."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: its parameters by name, and what it takes to write it back.

    Attributes:
        tensors: the floating-point tensors treated as parameters, by dotted name.
        derived: parameters saved reparametrized, by their usual name.
        skipped: places in the file that hold training state, not parameters.
        changed: names of the parameters that clamping changed.
    """

    path: Path
    format: str
    tensors: dict[str, Tensor]
    data: Any
    derived: dict[str, Reparametrized] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    changed: set[str] = field(default_factory=set)
    handle: Any = None
    paths: dict[str, tuple[Any, ...]] = field(default_factory=dict)

    @property
    def metadata(self) -> dict[str, str] | None:
        """A safetensors file's metadata."""
        return self.handle.metadata if isinstance(self.handle, SafetensorsFile) else None

    def parameter_names(self) -> list[str]:
        """Every name that bounds can match: tensors, then reparametrized parameters."""
        return [*self.tensors, *self.derived]

    def all_tensors(self) -> list[tuple[str, Tensor]]:
        """Every tensor in the file with a name, for finding shared memory."""
        if self.format != "torch":
            return list(self.tensors.items())  # safetensors and JSON cannot share memory
        names = {p: n for n, p in self.paths.items()}  # tied tensors: one object, two names
        return [(names.get(path, where(path)), t) for path, t in walk_tensors(self.data)]


def _format_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return "safetensors"
    if suffix == ".json":
        return "rockpool-json"
    return "torch"


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a regular file")


def _from_named(path: Path, fmt: str, named: Named, data: Any, handle: Any) -> Checkpoint:
    tensors = dict(named.tensors)
    derived = find_reparametrized(tensors)
    return Checkpoint(
        path, fmt, tensors, data, derived, named.skipped, handle=handle, paths=named.paths
    )


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint's parameters, without ever running code from it.

    Raises:
        CheckpointError: naming the file, when it is missing, a directory, unreadable,
            truncated, compressed, forged, needs full unpickling, or has two entries
            with the same name.
    """
    path = Path(path)
    if path.is_dir() and (path / ".metadata").is_file():  # a sharded (DCP) checkpoint
        from .checkpoints_dcp import load_dcp

        return load_dcp(path)
    _check_readable(path)
    fmt = _format_of(path)
    try:
        if fmt == "safetensors":
            st = open_safetensors(path)
            named = Named()
            for name, t in st.tensors.items():
                named.add(name, (name,), t, str(path))
            return _from_named(path, fmt, named, None, st)
        if fmt == "rockpool-json":
            js = load_json_file(path)
            return _from_named(path, fmt, js.named, js.data, js)
        data = load_torch_file(path)
        named, _ = name_tensors(data, str(path))
        return _from_named(path, fmt, named, data, None)
    except CheckpointError:
        raise
    except BoundsError as err:
        raise CheckpointError(str(err)) from None


def _changed_tensor(ckpt: Checkpoint, name: str) -> Tensor:
    """The tensor in the file behind a changed name (a reparametrized one's ``original``)."""
    if name in ckpt.tensors:
        return ckpt.tensors[name]
    return next(d.original for d in ckpt.derived.values() if d.source == name)


def save_checkpoint(ckpt: Checkpoint, target: str | Path) -> None:
    """Write ``ckpt`` (with its possibly clamped tensors) to ``target``, atomically.

    A ``.pt`` or Rockpool file gets the tensors named in ``ckpt.changed`` written back
    (a ``.pt`` is copied and those storages patched); a change to any other tensor is
    not written.

    ``target`` is written as given: resolve symlinks and check hard links first with
    :func:`._ckpt_write.resolve_target`.

    Raises:
        CheckpointError: when ``target``'s folder does not exist, its format differs, or
            the write fails (nothing is left behind).
    """
    target = Path(target)
    if ckpt.format == "dcp":  # a sharded checkpoint: a directory
        from .checkpoints_dcp import save_dcp

        return save_dcp(ckpt, target)
    if not target.parent.is_dir():
        raise CheckpointError(f"{target}: folder {target.parent} does not exist")
    if target.is_dir():
        raise CheckpointError(f"{target}: is a directory")
    if _format_of(target) != ckpt.format:
        raise CheckpointError(
            f"{target}: the output must have the same format as the input ({ckpt.path.name})"
        )
    mode_from = target if target.exists() else ckpt.path
    handle = ckpt.handle
    if isinstance(handle, SafetensorsFile):

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                handle.write(f)

    elif isinstance(handle, JsonFile):
        handle.write_back(ckpt.changed)

        def write(tmp: Path) -> None:
            with open(tmp, "w") as f:
                json.dump(ckpt.data, f)

    elif (patch := plan_patch(ckpt.path, [t for _, t in walk_tensors(ckpt.data)])) is not None:
        changed = [_changed_tensor(ckpt, name) for name in ckpt.changed]

        def write(tmp: Path) -> None:
            patch.write(tmp, changed)  # the original's bytes, the changed storages patched

    else:  # not memory-mapped (an old-format file), or laid out unlike torch.save's

        def write(tmp: Path) -> None:
            torch.save(ckpt.data, tmp)

    try:
        atomic_write(target, write, mode_from)
    except CheckpointError:
        raise
    except BoundsError as err:
        raise CheckpointError(str(err)) from None
