"""The distributed path: bounds on ``DTensor`` parameters (FSDP2, tensor parallelism).

Everything is done on the local shard, with PyTorch's own distributed engine combining
the results; full parameters are never gathered. What to do across ranks is decided
from what each placement *means* on its mesh dimension, not from its class:

- sharded (``Shard``, and the private ``_StridedShard`` that FSDP2 over tensor
  parallelism makes): each rank holds different elements, so per-rank sums add up;
- replicated: each rank holds the same elements, so one copy counts;
- partial (``Partial``, sum, max or min): each rank holds an addend, so the values are
  reduced first (a differentiable ``redistribute`` to ``Replicate``) and never read as
  parameter values.

- Cost: each rank computes the cost of its local shard (with the fast kernels); the
  partial costs become a ``DTensor`` that is ``Partial`` over the sharded mesh dimensions
  and ``Replicate`` over the others, so that ``full_tensor()`` (one all-reduce per mesh)
  sums every element exactly once, and autograd sends each shard its own gradient.
- Projection clamps the local shards in place; per-element bounds are sliced to the
  shard (``distribute_tensor(..., src_data_rank=None)``: no communication).
- Report: per-shard counts, one gather per mesh (over the parameter's own mesh, so a
  submesh is reduced over its own group), the same result on every rank.

Under ``DistributedDataParallel`` parameters are plain tensors and nothing here is used.
"""

from __future__ import annotations

import functools
import hashlib
import sys
import weakref
from typing import Any, cast

import torch
from torch import Tensor

from ..errors import BoundsError
from ._collectives import Exchange, fingerprint, gather_rows, mesh_ranks, settle, sum_over

__all__ = [
    "agree",
    "agree_penalty",
    "clamp_",
    "combine",
    "cost_layout",
    "fsdp_originals",
    "full_bound",
    "is_dtensor",
    "is_partial",
    "local_bound",
    "map_local",
    "order_violation",
    "partial_cost",
    "placement_kind",
    "reduce_stats",
    "shard_cost",
    "to_local",
]


#: The ``DTensor`` class, once ``torch.distributed.tensor`` is imported (by the user:
#: whoever has a DTensor imported it). Never imported here: the distributed stack costs
#: ~0.7 s and ~500 modules, which a user without DTensors should not pay.
_DTENSOR: Any = None


def _dtensor_cls() -> Any:
    global _DTENSOR
    if _DTENSOR is None:
        module = sys.modules.get("torch.distributed.tensor")
        # getattr: a module still being imported may not have the class yet.
        _DTENSOR = getattr(module, "DTensor", None)
    return _DTENSOR


def is_dtensor(x: Any) -> bool:
    """Whether ``x`` is a ``torch.distributed.tensor.DTensor``.

    Looks only at an already imported ``torch.distributed.tensor``: nothing can be a
    DTensor before it is imported, so a plain model never imports the distributed stack.
    """
    cls = _DTENSOR if _DTENSOR is not None else _dtensor_cls()
    return cls is not None and isinstance(x, cls)


def placement_kind(p: Any) -> str:
    """What a placement means on its mesh dimension: ``"shard"``, ``"replicate"`` or ``"partial"``.

    Raises:
        BoundsError: for a placement whose meaning is unknown.
    """
    if p.is_replicate():
        return "replicate"
    if p.is_partial():
        return "partial"
    if p.is_shard() or isinstance(getattr(p, "dim", None), int):  # Shard, _StridedShard
        return "shard"
    raise BoundsError(f"unsupported DTensor placement {p!r}: not a shard, replica or partial")


def is_partial(x: Any) -> bool:
    """Whether the DTensor ``x`` holds addends (``Partial``) on some mesh dimension."""
    return is_dtensor(x) and any(placement_kind(p) == "partial" for p in x.placements)


def _reduced_placements(x: Any) -> tuple[Any, ...]:
    from torch.distributed.tensor import Replicate

    return tuple(Replicate() if placement_kind(p) == "partial" else p for p in x.placements)


def _reduce(x: Any) -> Any:
    """``x`` with its ``Partial`` dimensions reduced (differentiable; a collective)."""
    if not is_partial(x):
        return x
    return x.redistribute(x.device_mesh, _reduced_placements(x))


def to_local(x: Any) -> Tensor:
    """The local values of a DTensor (differentiable), or ``x`` itself.

    ``Partial`` DTensors are reduced first (a collective), so the result holds values,
    never addends.
    """
    return _reduce(x).to_local() if is_dtensor(x) else x


