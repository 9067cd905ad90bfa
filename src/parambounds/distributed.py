"""The distributed path: bounds on ``DTensor`` parameters (FSDP2, tensor parallelism).

Everything is done on the local shard, with PyTorch's own distributed engine combining
the results; full parameters are never gathered.

- Cost: each rank computes the cost of its local shard (with the fast kernels); the
  partial costs become a ``DTensor`` that is ``Partial`` over the mesh dimensions the
  parameter is sharded on and ``Replicate`` over the others, so that
  ``full_tensor()`` (one all-reduce per mesh for the whole tree) sums every element
  exactly once, and autograd sends each shard its own gradient.
- Projection clamps the local shards in place; per-element bounds are sliced to the
  shard (``distribute_tensor(..., src_data_rank=None)``: no communication).
- Report: per-shard counts, one ``all_gather`` for the whole report, reduced the same
  way on every rank, so ``check`` agrees everywhere.

Under ``DistributedDataParallel`` parameters are plain tensors and nothing here is used.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = [
    "combine",
    "cost_layout",
    "is_dtensor",
    "local_bound",
    "partial_cost",
    "reduce_stats",
    "to_local",
]


def _dtensor_cls() -> Any:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - a build without torch.distributed
        return None
    return DTensor


_DTENSOR = _dtensor_cls()


def is_dtensor(x: Any) -> bool:
    """Whether ``x`` is a ``torch.distributed.tensor.DTensor``."""
    return _DTENSOR is not None and isinstance(x, _DTENSOR)


def to_local(x: Any) -> Tensor:
    """The local shard of a DTensor (differentiable), or ``x`` itself."""
    return x.to_local() if is_dtensor(x) else x


def local_bound(b: Any, x: Any) -> Any:
    """Restrict bound ``b`` to the local shard of the DTensor ``x``.

    ``b`` is a number, ``None``, a tensor that broadcasts to ``x``'s global shape, or a
    DTensor (redistributed to ``x``'s placements if they differ).
    """
    if b is None or not isinstance(b, Tensor):
        return b
    from torch.distributed.tensor import distribute_tensor

    if is_dtensor(b):
        d: Any = b
        if d.device_mesh != x.device_mesh or tuple(d.placements) != tuple(x.placements):
            d = d.redistribute(x.device_mesh, x.placements)
        return d.to_local()
    full = b.expand(x.shape).contiguous()
    return distribute_tensor(full, x.device_mesh, x.placements, src_data_rank=None).to_local()


def cost_layout(x: Any) -> tuple[Any, tuple[Any, ...]]:
    """The mesh and placements of the cost of a DTensor ``x``.

    ``Partial`` (summed across ranks) on the mesh dimensions ``x`` is sharded on,
    ``Replicate`` on the others. Leaves with the same layout add up locally first.
    """
    from torch.distributed.tensor import Partial, Replicate, Shard

    placements = tuple(Partial() if isinstance(p, Shard) else Replicate() for p in x.placements)
    return x.device_mesh, placements


def partial_cost(local_cost: Tensor, layout: tuple[Any, tuple[Any, ...]]) -> Any:
    """Wrap the summed local costs of one layout as a DTensor that sums to the global cost."""
    mesh, placements = layout
    return _DTENSOR.from_local(local_cost, mesh, list(placements), run_check=False)


def combine(parts: list[Any]) -> list[Tensor]:
    """Turn DTensor partial costs into plain tensors: one reduction per mesh."""
    by_mesh: dict[Any, Any] = {}
    plain = []
    for part in parts:
        if is_dtensor(part):
            mesh = part.device_mesh
            by_mesh[mesh] = part if mesh not in by_mesh else by_mesh[mesh] + part
        else:
            plain.append(part)
    return plain + [total.full_tensor() for total in by_mesh.values()]


def _counts_here(x: Any) -> bool:
    """Whether this rank's shard of ``x`` is the one to count (first replica of it)."""
    from torch.distributed.tensor import Replicate

    coord = x.device_mesh.get_coordinate()
    if coord is None:  # this rank is not in the mesh
        return False
    return all(c == 0 for c, p in zip(coord, x.placements) if isinstance(p, Replicate))


def reduce_stats(stats: Tensor, leaves: list[Any]) -> Tensor:
    """Combine per-shard ``[below, above, max_excess, nan]`` rows across ranks.

    One ``all_gather`` for the whole report; rows of plain tensors are left as they are.
    """
    import torch.distributed as dist

    dtensor_rows = [i for i, x in enumerate(leaves) if is_dtensor(x)]
    if not dtensor_rows or not (dist.is_available() and dist.is_initialized()):
        return stats
    weights = torch.ones(len(leaves), 1, dtype=stats.dtype, device=stats.device)
    for i in dtensor_rows:
        if not _counts_here(leaves[i]):
            weights[i] = 0.0
    mine = stats.clone()
    mine[:, [0, 1, 3]] *= weights  # counts of replicas beyond the first do not add up
    backend = dist.get_backend()
    device = stats.device if backend != "gloo" else torch.device("cpu")
    mine = mine.to(device)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    stacked = torch.stack(gathered)
    out = stats.clone()
    rows = torch.tensor(dtensor_rows, device=out.device)
    counts = stacked[:, :, [0, 1, 3]].sum(dim=0).to(out.device)
    excess = stacked[:, :, 2].amax(dim=0).to(out.device)
    out[rows[:, None], torch.tensor([0, 1, 3], device=out.device)] = counts[rows]
    out[rows, 2] = excess[rows]
    return out
