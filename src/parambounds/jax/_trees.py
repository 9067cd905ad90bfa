"""The trees for JAX: leaves named by key path, bound trees matched to parameter trees.

Any pytree works (dicts, lists, tuples, ``None``-free registered nodes such as equinox
modules and flax ``FrozenDict``s). A leaf's name is its key path joined with ``.``
(``1_LIFJax.tau_mem``, ``layers.0.weight``): dict keys, sequence indices and attribute
names, as Rockpool's ``parameters()`` and PyTorch's ``named_parameters()`` spell them.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

from ..errors import BoundsError

__all__ = [
    "align",
    "bound_leaves",
    "first_index",
    "key_name",
    "make_bounds",
    "named_leaves",
    "show",
]


def key_name(path: tuple[Any, ...]) -> str:
    """Join a ``jax.tree_util`` key path with dots."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            parts.append(str(k.key))
        else:  # pragma: no cover - a key type added by a future jax
            parts.append(str(k).lstrip(".[").rstrip("]"))
    return ".".join(parts)


def named_leaves(tree: Any) -> tuple[list[str], list[Any], Any]:
    """Names, leaves and treedef of ``tree`` (``None`` is an empty subtree, as in jax)."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return [key_name(p) for p, _ in flat], [x for _, x in flat], treedef


def bound_leaves(bounds: Any) -> dict[str, Any]:
    """``{name: leaf}`` of a bounds tree, ``None`` leaves kept (open sides)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(bounds, is_leaf=lambda x: x is None)
    return {key_name(p): b for p, b in flat}


def show(name: str) -> str:
    """A leaf's name in a message: ``<root>`` for the tree that is one leaf."""
    return name or "<root>"


def first_index(mask: Any) -> tuple[int, ...] | None:
    """The index of the first ``True`` of a NumPy ``mask`` (``()`` when 0-d), else ``None``."""
    found = np.argwhere(mask)
    return tuple(int(i) for i in found[0]) if len(found) else None


def align(names: list[str], bounds: Any, which: str) -> list[Any]:
    """The leaves of ``bounds`` in the order of ``names``, matched by key path.

    Raises:
        BoundsError: naming the first path where the two trees differ.
    """
    by_name = bound_leaves(bounds)
    if list(by_name) == names:  # the common case: the same structure
        return list(by_name.values())
    known = set(names)
    for name in names:
        if name not in by_name:
            prefix = next((b for b in by_name if name.startswith(b + ".") or not b), None)
            if prefix is not None:
                raise BoundsError(
                    f"{which} has a leaf at '{show(prefix)}' where the parameters have a "
                    f"subtree (with '{name}'): the nesting differs"
                )
            raise BoundsError(f"{which} has no entry for '{show(name)}', a key of the parameters")
    for b, v in by_name.items():
        if b not in known and v is not None:  # None: open, or jax's empty subtree
            under = next((n for n in names if b.startswith(n + ".")), None)
            if under is not None:
                raise BoundsError(
                    f"{which} has a subtree at '{show(under)}' where the parameters have a "
                    f"leaf: the nesting differs"
                )
            raise BoundsError(f"{which} has an entry '{b}' that the parameters do not have")
    return [by_name[n] for n in names]


def make_bounds(params: Any) -> tuple[Any, Any]:
    """Build ``(lower, upper)`` templates shaped like ``params``, unbounded everywhere.

    A drop-in for Rockpool's ``jax_loss.make_bounds``: every leaf of ``lower`` is
    ``-inf`` and every leaf of ``upper`` is ``inf`` (plain floats); the trees keep the
    structure (and node types) of ``params``. Set a leaf to a number, an array that
    broadcasts to the parameter, or ``None`` (open).

    >>> import jax.numpy as jnp
    >>> lower, upper = make_bounds({"w": jnp.zeros(2), "lif": {"tau": jnp.ones(3)}})
    >>> lower
    {'lif': {'tau': -inf}, 'w': -inf}
    >>> upper["lif"]["tau"]
    inf
    """
    return (
        jax.tree_util.tree_map(lambda _: -math.inf, params),
        jax.tree_util.tree_map(lambda _: math.inf, params),
    )
