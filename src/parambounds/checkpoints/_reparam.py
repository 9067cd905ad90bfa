"""Parameters saved after ``Bounds.reparametrize_``: checked under their usual name.

``reparametrize_`` stores ``1.tau`` as ``1.parametrizations.tau.original`` (the
unconstrained tensor) plus the bounds it was given, ``1.parametrizations.tau.0.lower``
and ``.0.upper``. The value the model uses is computed from those; clamping it writes
back the unconstrained tensor whose image is the clamped value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..errors import BoundsError

if TYPE_CHECKING:
    from ..torch._constraints import BoundedParametrization

__all__ = ["Reparametrized", "find_reparametrized"]

_ORIGINAL = re.compile(r"^(?P<owner>(?:.*\.)?)parametrizations\.(?P<attr>[^.]+)\.original$")


@dataclass
class Reparametrized:
    """One reparametrized parameter: the stored unconstrained tensor and saved bounds."""

    source: str
    original: Tensor
    lower: Tensor | None
    upper: Tensor | None

    def _module(self) -> BoundedParametrization:
        from ..torch._constraints import BoundedParametrization  # only when a file holds one

        return BoundedParametrization(self.lower, self.upper, self.original)

    @torch.no_grad()
    def value(self) -> Tensor:
        """The value the model uses."""
        return self._module()(self.original)

    @torch.no_grad()
    def clamped(self, name: str, lo: float | None, hi: float | None) -> Tensor:
        """The unconstrained tensor whose value is this one's clamped into ``[lo, hi]``.

        Only the elements whose value is outside change; ``original`` is not written.

        Raises:
            BoundsError: when the saved bounds do not reach ``[lo, hi]``.
        """
        p = self._module()
        v = p(self.original)
        c = v.clamp(lo, hi)
        changed = c != v
        changed &= ~torch.isnan(v)
        if not bool(changed.any()):
            return self.original.clone()
        z = torch.where(changed, p.right_inverse(c), self.original)
        increasing = self.lower is not None
        step = torch.full_like(z, torch.finfo(z.dtype).eps) * z.abs().clamp_min(1.0)
        for _ in range(80):  # the inverse may round just outside: nudge inwards
            y = p(z)
            low = changed & (y < lo) if lo is not None else torch.zeros_like(changed)
            high = changed & (y > hi) if hi is not None else torch.zeros_like(changed)
            if not bool((low | high).any()):
                return z
            up = low if increasing else high
            down = high if increasing else low
            z = torch.where(up, z + step, torch.where(down, z - step, z))
            step = step * 2
        raise BoundsError(
            f"cannot clamp '{name}' into [{lo}, {hi}]: the bounds it was reparametrized "
            "with do not reach that range"
        )


def find_reparametrized(tensors: dict[str, Tensor]) -> dict[str, Reparametrized]:
    """Take the tensors of reparametrized parameters out of ``tensors``; name them usually.

    Returns:
        the reparametrized parameters by their usual name (``1.tau``).
    """
    found: dict[str, Reparametrized] = {}
    for name in list(tensors):
        m = _ORIGINAL.match(name)
        if m is None:
            continue
        base = name[: -len("original")]
        parts = {n[len(base) :] for n in tensors if n.startswith(base)}
        if not parts <= {"original", "0.lower", "0.upper"} or parts == {"original"}:
            continue  # another parametrization, or a chain: keep the raw names
        usual = m.group("owner") + m.group("attr")
        if usual in tensors:
            continue
        found[usual] = Reparametrized(
            name,
            tensors.pop(name),
            tensors.pop(base + "0.lower", None),
            tensors.pop(base + "0.upper", None),
        )
    return found
