"""The plan stores: what they keep, and that the distributed one evicts alike on every rank."""

import torch

from parambounds import bounds_cost
from parambounds.torch import _plan
from parambounds.torch._plan_cache import PlanCache, serials, tensor_key


def count_builds(monkeypatch):
    builds = []
    original = _plan._build

    def counting(*args):
        builds.append(1)
        return original(*args)

    monkeypatch.setattr(_plan, "_build", counting)
    return builds


def test_a_plan_sharing_a_bound_tensor_does_not_evict_another(monkeypatch):
    # Rank-0-only work (reading a checkpoint) with the training run's bound tensor used to
    # evict the training run's plan on rank 0 alone: the ranks then deadlocked.
    builds = count_builds(monkeypatch)
    hi = torch.tensor([0.0, 0.1])
    w, v = torch.tensor([0.5, 0.5]), torch.tensor([1.0, -1.0])
    expected = {"w": 0.5 + 0.4, "v": 1.0 + 0.0}
    for _ in range(3):
        for name, x in (("w", w), ("v", v)):
            _plan._SEEN.clear()  # go to the keyed store every time
            got = bounds_cost({name: x}, {name: None}, {name: hi}, penalty="linear")
            torch.testing.assert_close(got.item(), expected[name])
    assert len(builds) == 2


def test_an_updated_bound_replaces_its_older_plan(monkeypatch):
    builds = count_builds(monkeypatch)
    lo = torch.tensor([0.0, 0.0])
    w = torch.tensor([-1.0, 1.0])
    for _ in range(3):
        lo.sub_(1.0)  # a new version: a new plan, the old one forgotten
        _plan._SEEN.clear()
        got = bounds_cost({"w": w}, {"w": lo}, {"w": None}, penalty="linear").item()
        assert got == 0.0  # lower -1, -2, -3: w inside
    assert len(builds) == 3
    (serial,) = serials((tensor_key(lo),))
    assert sum(serial in held for held in _plan._PLANS.tensors.values()) == 1


def test_a_deterministic_store_evicts_the_same_whatever_dies_when():
    # Two ranks make the same calls; a bound tensor is freed by the garbage collector on
    # one of them first. Their stores must still evict the same plans afterwards.
    ranks = [PlanCache(3, deterministic=True), PlanCache(3, deterministic=True)]
    for cache in ranks:
        cache.put("a", "plan a", {7: 0})
        cache.put("b", "plan b", {})
        cache.put("c", "plan c", {})
    ranks[0].died(7)
    for cache in ranks:
        cache.put("d", "plan d", {})  # evicts "a" (or its empty slot) on both
    assert [list(c.plans) for c in ranks] == [["b", "c", "d"]] * 2
    assert [c.get("b") for c in ranks] == ["plan b"] * 2
    assert ranks[0].get("a") is None and ranks[1].get("a") is None


def test_a_plain_store_forgets_dead_plans_at_once():
    cache = PlanCache(3, deterministic=False)
    cache.put("a", "plan a", {7: 0})
    cache.died(7)
    assert list(cache.plans) == [] and len(cache) == 0


def test_tensor_keys_never_repeat():
    seen = set()
    for _ in range(50):  # ids of dead tensors get reused; serials do not
        t = torch.zeros(1)
        (serial,) = serials((tensor_key(t),))
        assert serial not in seen
        seen.add(serial)
        del t
