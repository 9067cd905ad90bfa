import math
from collections import OrderedDict

import pytest
import torch

from parambounds import BoundsError, make_bounds
from parambounds.torch._trees import align, flatten, named_leaves

from .conftest import rockpool_net


def test_make_bounds_shapes_like_params_without_copying():
    a = torch.ones(3, requires_grad=True)
    nonleaf = a * 2  # Rockpool's deepcopy fails on non-leaf tensors
    params = OrderedDict(x=nonleaf, y=[a, (a,)])
    lower, upper = make_bounds(params)
    assert isinstance(lower, OrderedDict)
    assert lower == OrderedDict(x=-math.inf, y=[-math.inf, (-math.inf,)])
    assert upper == OrderedDict(x=math.inf, y=[math.inf, (math.inf,)])


def test_make_bounds_fails_in_rockpool_on_non_leaf_tensors():
    from rockpool.training.torch_loss import make_bounds as rp_make_bounds

    nonleaf = torch.ones(3, requires_grad=True) * 2
    with pytest.raises(RuntimeError):
        rp_make_bounds({"x": nonleaf})
    assert make_bounds({"x": nonleaf}) == ({"x": -math.inf}, {"x": math.inf})


def test_make_bounds_on_rockpool_parameters_and_module():
    net = rockpool_net()
    lower, upper = make_bounds(net.parameters())
    assert isinstance(lower, type(net.parameters()))
    assert lower["1_LIFTorch"]["tau_mem"] == -math.inf
    flat_lower, _ = make_bounds(net)
    assert list(flat_lower) == [n for n, _ in net.named_parameters()]


def test_flatten_and_named_leaves_agree():
    tree = {"b": [torch.zeros(1), {"c": torch.ones(1)}], "a": torch.ones(2)}
    treedef, leaves = flatten(tree)
    named = named_leaves(tree)
    assert [n for n, _ in named] == ["b.0", "b.1.c", "a"]
    assert all(x is y for x, (_, y) in zip(leaves, named))
    assert hash(treedef) == hash(flatten(dict(tree))[0])


def test_align_matches_by_key():
    params = {"a": torch.zeros(1), "b": {"c": torch.zeros(1), "d": torch.zeros(1)}}
    bounds = {"b": {"d": 4.0, "c": 3.0}, "a": 1.0}
    assert align(params, bounds, "lower_bounds") == [1.0, 3.0, 4.0]


@pytest.mark.parametrize(
    "bounds,message",
    [
        (
            {"a": 1.0, "b": {"c": 1.0}},
            r"lower_bounds has no entry for 'b\.d', a key of the parameters",
        ),
        (
            {"a": 1.0, "b": {"c": 1.0, "d": 1.0, "e": 1.0}},
            r"lower_bounds has an entry 'b\.e' that the parameters do not have",
        ),
        (
            {"a": 1.0, "b": 1.0},
            r"lower_bounds has a leaf \(float\) at 'b' where the parameters have a mapping",
        ),
        (
            {"a": [1.0], "b": {"c": 1.0, "d": 1.0}},
            r"lower_bounds has a list of length 1 at 'a' where the parameters have a tensor",
        ),
    ],
)
def test_align_errors_name_the_path(bounds, message):
    params = {"a": torch.zeros(1), "b": {"c": torch.zeros(1), "d": torch.zeros(1)}}
    with pytest.raises(BoundsError, match=message):
        align(params, bounds, "lower_bounds")


def test_align_sequence_length_mismatch():
    with pytest.raises(
        BoundsError,
        match=r"upper_bounds has a list of length 1 at 'w' where the parameters have a list of length 2",
    ):
        align({"w": [torch.zeros(1), torch.zeros(1)]}, {"w": [1.0]}, "upper_bounds")
