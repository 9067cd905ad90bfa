"""Pick the framework that a tree of parameters comes from, as einops does.

The spec (:mod:`parambounds.spec`) knows no framework. Each framework is one backend
module with ``framework_name``, ``is_appropriate_type(tree)`` and the functions that apply
a resolved spec to its trees. :func:`get_backend` looks only at frameworks that are
already imported (in ``sys.modules``): a backend is never imported unless the user's own
parameters come from its framework. Frameworks may be missing, heavy to import, or
broken in a given environment; none of that may stop the others from working.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from .errors import BoundsError

__all__ = ["get_backend"]


def _torch() -> ModuleType:
    from .torch import _spec as torch_spec

    return torch_spec


def _jax() -> ModuleType:
    from .jax import _spec

    return _spec


#: Framework (its top-level module) -> the loader of the parambounds module that backs it.
#: Plain ``import`` statements, which ``torch.compile`` can trace, unlike ``importlib``.
_BACKENDS = {"torch": _torch, "jax": _jax}
#: Types that decide their backend by themselves (modules, arrays), once claimed.
_BY_TYPE: dict[type, ModuleType] = {}


def _loaded(framework: str) -> bool:
    return sys.modules.get(framework) is not None


def get_backend(tree: Any) -> ModuleType:
    """Return the backend for ``tree``: the first loaded framework that claims it.

    A tree no backend claims (an empty mapping, a list of floats) goes to the first
    loaded framework, whose own checks then name what is wrong.

    Raises:
        BoundsError: when no supported framework is loaded.
    """
    backend = _BY_TYPE.get(type(tree))
    if backend is not None:
        return backend
    loaded = [name for name in _BACKENDS if _loaded(name)]
    backends = [_BACKENDS[name]() for name in loaded]
    for backend in backends:
        if backend.is_appropriate_type(tree):
            if not isinstance(tree, (Mapping, list, tuple)):
                _BY_TYPE[type(tree)] = backend
            return backend
    if backends:
        return backends[0]
    raise BoundsError(
        f"cannot apply bounds to {type(tree).__name__}: neither torch nor jax is loaded; "
        "pass a torch model or state_dict, or a JAX pytree"
    )