def local_bound(b: Any, x: Any) -> Any:
    """Restrict bound ``b`` to the local values of the DTensor ``x``.

    ``b`` is a number, ``None``, a tensor that broadcasts to ``x``'s global shape, or a
    DTensor (redistributed to ``x``'s layout if it differs: a collective).
    """
    if b is None or not isinstance(b, Tensor):
        return b
    from torch.distributed.tensor import distribute_tensor

    placements = _reduced_placements(x)
    if torch.compiler.is_compiling() and not is_dtensor(b):
        return _traced_local_bound(b, x, placements)
    if b.requires_grad and torch.is_grad_enabled() and not is_dtensor(b):
        return _learnable_local_bound(b, x)
    if is_dtensor(b):
        d: Any = _reduce(b)
        if d.shape != x.shape or d.device_mesh != x.device_mesh:
            # broadcasting (small), or on another mesh (DTensor cannot move it between
            # meshes): gathered over its own mesh, then sliced like x
            d = d.full_tensor()
        else:
            if tuple(d.placements) != placements:
                d = d.redistribute(x.device_mesh, placements)
            return d.to_local()
        b = d
    full = b.expand(x.shape).contiguous()
    return distribute_tensor(full, x.device_mesh, placements, src_data_rank=None).to_local()


def _traced_local_bound(b: Tensor, x: Any, placements: tuple[Any, ...]) -> Tensor:
    """A plain bound restricted to ``x``'s local values by DTensor's own ops (traceable).

    Under ``torch.compile``: a replicated DTensor of the full bound, redistributed to
    ``x``'s layout (slicing, no communication). The gradient of a learnable bound flows
    back through DTensor's redistribution, which gathers it over the sharded dimensions:
    every rank gets the gradient of the whole cost, as in eager mode.
    """
    mesh = x.device_mesh
    full = _DTENSOR.from_local(
        b.expand(x.shape).contiguous(), mesh, [_replicate()] * mesh.ndim, run_check=False
    )
    return full.redistribute(mesh, placements).to_local()  # type: ignore[no-any-return]


def _replicate() -> Any:
    from torch.distributed.tensor import Replicate

    return Replicate()


def _local_positions(x: Any) -> Tensor:
    """The global flat index of each of this rank's values of ``x`` (no communication)."""
    from torch.distributed.tensor import distribute_tensor

    positions = torch.arange(x.numel(), device=x.device).view(x.shape)
    return distribute_tensor(
        positions, x.device_mesh, _reduced_placements(x), src_data_rank=None
    ).to_local()


def _learnable_local_bound(b: Tensor, x: Any) -> Tensor:
    """A bound that requires grad, restricted to ``x``'s local values, differentiably.

    Its gradient is summed over the ranks of ``x``'s mesh in the backward pass (each
    element once), so that every rank holds the gradient of the whole cost, as for an
    unsharded parameter. Under ``torch.compile`` see :func:`_traced_local_bound`.
    """
    shared = _SumGradAcross.apply(b, x.device_mesh, _counts_here(x))
    flat = shared.expand(x.shape).reshape(-1)
    return flat[_local_positions(x).to(flat.device)]


class _SumGradAcross(torch.autograd.Function):
    """The identity; its backward pass sums the gradient over the ranks of a mesh."""

    @staticmethod
    def forward(ctx: Any, b: Tensor, mesh: Any, counted: bool) -> Tensor:
        ctx.mesh, ctx.counted = mesh, counted
        return b.view_as(b)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Any, ...]:
        mine = grad if ctx.counted else torch.zeros_like(grad)  # replicas: counted once
        return sum_over(mine, ctx.mesh, "the gradient of a learnable bound"), None, None


def full_bound(b: Any) -> Any:
    """A DTensor bound as a plain full tensor (a collective), for an unsharded parameter.

    FSDP2 with ``reshard_after_forward=False`` leaves plain, unsharded parameters after
    the forward pass; their DTensor bounds are gathered once, when the plan is built.
    """
    return _reduce(b).full_tensor() if is_dtensor(b) else b


def map_local(b: Any, fn: Any) -> Any:
    """``fn`` applied to the values of the DTensor ``b``, keeping its layout (no communication).

    ``fn`` maps a local tensor elementwise (such as rounding a bound inward). A
    ``Partial`` DTensor is reduced first (a collective), so ``fn`` sees values.
    """
    d = _reduce(b)
    return _DTENSOR.from_local(
        fn(d.to_local()),
        d.device_mesh,
        d.placements,
        run_check=False,
        shape=d.shape,
        stride=d.stride(),
    )


