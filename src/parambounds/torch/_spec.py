"""The torch backend of the spec: a resolved :class:`~parambounds.Bounds` applied to torch.

Names are those of ``named_parameters()`` (or a ``state_dict``'s keys); the per-step
work goes through the cached plans and kernels of :mod:`parambounds.torch._plan`.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..errors import BoundsError, verifying
from ..matching import Resolved, Spec, match_indices, with_pattern
from ..report import Report
from ._constraints import bake_ as bake_names_
from ._constraints import project_plan_, projection, reparametrize_plan_, run_projection_
from ._cost import tree_cost
from ._distributed import fsdp_originals
from ._metrics import compute_metrics
from ._plan import Plan, get_plan
from ._report import compute_report
from ._trees import flatten

__all__ = [
    "Model",
    "attach",
    "bake_",
    "bounded_parameters",
    "bounds_of",
    "compute_report",
    "constrain",
    "cost",
    "framework_name",
    "is_appropriate_type",
    "metrics",
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


def _constant_match(patterns: tuple[str, ...], names: tuple[str, ...]) -> tuple[int, ...]:
    return match_indices(patterns, names)


#: Inside ``torch.compile``: run the (untraceable) ``fnmatch`` matching when tracing,
#: and keep its result (a tuple of integers) as a constant of the graph. This is all
#: that ``torch.compiler.assume_constant_result`` does, without the import of
#: ``torch._dynamo`` (~300 modules) it makes, which a user who never compiles should not
#: pay (``tests/test_imports.py`` checks the two agree).
_constant_match._dynamo_marked_constant = True  # type: ignore[attr-defined]


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
    elif verifying():
        from . import _verify  # only in verify mode: a first step does not import it

        _verify.same_resolved(resolved, bounds._match(names, match_indices.__wrapped__))
    return resolved, params


def plan(bounds: Spec, model: Model) -> tuple[Plan, list[Tensor], Resolved]:
    """The cached plan of ``model`` under ``bounds``, its leaves and the resolved spec."""
    resolved, params = resolve(bounds, model)
    seen = _PARAMS.get(model) if isinstance(model, torch.nn.Module) else None
    if seen is not None and seen[1] is params:  # unchanged: flattened once
        treedef, leaves = seen[2]
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
    """Clamp every bounded parameter into its bounds, in place.

    Under FSDP2, a module whose parameters are unsharded (after a forward pass that did
    not reshard) has both its copies and the sharded parameters behind them clamped.
    """
    if verifying():
        _verified_projection(bounds, model)
    else:
        _project(bounds, model)


def _fresh(bounds: Spec, model: Model) -> tuple[dict[str, Any], Resolved]:
    """The parameters and their match to ``bounds``, found again without any cache."""
    params = dict(model) if isinstance(model, Mapping) else _effective_parameters(model)
    return params, bounds._match(tuple(params), match_indices.__wrapped__)


def _verified_projection(bounds: Spec, model: Model) -> None:
    """:func:`_project`, checked element by element against the projection's rule."""
    from . import _verify

    params, resolved = _fresh(bounds, model)
    check = _verify.checkable(params, resolved.lower, resolved.upper)
    bounded = [n for n in params if resolved.lower[n] is not None or resolved.upper[n] is not None]
    before = {n: params[n].detach().clone() for n in bounded if check}
    _project(bounds, model)
    if check:
        after, resolved = _fresh(bounds, model)
        _verify.check_projection(before, after, resolved.lower, resolved.upper)


def _project(bounds: Spec, model: Model) -> None:
    got, leaves, resolved = plan(bounds, model)
    if isinstance(model, torch.nn.Module):
        originals = fsdp_originals(model, leaves)
        if originals:
            _project_originals(originals, resolved)
    seen = _PARAMS.get(model) if isinstance(model, torch.nn.Module) else None
    if seen is None or seen[2][1] is not leaves:  # a state_dict, or parametrized values
        project_plan_(got, leaves, list(resolved.names))
        return
    steps = seen[3].get(id(got), (None, None))
    if steps[0] is not got:  # worked out once per plan of these very leaves
        seen[3].clear()  # only the latest plan's
        steps = seen[3][id(got)] = (got, projection(got, leaves))
    if steps[1] is None:
        project_plan_(got, leaves, list(resolved.names))
    else:
        run_projection_(steps[1])


