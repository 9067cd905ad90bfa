r"""The hard constraints: projection onto the bounds, and reparametrization.

Projection (optax's ``projection_box``) solves :math:`\min_y \|y - x\|^2` s.t.
:math:`l \le y \le u`, elementwise :math:`y = \min(\max(x, l), u)`.

Reparametrization writes a bounded parameter as a smooth function of an unconstrained
tensor :math:`z`:

.. math::

    x = l + (u - l)\,\sigma(z) \quad\text{(two-sided)},\qquad
    x = l + \mathrm{softplus}(z),\qquad x = u - \mathrm{softplus}(z) \quad\text{(one-sided)}
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn.utils import parametrize

from ..errors import BoundsError
from ._distributed import clamp_, is_dtensor, is_partial, to_local
from ._kernels import clamp_args, signed_excess
from ._plan import Plan
from ._rounding import compute_dtype

__all__ = [
    "BoundedParametrization",
    "bake_",
    "project_plan_",
    "projection",
    "reparametrize_plan_",
    "run_projection_",
]


def _where(names: list[str] | None, i: int) -> str:
    return f"'{names[i]}'" if names is not None else f"leaf {i}"


def _clamp_(x: Tensor, lo: Any, hi: Any) -> None:
    """Clamp one tensor in place into bounds already rounded inward to its dtype."""
    if x.is_floating_point() and x.itemsize == 1:  # float8: few ops; exact in float32
        x.copy_(x.to(compute_dtype(x.dtype)).clamp(*clamp_args(lo, hi)))
    else:
        x.clamp_(*clamp_args(lo, hi))


def _refuse_bool(x: Tensor, names: list[str] | None, i: int) -> None:
    if x.dtype == torch.bool and x.is_leaf:
        raise BoundsError(f"cannot project {_where(names, i)}: it is a bool tensor")


def projection(plan: Plan, leaves: list[Tensor]) -> list[tuple[list[Tensor], Any, Any]] | None:
    """:func:`project_plan_` worked out once: ``(tensors, lower, upper)`` to clamp.

    Each entry is clamped with one multi-tensor op (scalar bounds) or one ``clamp_``
    (a tensor with per-element bounds). Valid while ``plan`` is the plan of the very
    same ``leaves``. ``None`` when some bounded leaf needs the care of
    :func:`project_plan_` (DTensors, computed tensors, bool and float8 tensors, leaves
    that share memory but get different bounds).
    """

    def plain(x: Any) -> bool:
        return (
            isinstance(x, Tensor)
            and x.is_leaf
            and not is_dtensor(x)
            and x.dtype != torch.bool
            and not (x.is_floating_point() and x.itemsize == 1)
        )

    if aliased_conflicts(plan, leaves):  # project_plan_ refuses them, naming both
        return None
    steps: list[tuple[list[Tensor], Any, Any]] = []
    for g in plan.groups:
        xs = [leaves[i] for i in g.indices]
        if not all(map(plain, xs)):
            return None
        steps.append((xs, g.exact_lower, g.exact_upper))
    for lb in plan.tensor_leaves:
        x = leaves[lb.index]
        if not plain(x):
            return None
        steps.append(([x], *clamp_args(lb.exact_lower, lb.exact_upper)))
    return steps


@torch.no_grad()
def run_projection_(steps: list[tuple[list[Tensor], Any, Any]]) -> None:
    """Clamp in place as worked out by :func:`projection`."""
    for xs, lo, hi in steps:
        if isinstance(lo, Tensor) or isinstance(hi, Tensor):
            xs[0].clamp_(lo, hi)
            continue
        if lo is not None:
            torch._foreach_clamp_min_(xs, lo)
        if hi is not None:
            torch._foreach_clamp_max_(xs, hi)


def _span(x: Any) -> tuple[Any, int, int] | None:
    """``(storage, first byte, end byte)`` of the memory ``x`` covers, or ``None``."""
    if not isinstance(x, Tensor) or x.numel() == 0 or is_dtensor(x) or x.is_meta:
        return None
    try:
        storage = x.untyped_storage()
    except (RuntimeError, NotImplementedError):  # a tensor subclass without storage
        return None
    k = x.element_size()
    first = int(x.storage_offset())
    last = first + sum((int(n) - 1) * abs(int(s)) for n, s in zip(x.shape, x.stride()))
    return (x.device, storage.data_ptr()), first * k, (last + 1) * k


def _offsets(x: Tensor) -> Tensor:
    """The storage offset of every element of ``x`` (int64, on the CPU)."""
    out = torch.full((), int(x.storage_offset()), dtype=torch.int64)
    for dim, (n, stride) in enumerate(zip(x.shape, x.stride())):
        shape = [1] * x.dim()
        shape[dim] = n
        out = out + (torch.arange(n, dtype=torch.int64) * stride).view(shape)
    return out.reshape(-1)


_EXACT_OVERLAP_MAX = 1 << 24  # elements: beyond, overlapping spans count as overlapping


def _overlap(x: Tensor, y: Tensor) -> bool:
    """Whether two tensors whose byte spans overlap share an element.

    Strided views such as two columns of a matrix interleave without sharing one.
    """
    if x.dtype != y.dtype or max(x.numel(), y.numel()) > _EXACT_OVERLAP_MAX:
        return True
    return bool(torch.isin(_offsets(x), _offsets(y)).any())


def _same_bounds(a: tuple[Any, Any], b: tuple[Any, Any]) -> bool:
    for u, v in zip(a, b):
        if isinstance(u, Tensor) or isinstance(v, Tensor):
            if not (isinstance(u, Tensor) and isinstance(v, Tensor)):
                return False
            if u is not v and (u.shape != v.shape or not torch.equal(u, v.to(u.device))):
                return False
        elif u != v:
            return False
    return True


def aliased_conflicts(plan: Plan, leaves: list[Any]) -> list[tuple[int, int]]:
    """Pairs of leaves that share memory but get different bounds (in leaf order).

    Tied tensors (the same tensor under two names) and overlapping views of one tensor
    may be projected only when both get the same bounds (an unbounded one counts as
    different): clamping one into its bounds would otherwise move the other out of its
    own. Views are compared by the bytes they span, and per-element bounds only when
    both are the very same view (same offset, shape and strides).
    """
    spans = []
    for i, x in enumerate(leaves):
        got = _span(x)
        if got is not None:
            spans.append((got[0], got[1], got[2], i))
    if len(spans) < 2:
        return []
    spans.sort(key=lambda s: (s[0][1], str(s[0][0]), s[1]))
    bounds = {i: (lo, hi) for i, lo, hi in plan.bounded_items(exact=True)}
    pairs = []
    for k, (where, _, end, i) in enumerate(spans):
        for other, start2, _, j in spans[k + 1 :]:
            if other != where or start2 >= end:
                break
            a, b = bounds.get(i, (None, None)), bounds.get(j, (None, None))
            x, y = leaves[i], leaves[j]
            same_view = (
                x.storage_offset() == y.storage_offset()
                and x.shape == y.shape
                and x.stride() == y.stride()
            )
            tensor_bound = any(isinstance(v, Tensor) for v in (*a, *b))
            if not _same_bounds(a, b) or (tensor_bound and not same_view):
                if same_view or _overlap(x, y):
                    pairs.append((min(i, j), max(i, j)))
    return sorted(set(pairs))


def _refuse_aliases(plan: Plan, leaves: list[Any], names: list[str] | None) -> None:
    pairs = aliased_conflicts(plan, leaves)
    if not pairs:
        return
    i, j = pairs[0]
    bounds = {k: (lo, hi) for k, lo, hi in plan.bounded_items()}

    def show(k: int) -> str:
        lo, hi = bounds.get(k, (None, None))
        if lo is None and hi is None:
            return "unbounded"
        shown = ("per-element" if isinstance(b, Tensor) else str(b) for b in (lo, hi))
        return "[" + ", ".join(shown) + "]"

    raise BoundsError(
        f"cannot project: {_where(names, i)} and {_where(names, j)} share memory (the same "
        f"tensor, or views of one tensor) but get different bounds ({show(i)} and "
        f"{show(j)}); clamping one would move the other out of its bounds. Give every "
        "alias the same bounds (or bound only one name of a tied tensor); nothing was changed"
    )


@torch.no_grad()
def project_plan_(plan: Plan, leaves: list[Tensor], names: list[str] | None = None) -> None:
    """Clamp the bounded leaves of ``plan`` in place: one multi-tensor op per group.

    The bounds are rounded inward to each dtype, so every projected element satisfies
    them exactly (compared in float64). Integer tensors are clamped to whole numbers.
    Computed tensors (non-leaves, such as the value of a parametrized weight) cannot be
    written: they pass when already inside, and otherwise raise.

    Raises:
        BoundsError: for a bool tensor, a computed tensor outside its bounds, or two
            leaves that share memory but get different bounds, naming them; nothing is
            changed then.
    """
    _refuse_aliases(plan, leaves, names)
    computed = []  # checked last: a bool tensor is refused before anything is written
    for lb in plan.tensor_leaves:
        _refuse_bool(leaves[lb.index], names, lb.index)
    groups = []
    for g in plan.groups:  # a group's leaves share one dtype
        if leaves[g.indices[0]].dtype == torch.bool:
            for i in g.indices:
                _refuse_bool(leaves[i], names, i)
        own = []
        for i in g.indices:
            if leaves[i].is_leaf:
                own.append(leaves[i])
            else:
                computed.append((i, g.exact_lower, g.exact_upper))
        groups.append((g, own))
    for g, own in groups:
        # DTensors (FSDP2, tensor parallel): clamp the local shard in place.
        for x in own:
            if is_partial(x):  # addends, not values: clamped exactly, one by one
                clamp_(x, g.exact_lower, g.exact_upper)
        xs = [to_local(x) for x in own if not is_partial(x)]
        if not xs:
            continue
        if xs[0].is_floating_point() and xs[0].itemsize == 1:
            for x in xs:
                _clamp_(x, g.exact_lower, g.exact_upper)
            continue
        if g.exact_lower is not None:
            torch._foreach_clamp_min_(xs, g.exact_lower)
        if g.exact_upper is not None:
            torch._foreach_clamp_max_(xs, g.exact_upper)
    for lb in plan.tensor_leaves:
        x = leaves[lb.index]
        if not x.is_leaf:
            computed.append((lb.index, lb.exact_lower, lb.exact_upper))
            continue
        lo, hi = plan.local_bounds(lb.index, lb.exact_lower, lb.exact_upper, x)
        if is_partial(x):
            clamp_(x, *clamp_args(lo, hi))
        else:
            _clamp_(to_local(x), lo, hi)
    for i, lo, hi in computed:
        x = to_local(leaves[i]).detach()
        if not x.is_floating_point() or x.itemsize == 1:
            x = x.to(torch.float64)
        lo, hi = plan.local_bounds(i, lo, hi, leaves[i])
        lo, hi = (b.to(x.dtype) if isinstance(b, Tensor) else b for b in (lo, hi))
        if bool((signed_excess(x, *clamp_args(lo, hi)) != 0).any()):
            raise BoundsError(
                f"cannot project {_where(names, i)}: it is computed from other tensors (a "
                "parametrization such as weight_norm or orthogonal, or a non-leaf tensor) "
                "and lies outside its bounds; bound or project the tensors it is computed "
                "from, or use reparametrize_"
            )


def _as_buffer(b: Any, like: Tensor) -> Tensor | None:
    if b is None:
        return None
    return torch.as_tensor(b, dtype=like.dtype, device=like.device).detach().clone()


def _finite(b: Tensor | None, like: Tensor) -> Tensor:
    """Where ``b`` bounds its side: finite entries (all False for an open side)."""
    if b is None:
        return torch.zeros((), dtype=torch.bool, device=like.device)
    return torch.isfinite(b)


def _inv_softplus(y: Tensor) -> Tensor:
    # log(exp(y) - 1) = y + log(-expm1(-y)), stable for large and small y > 0.
    return y + torch.log(-torch.expm1(-y))


class BoundedParametrization(torch.nn.Module):
    r"""Maps an unconstrained tensor into ``[lower, upper]`` (either side may be open).

    Each element gets the map that fits its own bounds: :math:`l + (u - l)\,\sigma(z)`
    where both are finite, :math:`l + \mathrm{softplus}(z)` or
    :math:`u - \mathrm{softplus}(z)` where one is, and :math:`z` itself where neither
    is. The map is computed in at least float32 and its result clamped to the bounds,
    which are rounded inward to the dtype: every output satisfies them exactly.

    ``right_inverse`` keeps the current values: it is computed in float64, and values on
    or outside a bound are first moved inside by a small margin (the larger of ``1e-6``
    and twice the dtype's epsilon, of the width, or of ``max(1, |bound|)`` for one-sided
    bounds), so that the unconstrained value is finite in the dtype.
    """

    lower: Tensor | None
    upper: Tensor | None
    #: The names of its module's parameters, in order, when it was registered.
    order: tuple[str, ...] = ()

    def __init__(self, lower: Any, upper: Any, like: Tensor) -> None:
        super().__init__()
        if lower is None and upper is None:
            raise BoundsError("a bounded parametrization needs at least one bound")
        if not like.is_floating_point() or like.itemsize == 1:
            raise BoundsError(
                f"a bounded parametrization needs a float16 or wider tensor, got {like.dtype}"
            )
        self.register_buffer("lower", _as_buffer(lower, like))
        self.register_buffer("upper", _as_buffer(upper, like))
        # Some element open on a side that bounds others: the per-element map.
        self.mixed = bool(
            (self.lower is not None and not torch.isfinite(self.lower).all())
            or (self.upper is not None and not torch.isfinite(self.upper).all())
        )
        self.margin = max(1e-6, 2 * torch.finfo(like.dtype).eps)

    def _map(self, z: Tensor, lo: Any, hi: Any) -> Tensor:
        """The smooth map, with finite bounds (``None`` for an open side)."""
        if lo is not None and hi is not None:
            return lo + (hi - lo) * torch.sigmoid(z)
        if lo is not None:
            return lo + torch.nn.functional.softplus(z)
        return hi - torch.nn.functional.softplus(z)

    def forward(self, z: Tensor) -> Tensor:
        """Map ``z`` into the bounds."""
        wide = torch.promote_types(z.dtype, torch.float32)
        lo: Any = None if self.lower is None else self.lower.to(wide)
        hi: Any = None if self.upper is None else self.upper.to(wide)
        zw = z.to(wide)
        out = self._each(self._map, zw, lo, hi)
        return torch.clamp(out.to(z.dtype), *clamp_args(self.lower, self.upper))

    def _each(self, f: Any, v: Tensor, lo: Any, hi: Any) -> Tensor:
        """``f(v, lo, hi)``, each element with the form that fits its own bounds.

        With per-element bounds open on some elements, ``f`` is evaluated two-sided,
        lower-only and upper-only, and each element takes the one that fits (or stays).
        """
        if not self.mixed:
            return f(v, lo, hi)  # type: ignore[no-any-return]
        has_lo, has_hi = _finite(lo, v), _finite(hi, v)
        # open sides replaced by 0 where unused: no inf - inf, no NaN gradient
        zero = torch.zeros((), dtype=v.dtype)
        lo0 = torch.where(has_lo, lo, 0.0) if lo is not None else zero
        hi0 = torch.where(has_hi, hi, 0.0) if hi is not None else zero
        one_sided = torch.where(has_hi, f(v, None, hi0), v)
        return torch.where(
            has_lo & has_hi, f(v, lo0, hi0), torch.where(has_lo, f(v, lo0, None), one_sided)
        )

    def _inverse(self, x: Tensor, lo: Any, hi: Any) -> Tensor:
        """The unconstrained value of ``x`` (float64) under finite bounds."""
        m = self.margin
        if lo is not None and hi is not None:
            width = hi - lo
            t = ((x - lo) / torch.where(width > 0, width, 1.0)).clamp(m, 1 - m)
            return torch.logit(torch.where(width > 0, t, 0.5))
        if lo is not None:
            return _inv_softplus((x - lo).clamp_min(m * lo.abs().clamp_min(1.0)))
        return _inv_softplus((hi - x).clamp_min(m * hi.abs().clamp_min(1.0)))

    def right_inverse(self, x: Tensor) -> Tensor:
        """The unconstrained tensor whose image is ``x`` (moved just inside)."""
        f64 = torch.float64
        lo: Any = None if self.lower is None else self.lower.to(f64)
        hi: Any = None if self.upper is None else self.upper.to(f64)
        x64 = x.detach().to(f64)
        z = self._each(self._inverse, x64, lo, hi)
        big = torch.finfo(x.dtype).max
        return z.clamp(-big, big).to(x.dtype)  # finite in the dtype

    def extra_repr(self) -> str:
        """Show the bounds."""

        def show(b: Tensor | None) -> str:
            return (
                "None"
                if b is None
                else (f"{b.item():g}" if b.dim() == 0 else f"tensor{tuple(b.shape)}")
            )

        return f"lower={show(self.lower)}, upper={show(self.upper)}"


def _owner(model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    module_path, _, attr = name.rpartition(".")
    return (model.get_submodule(module_path) if module_path else model), attr


def _rockpool_base(module: Any) -> Any:
    """Rockpool's ``TorchModule`` class if ``module`` is one (without importing Rockpool)."""
    for c in type(module).__mro__:
        if c.__name__ == "TorchModule" and c.__module__.split(".")[0] == "rockpool":
            return c
    return None


