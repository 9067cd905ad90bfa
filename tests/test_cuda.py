"""The CUDA path: same values as on the CPU, and no host synchronisation per step.

Skipped on machines without a GPU (this project's CI has none)."""

import pytest
import torch

from parambounds import Bounds, bounds_cost

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def params(device):
    g = torch.Generator().manual_seed(0)
    return {
        "a": (torch.randn(300, generator=g) * 3).to(device).requires_grad_(),
        "b": (torch.randn(64, 64, generator=g) * 3).to(device).requires_grad_(),
        "c": (torch.randn(10, generator=g) * 3).to(device).requires_grad_(),
    }


def bounds(device):
    lower = {"a": -1.0, "b": -2.0, "c": torch.linspace(-1, 0, 10, device=device)}
    upper = {"a": 1.0, "b": None, "c": 1.0}
    return lower, upper


@cuda
@pytest.mark.parametrize("kernel", ["eager", "compiled"])
def test_same_values_as_cpu_and_no_sync_per_step(kernel):
    from parambounds.torch import _kernels

    _kernels.set_kernel(kernel)
    try:
        cpu, gpu = params("cpu"), params("cuda")
        ref = bounds_cost(cpu, *bounds("cpu"))
        ref_grads = torch.autograd.grad(ref, list(cpu.values()))
        lower, upper = bounds("cuda")
        bounds_cost(gpu, lower, upper).backward()  # first call: validates (may sync once)
        for p in gpu.values():
            p.grad = None
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            cost = bounds_cost(gpu, lower, upper)
            cost.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.testing.assert_close(cost.cpu(), ref, rtol=1e-5, atol=1e-5)
        for p, g in zip(gpu.values(), ref_grads):
            torch.testing.assert_close(p.grad.cpu(), g, rtol=1e-5, atol=1e-5)
    finally:
        _kernels.set_kernel("auto")


@cuda
def test_project_has_no_sync_after_the_first_call():
    model = torch.nn.Linear(8, 4).cuda()
    b = Bounds({"weight": (-0.1, 0.1), "bias": (0.0, None)})
    b.project_(model)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        b.project_(model)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert b.report(model).ok
