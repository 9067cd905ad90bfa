import math

import pytest
import torch

from parambounds import BoundsError, ParameterBoundaryRegularizer, summed_exp_boundary_loss


def test_zero_bound_is_honoured_where_rockpool_ignores_it():
    from rockpool.training.torch_loss import summed_exp_boundary_loss as rp

    x = torch.tensor([-1.0, 0.5])
    assert float(rp(x, 0.0, None)) == 0.0  # Rockpool: `if lower_bound:` drops 0
    assert summed_exp_boundary_loss(x, 0.0, None).item() == pytest.approx(math.e)
    assert summed_exp_boundary_loss(x, 0, None).item() == pytest.approx(math.e)


def test_per_element_bounds_where_rockpool_fails():
    from rockpool.training.torch_loss import summed_exp_boundary_loss as rp

    x = torch.tensor([0.0, 3.0])
    upper = torch.tensor([1.0, 2.0])
    with pytest.raises(RuntimeError):
        rp(x, None, upper)
    assert summed_exp_boundary_loss(x, None, upper).item() == pytest.approx(math.e)


def test_always_a_tensor_of_datas_dtype():
    from rockpool.training.torch_loss import summed_exp_boundary_loss as rp

    assert rp(torch.zeros(2), None, None) == 0.0 and not isinstance(
        rp(torch.zeros(2), None, None), torch.Tensor
    )
    for dtype in (torch.float32, torch.float64):
        out = summed_exp_boundary_loss(torch.zeros(2, dtype=dtype))
        assert isinstance(out, torch.Tensor) and out.shape == () and out.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_parity_with_rockpool_for_nonzero_bounds(dtype):
    from rockpool.training.torch_loss import summed_exp_boundary_loss as rp

    x = (torch.randn(50, dtype=dtype) * 3).requires_grad_()
    ours = summed_exp_boundary_loss(x, -1.5, 2.0)
    (g_ours,) = torch.autograd.grad(ours, x)
    theirs = rp(x, -1.5, 2.0)
    (g_theirs,) = torch.autograd.grad(theirs, x)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(g_ours, g_theirs)


def test_data_must_be_a_tensor():
    with pytest.raises(BoundsError, match=r"data must be a tensor, got list"):
        summed_exp_boundary_loss([1.0], 0.0, 1.0)


def test_invalid_bound_names_data():
    with pytest.raises(
        BoundsError, match=r"lower bound for 'data' exceeds its upper bound \(1\.0 > 0\.0\)"
    ):
        summed_exp_boundary_loss(torch.zeros(2), 1.0, 0.0)


def test_regularizer_buffers_repr_and_value():
    reg = ParameterBoundaryRegularizer(lower_bound=torch.tensor([0.0, 1.0]), upper_bound=2.0)
    assert "lower_bound" in dict(reg.named_buffers())
    assert (
        repr(reg) == "ParameterBoundaryRegularizer(lower_bound=tensor([0., 1.]), upper_bound=2.0)"
    )
    reg = reg.to(torch.float64)
    assert reg.lower_bound.dtype == torch.float64
    x = torch.tensor([-1.0, 3.0], dtype=torch.float64)
    assert reg(x).item() == pytest.approx(2 * math.e)