def _register_with_rockpool(owner: Any, attr: str) -> None:
    """Make a Rockpool module's own registry list the unconstrained tensor of ``attr``.

    Rockpool lists parameters from a registry of its own (``net.parameters()``, and
    ``net.parameters().astorch()`` for an optimizer), filled when attributes are set.
    ``parametrize`` removes ``attr`` from it and puts the unconstrained tensor in
    ``parametrizations[attr].original`` through ``ModuleDict.__setitem__``, which
    Rockpool never sees: the tensor would never train. It is registered here as
    Rockpool registers any torch module assigned to it (``TorchModule.from_torch``), so
    ``net.parameters()`` lists it under the name torch gives it:
    ``{"parametrizations": {attr: {"original": z}}}``.
    """
    base = _rockpool_base(owner)
    if base is None:
        return
    container = owner.parametrizations
    if _rockpool_base(container) is None:  # Rockpool converted it on assignment; if not:
        base.from_torch(container, retain_torch_api=True)
        owner._register_module("parametrizations", container)
    plist = container[attr]
    _, modules = container._get_attribute_registry()
    if attr not in modules:
        base.from_torch(plist, retain_torch_api=True)
        container._register_module(attr, plist)


def _unregister_with_rockpool(owner: Any, attr: str) -> None:
    """Undo :func:`_register_with_rockpool` (when a reparametrization is rolled back)."""
    container = owner.__dict__.get("_modules", {}).get("parametrizations")
    if container is None or _rockpool_base(container) is None:
        return
    _, modules = container._get_attribute_registry()
    if attr in modules:
        del modules[attr]
        if attr in container._submodulenames:
            container._submodulenames.remove(attr)