def _project_originals(originals: dict[int, Tensor], resolved: Resolved) -> None:
    """Clamp FSDP2's sharded parameters (by leaf index) under their copies' bounds."""
    sharded = {resolved.names[i]: x for i, x in sorted(originals.items())}
    lower = {name: resolved.lower[name] for name in sharded}
    upper = {name: resolved.upper[name] for name in sharded}
    treedef, leaves = flatten(sharded)
    try:
        got = get_plan(sharded, treedef, leaves, lower, upper)
    except BoundsError as err:
        raise with_pattern(err, resolved) from None
    project_plan_(got, leaves, list(sharded))


def bounded_parameters(bounds: Spec, model: torch.nn.Module) -> dict[str, Tensor]:
    """The tensors an optimizer trains for each bounded name of ``model``, by name.

    A plain parameter is itself; a parameter changed by ``reparametrize_`` is its
    unconstrained ``original``.
    """
    got, leaves, resolved = plan(bounds, model)
    out: dict[str, Tensor] = {}
    for i in got.bounded:
        name, x = resolved.names[i], leaves[i]
        if not x.is_leaf and isinstance(model, torch.nn.Module):
            owner_path, _, attr = name.rpartition(".")
            owner = model.get_submodule(owner_path) if owner_path else model
            chain = getattr(getattr(owner, "parametrizations", None), attr, None)
            x = getattr(chain, "original", x)
        out[name] = x
    return out


def attach(bounds: Spec, optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> Any:
    """Project ``model`` after every ``optimizer.step()``; returns the hook's handle.

    Raises:
        BoundsError: when ``optimizer`` holds none of the bounded parameters, naming them.
    """
    bounded = bounded_parameters(bounds, model)  # validate now, not at the first step
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if bounded and not any(id(p) in held for p in bounded.values()):
        names = list(bounded)
        shown = ", ".join(f"'{n}'" for n in names[:5]) + (
            f" and {len(names) - 5} more" if len(names) > 5 else ""
        )
        raise BoundsError(
            f"the optimizer holds none of the bounded parameters ({shown}); attach the "
            "optimizer that trains them, or call bounds.project_(model) yourself"
        )

    def hook(opt: Any, args: Any, kwargs: Any) -> None:  # noqa: ARG001
        project_(bounds, model)

    return optimizer.register_step_post_hook(hook)


def reparametrize_(bounds: Spec, model: torch.nn.Module) -> torch.nn.Module:
    """Register bounded parametrizations on every bounded parameter of ``model``."""
    got, _, resolved = plan(bounds, model)
    return reparametrize_plan_(model, got, list(resolved.names))


def bake_(bounds: Spec, model: torch.nn.Module) -> torch.nn.Module:
    """Turn the parametrizations of ``reparametrize_`` back into plain parameters."""
    if not isinstance(model, torch.nn.Module):
        raise BoundsError(f"bake_ needs a torch.nn.Module, got {type(model).__name__}")
    resolved, _ = resolve(bounds, model)
    return bake_names_(model, [n for n in resolved.names if n in resolved.patterns])


def metrics(bounds: Spec, model: Model, *, prefix: str, per_parameter: bool) -> dict[str, Tensor]:
    """Totals and per-parameter metrics as 0-d tensors on the parameters' device."""
    got, leaves, resolved = plan(bounds, model)
    return compute_metrics(
        got,
        leaves,
        list(resolved.names),
        bounds.penalty,
        prefix=prefix,
        per_parameter=per_parameter,
    )


def report(bounds: Spec, model: Model) -> Report:
    """The :class:`~parambounds.Report` of ``model`` under ``bounds``."""
    got, leaves, resolved = plan(bounds, model)
    out = compute_report(got, leaves, list(resolved.names))
    if verifying():
        from . import _verify

        params, fresh = _fresh(bounds, model)
        _verify.check_report(out, params, fresh.lower, fresh.upper)
    return out


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


#: Per model: (its structure, its effective parameters, flatten(them), projections by plan).
_PARAMS: weakref.WeakKeyDictionary[torch.nn.Module, Any] = weakref.WeakKeyDictionary()


class _Structure(NamedTuple):
    """What ``named_parameters()`` is made of: every ``_parameters`` and ``_modules`` dict.

    ``modules`` are weak references to every module in a walk from the root (a child that
    refers back to its model must not keep it alive through this cache); ``state`` is,
    per module, the sizes, names and object ids of its two dicts, all in one flat list.
    ``params`` holds the parameters strongly, so no other object can take one of their
    ids; a child's id is safe while its weak reference is alive.
    """

    modules: list[weakref.ref[torch.nn.Module]]
    state: list[Any]
    params: list[Any]


def _state(modules: list[torch.nn.Module | None]) -> list[Any] | None:
    """The flat list :class:`_Structure` compares, or ``None`` when a module is gone."""
    out: list[Any] = []
    extend = out.extend
    for m in modules:
        if m is None:
            return None
        ps, ms = m._parameters, m._modules
        extend((len(ps), len(ms)))
        extend(ps)
        extend(map(id, ps.values()))
        extend(ms)
        extend(map(id, ms.values()))
    return out


def _structure(model: torch.nn.Module) -> _Structure:
    """The :class:`_Structure` of ``model`` now."""
    modules: list[torch.nn.Module] = []
    stack = [model]
    while stack:
        m = stack.pop()
        modules.append(m)
        stack.extend(c for c in reversed(m._modules.values()) if c is not None)
    state = _state(list(modules))
    assert state is not None
    params = [p for m in modules for p in m._parameters.values()]
    return _Structure([weakref.ref(m) for m in modules], state, params)


def _unchanged(model: torch.nn.Module, structure: _Structure) -> bool:  # noqa: ARG001
    """Whether every ``_parameters`` and ``_modules`` dict of ``model`` holds what it held.

    Each module of the last walk, compared in one flat list (:func:`_state`): a child
    swapped in through ``module._modules[k] =`` or a parameter through
    ``module._parameters[k] =`` (which bypass ``__setattr__`` and the registration
    hooks) is a change, whenever the new object was made. Every module reachable now is
    one of the last walk's: the root is, and each module's children are the same objects.
    """
    now = _state([r() for r in structure.modules])
    return now is not None and now == structure.state


def _parameters(model: torch.nn.Module) -> dict[str, Tensor]:
    """:func:`_effective_parameters`, the same dict each step while nothing changed.

    Unchanged means: every ``_parameters`` and ``_modules`` dict in the model holds the
    same names and objects (:func:`_unchanged`, a walk over the modules). So the
    per-step cost is a few lookups per module, and the dict's identity lets
    :func:`get_plan` find its plan at once. A model with parametrizations is walked
    every time (its values are computed).
    """
    if torch.compiler.is_compiling():  # traced: no hooks to register, no cache to keep
        return _effective_parameters(model)
    seen = _PARAMS.get(model)
    if seen is not None and _unchanged(model, seen[0]):
        if verifying():
            from . import _verify

            _verify.same_parameters(seen[1], _effective_parameters(model))
        return seen[1]  # type: ignore[no-any-return]
    structure = _structure(model)
    params = _effective_parameters(model)
    for name, p in params.items():
        owner_path, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_path) if owner_path else model
        if owner._parameters.get(attr) is not p:  # computed by a parametrization
            _PARAMS.pop(model, None)
            return params
    _PARAMS[model] = (structure, params, flatten(params), {})
    return params


