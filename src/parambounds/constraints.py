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

from ._kernels import clamp_args
from ._plan import Plan
from .distributed import clamp_, is_dtensor, is_partial, to_local
from .errors import BoundsError

__all__ = ["BoundedParametrization", "project_plan_", "reparametrize_plan_"]


@torch.no_grad()
def project_plan_(plan: Plan, leaves: list[Tensor]) -> None:
    """Clamp the bounded leaves of ``plan`` in place: one multi-tensor op per group.

    Computed tensors (the values of reparametrized parameters) are skipped: they are
    bounded by construction and cannot be written.
    """
    for g in plan.groups:
        # DTensors (FSDP2, tensor parallel): clamp the local shard in place.
        own = [leaves[i] for i in g.indices if leaves[i].is_leaf]
        for x in own:
            if is_partial(x):  # addends, not values: clamped exactly, one by one
                clamp_(x, g.lower, g.upper)
        xs = [to_local(x) for x in own if not is_partial(x)]
        if not xs:
            continue
        if g.lower is not None:
            torch._foreach_clamp_min_(xs, g.lower)
        if g.upper is not None:
            torch._foreach_clamp_max_(xs, g.upper)
    for lb in plan.tensor_leaves:
        x = leaves[lb.index]
        if x.is_leaf:
            lo, hi = plan.local_bounds(lb.index, lb.lower, lb.upper, x)
            lo, hi = clamp_args(lo, hi)
            clamp_(x, lo, hi)


def _as_buffer(b: Any, like: Tensor) -> Tensor | None:
    if b is None:
        return None
    return torch.as_tensor(b, dtype=like.dtype, device=like.device).detach().clone()


class BoundedParametrization(torch.nn.Module):
    """Maps an unconstrained tensor into ``[lower, upper]`` (either side may be open).

    ``right_inverse`` keeps the current values: values on or outside a bound are first
    moved inside by a small margin (``1e-6`` of the width, or of ``max(1, |bound|)`` for
    one-sided bounds).
    """

    lower: Tensor | None
    upper: Tensor | None

    def __init__(self, lower: Any, upper: Any, like: Tensor) -> None:
        super().__init__()
        if lower is None and upper is None:
            raise BoundsError("a bounded parametrization needs at least one bound")
        self.register_buffer("lower", _as_buffer(lower, like))
        self.register_buffer("upper", _as_buffer(upper, like))

    def forward(self, z: Tensor) -> Tensor:
        """Map ``z`` into the bounds."""
        lo: Any = self.lower
        hi: Any = self.upper
        if lo is not None and hi is not None:
            return lo + (hi - lo) * torch.sigmoid(z)
        if lo is not None:
            return lo + torch.nn.functional.softplus(z)
        return hi - torch.nn.functional.softplus(z)

    @staticmethod
    def _inv_softplus(y: Tensor) -> Tensor:
        # log(exp(y) - 1) = y + log(-expm1(-y)), stable for large and small y > 0.
        return y + torch.log(-torch.expm1(-y))

    def right_inverse(self, x: Tensor) -> Tensor:
        """The unconstrained tensor whose image is ``x`` (moved just inside)."""
        lo: Any = self.lower
        hi: Any = self.upper
        x = x.detach()
        if lo is not None and hi is not None:
            width = hi - lo
            eps = 1e-6
            t = ((x - lo) / width).clamp(eps, 1 - eps)
            t = torch.where(width > 0, t, 0.5)
            return torch.logit(t)
        if lo is not None:
            margin = 1e-6 * lo.abs().clamp_min(1.0)
            return self._inv_softplus((x - lo).clamp_min(margin))
        margin = 1e-6 * hi.abs().clamp_min(1.0)
        return self._inv_softplus((hi - x).clamp_min(margin))

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


def reparametrize_plan_(model: torch.nn.Module, plan: Plan, names: list[str]) -> torch.nn.Module:
    """Register a :class:`BoundedParametrization` on every bounded parameter of ``plan``."""
    params = dict(model.named_parameters())
    for i, lo, hi in plan.bounded_items():
        name = names[i]
        owner, attr = _owner(model, name)
        if parametrize.is_parametrized(owner, attr):
            raise BoundsError(f"parameter '{name}' is already parametrized")
        if name not in params:
            raise BoundsError(f"'{name}' is not a parameter that can be reparametrized")
        if is_dtensor(params[name]):
            raise BoundsError(
                f"cannot reparametrize '{name}': it is a DTensor (FSDP2 or tensor parallel), "
                "and torch.nn.utils.parametrize does not support sharded parameters; call "
                "reparametrize_ before fully_shard, or use attach/project_"
            )
        try:
            parametrize.register_parametrization(
                owner, attr, BoundedParametrization(lo, hi, params[name])
            )
        except Exception as err:  # a module type that parametrize does not support
            raise BoundsError(f"cannot reparametrize '{name}': {err}") from err
    return model
