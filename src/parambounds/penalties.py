r"""The math: penalty shapes applied to the excess of a bounded element.

For an element :math:`x` with bounds :math:`[l, u]` the *excess* is

.. math::

    e = \max(x - u,\; l - x),

positive exactly when :math:`x` is outside the bounds (``l <= u`` ensures at most one
side is violated). A penalty shape :math:`f` maps the excess of a violating element to
its cost; elements with :math:`e \le 0` cost nothing. The total cost is
:math:`\sum_i [e_i > 0]\, f(e_i)`.

Overflow guard: ``exp`` and ``expm1`` overflow for large excesses (about 88.7 in
float32). Past the threshold :math:`T = 0.9 \log(\mathrm{finfo.max})` of the computing
dtype (79.9 for float32 and bfloat16, 638.8 for float64, 10.0 for float16) they continue
linearly with the slope at :math:`T`, so finite input gives finite cost and gradients
for every excess below about :math:`\mathrm{finfo.max}^{0.1}` (about 7000 in float32).

Adding a shape is one subclass of :class:`Penalty` with ``value`` (and, where the
value and the slope share work, ``value_and_slope``) registered in :data:`PENALTIES`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from .errors import BoundsError

if TYPE_CHECKING:
    import torch
    from torch import Tensor

__all__ = ["PENALTIES", "Penalty", "get_penalty", "overflow_threshold", "threshold_for_max"]


def threshold_for_max(finfo_max: float) -> float:
    r"""The overflow threshold :math:`T = 0.9 \log(\mathrm{max})` for a dtype's largest value.

    Shared by every backend, so they all continue linearly at the same excess.

    >>> round(threshold_for_max(3.4028234663852886e38), 2)
    79.85
    """
    return 0.9 * math.log(finfo_max)


def overflow_threshold(dtype: torch.dtype) -> float:
    r"""Excess past which exponential penalties continue linearly.

    .. math:: T = 0.9 \log(\mathrm{finfo}(\mathrm{dtype}).\mathrm{max})

    Examples:
        >>> import torch
        >>> round(overflow_threshold(torch.float32), 2)
        79.85
    """
    import torch  # only torch dtypes get here; torch is loaded already

    return threshold_for_max(torch.finfo(dtype).max)


class Penalty:
    r"""A penalty shape :math:`f(e)` for the excess :math:`e > 0` of a violating element.

    Attributes:
        name: the name accepted by ``penalty=``.
        jump: whether :math:`\lim_{e \to 0^+} f(e) \ne 0`, i.e. the cost jumps at the
            bound (Rockpool's ``exp``).
    """

    name: str = ""
    jump: bool = False

    def value(self, e: Tensor) -> Tensor:
        """Return :math:`f(e)` elementwise for ``e >= 0``; differentiable by autograd.

        Must be NaN where ``e`` is NaN, and :meth:`slope` too. Its autograd gradient
        should be :meth:`slope` times the incoming gradient, with no ``0 * incoming``
        terms (an infinite incoming gradient would make them NaN).
        """
        raise NotImplementedError

    def slope(self, e: Tensor) -> Tensor:
        """Return :math:`f'(e)` elementwise for ``e >= 0``."""
        raise NotImplementedError

    def value_and_slope(self, e: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(value(e), slope(e))``; override when the two share work."""
        return self.value(e), self.slope(e)

    def __repr__(self) -> str:
        return f"Penalty({self.name!r})"

    def __reduce__(self) -> Any:
        # A registered shape unpickles (and deep-copies) as the registered object itself,
        # which the native kernel and the caches recognise by identity.
        if PENALTIES.get(self.name) is self:
            return (get_penalty, (self.name,))
        return super().__reduce__()


class ExpPenalty(Penalty):
    r"""Rockpool's shape: :math:`f(e) = e^{e}`, which jumps from 0 to 1 at the bound.

    .. math::

        f(e) = \begin{cases} \exp(e) & e \le T \\ \exp(T)\,(1 + e - T) & e > T \end{cases}
    """

    name = "exp"
    jump = True

    def value_and_slope(self, e: Tensor) -> tuple[Tensor, Tensor]:
        t = overflow_threshold(e.dtype)
        slope = e.clamp_max(t).exp()
        # relu, not clamp_min: its gradient at e == T is 0, so autograd's slope there is
        # exp(T) from the clamped branch alone (clamp_min would add it twice).
        return slope.addcmul(slope, (e - t).relu()), slope

    def value(self, e: Tensor) -> Tensor:
        # For autograd: past T only, so that below it the gradient is exp(e) times the
        # incoming one, never plus 0 * incoming (NaN for an infinite incoming gradient).
        t = overflow_threshold(e.dtype)
        slope = e.clamp_max(t).exp()
        return slope.where(~(e > t), slope.addcmul(slope, (e - t).relu()))

    def slope(self, e: Tensor) -> Tensor:
        return e.clamp_max(overflow_threshold(e.dtype)).exp()


class Expm1Penalty(Penalty):
    r"""Exponential shape that is zero and continuous at the bound.

    .. math::

        f(e) = \begin{cases} \exp(e) - 1 & e \le T \\ \exp(T) - 1 + \exp(T)(e - T) & e > T
        \end{cases}
    """

    name = "expm1"

    def value_and_slope(self, e: Tensor) -> tuple[Tensor, Tensor]:
        t = overflow_threshold(e.dtype)
        capped = e.clamp_max(t)
        slope = capped.exp()
        return capped.expm1() + slope * (e - t).relu(), slope

    def value(self, e: Tensor) -> Tensor:
        # For autograd: as ExpPenalty.value, the linear part only where it applies.
        t = overflow_threshold(e.dtype)
        capped = e.clamp_max(t)
        return capped.expm1().where(~(e > t), capped.expm1() + capped.exp() * (e - t).relu())

    def slope(self, e: Tensor) -> Tensor:
        return e.clamp_max(overflow_threshold(e.dtype)).exp()


class QuadraticPenalty(Penalty):
    r"""Quadratic shape, as in cooper's quadratic penalty: :math:`f(e) = e^2`."""

    name = "quadratic"

    def value(self, e: Tensor) -> Tensor:
        return e * e

    def slope(self, e: Tensor) -> Tensor:
        return 2 * e


class LinearPenalty(Penalty):
    r"""Linear shape: :math:`f(e) = e`, an exact penalty with a constant pull."""

    name = "linear"

    def value(self, e: Tensor) -> Tensor:
        return e.clone()

    def slope(self, e: Tensor) -> Tensor:
        return e.new_ones(e.shape).where(~e.isnan(), e)


#: Registered penalty shapes by name.
PENALTIES: dict[str, Penalty] = {
    p.name: p for p in (ExpPenalty(), Expm1Penalty(), QuadraticPenalty(), LinearPenalty())
}


def get_penalty(penalty: str | Penalty) -> Penalty:
    """Return the registered :class:`Penalty` named ``penalty`` (or ``penalty`` itself).

    Raises:
        BoundsError: for an unknown name; the message lists the valid ones.
    """
    if isinstance(penalty, Penalty):
        return penalty
    try:
        return PENALTIES[penalty]
    except (KeyError, TypeError):
        valid = ", ".join(repr(n) for n in PENALTIES)
        raise BoundsError(f"unknown penalty {penalty!r}; expected one of {valid}") from None