_PARAMETRIZED = "parametrizations."


def _effective_parameters(model: torch.nn.Module) -> dict[str, Tensor]:
    """``named_parameters()``, with each parametrized tensor under its own name and value.

    ``torch.nn.utils.parametrize`` stores ``m.weight`` as
    ``m.parametrizations.weight.original``; bounds talk about ``m.weight``, the value
    the model uses, which is computed here through the parametrization.

    A tensor under several names (tied weights) is listed once, under its first plain
    name, as ``named_parameters()`` does; but each parametrized name is listed whatever
    other name its ``original`` also has, since its value is another tensor (a weight
    tied to ``m.weight`` and parametrized in ``n`` only: both ``m.weight`` and the
    computed ``n.weight``). A module under two names is listed once, as there.
    """
    out: dict[str, Tensor] = {}
    plain: set[int] = set()
    computed: set[tuple[int, str]] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        head, _, tail = name.rpartition(_PARAMETRIZED)
        attr, _, rest = tail.partition(".")
        if _PARAMETRIZED not in name or rest not in ("original", "original0"):
            # plain (or a multi-tensor parametrization's own names): once per tensor
            if id(p) not in plain:
                plain.add(id(p))
                out[name] = p
            continue
        owner_path = head[:-1]
        owner = model.get_submodule(owner_path) if owner_path else model
        if (id(owner), attr) not in computed:  # a module under two names: once
            computed.add((id(owner), attr))
            out[owner_path + ("." if owner_path else "") + attr] = getattr(owner, attr)
    return out
