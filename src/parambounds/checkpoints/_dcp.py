"""Sharded checkpoints: ``torch.distributed.checkpoint`` (DCP) directories.

A DCP directory (what ``dcp.save`` writes, one ``.distcp`` file per rank) holds a
``.metadata`` file, which is a pickle. It is read with a restricted unpickler that builds
only the plain record types of ``torch.distributed.checkpoint`` (``Metadata``,
``TensorStorageMetadata``, ``_StorageInfo``...), ``torch.Size``, dtypes and layouts,
and refuses any other global, so a checkpoint can never run code. Tensors are read one
at a time through ``dcp.load`` (shards are assembled into the full tensor, one tensor in
memory at a time for :func:`report_dcp`); non-tensor entries are kept as their raw
bytes and never unpickled. :func:`save_dcp` writes a new directory that ``dcp.load``
reads back, next to the target, then moves it into place; onto an existing checkpoint
it replaces only what DCP owns (the data files its metadata names, then ``.metadata``
in one rename), keeping every other file and the folder's mode and owner. The metadata
is checked first: every data file it names lies inside the folder, and the chunks of
every tensor cover it exactly; the new metadata keeps the original's ``planner_data``.
:func:`write_folder` is that writing, for any way of filling the new folder: the command
line fills it with patched copies of the data files where it can (:mod:`._dcp_patch`).

The library never imports this module.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
import stat
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import BoundsError
from ..report import Report
from ._checkpoint import Checkpoint, CheckpointError

__all__ = [
    "is_dcp",
    "load_dcp",
    "read_metadata",
    "read_tensor",
    "report_dcp",
    "save_dcp",
    "tensor_names",
    "write_folder",
]

_METADATA = ".metadata"
_DCP_MODULES = (
    "torch.distributed.checkpoint.metadata",
    "torch.distributed.checkpoint.planner",
    "torch.distributed.checkpoint.storage",
)
_OTHER_GLOBALS = {
    ("torch", "Size"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


def is_dcp(path: str | Path) -> bool:
    """Whether ``path`` is a DCP checkpoint directory (it holds a ``.metadata`` file)."""
    path = Path(path)
    return path.is_dir() and (path / _METADATA).is_file()


class _Refused(pickle.UnpicklingError):
    """A global outside the allowlist."""


class _RestrictedUnpickler(pickle.Unpickler):
    """Builds DCP's metadata records and nothing else: no code can run."""

    def find_class(self, module: str, name: str) -> Any:
        if module in _DCP_MODULES and not name.startswith("__"):
            import importlib

            obj = getattr(importlib.import_module(module), name, None)
            if isinstance(obj, type):  # dataclasses and enums: built field by field
                return obj
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) in _OTHER_GLOBALS:
            import importlib

            return getattr(importlib.import_module(module), name)
        raise _Refused(f"global '{module}.{name}' is not allowed")


def read_metadata(path: str | Path) -> Any:
    """The ``Metadata`` of a DCP directory, read without running code from it.

    Raises:
        CheckpointError: when it is not a DCP directory, or the metadata needs anything
            but DCP's own record types.
    """
    path = Path(path)
    if not is_dcp(path):
        raise CheckpointError(f"{path}: not a torch.distributed.checkpoint directory")
    try:
        with open(path / _METADATA, "rb") as f:
            meta = _RestrictedUnpickler(f).load()
    except _Refused as err:
        raise CheckpointError(
            f"{path / _METADATA}: refused: it needs more than DCP's metadata records to "
            f"unpickle, which could run code ({err})"
        ) from None
    except Exception as err:  # truncated or not a pickle
        raise CheckpointError(f"{path / _METADATA}: unreadable DCP metadata ({err})") from None
    from torch.distributed.checkpoint.metadata import Metadata

    if not isinstance(meta, Metadata):
        raise CheckpointError(f"{path / _METADATA}: not DCP metadata")
    _check_paths(path, meta)
    _check_chunks(path, meta)
    return meta


def _check_paths(path: Path, meta: Any) -> None:
    """Every file the metadata names must lie inside the folder (no ``..``, no absolute)."""
    storage = meta.storage_data
    if storage is None:
        return
    if not isinstance(storage, dict):
        raise CheckpointError(f"{path / _METADATA}: malformed DCP metadata (storage_data)")
    root = os.path.realpath(path)
    for index, info in storage.items():
        rel = getattr(info, "relative_path", None)
        name = getattr(index, "fqn", index)
        if not isinstance(rel, str) or not rel:
            raise CheckpointError(f"{path / _METADATA}: entry '{name}' names no data file")
        real = os.path.realpath(os.path.join(root, rel))
        if os.path.isabs(rel) or ".." in Path(rel).parts or not real.startswith(root + os.sep):
            raise CheckpointError(
                f"{path / _METADATA}: refused: entry '{name}' names the data file {rel!r}, "
                "which is not inside the checkpoint folder"
            )


