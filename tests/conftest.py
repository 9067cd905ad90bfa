import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings

# No verdict from the clock: on a busy machine an example may take seconds. Every
# property test inherits this profile (its own @settings override only what they name).
settings.register_profile(
    "parambounds",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("parambounds")


def pytest_addoption(parser):
    parser.addoption(
        "--kernel",
        choices=["auto", "eager", "native", "compiled"],
        default=None,
        help="run the tests with this parambounds kernel (default: PARAMBOUNDS_KERNEL or auto)",
    )


@pytest.fixture(autouse=True, scope="session")
def _kernel(request):
    """Run the whole session with the kernel named by ``--kernel``."""
    from parambounds.torch import _kernels

    name = request.config.getoption("--kernel")
    if name is None:
        yield
        return
    before = _kernels.get_kernel()
    _kernels.set_kernel(name)
    if name == "native":
        from parambounds.torch import _native

        _native.build(verbose=False)  # fail loudly here, not in the first test
    yield
    _kernels.set_kernel(before)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def rockpool_net(dtype=torch.float32):
    """A real Rockpool network: Sequential(LinearTorch, LIFTorch, LinearTorch, LIFTorch)."""
    from rockpool.nn.combinators import Sequential
    from rockpool.nn.modules import LIFTorch, LinearTorch

    net = Sequential(LinearTorch((3, 5)), LIFTorch(5), LinearTorch((5, 2)), LIFTorch(2))
    return net.to(dtype)


def inward_f32(b: float, side: str) -> float:
    """The float32 value nearest to ``b`` on the inside (plain numpy, for reference)."""
    f = np.float32(b)
    if side == "lower" and float(f) < b:
        f = np.nextafter(f, np.float32(np.inf))
    if side == "upper" and float(f) > b:
        f = np.nextafter(f, np.float32(-np.inf))
    return float(f)