def reparametrize_plan_(model: torch.nn.Module, plan: Plan, names: list[str]) -> torch.nn.Module:
    """Register a :class:`BoundedParametrization` on every bounded parameter of ``plan``.

    Everything is checked first; if anything fails, the model is left as it was. On a
    Rockpool module the unconstrained tensors are also entered in Rockpool's own
    registry, so that ``net.parameters().astorch()`` hands them to the optimizer.

    Raises:
        BoundsError: for a parameter that is already parametrized, tied to another name,
            sharded, or not a parameter, naming it; nothing is changed.
    """
    params = dict(model.named_parameters())
    aliases: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    todo = []
    for i, lo, hi in plan.bounded_items(exact=True):
        name = names[i]
        owner, attr = _owner(model, name)
        if parametrize.is_parametrized(owner, attr):
            raise BoundsError(f"parameter '{name}' is already parametrized")
        if name not in params:
            raise BoundsError(f"'{name}' is not a parameter that can be reparametrized")
        p = params[name]
        if is_dtensor(p):
            raise BoundsError(
                f"cannot reparametrize '{name}': it is a DTensor (FSDP2 or tensor parallel), "
                "and torch.nn.utils.parametrize does not support sharded parameters; call "
                "reparametrize_ before fully_shard, or use attach/project_"
            )
        others = [n for n in aliases.get(id(p), []) if n != name]
        if others:
            raise BoundsError(
                f"cannot reparametrize '{name}': it is tied to "
                + ", ".join(f"'{n}'" for n in others)
                + " (the same Parameter), which would see the unconstrained value; untie "
                "them, or use attach/project_"
            )
        try:
            par = BoundedParametrization(lo, hi, p)
        except BoundsError as err:
            raise BoundsError(f"cannot reparametrize '{name}': {err}") from None
        todo.append((name, owner, attr, par, p))
    done: list[tuple[torch.nn.Module, str, Tensor, Tensor]] = []
    try:
        for name, owner, attr, par, p in todo:
            saved = p.detach().clone()
            par.order = tuple(owner._parameters)  # for bake_: the parameters' order
            try:
                parametrize.register_parametrization(owner, attr, par)
            except Exception as err:  # a module type that parametrize does not support
                raise BoundsError(f"cannot reparametrize '{name}': {err}") from err
            done.append((owner, attr, p, saved))
            _register_with_rockpool(owner, attr)
    except BoundsError:
        for owner, attr, param, saved in reversed(done):  # undo: same Parameter, its values
            _unregister_with_rockpool(owner, attr)
            parametrize.remove_parametrizations(owner, attr, leave_parametrized=False)
            with torch.no_grad():
                param.copy_(saved)
        raise
    return model


