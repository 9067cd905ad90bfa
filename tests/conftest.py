import pytest
import torch


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
