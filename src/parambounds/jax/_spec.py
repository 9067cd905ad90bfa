"""The JAX backend of the spec: a resolved :class:`~parambounds.Bounds` applied to pytrees."""

from __future__ import annotations

from typing import Any

import jax

__all__ = ["framework_name", "is_appropriate_type"]

framework_name = "jax"


def is_appropriate_type(tree: Any) -> bool:
    """Whether ``tree`` holds JAX arrays."""
    return any(isinstance(x, jax.Array) for x in jax.tree_util.tree_leaves(tree))
