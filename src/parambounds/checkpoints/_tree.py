"""The trees of a checkpoint: every tensor with its dotted name, and what is not a parameter.

A ``.pt`` file holds nested dicts, lists and tuples. The parameters are the floating-point
tensors of its state_dict: the dict under a wrapper key (``state_dict``, ``model``, ...)
when there is one, else the whole file less the usual training-state containers
(optimizer, scheduler and scaler state, Lightning's loops and callbacks), which are never
parameters whatever the patterns say. Names join keys and list indices with dots
(``x.tau_mem.0``); two entries that end up with the same name are refused, naming both.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from ..errors import BoundsError

__all__ = ["WRAPPERS", "Named", "in_memory", "name_tensors", "walk_tensors", "where"]

#: Keys under which a checkpoint commonly holds the model's state_dict (first wins).
WRAPPERS = ("state_dict", "model_state_dict", "model", "module")

#: Top-level keys of training state that are never parameters.
_NOT_PARAMETERS = frozenset(
    {
        "optimizer",
        "optimizers",
        "optimizer_state",
        "optimizer_state_dict",
        "optimizer_states",
        "optim",
        "optim_state",
        "opt",
        "lr_scheduler",
        "lr_schedulers",
        "scheduler",
        "schedulers",
        "scheduler_state_dict",
        "scaler",
        "grad_scaler",
        "amp",
        "callbacks",
        "loops",
        "hyper_parameters",
        "hparams",
        "rng_state",
        "rng_states",
    }
)

Path_ = tuple[Any, ...]


def in_memory(t: Tensor) -> bool:
    """Whether ``t`` is a plain strided tensor with values: not sparse, nested or meta."""
    return t.layout == torch.strided and t.device.type != "meta" and not t.is_nested


def unreachable_tensor(node: Any) -> str | None:
    """Where a tensor sits that no name can reach (in a set, or as a dict key), if any.

    ``torch.load(weights_only=True)`` builds sets and tensor dict keys; parambounds
    names tensors by keys and indices, so such a tensor could neither be checked nor
    clamped (nor kept in step with a clamped tensor it shares memory with).
    """
    stack: list[tuple[Any, tuple[Any, ...]]] = [(node, ())]
    seen: set[int] = set()
    while stack:
        x, path = stack.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, Mapping):
            for key, value in x.items():
                if _holds_tensor(key):
                    return f"a dict key under {where(path)}"
                stack.append((value, (*path, key)))
        elif isinstance(x, (list, tuple)):
            stack.extend((v, (*path, i)) for i, v in enumerate(x))
        elif isinstance(x, (set, frozenset)):
            if any(_holds_tensor(v) for v in x):
                return f"a set at {where(path)}"
    return None


def _holds_tensor(x: Any) -> bool:
    if isinstance(x, Tensor):
        return True
    if isinstance(x, (tuple, frozenset, set, list)):
        return any(_holds_tensor(v) for v in x)
    return False


def where(path: Path_) -> str:
    """An entry's place in the file, as Python subscripts: ``['a']['tau_mem']``, ``[0]``."""
    return "".join(f"[{k!r}]" for k in path) or "<root>"


def _is_training_state(node: Any) -> bool:
    """An optimizer or scheduler ``state_dict``, recognised by its keys."""
    if not isinstance(node, Mapping):
        return False
    keys = set(node)
    return {"state", "param_groups"} <= keys or (
        "last_epoch" in keys and bool(keys & {"base_lrs", "_step_count"})
    )


def walk_tensors(node: Any, path: Path_ = ()) -> Iterator[tuple[Path_, Tensor]]:
    """Every tensor under ``node`` (dicts, lists, tuples), with its path."""
    if isinstance(node, Tensor):
        yield path, node
    elif isinstance(node, Mapping):
        for key, value in node.items():
            yield from walk_tensors(value, (*path, key))
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from walk_tensors(value, (*path, i))


def _children(node: Any) -> Iterator[tuple[Any, Any]]:
    if isinstance(node, Mapping):
        yield from node.items()
    elif isinstance(node, (list, tuple)):
        yield from enumerate(node)


class Named:
    """The tensors of a checkpoint's parameter tree, by dotted name.

    Attributes:
        tensors: floating-point tensors by name: the parameters.
        others: every other tensor of the tree by name (integer buffers, ...).
        paths: name -> path in the file, for messages.
        skipped: places of the containers that are not parameters (optimizer state, ...).
    """

    def __init__(self) -> None:
        self.tensors: dict[str, Tensor] = {}
        self.others: dict[str, Tensor] = {}
        self.paths: dict[str, Path_] = {}
        self.skipped: list[str] = []

    def add(self, name: str, path: Path_, tensor: Tensor, file: str) -> None:
        """Record one tensor; refuse a name that another entry already has."""
        if name in self.paths:
            raise BoundsError(
                f"{file}: two entries are both named '{name}': {where(self.paths[name])} "
                f"and {where(path)}; rename one (nothing was checked)"
            )
        self.paths[name] = path
        (self.tensors if tensor.is_floating_point() else self.others)[name] = tensor

    def visit(self, node: Any, path: Path_, prefix: str, file: str) -> None:
        """Name every tensor under ``node``, skipping optimizer and scheduler states."""
        for key, value in _children(node):
            name = f"{prefix}{key}"
            if isinstance(value, Tensor):
                self.add(name, (*path, key), value, file)
            elif _is_training_state(value):
                self.skipped.append(where((*path, key)))
            elif isinstance(value, (Mapping, list, tuple)):
                self.visit(value, (*path, key), f"{name}.", file)


def name_tensors(data: Any, file: str) -> tuple[Named, Path_]:
    """Find the parameter tree of a loaded ``.pt`` file and name its tensors.

    Returns:
        the named tensors, and the path of the parameter tree in the file.

    Raises:
        BoundsError: for a file that holds no dict, or two entries with the same name.
    """
    if isinstance(data, Tensor):
        raise BoundsError(f"{file}: holds a single tensor, not a state_dict")
    if not isinstance(data, Mapping):
        raise BoundsError(f"{file}: holds a {type(data).__name__}, not a state_dict")
    named = Named()
    for key in WRAPPERS:
        if isinstance(data.get(key), Mapping):
            named.skipped += [where((k,)) for k in data if k != key]
            named.visit(data[key], (key,), "", file)
            return named, (key,)
    top: dict[Any, Any] = {}
    for key, value in data.items():
        if isinstance(key, str) and key in _NOT_PARAMETERS and not isinstance(value, Tensor):
            named.skipped.append(where((key,)))
        else:
            top[key] = value
    named.visit(top, (), "", file)
    return named, ()
