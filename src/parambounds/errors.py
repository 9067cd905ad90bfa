"""The library's error types."""

from __future__ import annotations

__all__ = ["BoundsError", "BoundsViolationError"]


class BoundsError(ValueError):
    """Invalid bounds, or bounds that do not fit the parameters they are applied to.

    Messages name the parameter path (``1_LIFTorch.tau_syn``), the offending value and
    what was expected.
    """


class BoundsViolationError(BoundsError):
    """A parameter lies outside its bounds where the caller asked for it to be inside."""
