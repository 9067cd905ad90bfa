"""Rockpool's JSON parameter files (what ``module.save()`` writes).

Nested objects whose leaves are JSON-encoded strings: ``"tau_mem": "0.5"`` for a scalar,
``"weight": "[[0.1, 0.2]]"`` for an array. A leaf whose values are all numbers and
include at least one float is a parameter (a float64 tensor); integer and boolean leaves
are not, and stay as they are. Only the leaves that clamping changed are re-encoded, in
the form they had: a scalar as a scalar, an array as nested lists. Rockpool's
``module.load()`` puts the values in float32 parameters, so bounds are compared and
clamped rounded inward to float32 (``Checkpoint.loaded_as``): ``0.1`` as an upper bound
is written ``0.09999999403953552``, which float32 holds exactly, not ``0.1``, which it
rounds up.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..errors import BoundsError
from ._tree import Named

__all__ = ["JsonFile", "load_json_file"]

_MAX_BYTES = 2**30


def _numbers(v: Any) -> tuple[bool, bool]:
    """``(all numbers, any float)`` of a decoded leaf (nested lists allowed)."""
    if isinstance(v, bool):
        return True, False
    if isinstance(v, int):
        return True, False
    if isinstance(v, float):
        return True, True
    if isinstance(v, list):
        anyf = False
        for x in v:
            ok, f = _numbers(x)
            if not ok:
                return False, False
            anyf = anyf or f
        return True, anyf
    return False, False


class JsonFile:
    """A Rockpool parameter file: its float leaves as tensors, and where they came from."""

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path = path
        self.data = data
        self.named = Named()
        self.slots: dict[str, tuple[dict[str, Any], str]] = {}
        self._walk(data, (), "")

    def _walk(self, node: dict[str, Any], path: tuple[Any, ...], prefix: str) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                self._walk(value, (*path, key), f"{name}.")
                continue
            if not isinstance(value, str):
                continue
            try:
                decoded = json.loads(value)
            except (ValueError, RecursionError):
                continue
            ok, anyf = _numbers(decoded)
            if not (ok and anyf):
                continue
            try:
                t = torch.tensor(decoded, dtype=torch.float64)
            except OverflowError:
                raise BoundsError(
                    f"{self.path}: '{name}' holds an integer too large for a float"
                ) from None
            except (TypeError, ValueError, RuntimeError):  # ragged lists: not an array
                continue
            self.named.add(name, (*path, key), t, str(self.path))
            self.slots[name] = (node, key)

    def write_back(self, changed: set[str]) -> None:
        """Re-encode the leaves named in ``changed``, each in its original form."""
        for name in changed:
            node, key = self.slots[name]
            t = self.named.tensors[name]
            node[key] = json.dumps(t.item() if t.dim() == 0 else t.tolist())


def load_json_file(path: Path) -> JsonFile:
    """Read a Rockpool parameter file.

    Raises:
        BoundsError: naming the file when it is not one.
    """
    if path.stat().st_size > _MAX_BYTES:
        raise BoundsError(f"{path}: too large for a Rockpool parameter file")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise BoundsError(f"{path}: malformed JSON (not UTF-8, byte {err.start})") from None
    except RecursionError:
        raise BoundsError(f"{path}: malformed JSON (nested too deeply)") from None
    except ValueError as err:
        raise BoundsError(f"{path}: malformed JSON ({err})") from None
    if not isinstance(data, dict):
        raise BoundsError(f"{path}: not a Rockpool parameter file (top level is not an object)")
    return JsonFile(path, data)