#: Per module: (the leaves last looked at, their FSDP2 originals by leaf index).
_ORIGINALS: weakref.WeakKeyDictionary[Any, tuple[list[Any], dict[int, Any]]] = (
    weakref.WeakKeyDictionary()
)


def fsdp_originals(model: Any, leaves: list[Any]) -> dict[int, Any]:
    """The sharded parameters behind the copies FSDP2 has registered in their place.

    Between FSDP2's all-gather and its reshard (after a forward pass that does not
    reshard: the root module by default, ``reshard_after_forward=False`` or an int),
    a module holds an unsharded copy of each of its parameters (a plain tensor, or a
    DTensor on a smaller mesh); the optimizer and the checkpoint hold the sharded
    ``DTensor``. Returns ``{leaf index: sharded parameter}`` for every leaf of
    ``model.named_parameters()`` that is such a copy; empty when FSDP2 is not in use.
    Looked up again only when the leaves change (FSDP2 swaps the registered tensors).
    """
    if "torch.distributed.fsdp" not in sys.modules:  # never imported: no FSDP2 module
        return {}
    seen = _ORIGINALS.get(model)
    if seen is not None and seen[0] is leaves:
        return seen[1]
    from torch.distributed.fsdp import FSDPModule

    behind: dict[int, Any] = {}
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        state: Any = module._get_fsdp_state()
        groups = getattr(state, "_fsdp_param_groups", None)
        if groups is None:  # torch before 2.9: one group per module
            groups = [g for g in [state._fsdp_param_group] if g is not None]
        for group in groups:
            for fp in group.fsdp_params:
                info = fp._module_info
                registered = info.module._parameters.get(info.param_name)
                if registered is not None and registered is not fp.sharded_param:
                    behind[id(registered)] = fp.sharded_param
    found = {i: behind[id(x)] for i, x in enumerate(leaves) if id(x) in behind}
    _ORIGINALS[model] = (leaves, found)
    return found


def order_violation(lo: Any, hi: Any, x: Any) -> tuple[int, tuple[int, ...], float, float] | None:
    """The first element of this rank's part of DTensor ``x`` where ``lo > hi``, if any.

    Returns ``(global flat index, global index, lower, upper)``, or ``None``.
    """
    with torch.no_grad():
        lo_l, hi_l = local_bound(lo, x), local_bound(hi, x)
    shape = x.to_local().shape  # the same for Partial: addends have the values' shape
    bad = (torch.as_tensor(lo_l) > torch.as_tensor(hi_l)).expand(shape)
    if not bool(bad.any()):
        return None
    local_pos = _local_positions(x).to(bad.device)  # slicing needs no communication
    flat = int(local_pos[bad].min())
    where = tuple(int(i) for i in (local_pos == flat).nonzero()[0])
    lo_v = torch.as_tensor(lo_l).expand(shape)[where].item()
    hi_v = torch.as_tensor(hi_l).expand(shape)[where].item()
    idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), x.shape))
    return flat, idx, lo_v, hi_v


def agree(
    named: list[tuple[str, Any]], lowers: list[Any], uppers: list[Any], errors: dict[int, Any]
) -> None:
    """Check, once per plan, that every rank bounds the same DTensors; share errors.

    ``lowers``/``uppers`` are the bounds as given, leaf by leaf; ``errors`` the
    :class:`BoundsError` each DTensor leaf raised on this rank (with ``flat_index``).
    One exchange per mesh; every rank raises the same error.

    Raises:
        BoundsError: when ranks differ, or when any rank found an invalid bound.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    per_mesh: dict[Any, list[Any]] = {}
    for i, (path, p) in enumerate(named):
        if is_dtensor(p):
            desc = (path, _describe(p), _bound(lowers[i]), _bound(uppers[i]))
            per_mesh.setdefault(p.device_mesh, []).append((i, desc))
    exchanges = []
    for mesh, entries in per_mesh.items():
        ex = Exchange("plan", fingerprint([d for _, d in entries]), len(entries))
        for i, _ in entries:
            if i in errors:
                ex.note(i, getattr(errors[i], "flat_index", -1), str(errors[i]))
        exchanges.append((mesh, ex))
    settle(exchanges, "building the bounds plan")


def _describe(x: Any) -> tuple[Any, ...]:
    return (tuple(x.shape), str(x.dtype), tuple(map(repr, x.placements)), mesh_ranks(x.device_mesh))


def _bound(b: Any) -> Any:
    """What must be the same on every rank about one bound, for the plan's fingerprint.

    Numbers by value; a plain tensor by shape, dtype and a digest of its values (one
    host copy, once per plan: ranks that pass different per-element bounds of the same
    shape disagree); a DTensor bound by its layout (each rank holds its own part).
    """
    if not isinstance(b, Tensor):
        return b
    if is_dtensor(b):
        d: Any = b
        # its mesh by shape: a submesh holds other ranks on other ranks (HSDP)
        return ("dtensor", tuple(d.shape), tuple(map(repr, d.placements)), d.device_mesh.shape)
    if not b.dim():
        return float(b.detach())
    data = b.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    return ("tensor", tuple(b.shape), str(b.dtype), hashlib.blake2b(data, digest_size=16).digest())


def agree_penalty(dtensors: list[Any], penalty: Any) -> None:
    """Check, once per plan and penalty, that every rank computes the cost with ``penalty``.

    ``dtensors`` are the plan's DTensor parameters, in leaf order; one exchange per mesh.

    Raises:
        BoundsError: on every rank, when the ranks of a mesh use different penalties.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    kind = type(penalty)
    fp = fingerprint([kind.__module__, kind.__qualname__, penalty.name, penalty.jump])
    counts: dict[Any, int] = {}
    for x in dtensors:
        counts[x.device_mesh] = counts.get(x.device_mesh, 0) + 1
    settle(
        [(mesh, Exchange("penalty", fp, n)) for mesh, n in counts.items()],
        "the cost",
        differ="penalty",
    )


