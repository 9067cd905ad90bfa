"""The trees: walking nested parameter structures and matching bound trees to them.

A tree is a :class:`~collections.abc.Mapping` (``dict``, ``OrderedDict``, Rockpool's
``TorchModuleParameters``), a ``list`` or a ``tuple``, nested freely; anything else is a
leaf. A :class:`torch.nn.Module` stands for the flat dict of its ``named_parameters()``
(the names of its ``state_dict``). Leaves are named by their path, keys joined with
``.`` (``1_LIFTorch.tau_syn``), as PyTorch names parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..errors import BoundsError

__all__ = ["align", "as_tree", "flatten", "join_path", "make_bounds", "named_leaves"]

Tree = Any
TreeDef = Any
# Leaf types checked first, before the slower abstract ``Mapping`` check.
_PLAIN_LEAVES = (torch.Tensor, float, int, type(None))


def as_tree(params: Tree) -> Tree:
    """Return ``params``, or the dict of ``named_parameters()`` for a module."""
    if isinstance(params, torch.nn.Module):
        return dict(params.named_parameters())
    return params


def flatten(tree: Tree) -> tuple[TreeDef, list[Any]]:
    """Flatten ``tree`` into a hashable structure (keys in their order) and its leaves.

    Written without closures (a recursive closure is a reference cycle: it would keep
    the leaves, and their autograd graphs, alive until the cyclic collector runs).
    """
    leaves: list[Any] = []
    return _flatten_into(tree, leaves.append), leaves


def _flatten_into(node: Any, append: Callable[[Any], None]) -> TreeDef:
    if isinstance(node, _PLAIN_LEAVES):
        append(node)
        return None
    if isinstance(node, Mapping):
        keys = tuple(node)
        return (keys, _children([node[k] for k in keys], append))
    if isinstance(node, (list, tuple)):
        return (len(node), _children(node, append))
    append(node)
    return None


def _children(nodes: Any, append: Callable[[Any], None]) -> tuple[TreeDef, ...]:
    defs: list[TreeDef] = []
    for c in nodes:
        if isinstance(c, _PLAIN_LEAVES):  # the common case, without a call
            append(c)
            defs.append(None)
        else:
            defs.append(_flatten_into(c, append))
    return tuple(defs)


def join_path(path: str, key: Any) -> str:
    """Append ``key`` to ``path`` with a dot, as ``named_parameters()`` does."""
    return f"{path}.{key}" if path else str(key)


def _display(path: str) -> str:
    return path or "<root>"


def named_leaves(tree: Tree, prefix: str = "") -> list[tuple[str, Any]]:
    """Return ``(path, leaf)`` pairs in the order of :func:`flatten`."""
    out: list[tuple[str, Any]] = []
    _named_into(tree, "", prefix, out)
    return out


def _named_into(node: Any, path: str, prefix: str, out: list[tuple[str, Any]]) -> None:
    if isinstance(node, Mapping) and not isinstance(node, torch.Tensor):
        for k in node:
            _named_into(node[k], join_path(path, k), prefix, out)
    elif isinstance(node, (list, tuple)):
        for i, c in enumerate(node):
            _named_into(c, join_path(path, i), prefix, out)
    else:
        out.append((path or prefix, node))


def _kind(node: Any) -> str:
    if isinstance(node, torch.Tensor):
        return "a tensor"
    if isinstance(node, Mapping):
        return "a mapping"
    if isinstance(node, (list, tuple)):
        return f"a {type(node).__name__} of length {len(node)}"
    return f"a leaf ({type(node).__name__})"


def align(params: Tree, bounds: Tree, which: str) -> list[Any]:
    """Return the leaves of ``bounds`` in the leaf order of ``params``, matched by key.

    Args:
        params: the parameter tree.
        bounds: a tree of bounds with the same keys and nesting.
        which: the argument's name, for messages (``"lower_bounds"``).

    Raises:
        BoundsError: naming the path where the two trees differ.
    """
    out: list[Any] = []
    _align_into(params, bounds, "", which, out)
    return out


def _nesting(which: str, path: str, p: Any, b: Any) -> BoundsError:
    return BoundsError(
        f"{which} has {_kind(b)} at '{_display(path)}' where the parameters have "
        f"{_kind(p)}: the nesting differs"
    )


def _align_into(p: Any, b: Any, path: str, which: str, out: list[Any]) -> None:
    if isinstance(p, torch.Tensor) or not isinstance(p, (Mapping, list, tuple)):
        if isinstance(b, (Mapping, list, tuple)):
            raise _nesting(which, path, p, b)
        out.append(b)
    elif isinstance(p, Mapping):
        if not isinstance(b, Mapping):
            raise _nesting(which, path, p, b)
        for k in p:
            if k not in b:
                raise BoundsError(
                    f"{which} has no entry for '{join_path(path, k)}', a key of the parameters"
                )
        for k in b:
            if k not in p:
                extra = join_path(path, k)
                raise BoundsError(f"{which} has an entry '{extra}' that the parameters do not have")
        for k in p:
            _align_into(p[k], b[k], join_path(path, k), which, out)
    else:
        if not isinstance(b, (list, tuple)) or len(b) != len(p):
            raise _nesting(which, path, p, b)
        for i, (pc, bc) in enumerate(zip(p, b)):
            _align_into(pc, bc, join_path(path, i), which, out)


def _map(tree: Tree, fn: Callable[[Any], Any]) -> Tree:
    if isinstance(tree, Mapping):
        items = [(k, _map(v, fn)) for k, v in tree.items()]
        try:
            return type(tree)(items)  # type: ignore[call-arg]
        except TypeError:
            return dict(items)
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(_map(c, fn) for c in tree))
    if isinstance(tree, (list, tuple)):
        return type(tree)(_map(c, fn) for c in tree)
    return fn(tree)


def make_bounds(params: Tree) -> tuple[Tree, Tree]:
    """Build ``(lower, upper)`` templates shaped like ``params``, unbounded everywhere.

    Every leaf of ``lower`` is ``-inf`` and every leaf of ``upper`` is ``inf`` (plain
    floats). Containers keep their types where they can be rebuilt from items; tensors
    are never copied. A module stands for the dict of its ``named_parameters()``.

    Examples:
        >>> lower, upper = make_bounds({"w": torch.zeros(2), "lif": {"tau": torch.ones(3)}})
        >>> lower
        {'w': -inf, 'lif': {'tau': -inf}}
        >>> upper["lif"]["tau"]
        inf
    """
    tree = as_tree(params)
    return _map(tree, lambda _: -math.inf), _map(tree, lambda _: math.inf)
