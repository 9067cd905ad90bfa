"""The library's error types, and the checks whose messages the torch and JAX backends share."""

from __future__ import annotations

import math
import numbers
from typing import Any

__all__ = ["BoundsError", "BoundsViolationError", "number_bound", "order_error"]


class BoundsError(ValueError):
    """Invalid bounds, or bounds that do not fit the parameters they are applied to.

    Messages name the parameter path (``1_LIFTorch.tau_syn``), the offending value and
    what was expected.
    """


class BoundsViolationError(BoundsError):
    """A parameter lies outside its bounds where the caller asked for it to be inside."""


def number_bound(where: str, side: str, b: numbers.Real) -> float:
    """A number bound as a float (an integer beyond float64 is +-inf), checked.

    Args:
        where: how the message names the bound (``"lower bound for 'w'"``).
        side: ``"lower"`` or ``"upper"``.
        b: the bound.

    Raises:
        BoundsError: for NaN, and for an infinite bound on the side no value can satisfy.
    """
    try:
        v = float(b)
    except OverflowError:
        v = math.inf if b > 0 else -math.inf  # type: ignore[operator]
    if math.isnan(v):
        raise BoundsError(f"{where} is NaN")
    if (side == "lower" and v == math.inf) or (side == "upper" and v == -math.inf):
        raise BoundsError(f"{where} is {v}, which no value can satisfy")
    return v


def order_error(name: str, lo: Any, hi: Any, index: tuple[int, ...] | None = None) -> BoundsError:
    """The error for a lower bound above its upper bound (torch, JAX and the spec alike).

    Args:
        name: the parameter's path, quoted as the message shows it, or what else the
            bounds are for (``"pattern '*.tau'"``).
        lo: the lower bound (at ``index`` for per-element bounds).
        hi: the upper bound (at ``index``).
        index: the first offending element's index, for per-element bounds.
    """
    at = "" if index is None else f" at index {index}"
    return BoundsError(f"lower bound for {name} exceeds its upper bound{at} ({lo} > {hi})")
