"""The library's error types, the checks whose messages the backends share, verify mode."""

from __future__ import annotations

import math
import numbers
import os
from typing import Any

__all__ = [
    "BoundsError",
    "BoundsViolationError",
    "get_verify",
    "mismatch",
    "number_bound",
    "order_error",
    "set_verify",
    "verifying",
]


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


# ---------------------------------------------------------------- verify mode

_ON = ("1", "true", "yes", "on")
_OFF = ("", "0", "false", "no", "off")


def _from_environment() -> bool | None:
    raw = os.environ.get("PARAMBOUNDS_VERIFY", "").strip().lower()
    if raw in _ON:
        return True
    return False if raw in _OFF else None


#: Verify mode, from ``PARAMBOUNDS_VERIFY`` (``None``: a value that is neither on nor off).
_verify: bool | None = _from_environment()


def set_verify(on: bool) -> None:
    """Turn verify mode on or off (it starts as ``PARAMBOUNDS_VERIFY`` says: ``1`` is on).

    In verify mode every cached or fast result is computed again by a cache-free,
    plainly written float64 reference and compared: the plan found for the bounds, the
    cost and (in ``backward``) the gradient of every bounded parameter, the report's
    statistics, the projection, the parameters found for a module, the JAX plan cache.
    A difference raises :class:`BoundsError` naming both answers. It costs what it
    costs (several times a step); it is for tests and debugging. See docs/correctness.md.

    Examples:
        >>> import parambounds
        >>> parambounds.set_verify(True)
        >>> parambounds.get_verify()
        True
        >>> parambounds.set_verify(False)
    """
    global _verify
    _verify = bool(on)


def get_verify() -> bool:
    """Whether verify mode is on (see :func:`set_verify`).

    Raises:
        BoundsError: when ``PARAMBOUNDS_VERIFY`` is set to something that is neither on
            (``1``, ``true``, ``yes``, ``on``) nor off (``0``, ``false``, ``no``, ``off``,
            empty).
    """
    return verifying()


def verifying() -> bool:
    """:func:`get_verify`, for the per-step checks (one global read when set)."""
    if _verify is None:
        raise BoundsError(
            f"PARAMBOUNDS_VERIFY={os.environ.get('PARAMBOUNDS_VERIFY')!r} is neither on "
            "('1', 'true', 'yes', 'on') nor off ('0', 'false', 'no', 'off', or unset)"
        )
    return _verify


def mismatch(what: str, fast: Any, reference: Any, hint: str = "") -> BoundsError:
    """The error of verify mode: a fast or cached answer that the reference does not give.

    Args:
        what: what was compared (``"cost"``, ``"report of 'w'"``).
        fast: the library's answer.
        reference: the reference's answer.
        hint: what may have caused it, when known.
    """
    return BoundsError(
        f"verify mode: the {what} is {fast}, but the float64 reference computes "
        f"{reference}" + (f"; {hint}" if hint else "") + " (a stale cache or a bug in "
        "parambounds: please report it, with this message)"
    )
