"""The loaded checkpoint, in any format, and the error that names the file."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from ..errors import BoundsError
from ._reparam import Reparametrized
from ._safetensors import SafetensorsFile
from ._tree import walk_tensors, where

__all__ = ["Checkpoint", "CheckpointError"]


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
        loaded_as: the dtype the format's own loader casts the parameters to, when it
            differs from the one they are read in (float32 for Rockpool's JSON files).
        local_shards: a ``.pt`` of DTensors, each replaced in ``data`` by its local
            shard: written back only by patching the file.
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
    loaded_as: Any = None
    local_shards: bool = False

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
