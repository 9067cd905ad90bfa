r"""Rockpool's single-tensor penalty: ``summed_exp_boundary_loss`` and its module.

.. math::

    \mathrm{sebl}(y, l, u) = \sum_i \begin{cases}
        \exp(y_i - u) & y_i > u \\
        \exp(l - y_i) & y_i < l \\
        0 & \text{otherwise}
    \end{cases}
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..errors import BoundsError
from ..penalties import PENALTIES
from ._cost import tree_cost

__all__ = ["ParameterBoundaryRegularizer", "summed_exp_boundary_loss"]


def summed_exp_boundary_loss(
    data: Tensor, lower_bound: Any = None, upper_bound: Any = None
) -> Tensor:
    r"""Summed exponential cost of the elements of ``data`` outside ``[lower, upper]``.

    A drop-in for Rockpool's function of the same name. Unlike Rockpool's, a bound of
    ``0`` is a bound, tensor bounds broadcast per element, the result is always a 0-d
    tensor of ``data``'s dtype and device, and the exponential continues linearly past
    the overflow threshold (:func:`~parambounds.penalties.overflow_threshold`).

    .. math::

        \sum_i [y_i > u]\,\exp(y_i - u) + [y_i < l]\,\exp(l - y_i)

    Args:
        data: the tensor to penalise.
        lower_bound: ``None`` (no bound), a number, or a tensor that broadcasts to ``data``.
        upper_bound: as ``lower_bound``.

    Raises:
        BoundsError: for an invalid bound, naming ``data``.

    Examples:
        >>> summed_exp_boundary_loss(torch.tensor([-1.0, 0.5, 3.0]), 0.0, 2.0)  # e^1 + e^1
        tensor(5.4366)
    """
    if not isinstance(data, Tensor):
        raise BoundsError(f"data must be a tensor, got {type(data).__name__}")
    return tree_cost(data, lower_bound, upper_bound, PENALTIES["exp"], root_name="data")


class ParameterBoundaryRegularizer(torch.nn.Module):
    """A module that applies :func:`summed_exp_boundary_loss` with fixed bounds.

    Tensor bounds are registered as buffers, so ``.to(device)`` moves them.

    Args:
        lower_bound: ``None``, a number, or a tensor.
        upper_bound: ``None``, a number, or a tensor.

    Examples:
        >>> reg = ParameterBoundaryRegularizer(lower_bound=0.0)
        >>> reg
        ParameterBoundaryRegularizer(lower_bound=0.0, upper_bound=None)
        >>> reg(torch.tensor([-1.0, 1.0]))
        tensor(2.7183)
    """

    def __init__(self, lower_bound: Any = None, upper_bound: Any = None) -> None:
        super().__init__()
        for name, value in (("lower_bound", lower_bound), ("upper_bound", upper_bound)):
            if isinstance(value, Tensor):
                self.register_buffer(name, value)
            else:
                setattr(self, name, value)

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002
        """Return the summed exponential boundary cost of ``input``."""
        return summed_exp_boundary_loss(input, self.lower_bound, self.upper_bound)

    def extra_repr(self) -> str:
        """Show both bounds."""
        return f"lower_bound={self.lower_bound!r}, upper_bound={self.upper_bound!r}"
