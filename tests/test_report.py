import json

import pytest
import torch

from parambounds import Bounds, BoundsViolationError

from .conftest import rockpool_net


def model():
    m = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    with torch.no_grad():
        m[0].weight.copy_(torch.tensor([[-3.0, 0.0], [0.5, 2.5], [1.0, -1.0]]))
        m[0].bias.copy_(torch.tensor([0.1, float("nan"), -0.2]))
        m[1].weight.fill_(0.5)
    return m


SPEC = {"0.weight": (-1.0, 1.0), "0.bias": (0.0, None), "1.weight": (None, 1.0)}


def test_counts_and_excess_against_a_plain_count():
    r = Bounds(SPEC).report(model()).to_dict()
    assert r["0.weight"] == {
        "numel": 6,
        "below": 1,
        "above": 1,
        "max_excess": 2.0,
        "nan": 0,
        "lower": -1.0,
        "upper": 1.0,
    }
    assert r["0.bias"] == {
        "numel": 3,
        "below": 1,
        "above": 0,
        "max_excess": pytest.approx(0.2),
        "nan": 1,
        "lower": 0.0,
        "upper": None,
    }
    assert r["1.weight"]["below"] == r["1.weight"]["above"] == r["1.weight"]["nan"] == 0
    assert list(r) == ["0.bias", "0.weight", "1.weight"]  # violators first: NaN is worst
    json.dumps(r)  # serialisable


def test_table_lists_violators_first():
    text = str(Bounds(SPEC).report(model()))
    lines = text.splitlines()
    assert lines[0].split() == [
        "parameter",
        "numel",
        "below",
        "above",
        "max",
        "excess",
        "nan",
        "lower",
        "upper",
    ]
    assert [ln.split()[0] for ln in lines[2:5]] == ["0.bias", "0.weight", "1.weight"]
    assert lines[-1].startswith("2 of 3 bounded parameters are out of bounds")


def test_check_raises_with_worst_offenders_and_passes_when_inside():
    b = Bounds(SPEC)
    m = model()
    with pytest.raises(
        BoundsViolationError,
        match=r"2 of 3 bounded parameters are out of bounds: '0\.bias' \(1 below, 0 above, 1 NaN, max excess 0\.2\), '0\.weight' \(1 below, 1 above, max excess 2\)",
    ):
        b.check(m)
    with torch.no_grad():
        m[0].bias.nan_to_num_(0.0)
    b.project_(m)
    b.check(m)  # quiet
    assert b.report(m).ok


def test_report_makes_one_host_transfer(monkeypatch):
    calls = []
    original = torch.Tensor.tolist

    def counting(self):
        calls.append(self.shape)
        return original(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counting)
    Bounds(SPEC).report(model())
    assert len(calls) == 1


def test_report_on_rockpool():
    net = rockpool_net()
    r = Bounds({"*.tau_mem": (0.03, 0.05)}).report(net).to_dict()
    assert set(r) == {"1_LIFTorch.tau_mem", "3_LIFTorch.tau_mem"}
    assert r["1_LIFTorch.tau_mem"]["below"] == 5