def bake_(model: torch.nn.Module, names: list[str]) -> torch.nn.Module:
    """Turn the bounded parametrizations of ``names`` back into plain parameters.

    Each one keeps its current bounded value, under its original name (the
    ``original`` Parameter object itself, now holding that value). Parameters that are
    not parametrized are left as they are. Everything is checked first.

    Raises:
        BoundsError: for a parameter whose parametrizations are not only the bounded
            one of ``reparametrize_`` (such as ``weight_norm`` stacked on it), naming it.
    """
    todo = []
    for name in names:
        owner, attr = _owner(model, name)
        if not parametrize.is_parametrized(owner, attr):
            continue
        chain = list(getattr(owner.parametrizations, attr))
        if not all(isinstance(p, BoundedParametrization) for p in chain):
            kinds = ", ".join(type(p).__name__ for p in chain)
            raise BoundsError(
                f"cannot bake '{name}': its parametrizations are {kinds}, not only the "
                "BoundedParametrization of reparametrize_; remove the others first "
                "(torch.nn.utils.parametrize.remove_parametrizations)"
            )
        todo.append((owner, attr))
    for owner, attr in todo:
        order = getattr(getattr(owner.parametrizations, attr)[0], "order", ())
        parametrize.remove_parametrizations(owner, attr, leave_parametrized=True)
        if attr in order:  # back in its place: parameters() in the order optimizers saw
            rank = {n: k for k, n in enumerate(order)}
            params = owner._parameters
            kept = sorted(params.items(), key=lambda kv: rank.get(kv[0], len(rank)))
            params.clear()
            params.update(kept)
    return model
