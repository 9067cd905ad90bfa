"""parambounds for JAX: the same bounds for JAX pytrees, without torch.

A drop-in for Rockpool's ``rockpool.training.jax_loss`` bounds functions
(:func:`bounds_cost`, :func:`make_bounds`, :func:`bounds_clip`) and
:func:`summed_exp_boundary_loss`, with parambounds' semantics, plus the same
:class:`Bounds` spec as the torch side: ``cost``, ``report``, ``check``, ``project``
(a new pytree) and the ``unconstrain``/``constrain`` pair.

Importing this module never imports torch.
"""

from __future__ import annotations

from ..errors import BoundsError, BoundsViolationError
from ..report import ParamReport, Report
from ..spec import Bounds
from ._cost import bounds_clip, bounds_cost, summed_exp_boundary_loss
from ._trees import make_bounds

__all__ = [
    "Bounds",
    "BoundsError",
    "BoundsViolationError",
    "ParamReport",
    "Report",
    "bounds_clip",
    "bounds_cost",
    "make_bounds",
    "summed_exp_boundary_loss",
]