def cost_layout(x: Any) -> tuple[Any, tuple[Any, ...]]:
    """The mesh and placements of the cost of a DTensor ``x``.

    ``Partial`` (summed across ranks) on the mesh dimensions ``x`` is sharded on,
    ``Replicate`` on the others (replicated, or partial: reduced before the cost).
    Leaves with the same layout add up locally first.
    """
    from torch.distributed.tensor import Partial, Replicate

    kinds = [placement_kind(p) for p in x.placements]
    return x.device_mesh, tuple(Partial() if k == "shard" else Replicate() for k in kinds)


def partial_cost(local_cost: Tensor, layout: tuple[Any, tuple[Any, ...]]) -> Any:
    """Wrap the summed local costs of one layout as a DTensor that sums to the global cost."""
    mesh, placements = layout
    return _dtensor_cls().from_local(local_cost, mesh, list(placements), run_check=False)


def shard_cost(fn: Any, x: Any, lo: Any, hi: Any, *args: Any) -> Any:
    """``fn(x, lo, hi, *args)``; for a DTensor ``x``, on its local values, as a partial cost.

    The path ``torch.compile`` traces: the same layout as the eager kernels, so that
    :func:`combine` returns a plain tensor in both.
    """
    if not is_dtensor(x):
        return fn(x, lo, hi, *args)
    local = fn(to_local(x), local_bound(lo, x), local_bound(hi, x), *args)
    return partial_cost(local, cost_layout(x))


def combine(parts: list[Any]) -> list[Tensor]:
    """Turn DTensor partial costs into plain tensors: one reduction per mesh.

    In eager mode, :func:`~parambounds.torch._collectives.sum_over` (bounded in time on the
    CPU); traced by ``torch.compile`` or a ``torch.func`` transform, DTensor's own
    ``full_tensor()``.
    """
    plain = [part for part in parts if not is_dtensor(part)]
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        by_mesh: dict[Any, Any] = {}
        for part in parts:
            if is_dtensor(part):
                mesh = part.device_mesh
                by_mesh[mesh] = part if mesh not in by_mesh else by_mesh[mesh] + part
        return plain + [total.full_tensor() for total in by_mesh.values()]
    groups: dict[Any, tuple[list[bool], list[Tensor]]] = {}
    for part in parts:
        if is_dtensor(part):
            counted, local = groups.setdefault(part.device_mesh, ([], []))
            coord = part.device_mesh.get_coordinate()
            # Replicated dimensions hold the same sum on every rank: the first one counts.
            counted.append(all(c == 0 for c, p in zip(coord, part.placements) if p.is_replicate()))
            local.append(part.to_local())
    return plain + [
        _SumAcross.apply(mesh, tuple(counted), *local) for mesh, (counted, local) in groups.items()
    ]


