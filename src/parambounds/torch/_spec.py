"""The torch backend of the spec: a resolved :class:`~parambounds.Bounds` applied to torch.

Names are those of ``named_parameters()`` (or a ``state_dict``'s keys); the per-step
work goes through the cached plans and kernels of :mod:`parambounds.torch._plan`.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..errors import BoundsError
from ..matching import Resolved, Spec, match_indices, with_pattern
from ..report import Report
from ._constraints import project_plan_, projection, reparametrize_plan_, run_projection_
from ._cost import tree_cost
from ._plan import Plan, get_plan
from ._report import compute_report
from ._trees import flatten

__all__ = [
    "Model",
    "attach",
    "bounds_of",
    "compute_report",
    "constrain",
    "cost",
    "framework_name",
    "is_appropriate_type",
    "plan",
    "project",
    "project_",
    "reparametrize_",
    "report",
    "resolve",
    "unconstrain",
]

framework_name = "torch"

#: What bounds apply to: a module (its ``named_parameters()``), or a flat mapping of
#: names to tensors such as a ``state_dict``.
Model = torch.nn.Module | Mapping[str, Tensor]


#: Inside ``torch.compile``: run the (untraceable) ``fnmatch`` matching when tracing,
#: and keep its result (a tuple of integers) as a constant of the graph.
@torch.compiler.assume_constant_result
def _constant_match(patterns: tuple[str, ...], names: tuple[str, ...]) -> tuple[int, ...]:
    return match_indices(patterns, names)


def is_appropriate_type(tree: Any) -> bool:
    """Whether ``tree`` is a torch module, tensor, or a mapping of tensors."""
    if isinstance(tree, (torch.nn.Module, Tensor)):
        return True
    if isinstance(tree, Mapping):
        return isinstance(next(iter(tree.values()), None), Tensor)
    return False


def resolve(bounds: Spec, model: Model) -> tuple[Resolved, dict[str, Tensor]]:
    """Match ``bounds`` to the parameters of ``model`` (cached per module)."""
    if isinstance(model, Mapping):  # a state_dict: names to tensors, resolved each time
        params = dict(model)
        for name, t in params.items():
            if not isinstance(t, Tensor):
                raise BoundsError(f"'{name}' must be a tensor, got {type(t).__name__}")
        matcher = _constant_match if torch.compiler.is_compiling() else None
        return bounds._match(tuple(params), matcher), params
    if not isinstance(model, torch.nn.Module):
        raise BoundsError(
            f"model must be a torch.nn.Module or a mapping of names to tensors, "
            f"got {type(model).__name__}"
        )
    params = _parameters(model)
    names = tuple(params)
    if torch.compiler.is_compiling():  # fnmatch is not traceable: match at trace time
        return bounds._match(names, _constant_match), params
    resolved = bounds._cache.get(model)
    if resolved is None or resolved.names != names:
        resolved = bounds._match(names)
        bounds._cache[model] = resolved
    return resolved, params


def plan(bounds: Spec, model: Model) -> tuple[Plan, list[Tensor], Resolved]:
    """The cached plan of ``model`` under ``bounds``, its leaves and the resolved spec."""
    resolved, params = resolve(bounds, model)
    seen = _PARAMS.get(model) if isinstance(model, torch.nn.Module) else None
    if seen is not None and seen[1] is params:  # unchanged: flattened once
        treedef, leaves = seen[3]
    else:
        treedef, leaves = flatten(params)
    try:
        got = get_plan(params, treedef, leaves, resolved.lower, resolved.upper)
    except BoundsError as err:
        raise with_pattern(err, resolved) from None
    return got, leaves, resolved


def bounds_of(bounds: Spec, model: Model) -> tuple[dict[str, Any], dict[str, Any]]:
    """Flat ``(lower, upper)`` dicts by parameter name."""
    resolved, _ = resolve(bounds, model)
    return dict(resolved.lower), dict(resolved.upper)


def cost(bounds: Spec, model: Model) -> Tensor:
    """The penalty of every bounded parameter."""
    resolved, params = resolve(bounds, model)
    try:
        return tree_cost(params, resolved.lower, resolved.upper, bounds.penalty)
    except BoundsError as err:
        raise with_pattern(err, resolved) from None


def project_(bounds: Spec, model: Model) -> None:
    """Clamp every bounded parameter into its bounds, in place."""
    got, leaves, resolved = plan(bounds, model)
    seen = _PARAMS.get(model) if isinstance(model, torch.nn.Module) else None
    if seen is None or seen[3][1] is not leaves:  # a state_dict, or parametrized values
        project_plan_(got, leaves, list(resolved.names))
        return
    steps = seen[4].get(id(got), (None, None))
    if steps[0] is not got:  # worked out once per plan of these very leaves
        seen[4].clear()  # only the latest plan's
        steps = seen[4][id(got)] = (got, projection(got, leaves))
    if steps[1] is None:
        project_plan_(got, leaves, list(resolved.names))
    else:
        run_projection_(steps[1])


def attach(bounds: Spec, optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> Any:
    """Project ``model`` after every ``optimizer.step()``; returns the hook's handle."""
    plan(bounds, model)  # validate now, not at the first step

    def hook(opt: Any, args: Any, kwargs: Any) -> None:  # noqa: ARG001
        project_(bounds, model)

    return optimizer.register_step_post_hook(hook)


