"""Checkpoints on disk, for the command line: read their parameters, write them back safely.

One module per format, each reading a file into a :class:`Checkpoint` and writing one back:

- :mod:`._torch`: files of ``torch.save`` (``.pt``, ``.pth``), read with
  ``torch.load(..., mmap=True, weights_only=True)``; nothing in a file can run;
- :mod:`._safetensors`: ``.safetensors``, mapped lazily, metadata kept;
- :mod:`._rockpool_json`: Rockpool's parameter files (``.json``);
- :mod:`._dcp`: ``torch.distributed.checkpoint`` folders.

Beside them: :mod:`._tree` (which tensors of a file are parameters, by name),
:mod:`._reparam` (parameters saved after ``Bounds.reparametrize_``), :mod:`._patch`
(a clamped ``.pt`` as the original with the changed storages patched), :mod:`._dcp_layout`
and :mod:`._dcp_patch` (a DCP folder checked and clamped in its data files), :mod:`._write`
(atomic writes, never over a user's file without ``--force``), :mod:`._apply` (bounds
applied to a checkpoint's tensors) and :mod:`._files` (the format chosen for a path).

The library never imports this package: the command line does.
"""

from ._apply import Target, aliases, make_targets, scalar, scan_targets
from ._checkpoint import Checkpoint, CheckpointError
from ._dcp import is_dcp, load_dcp, read_metadata, read_tensor, report_dcp, save_dcp
from ._dcp_patch import clamp_dcp, scan_dcp
from ._files import clamp_checkpoint, format_of, load_checkpoint, save_checkpoint
from ._write import atomic_write, lock_target, resolve_target

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "Target",
    "aliases",
    "atomic_write",
    "clamp_checkpoint",
    "clamp_dcp",
    "format_of",
    "is_dcp",
    "load_checkpoint",
    "load_dcp",
    "lock_target",
    "make_targets",
    "read_metadata",
    "read_tensor",
    "report_dcp",
    "resolve_target",
    "save_checkpoint",
    "save_dcp",
    "scalar",
    "scan_dcp",
    "scan_targets",
]
