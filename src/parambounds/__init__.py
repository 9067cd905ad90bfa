"""parambounds: keep the parameters of PyTorch models inside the ranges where they mean something.

A drop-in for Rockpool's ``rockpool.training.torch_loss`` bounds functions, without
their defects.
"""

from importlib.metadata import PackageNotFoundError, version

from ._kernels import get_kernel, set_kernel
from .constraints import BoundedParametrization
from .cost import bounds_cost
from .errors import BoundsError, BoundsViolationError
from .loss import ParameterBoundaryRegularizer, summed_exp_boundary_loss
from .penalties import PENALTIES, Penalty, overflow_threshold
from .report import ParamReport, Report
from .spec import Bounds
from .trees import make_bounds

try:
    __version__ = version("parambounds")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"

__all__ = [
    "PENALTIES",
    "BoundedParametrization",
    "Bounds",
    "BoundsError",
    "BoundsViolationError",
    "ParamReport",
    "ParameterBoundaryRegularizer",
    "Penalty",
    "Report",
    "__version__",
    "bounds_cost",
    "get_kernel",
    "make_bounds",
    "overflow_threshold",
    "set_kernel",
    "summed_exp_boundary_loss",
]
