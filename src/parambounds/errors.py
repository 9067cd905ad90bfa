"""The library's error types."""

from __future__ import annotations

from typing import Any

__all__ = ["BoundsError", "BoundsViolationError", "order_error"]


class BoundsError(ValueError):
    """Invalid bounds, or bounds that do not fit the parameters they are applied to.

    Messages name the parameter path (``1_LIFTorch.tau_syn``), the offending value and
    what was expected.
    """


class BoundsViolationError(BoundsError):
    """A parameter lies outside its bounds where the caller asked for it to be inside."""


def order_error(name: str, lo: Any, hi: Any, index: tuple[int, ...] | None = None) -> BoundsError:
    """The error for a lower bound above its upper bound (torch and JAX alike).

    Args:
        name: the parameter's path, as shown to the user.
        lo: the lower bound (at ``index`` for per-element bounds).
        hi: the upper bound (at ``index``).
        index: the first offending element's index, for per-element bounds.
    """
    at = "" if index is None else f" at index {index}"
    return BoundsError(f"lower bound for '{name}' exceeds its upper bound{at} ({lo} > {hi})")
