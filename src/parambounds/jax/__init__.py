"""parambounds for JAX: the same bounds for JAX pytrees, without torch."""

from __future__ import annotations

from ..errors import BoundsError, BoundsViolationError
from ..spec import Bounds

__all__ = ["Bounds", "BoundsError", "BoundsViolationError"]
