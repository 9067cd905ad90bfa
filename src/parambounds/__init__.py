"""parambounds: keep the parameters of PyTorch and JAX models inside their meaningful ranges.

A drop-in for Rockpool's ``rockpool.training.torch_loss`` bounds functions (and, in
:mod:`parambounds.jax`, its ``jax_loss`` ones), without their defects.

The spec (:class:`Bounds`), the errors and the report need no framework; the torch API
(``bounds_cost``, ``make_bounds``, ...) imports torch when first used, so that
``import parambounds.jax`` works where torch is missing or broken.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from .errors import BoundsError, BoundsViolationError, get_verify, set_verify
from .report import ParamReport, Report
from .spec import Bounds, Model, PyTree

if TYPE_CHECKING:
    from .penalties import PENALTIES, Penalty, overflow_threshold
    from .torch._constraints import BoundedParametrization
    from .torch._cost import bounds_cost
    from .torch._kernels import get_kernel, set_kernel
    from .torch._loss import ParameterBoundaryRegularizer, summed_exp_boundary_loss
    from .torch._native import empty_cache
    from .torch._trees import make_bounds

try:
    __version__ = version("parambounds")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"

#: Public names of the torch API, by the module that defines them (imported on first use).
_LAZY = {
    "PENALTIES": ".penalties",
    "BoundedParametrization": ".torch._constraints",
    "ParameterBoundaryRegularizer": ".torch._loss",
    "Penalty": ".penalties",
    "bounds_cost": ".torch._cost",
    "empty_cache": ".torch._native",
    "get_kernel": ".torch._kernels",
    "make_bounds": ".torch._trees",
    "overflow_threshold": ".penalties",
    "set_kernel": ".torch._kernels",
    "summed_exp_boundary_loss": ".torch._loss",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'parambounds' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "PENALTIES",
    "BoundedParametrization",
    "Bounds",
    "BoundsError",
    "BoundsViolationError",
    "Model",
    "ParamReport",
    "ParameterBoundaryRegularizer",
    "Penalty",
    "PyTree",
    "Report",
    "__version__",
    "bounds_cost",
    "empty_cache",
    "get_kernel",
    "get_verify",
    "make_bounds",
    "overflow_threshold",
    "set_kernel",
    "set_verify",
    "summed_exp_boundary_loss",
]