def _check_chunks(path: Path, meta: Any) -> None:
    """The chunks of every tensor lie inside it, overlap nowhere and cover it whole.

    A tensor they do not cover would be read into uninitialised memory.
    """
    import math

    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    for name, md in meta.state_dict_metadata.items():
        if not isinstance(md, TensorStorageMetadata):
            continue
        size = tuple(md.size)
        boxes = []
        for c in md.chunks:
            off, sz = tuple(c.offsets), tuple(c.sizes)
            if (
                len(off) != len(size)
                or len(sz) != len(size)
                or any(o < 0 or n < 0 or o + n > d for o, n, d in zip(off, sz, size))
            ):
                raise CheckpointError(
                    f"{path}: malformed DCP checkpoint: a chunk of '{name}' (offsets {off}, "
                    f"sizes {sz}) lies outside the tensor's shape {size}"
                )
            if math.prod(sz):  # an empty chunk holds nothing, overlaps nothing
                boxes.append((off, sz))
        covered = sum(math.prod(sz) for _, sz in boxes)
        overlap = any(
            all(a < b + m and b < a + n for a, n, b, m in zip(*boxes[i], *boxes[j]))
            for i in range(len(boxes))
            for j in range(i)
        )
        if overlap or covered != math.prod(size):
            raise CheckpointError(
                f"{path}: malformed DCP checkpoint: the chunks of '{name}' "
                f"{'overlap' if overlap else 'do not cover the whole tensor'} "
                f"(shape {size}); refused (its values would be uninitialised memory)"
            )


def _reader(path: Path, known: Any = None) -> Any:
    from torch.distributed.checkpoint import FileSystemReader

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:  # noqa: ARG002
            from torch.distributed.checkpoint.metadata import StorageMeta

            meta = known if known is not None else read_metadata(path)
            if getattr(meta, "storage_meta", None) is None:
                meta.storage_meta = StorageMeta()
            meta.storage_meta.load_id = self.load_id
            return meta

    return SafeReader(str(path))


class _Raw:
    """A non-tensor entry, kept as the bytes DCP stored (never unpickled)."""

    def __init__(self, data: bytes) -> None:
        self.data = data


def _planners() -> tuple[Any, Any]:
    from torch.distributed.checkpoint import DefaultLoadPlanner, DefaultSavePlanner

    class RawLoadPlanner(DefaultLoadPlanner):
        raw: dict[str, _Raw]

        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            self.raw[read_item.dest_index.fqn] = _Raw(value.getvalue())

    class RawSavePlanner(DefaultSavePlanner):
        fill: Any = None  # name -> the tensor to write, asked for when it is written

        def transform_object(self, write_item: Any, object: Any) -> Any:  # noqa: A002
            if isinstance(object, _Raw):
                return io.BytesIO(object.data)
            return super().transform_object(write_item, object)

        def resolve_data(self, write_item: Any) -> Any:
            name = write_item.index.fqn
            if self.fill is not None and isinstance(self.state_dict.get(name), _Lazy):
                return self.fill(name)  # a whole plain tensor: one write item each
            return super().resolve_data(write_item)

    return RawLoadPlanner, RawSavePlanner


def _load(path: Path, names: list[str], meta: Any) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    state: dict[str, Any] = {}
    for name in names:
        md = meta.state_dict_metadata[name]
        if isinstance(md, TensorStorageMetadata):
            state[name] = torch.empty(md.size, dtype=md.properties.dtype)
        else:
            state[name] = None  # filled with the raw bytes
    load_planner, _ = _planners()
    planner = load_planner(flatten_state_dict=False)
    planner.raw = {}
    try:
        with warnings.catch_warnings():  # "no process group: loading in one process"
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, storage_reader=_reader(path, meta), planner=planner, no_dist=True)
        state.update(planner.raw)
    except (Exception, _checkpoint_exception()) as err:
        raise CheckpointError(f"{path}: cannot read the DCP checkpoint ({_why(err)})") from None
    return state


def _checkpoint_exception() -> type[BaseException]:
    """DCP's error, which derives from ``BaseException`` (not caught by ``Exception``)."""
    from torch.distributed.checkpoint.api import CheckpointException

    return CheckpointException


