import sys

import torch

from parambounds import demo


def test_without_rockpool_the_demo_uses_its_own_lif(monkeypatch):
    for name in [m for m in sys.modules if m == "rockpool" or m.startswith("rockpool.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "rockpool", None)  # makes `import rockpool...` fail
    net = demo.make_net()
    assert isinstance(net[1], demo.LIF)
    assert {"1.tau_mem", "1.tau_syn", "1.threshold"} <= {n for n, _ in net.named_parameters()}
    result = demo.train("project", steps=3)
    assert result["held_every_step"] and result["outside_at_end"] == 0
    assert torch.isfinite(torch.tensor(result["loss"]))


def test_lif_surrogate_gradient_flows():
    lif = demo.LIF(3)
    x = torch.full((2, 20, 3), 5.0)
    spikes = lif(x)
    assert spikes.sum() > 0 and set(spikes.unique().tolist()) <= {0.0, 1.0}
    spikes.sum().backward()
    assert lif.threshold.grad is not None and lif.threshold.grad.abs().sum() > 0


def test_story_matches_a_plain_python_reading_of_the_history():
    g = torch.Generator().manual_seed(3)
    tau = torch.rand(40, 6, generator=g, dtype=torch.float64) * 0.05 - 0.005
    tau[25:, 2] = float("nan")
    lo, hi = 0.005, 0.04
    rows = tau.tolist()
    finite = [v for row in rows for v in row if v == v]
    expected = {
        "outside_steps": [
            i + 1 for i, row in enumerate(rows) if any(v == v and not lo <= v <= hi for v in row)
        ],
        "first_nan": next(i + 1 for i, row in enumerate(rows) if any(v != v for v in row)),
        "below_zero": [i + 1 for i, row in enumerate(rows) if any(v == v and v < 0 for v in row)],
        "min": min(finite),
        "max": max(finite),
    }
    assert demo.story(tau, lo, hi) == expected


def test_story_of_a_history_that_stays_inside():
    s = demo.story(torch.full((5, 3), 0.01), 0.005, 0.04)
    assert s["outside_steps"] == [] and s["first_nan"] is None and s["below_zero"] == []


def test_run_demo_trains_on_one_thread_says_so_and_restores_threads(monkeypatch, tmp_path, capsys):
    seen = []
    real_train = demo.train

    def spy(use, steps, on_step):
        seen.append(torch.get_num_threads())
        return real_train(use, steps=steps, on_step=on_step)

    monkeypatch.setattr(demo, "train", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        results = demo.run_demo(tmp_path, steps=2, progress=True)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert seen == [1, 1, 1]
    assert list(results) == ["no bounds", "penalty", "projection"]
    captured = capsys.readouterr()
    assert "training on 1 CPU thread" in captured.err
    assert "| projection |" in captured.out
    assert (tmp_path / "time_constants.png").stat().st_size > 10_000
