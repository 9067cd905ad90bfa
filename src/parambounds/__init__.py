"""parambounds: keep the parameters of PyTorch models inside the ranges where they mean something.

A drop-in for Rockpool's ``rockpool.training.torch_loss`` bounds functions, without
their defects.
"""

from importlib.metadata import PackageNotFoundError, version

from .cost import bounds_cost
from .errors import BoundsError, BoundsViolationError
from .loss import ParameterBoundaryRegularizer, summed_exp_boundary_loss
from .penalties import PENALTIES, Penalty, overflow_threshold
from .trees import make_bounds

try:
    __version__ = version("parambounds")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"

__all__ = [
    "PENALTIES",
    "BoundsError",
    "BoundsViolationError",
    "ParameterBoundaryRegularizer",
    "Penalty",
    "__version__",
    "bounds_cost",
    "make_bounds",
    "overflow_threshold",
    "summed_exp_boundary_loss",
]