def _why(err: BaseException) -> str:
    """One line for ``err``: a rank's own error for DCP's (whose text is tracebacks)."""
    failures = getattr(err, "failures", None)
    if isinstance(err, _checkpoint_exception()) and isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))
        inner = first[0] if isinstance(first, tuple) else first
        if isinstance(inner, BaseException):
            return _why(inner)
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def _parameters(meta: Any) -> tuple[list[str], list[str]]:
    """The names of the parameters, and the places of training state, as for a ``.pt``.

    The entries are nested again as they were saved (``planner_data``: each name's
    path) and judged by the rule of :func:`._tree.name_tensors`: optimizer, scheduler
    and scaler state (what ``get_state_dict(model, optim)`` puts under ``optim``) are
    never parameters.
    """
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from ._tree import name_tensors

    floats = [
        name
        for name, md in meta.state_dict_metadata.items()
        if isinstance(md, TensorStorageMetadata) and md.properties.dtype.is_floating_point
    ]
    mapping = meta.planner_data if isinstance(meta.planner_data, dict) else {}
    skeleton: dict[Any, Any] = {}
    by_path: dict[tuple[Any, ...], str] = {}
    for name in meta.state_dict_metadata:
        where = mapping.get(name)
        where = tuple(where) if isinstance(where, (tuple, list)) and where else (name,)
        node = skeleton
        for key in where[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):  # a leaf and a container at one place
                return floats, []
            node = child
        node[where[-1]] = torch.empty(0) if name in floats else None
        by_path[where] = name
    try:
        named, _ = name_tensors(skeleton, "")
    except BoundsError:
        return floats, []
    params = {by_path[p] for p in named.paths.values() if p in by_path}
    return [n for n in floats if n in params], named.skipped


def tensor_names(path: str | Path) -> list[str]:
    """The names of the floating-point parameters of a DCP directory.

    Optimizer and scheduler state are not parameters (:func:`_parameters`).
    """
    return _parameters(read_metadata(path))[0]


def iter_tensors(path: str | Path) -> Iterator[tuple[str, Tensor]]:
    """Yield ``(name, full tensor)`` of each floating-point tensor, one at a time."""
    path = Path(path)
    meta = read_metadata(path)
    for name in tensor_names(path):
        yield name, _load(path, [name], meta)[name]


def report_dcp(path: str | Path, bounds: Any) -> Report:
    """The :class:`~parambounds.Report` of a DCP directory, reading one tensor at a time.

    Args:
        path: the checkpoint directory.
        bounds: a :class:`~parambounds.Bounds`; every pattern must match some tensor.

    Raises:
        CheckpointError: for an unreadable checkpoint.
        BoundsError: for a pattern that matches no tensor, or invalid bounds.
    """
    resolved = bounds._match(tuple(tensor_names(path)))  # unmatched patterns: as elsewhere
    entries = []
    for name, t in iter_tensors(path):
        lo, hi = resolved.lower[name], resolved.upper[name]
        if lo is not None or hi is not None:
            one = type(bounds).from_trees({name: lo}, {name: hi}, penalty=bounds.penalty)
            entries.extend(one.report({name: t}).entries)
        del t  # one tensor in memory at a time
    return Report(tuple(entries))


def load_dcp(path: str | Path, *, lazy: bool = False) -> Checkpoint:
    """Read every entry of a DCP directory: tensors as tensors, the rest as raw bytes.

    Args:
        path: the checkpoint directory.
        lazy: read no tensor now: ``tensors`` then holds stand-ins of the right shape and
            dtype that take no memory (never compute with them), and each tensor is read
            when asked for, by :func:`read_tensor` or when :func:`save_dcp` writes it.
            What the command line does, so that a checkpoint larger than memory can be
            checked and clamped.

    Raises:
        CheckpointError: for an unreadable checkpoint or unsafe metadata.
    """
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = Path(path)
    meta = read_metadata(path)
    if lazy:
        entries = meta.state_dict_metadata
        others = [n for n, md in entries.items() if not isinstance(md, TensorStorageMetadata)]
        state = _load(path, others, meta) if others else {}  # raw bytes: small
        state = {n: state[n] if n in state else _Lazy.like(md) for n, md in entries.items()}
    else:
        state = _load(path, list(meta.state_dict_metadata), meta)
    params, skipped = _parameters(meta)
    tensors = {k: state[k] for k in params}
    return Checkpoint(path, "dcp", tensors, state, skipped=skipped, handle=meta)


def _keep_planner_data(folder: Path, original: Any) -> None:
    """Give the new metadata the original's ``planner_data`` (how names nest).

    Without it, DCP's own loaders (``dcp_to_torch_save``...) return the flat names.
    """
    kept = getattr(original, "planner_data", None)
    if kept is None:
        return
    meta = read_metadata(folder)  # written just now by dcp.save
    meta.planner_data = kept
    tmp = folder / f"{_METADATA}.tmp"
    with open(tmp, "wb") as f:
        pickle.dump(meta, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / _METADATA)


class _Lazy(Tensor):
    """The stand-in of a tensor not read yet: its shape and dtype, no memory."""

    @staticmethod
    def like(md: Any) -> Tensor:
        stand_in = torch.empty((), dtype=md.properties.dtype).expand(md.size)
        return stand_in.as_subclass(_Lazy)


