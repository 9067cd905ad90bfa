"""``project_`` refuses aliases with conflicting bounds (issue 21, item 9).

A state_dict whose entries are the same tensor (tied weights) or overlapping views of
one tensor, bounded differently, was projected silently with one bound violated:
clamping one entry moves the other. Refused, naming both, as ``reparametrize_`` and
the CLI do; nothing is changed. Aliases with the same bounds are projected as usual.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from parambounds import Bounds, BoundsError


def test_tied_entries_with_conflicting_bounds_are_refused():
    w = torch.full((4,), 5.0)
    spec = Bounds({"a": (None, 1.0), "b": (3.0, None)})
    with pytest.raises(BoundsError, match=r"'a' and 'b' share memory.*different bounds"):
        spec.project_({"a": w, "b": w})
    assert w.tolist() == [5.0] * 4  # nothing changed


def test_overlapping_views_are_refused_and_disjoint_ones_are_not():
    w = torch.full((6,), 5.0)
    spec = Bounds({"a": (None, 1.0), "b": (3.0, None)})
    with pytest.raises(BoundsError, match=r"'a' and 'b' share memory"):
        spec.project_({"a": w[:4], "b": w[2:]})
    assert w.tolist() == [5.0] * 6
    spec.project_({"a": w[:3], "b": w[3:]})  # disjoint halves of one tensor: fine
    assert w.tolist() == [1.0] * 3 + [5.0] * 3
    m = torch.full((4, 4), 5.0)
    spec.project_({"a": m[:, 0], "b": m[:, 1]})  # interleaved columns share no element
    assert m[:, 0].tolist() == [1.0] * 4 and m[:, 1].tolist() == [5.0] * 4
    with pytest.raises(BoundsError, match=r"'a' and 'b' share memory"):
        spec.project_({"a": m[:, 1], "b": m[1]})  # a column and a row share m[1, 1]


def test_an_unbounded_alias_counts_as_different():
    w = torch.full((3,), 5.0)
    with pytest.raises(BoundsError, match="unbounded"):
        Bounds({"a": (None, 1.0)}, strict=False).project_({"a": w, "b": w})


def test_aliases_with_the_same_bounds_are_projected():
    w = torch.full((4,), 5.0)
    Bounds({"*": (None, 1.0)}).project_({"a": w, "b": w, "c": w[1:3]})
    assert w.tolist() == [1.0] * 4


def test_tied_parameters_of_a_module_keep_their_bounds():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Parameter(torch.full((4,), 5.0))
            self.b = torch.nn.Parameter(self.a.data[1:3])  # another Parameter, same memory

    m = Tied()
    with pytest.raises(BoundsError, match=r"'a' and 'b' share memory"):
        Bounds({"a": (None, 1.0), "b": (3.0, None)}).project_(m)
    assert m.a.tolist() == [5.0] * 4


@settings(max_examples=40, deadline=None)
@given(
    start_a=st.integers(0, 6),
    len_a=st.integers(1, 4),
    start_b=st.integers(0, 6),
    len_b=st.integers(1, 4),
    hi_a=st.sampled_from([1.0, 2.0]),
    hi_b=st.sampled_from([1.0, 2.0]),
)
def test_project_never_leaves_a_bound_violated(start_a, len_a, start_b, len_b, hi_a, hi_b):
    """Property: after project_ returns, every entry is inside its bounds (float64 check);
    it raises exactly when views overlap with different bounds."""
    w = torch.arange(10, dtype=torch.float32) + 3
    a, b = w[start_a : start_a + len_a], w[start_b : start_b + len_b]
    overlap = max(start_a, start_b) < min(start_a + a.numel(), start_b + b.numel())
    spec = Bounds({"a": (None, hi_a), "b": (None, hi_b)})
    before = w.clone()
    if overlap and hi_a != hi_b:
        with pytest.raises(BoundsError):
            spec.project_({"a": a, "b": b})
        assert torch.equal(w, before)
        return
    spec.project_({"a": a, "b": b})
    assert (a.double() <= hi_a).all() and (b.double() <= hi_b).all()