def reparametrize_(bounds: Spec, model: torch.nn.Module) -> torch.nn.Module:
    """Register bounded parametrizations on every bounded parameter of ``model``."""
    got, _, resolved = plan(bounds, model)
    return reparametrize_plan_(model, got, list(resolved.names))


def report(bounds: Spec, model: Model) -> Report:
    """The :class:`~parambounds.Report` of ``model`` under ``bounds``."""
    got, leaves, resolved = plan(bounds, model)
    return compute_report(got, leaves, list(resolved.names))


def _in_place(what: str, instead: str) -> BoundsError:
    return BoundsError(f"{what} returns a new JAX pytree; for torch, {instead}")


def project(bounds: Spec, model: Model) -> Any:  # noqa: ARG001
    """Not for torch: torch parameters are projected in place."""
    raise _in_place("project", "use bounds.project_(model), which keeps the Parameter objects")


def unconstrain(bounds: Spec, model: Model) -> Any:  # noqa: ARG001
    """Not for torch: see :func:`reparametrize_`."""
    raise _in_place("unconstrain", "use bounds.reparametrize_(model)")


def constrain(bounds: Spec, model: Model) -> Any:  # noqa: ARG001
    """Not for torch: see :func:`reparametrize_`."""
    raise _in_place("constrain", "use bounds.reparametrize_(model)")


#: Per model: (registrations seen, its effective parameters, their module slots).
_PARAMS: weakref.WeakKeyDictionary[torch.nn.Module, Any] = weakref.WeakKeyDictionary()
#: How many parameters and modules have been registered anywhere (while watched).
_registrations = [0]


def _count_registration(*_args: Any) -> None:
    _registrations[0] += 1


def _watch_registrations() -> None:
    """Count registrations of parameters and modules, from the first use of a spec on."""
    if not _registrations[0]:
        _registrations[0] = 1
        torch.nn.modules.module.register_module_parameter_registration_hook(_count_registration)
        torch.nn.modules.module.register_module_module_registration_hook(_count_registration)


def _parameters(model: torch.nn.Module) -> dict[str, Tensor]:
    """:func:`_effective_parameters`, the same dict each step while nothing changed.

    Unchanged means: no parameter or module registered anywhere since (global
    registration hooks count them), and every parameter still in its module's slot. So
    the per-step cost is a few lookups, and the dict's identity lets :func:`get_plan`
    find its plan at once. A model with parametrizations is walked every time (its
    values are computed).
    """
    if torch.compiler.is_compiling():  # traced: no hooks to register, no cache to keep
        return _effective_parameters(model)
    seen = _PARAMS.get(model)
    if (
        seen is not None
        and seen[0] == _registrations[0]
        and all([slots.get(n) is p for slots, n, p in seen[2]])
    ):
        return seen[1]  # type: ignore[no-any-return]
    _watch_registrations()
    generation = _registrations[0]
    params = _effective_parameters(model)
    slots = []
    for name, p in params.items():
        owner_path, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_path) if owner_path else model
        if owner._parameters.get(attr) is not p:  # computed by a parametrization
            return params
        slots.append((owner._parameters, attr, p))
    # (generation, params, their slots, flatten(params), projections by plan)
    _PARAMS[model] = (generation, params, slots, flatten(params), {})
    return params


_PARAMETRIZED = "parametrizations."


def _effective_parameters(model: torch.nn.Module) -> dict[str, Tensor]:
    """``named_parameters()``, with each parametrized tensor under its own name and value.

    ``torch.nn.utils.parametrize`` stores ``m.weight`` as
    ``m.parametrizations.weight.original``; bounds talk about ``m.weight``, the value
    the model uses, which is computed here through the parametrization.
    """
    out: dict[str, Tensor] = {}
    for name, p in model.named_parameters():
        if _PARAMETRIZED not in name:
            out[name] = p
            continue
        head, _, tail = name.rpartition(_PARAMETRIZED)
        attr, _, rest = tail.partition(".")
        if rest not in ("original", "original0"):
            out[name] = p  # a multi-tensor parametrization: keep its own names
            continue
        owner_path = head[:-1]
        owner = model.get_submodule(owner_path) if owner_path else model
        out[owner_path + ("." if owner_path else "") + attr] = getattr(owner, attr)
    return out