def read_tensor(ckpt: Checkpoint, name: str) -> Tensor:
    """The tensor ``name`` of a DCP checkpoint: the one in memory, or read from disk now.

    Raises:
        CheckpointError: for an unreadable checkpoint.
    """
    t = ckpt.data[name]
    if not isinstance(t, _Lazy):
        return t  # type: ignore[no-any-return]
    return _load(ckpt.path, [name], ckpt.handle)[name]  # type: ignore[no-any-return]


def save_dcp(ckpt: Checkpoint, target: str | Path, fill: Any = None) -> None:
    """Write ``ckpt`` as a new DCP directory at ``target`` (replacing a DCP directory there).

    Tensors of a lazy checkpoint (:func:`load_dcp`) are read one at a time as they are
    written: ``fill(name)`` (by default :func:`read_tensor`) gives each.

    Raises:
        CheckpointError: when ``target`` exists and is not a DCP directory, or its folder
            does not exist.
    """
    import torch.distributed.checkpoint as dcp

    state = dict(ckpt.data)
    state.update(ckpt.tensors)
    _, save_planner = _planners()
    planner = save_planner(flatten_state_dict=False)
    failed: list[BaseException] = []  # dcp.save wraps what fill raises: re-raised as is

    def fill_or_note(name: str) -> Tensor:
        try:
            return fill(name) if fill is not None else read_tensor(ckpt, name)  # type: ignore[no-any-return]
        except BaseException as err:
            failed.append(err)
            raise

    planner.fill = fill_or_note

    def build(tmp: Path) -> None:
        with warnings.catch_warnings():  # "no process group: saving in one process"
            warnings.simplefilter("ignore", UserWarning)
            dcp.save(
                state,
                storage_writer=dcp.FileSystemWriter(str(tmp)),
                planner=planner,
                no_dist=True,
            )
        _keep_planner_data(tmp, ckpt.handle)

    try:
        write_folder(target, build)
    except BaseException:
        if failed:
            raise failed[0] from None
        raise


def write_folder(target: str | Path, build: Any) -> None:
    """Put a DCP checkpoint at ``target``: ``build(tmp)`` writes it into a new folder first.

    The new folder is made beside ``target``; a new ``target`` is that folder renamed
    (with the mode ``mkdir`` would give it); an existing DCP checkpoint has only what
    DCP owns replaced (:func:`_replace_in`). Nothing is left behind on an error.

    Raises:
        CheckpointError: when ``target`` exists and is not a DCP directory, its folder
            does not exist, or the write fails (a full disk).
    """
    target = Path(target)
    if not target.parent.is_dir():
        raise CheckpointError(f"{target}: folder {target.parent} does not exist")
    if target.exists() and not is_dcp(target):
        raise CheckpointError(
            f"{target}: exists and is not a DCP checkpoint directory; refusing to replace it"
        )
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        build(tmp)
        if target.exists():
            _replace_in(target, tmp)
        else:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)  # as mkdir would make it, not mkdtemp's 0700
            tmp.rename(target)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, (OSError, _checkpoint_exception())):  # a full disk, ...
            raise CheckpointError(f"{target}: cannot write: {_why(err)}") from None
        raise
    shutil.rmtree(tmp, ignore_errors=True)


def _data_files(meta: Any) -> set[str]:
    storage = meta.storage_data if isinstance(meta.storage_data, dict) else {}
    return {info.relative_path for info in storage.values()}


def _replace_in(target: Path, new: Path) -> None:
    """Replace the DCP checkpoint in folder ``target`` by the one in ``new``, in place.

    Only what DCP owns changes: the new data files move in under fresh names, then the
    new ``.metadata`` replaces the old one in one rename (the moment the checkpoint
    changes), then the old data files it named are removed. Every other file of the
    folder (``config.json``, a tokenizer, notes), and the folder's mode and owner, stay.
    A crash before that rename leaves the old checkpoint whole (and stray new files).
    """
    old_meta = read_metadata(target)
    meta = read_metadata(new)
    mode = stat.S_IMODE((target / _METADATA).stat().st_mode)
    token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    renamed: dict[str, str] = {}
    for rel in sorted(_data_files(meta)):
        stem, dot, ext = rel.partition(".")
        renamed[rel] = f"{stem}.{token}{dot}{ext.rpartition('.')[2] if dot else ''}"
        os.chmod(new / rel, mode)
        os.replace(new / rel, target / renamed[rel])
    for info in (meta.storage_data or {}).values():
        info.relative_path = renamed[info.relative_path]
    tmp = target / f"{_METADATA}.parambounds-{token}.tmp"
    with open(tmp, "wb") as f:
        pickle.dump(meta, f)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, target / _METADATA)  # the checkpoint is now the new one
    for rel in _data_files(old_meta) - set(renamed.values()):
        (target / rel).unlink(missing_ok=True)
