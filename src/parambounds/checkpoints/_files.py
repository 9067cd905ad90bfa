"""Load and save a checkpoint file of any format: the format chosen by name and contents.

Formats, by file name (the contents are checked too: a file is named for what it is):

- ``.pt``, ``.pth`` (and anything else): files written by ``torch.save``, read with
  ``torch.load(..., mmap=True, weights_only=True)`` (:mod:`._torch`): nothing in the
  file can run, and tensors stay in the file's pages. The parameters are the
  floating-point tensors of the state_dict; optimizer, scheduler and scaler state are
  never parameters (:mod:`._tree`). Everything else is written back as it was:
  the clamped copy is the original file with the changed storages patched
  (:mod:`._patch`).
- ``.safetensors``: mapped lazily (:mod:`._safetensors`); metadata kept.
- ``.json``: Rockpool's parameter files (:mod:`._rockpool_json`).

Parameters saved after ``Bounds.reparametrize_`` are found under their usual name
(:mod:`._reparam`). The library never imports this module.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import BoundsError
from ..report import ParamReport
from ._apply import Target, scan_targets
from ._checkpoint import Checkpoint, CheckpointError
from ._patch import plan_patch
from ._reparam import find_reparametrized
from ._rockpool_json import JsonFile, load_json_file
from ._safetensors import SafetensorsFile, open_safetensors
from ._sink import copy_and_patch
from ._torch import load_torch_file, sniff
from ._tree import Named, name_tensors, walk_tensors
from ._write import atomic_write

__all__ = ["clamp_checkpoint", "format_of", "load_checkpoint", "save_checkpoint"]


def format_of(path: Path) -> str:
    """The format a file name says: ``safetensors``, ``rockpool-json`` or ``torch``."""
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
        from ._dcp import load_dcp

        return load_dcp(path)
    _check_readable(path)
    fmt = format_of(path)
    try:
        if fmt == "safetensors":
            st = open_safetensors(path)
            named = Named()
            for name, t in st.tensors.items():
                named.add(name, (name,), t, str(path))
            return _from_named(path, fmt, named, None, st)
        if fmt == "rockpool-json":
            js = load_json_file(path)
            ckpt = _from_named(path, fmt, js.named, js.data, js)
            ckpt.loaded_as = torch.float32  # Rockpool's modules hold float32 parameters
            return ckpt
        data, shards = load_torch_file(path)
        named, _ = name_tensors(data, str(path))
        ckpt = _from_named(path, fmt, named, data, None)
        ckpt.local_shards = shards
        return ckpt
    except CheckpointError:
        raise
    except BoundsError as err:
        raise CheckpointError(str(err)) from None


def _changed_tensor(ckpt: Checkpoint, name: str) -> Tensor:
    """The tensor in the file behind a changed name (a reparametrized one's ``original``)."""
    if name in ckpt.tensors:
        return ckpt.tensors[name]
    return next(d.original for d in ckpt.derived.values() if d.source == name)


def _check_target(ckpt: Checkpoint, target: Path) -> None:
    if not target.parent.is_dir():
        raise CheckpointError(f"{target}: folder {target.parent} does not exist")
    if target.is_dir():
        raise CheckpointError(f"{target}: is a directory")
    if target.suffix and format_of(target) != ckpt.format:  # no suffix: a blob, as
        # Hugging Face's cache keeps behind its named links (the command line judged the link)
        raise CheckpointError(
            f"{target}: the output must have the same format as the input ({ckpt.path.name})"
        )


def clamp_checkpoint(
    ckpt: Checkpoint, targets: list[Target], target: str | Path
) -> list[ParamReport]:
    """Clamp the ``targets`` of ``ckpt`` and write the clamped copy to ``target``, atomically.

    A memory-mapped file (a ``.pt`` that :func:`._patch.plan_patch` can patch, a
    ``.safetensors``) is copied and the clamped pieces are written into the copy
    (:mod:`._sink`): the input's pages are only read, so private memory stays a few
    pieces whatever the file's size. Anything else (an old-format ``.pt``, a Rockpool
    file) is clamped in memory and written by :func:`save_checkpoint`. Not for DCP
    folders, which the command line clamps one tensor at a time.

    Returns:
        the report of each target before clamping.

    Raises:
        CheckpointError: as :func:`save_checkpoint`.
        BoundsError: for a target that cannot be clamped (a view whose elements overlap).
    """
    target = Path(target)
    _check_target(ckpt, target)
    locate: Any = None
    finish: Any = None
    if isinstance(ckpt.handle, SafetensorsFile):
        locate = ckpt.handle.locate
    elif ckpt.format == "torch":
        patch = plan_patch(ckpt.path, [t for _, t in walk_tensors(ckpt.data)])
        if patch is not None:
            locate, finish = patch.locate, patch.fix_crcs
    if locate is None:
        reports = scan_targets(targets, clamp=True)
        _note_changed(ckpt, targets, reports)
        save_checkpoint(ckpt, target)
        return reports
    reports = []

    def write(tmp: Path) -> None:
        with copy_and_patch(ckpt.path, tmp, locate, finish) as sink:
            reports[:] = scan_targets(targets, clamp=True, sink=sink)

    atomic_write(target, write, target if target.exists() else ckpt.path)
    _note_changed(ckpt, targets, reports)
    return reports


def _note_changed(ckpt: Checkpoint, targets: list[Target], reports: list[ParamReport]) -> None:
    for t, e in zip(targets, reports):
        if e.below or e.above:
            ckpt.changed.add(t.derived.source if t.derived is not None else t.name)


def save_checkpoint(ckpt: Checkpoint, target: str | Path) -> None:
    """Write ``ckpt`` (with its possibly clamped tensors) to ``target``, atomically.

    A ``.pt`` or Rockpool file gets the tensors named in ``ckpt.changed`` written back
    (a ``.pt`` is copied and those storages patched); a change to any other tensor is
    not written.

    ``target`` is written as given: resolve symlinks and check hard links first with
    :func:`._write.resolve_target`.

    Raises:
        CheckpointError: when ``target``'s folder does not exist, its format differs, or
            the write fails (nothing is left behind).
    """
    target = Path(target)
    if ckpt.format == "dcp":  # a sharded checkpoint: a directory
        from ._dcp import save_dcp

        return save_dcp(ckpt, target)
    _check_target(ckpt, target)
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

        def write(tmp: Path) -> None:  # the original's bytes, the changed storages patched
            with copy_and_patch(ckpt.path, tmp, patch.locate, patch.fix_crcs) as sink:
                storages = {t.untyped_storage().data_ptr(): t.untyped_storage() for t in changed}
                for st in storages.values():
                    whole = torch.empty(0, dtype=torch.uint8).set_(st)
                    sink.put(whole, whole)

    elif ckpt.local_shards:  # torch.save would write the local shards, not the DTensors
        raise CheckpointError(
            f"{ckpt.path}: holds DTensors and cannot be patched in place (its layout is "
            "not torch.save's usual one); refused: nothing was written"
        )
    else:  # not memory-mapped (an old-format file), or laid out unlike torch.save's
        zip_format = sniff(ckpt.path) != "legacy"  # an old-format file stays one (torch < 1.6
        # reads no other)

        def write(tmp: Path) -> None:
            torch.save(ckpt.data, tmp, _use_new_zipfile_serialization=zip_format)

    try:
        atomic_write(target, write, mode_from)
    except CheckpointError:
        raise
    except BoundsError as err:
        raise CheckpointError(str(err)) from None