class _SumAcross(torch.autograd.Function):
    """The partial costs of one mesh, summed over its ranks (each counted once).

    The gradient of the total with respect to each rank's partial cost is one, so the
    backward pass needs no communication: each rank passes the incoming gradient on.
    """

    @staticmethod
    def forward(ctx: Any, mesh: Any, counted: tuple[bool, ...], *local: Tensor) -> Tensor:
        ctx.dtypes = [t.dtype for t in local]
        dtype = functools.reduce(torch.promote_types, ctx.dtypes)
        total = torch.zeros((), dtype=dtype, device=local[0].device)
        for c, t in zip(counted, local):
            if c:  # not multiplied by 0: a NaN or inf cost on a replica would remain
                total = total + t.detach()
        return sum_over(total, mesh, "the cost")

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Any, ...]:
        if is_dtensor(grad):  # the cost added to a DTensor loss (loss_parallel): Replicate
            grad = cast(Any, grad).full_tensor()
        return (None, None, *(grad.to(dtype) for dtype in ctx.dtypes))


@torch.no_grad()
def clamp_(x: Any, lo: Any, hi: Any) -> None:
    """Clamp the DTensor (or tensor) ``x`` in place; ``lo``/``hi`` are local bounds.

    A ``Partial`` DTensor is clamped exactly: for ``max``/``min`` each addend is clamped
    (clamping commutes with them); for ``sum`` the elements that change are written as
    the clamped value on the first rank of each partial dimension and zero elsewhere.

    Raises:
        BoundsError: for a ``Partial`` with another reduction (``avg``, masked).
    """
    if not is_partial(x):
        to_local(x).clamp_(lo, hi)
        return
    local = x._local_tensor
    ops = {getattr(p, "reduce_op", None) for p in x.placements if placement_kind(p) == "partial"}
    if ops <= {"max", "min"}:
        local.clamp_(lo, hi)
        return
    if ops != {"sum"} or any(type(p).__name__ != "Partial" for p in x.placements if p.is_partial()):
        raise BoundsError(
            f"cannot clamp a Partial DTensor with reduction {sorted(map(str, ops))} in place; "
            "redistribute it to Replicate first"
        )
    value = to_local(x)  # the reduced values (a collective)
    clamped = value.clamp(lo, hi)
    changed = clamped != value  # NaN stays NaN: written as NaN on the first rank
    coord = x.device_mesh.get_coordinate()
    first = all(c == 0 for c, p in zip(coord, x.placements) if p.is_partial())
    local.copy_(torch.where(changed, clamped if first else torch.zeros_like(clamped), local))


def _counts_here(x: Any) -> bool:
    """Whether this rank's part of ``x`` is the one to count (first replica of it)."""
    coord = x.device_mesh.get_coordinate()
    if coord is None:  # this rank is not in the mesh
        return False
    return all(c == 0 for c, p in zip(coord, x.placements) if placement_kind(p) != "shard")


def reduce_stats(stats: Tensor, leaves: list[Any], fp: int = 0) -> Tensor:
    """Combine per-shard ``[below, above, max_excess, nan]`` rows across ranks.

    Rows of DTensors are reduced over each DTensor's own mesh: a header exchange (are
    all ranks in the same call, with the same plan?) and one gather of the rows, per
    mesh. Rows of plain tensors are left as they are.

    Raises:
        BoundsError: when the ranks of a mesh are not all reporting the same parameters.
    """
    import torch.distributed as dist

    by_mesh: dict[Any, list[int]] = {}
    for i, x in enumerate(leaves):
        if is_dtensor(x):
            by_mesh.setdefault(x.device_mesh, []).append(i)
    if not by_mesh or not (dist.is_available() and dist.is_initialized()):
        return stats
    settle(
        [
            (
                mesh,
                Exchange(
                    "report", fingerprint([fp, [_describe(leaves[i]) for i in rows]]), len(rows)
                ),
            )
            for mesh, rows in by_mesh.items()
        ],
        "report/check",
    )
    out = stats.clone()
    for mesh, rows in by_mesh.items():
        mine = stats[rows].clone()
        weights = torch.tensor(
            [1.0 if _counts_here(leaves[i]) else 0.0 for i in rows], dtype=stats.dtype
        ).to(stats.device)
        mine[:, [0, 1, 3]] *= weights[:, None]  # replicas beyond the first do not add up
        gathered = gather_rows(mine.reshape(-1), mesh, "report/check").view(-1, len(rows), 4)
        idx = torch.tensor(rows, device=out.device)
        out[idx[:, None], torch.tensor([0, 1, 3], device=out.device)] = (
            gathered[:, :, [0, 1, 3]].sum(dim=0).to(out.device)
        )
        out[idx, 2] = gathered[:, :, 2].amax(dim=0).to(out.device)
    return out
