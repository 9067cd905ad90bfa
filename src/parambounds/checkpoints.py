"""Checkpoints on disk, for the command line: read their tensors, write them back safely.

Formats, by file name:

- ``.pt``, ``.pth`` (and anything else): PyTorch files, read with
  ``torch.load(..., weights_only=True)`` only, so a checkpoint can never run code. A
  state_dict, or a dict that holds one under ``state_dict`` or ``model``; nested dicts are
  named with dots. Everything else in the file (epoch, optimizer state) is kept as is.
- ``.safetensors``: through the ``safetensors`` package (``pip install
  'parambounds[safetensors]'``), metadata kept.
- ``.json``: Rockpool's parameter files (what ``module.save()`` writes): nested dicts whose
  leaves are JSON-encoded strings; lists of numbers become tensors, and only the entries
  that change are re-encoded.

The library never imports this module.
"""

from __future__ import annotations

import json
import os
import pickle
import stat
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .errors import BoundsError

__all__ = ["Checkpoint", "CheckpointError", "load_checkpoint", "save_checkpoint"]

_WRAPPERS = ("state_dict", "model")


class CheckpointError(BoundsError):
    """A checkpoint that cannot be read or written; the message names the file."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: its floating-point tensors by name, and everything else."""

    path: Path
    format: str
    tensors: dict[str, Tensor]
    data: Any
    metadata: dict[str, str] | None = None
    # Rockpool JSON: name -> (container, key), to write changed tensors back.
    slots: dict[str, tuple[dict[str, Any], str]] = field(default_factory=dict)


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


def _collect(node: Mapping[str, Any], prefix: str, out: dict[str, Tensor]) -> None:
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, Tensor):
            if value.is_floating_point():
                out[name] = value
        elif isinstance(value, Mapping):
            _collect(value, f"{name}.", out)


def _load_torch(path: Path) -> Checkpoint:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{path}: refused: loading it needs full unpickling, which can run code; only "
            f"tensors, numbers, strings and containers are read ({first})"
        ) from None
    except Exception as err:  # truncated or not a PyTorch file at all
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({detail})") from None
    root = data
    if isinstance(data, Mapping):
        for key in _WRAPPERS:
            if isinstance(data.get(key), Mapping):
                root = data[key]
                break
    if isinstance(root, Tensor):
        raise CheckpointError(f"{path}: holds a single tensor, not a state_dict")
    if not isinstance(root, Mapping):
        raise CheckpointError(f"{path}: holds a {type(root).__name__}, not a state_dict")
    tensors: dict[str, Tensor] = {}
    _collect(root, "", tensors)
    return Checkpoint(path, "torch", tensors, data)


def _safetensors() -> Any:
    try:
        import safetensors.torch as st
    except ImportError:
        raise CheckpointError(
            "reading .safetensors files needs the safetensors package: "
            "pip install 'parambounds[safetensors]'"
        ) from None
    return st


def _load_safetensors(path: Path) -> Checkpoint:
    st = _safetensors()
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
        data = st.load_file(str(path))
    except Exception as err:
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: not a readable safetensors file ({detail})") from None
    tensors = {k: v for k, v in data.items() if v.is_floating_point()}
    return Checkpoint(path, "safetensors", tensors, data, metadata)


def _load_rockpool_json(path: Path) -> Checkpoint:
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: malformed JSON ({err})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a Rockpool parameter file (top level is not an object)")
    tensors: dict[str, Tensor] = {}
    slots: dict[str, tuple[dict[str, Any], str]] = {}

    def walk(node: dict[str, Any], prefix: str) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(value, f"{name}.")
                continue
            if not isinstance(value, str):
                continue
            try:
                decoded = json.loads(value)
            except json.JSONDecodeError:
                continue
            if isinstance(decoded, list):
                try:
                    tensors[name] = torch.tensor(decoded, dtype=torch.float64)
                except (TypeError, ValueError, RuntimeError):
                    continue
                slots[name] = (node, key)

    walk(data, "")
    return Checkpoint(path, "rockpool-json", tensors, data, slots=slots)


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint's tensors, without ever running code from it.

    Raises:
        CheckpointError: naming the file, when it is missing, a directory, unreadable,
            truncated, or needs full unpickling.
    """
    path = Path(path)
    if path.is_dir() and (path / ".metadata").is_file():  # a sharded (DCP) checkpoint
        from .checkpoints_dcp import load_dcp

        return load_dcp(path)
    _check_readable(path)
    fmt = _format_of(path)
    if fmt == "safetensors":
        return _load_safetensors(path)
    if fmt == "rockpool-json":
        return _load_rockpool_json(path)
    return _load_torch(path)


def _atomic_write(target: Path, write: Callable[[Path], None], mode_from: Path | None) -> None:
    """Write through a temporary file in ``target``'s folder, then rename it into place."""
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        if mode_from is not None and mode_from.exists():
            os.chmod(tmp, stat.S_IMODE(mode_from.stat().st_mode))
        else:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_checkpoint(ckpt: Checkpoint, target: str | Path) -> None:
    """Write ``ckpt`` (with its possibly modified tensors) to ``target``, atomically.

    Raises:
        CheckpointError: when ``target``'s folder does not exist or its format differs.
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
    if ckpt.format == "safetensors":
        st = _safetensors()

        def write(tmp: Path) -> None:
            st.save_file(ckpt.data, str(tmp), metadata=ckpt.metadata)

    elif ckpt.format == "rockpool-json":
        for name, (node, key) in ckpt.slots.items():
            new = json.dumps(ckpt.tensors[name].tolist())
            if json.loads(node[key]) != json.loads(new):
                node[key] = new

        def write(tmp: Path) -> None:
            with open(tmp, "w") as f:
                json.dump(ckpt.data, f)

    else:

        def write(tmp: Path) -> None:
            torch.save(ckpt.data, tmp)

    _atomic_write(target, write, mode_from)
