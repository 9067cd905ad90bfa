"""Xylo presets and the deployability dry run, against Rockpool 3.1.0's own mapper and quantizer.

Rockpool's ``rockpool.devices.xylo`` package imports samna (not installable here), so
the mappers are loaded from their source files without running the package's
``__init__``: the functions tested are Rockpool's own, unchanged.
"""

import importlib
import inspect
import math
import pathlib
import sys
import types
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rockpool.nn.combinators import Sequential
from rockpool.nn.modules import LIFJax, LIFTorch, LinearJax, LinearTorch
from rockpool.transform.quantize_methods import channel_quantize, global_quantize

from parambounds import BoundsError
from parambounds.devices import DEVICES, bounds_for, deployability

DT = 1e-3
PARTS = {"xylo-audio-2": "syns61201", "xylo-audio-3": "syns65302", "xylo-imu": "syns63300"}


@pytest.fixture(scope="module")
def rockpool_xylo():
    """Rockpool's three mapper modules, loaded without ``rockpool.devices.xylo.__init__``."""
    import rockpool.devices

    base = pathlib.Path(rockpool.devices.__file__).parent / "xylo"
    names = ["rockpool.devices.xylo"] + [f"rockpool.devices.xylo.{p}" for p in PARTS.values()]
    saved = {k: v for k, v in sys.modules.items() if k.startswith("rockpool.devices.xylo")}
    for name, path in [(names[0], base)] + [(n, base / n.rpartition(".")[2]) for n in names[1:]]:
        stub = types.ModuleType(name)
        stub.__path__ = [str(path)]
        sys.modules[name] = stub
    graph_modules = importlib.import_module("rockpool.devices.xylo.syns61201.xylo_graph_modules")
    for n in graph_modules.__all__:  # syns63300 imports them from the package
        setattr(sys.modules["rockpool.devices.xylo.syns61201"], n, getattr(graph_modules, n))
    mods = {
        dev: importlib.import_module(f"rockpool.devices.xylo.{part}.xylo_mapper")
        for dev, part in PARTS.items()
    }
    yield mods
    for k in [k for k in sys.modules if k.startswith("rockpool.devices.xylo")]:
        del sys.modules[k]
    sys.modules.update(saved)


def net_torch(n_in=3, n_hidden=4, n_out=2, *, tau_mem=None, threshold=None, seed=0, **lif):
    torch.manual_seed(seed)
    net = Sequential(
        LinearTorch((n_in, n_hidden)),
        LIFTorch(n_hidden, dt=DT, **lif),
        LinearTorch((n_hidden, n_out)),
        LIFTorch(n_out, dt=DT),
    )
    with torch.no_grad():
        if tau_mem is not None:
            net[1].tau_mem.copy_(torch.as_tensor(tau_mem))
        if threshold is not None:
            net[1].threshold.copy_(torch.as_tensor(threshold))
    return net


def export(mapper, net, quantize=global_quantize):
    """Rockpool's export: mapper, then quantizer; the quantized spec."""
    spec = mapper(net.as_graph(), weight_dtype="float", threshold_dtype="float")
    spec.update(quantize(**spec))
    return spec


def dash_keys(spec):
    return [spec[k] for k in ("dash_mem", "dash_mem_out", "dash_syn", "dash_syn_out")]


# -- the presets' numbers, computed again from Rockpool ----------------------------------


def test_every_preset_is_there_with_its_part():
    assert {d: DEVICES[d].part for d in DEVICES} == {
        "xylo-audio-2": "SYNS61201",
        "xylo-audio-3": "SYNS65302",
        "xylo-imu": "SYNS63300",
    }


@pytest.mark.parametrize("device", list(PARTS))
def test_hidden_and_output_limits_are_the_mappers_defaults(rockpool_xylo, device):
    params = inspect.signature(rockpool_xylo[device].mapper).parameters
    assert DEVICES[device].hidden_neurons == params["max_hidden_neurons"].default
    if device == "xylo-audio-3":  # 32 in the signature; the design rule warns above 16
        assert params["max_output_neurons"].default == 32
        assert DEVICES[device].output_neurons == 16
    else:
        assert DEVICES[device].output_neurons == params["max_output_neurons"].default


def test_quantizer_integer_ranges_are_rockpools():
    from parambounds.devices._presets import MAX_THRESHOLD, MAX_WEIGHT

    for fn in (global_quantize, channel_quantize):
        params = inspect.signature(fn).parameters
        assert MAX_WEIGHT == 2 ** (params["bits_per_weight"].default - 1) - 1
        assert MAX_THRESHOLD == 2 ** (params["bits_per_threshold"].default - 1) - 1


def test_every_number_has_a_source():
    for dev in DEVICES.values():
        for field in (
            "input_channels",
            "hidden_neurons",
            "output_neurons",
            "synapses",
            "fan_out",
            "input_expansion",
            "output_expansion",
        ):
            assert dev.sources[field], (dev.name, field)


# -- bounds: every projected tau exports to a dash in 0..15 -------------------------------


taus = st.one_of(
    st.floats(1e-6, 1e3),
    st.sampled_from([DT, DT * (1 + 1e-9), 2**15 * DT, 2**15.5 * DT, 2**14.5 * DT, 0.0, -1.0]),
    st.floats(0.99 * DT, 1.01 * DT),
    st.floats(2**15.4 * DT, 2**15.6 * DT),
)


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(taus, min_size=4, max_size=4), st.lists(taus, min_size=2, max_size=2))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_projected_taus_export_to_dashes_0_to_15(rockpool_xylo, dtype, mem, syn):
    net = net_torch(tau_mem=mem).to(dtype)
    with torch.no_grad():
        net[3].tau_syn.copy_(torch.as_tensor(syn, dtype=dtype).reshape(net[3].tau_syn.shape))
    bounds_for("xylo-audio-2", dt=DT).project_(net)
    spec = export(rockpool_xylo["xylo-audio-2"].mapper, net)  # raises on tau <= dt
    for dash in dash_keys(spec):
        assert dash.min() >= 0 and dash.max() <= 15


@pytest.mark.parametrize("dt", [1e-3, 1e-4, 2.5e-3, 0.1, 1 / 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_bounds_themselves_export_to_dash_0_and_15(rockpool_xylo, dt, dtype):
    net = net_torch().to(dtype)
    for lif in (net[1], net[3]):
        lif.dt = dt
    lo, hi = bounds_for("xylo-audio-2", dt=dt).spec["*.tau_mem"]
    with torch.no_grad():
        net[1].tau_mem.copy_(torch.tensor([lo, hi, 1e9, -1.0]))
    bounds_for("xylo-audio-2", dt=dt).project_(net)
    spec = export(rockpool_xylo["xylo-audio-2"].mapper, net)
    assert spec["dash_mem"].tolist() == [0, 15, 15, 0]  # both ends reachable, nothing beyond


@pytest.mark.parametrize("mode", ["decays", "bitshifts"])
@pytest.mark.parametrize("scale", [0.0, 1.0])
def test_other_leak_modes_project_into_exportable_taus(rockpool_xylo, mode, scale):
    net = net_torch(leak_mode=mode)
    name = {"decays": "alpha", "bitshifts": "dash_mem"}[mode]
    extreme = (
        torch.tensor([0.0, 1.0, 0.999999, 0.2])
        if mode == "decays"
        else torch.tensor([0.1, 30.0, 0.6, 15.2])
    )
    with torch.no_grad():
        getattr(net[1], name).copy_(extreme * scale + (1 - scale) * 0.5)
    bounds_for("xylo-audio-2", dt=DT, leak_mode=mode).project_(net)
    spec = export(rockpool_xylo["xylo-audio-2"].mapper, net)
    assert spec["dash_mem"].min() >= 0 and spec["dash_mem"].max() <= 15
    assert deployability(net, "xylo-audio-2", dt=DT).ok


def test_leak_mode_bounds_reach_dash_0_and_15(rockpool_xylo):
    for mode, name in (("decays", "alpha"), ("bitshifts", "dash_mem")):
        net = net_torch(leak_mode=mode)
        lo, hi = bounds_for("xylo-audio-2", dt=DT, leak_mode=mode).spec[f"*.{name}"]
        with torch.no_grad():
            getattr(net[1], name).copy_(torch.tensor([lo, hi, lo, hi]))
        bounds_for("xylo-audio-2", dt=DT, leak_mode=mode).project_(net)
        spec = export(rockpool_xylo["xylo-audio-2"].mapper, net)
        assert spec["dash_mem"].tolist() == [0, 15, 0, 15], mode


def test_jax_network_projected_exports(rockpool_xylo):
    net = Sequential(LinearJax((3, 4)), LIFJax(4, dt=DT), LinearJax((4, 2)), LIFJax(2, dt=DT))
    params = net.parameters()
    params["1_LIFJax"]["tau_mem"] = np.array([1e-4, 1e-3, 40.0, 0.02], np.float32)
    params = bounds_for("xylo-audio-2", dt=DT).project(params)
    net = net.set_attributes(params)
    spec = export(rockpool_xylo["xylo-audio-2"].mapper, net)
    assert spec["dash_mem"].tolist() == [0, 0, 15, 4]
    assert deployability(net, "xylo-audio-2", dt=DT).ok
    params["3_LIFJax"]["tau_syn"] = np.array([[1e-3], [1e-2]], np.float32)
    report = deployability(net.set_attributes(params), "xylo-audio-2", dt=DT)
    assert [(f.rule, f.where) for f in report.errors] == [
        ("time-constant-above-dt", "3_LIFJax.tau_syn")
    ]


# -- deployability agrees with Rockpool on both sides of each limit ----------------------


def rockpool_rejects_taus(mapper, net):
    try:
        spec = export(mapper, net)
    except Exception:
        return True
    return any(d.min() < 0 or d.max() > 15 for d in dash_keys(spec))


tau_edges = st.one_of(
    st.floats(0.999 * DT, 1.001 * DT),
    st.floats(2**15.49 * DT, 2**15.51 * DT),
    st.sampled_from([DT, float(np.nextafter(np.float32(DT), np.float32(1))), 2**15.5 * DT]),
    st.floats(1e-5, 100.0),
)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(tau_edges, min_size=4, max_size=4), st.sampled_from([torch.float32, torch.float64]))
def test_time_constant_verdict_is_rockpools(rockpool_xylo, mem, dtype):
    net = net_torch(tau_mem=mem).to(dtype)
    with torch.no_grad():
        net[1].tau_mem.copy_(torch.tensor(mem, dtype=dtype))
    report = deployability(net, "xylo-audio-2", dt=DT)
    ours = any(f.rule in ("time-constant-above-dt", "dash-range") for f in report.errors)
    assert ours == rockpool_rejects_taus(rockpool_xylo["xylo-audio-2"].mapper, net), mem


def test_a_float32_tau_just_above_dt_in_float64_is_still_rejected(rockpool_xylo):
    # float32(1e-3) > 1e-3, but the mapper compares in float32: tau == float32(dt) fails
    tau = float(np.float32(DT))
    assert tau > DT
    net = net_torch(tau_mem=[tau, 0.01, 0.01, 0.01])
    with pytest.raises(Exception, match="Error replacing module") as err:
        export(rockpool_xylo["xylo-audio-2"].mapper, net)
    assert "time constants <= `dt`" in str(err.value.__cause__)
    (f,) = deployability(net, "xylo-audio-2", dt=DT).errors
    assert f.rule == "time-constant-above-dt" and f.where == "1_LIFTorch.tau_mem"


def test_nan_taus_pass_rockpools_mapper_but_fail_here(rockpool_xylo):
    net = net_torch(tau_mem=[float("nan"), 0.01, 0.01, 0.01])
    spec = export(rockpool_xylo["xylo-audio-2"].mapper, net)  # no error from Rockpool ...
    assert spec["dash_mem"][0] < 0  # ... and a meaningless dash
    report = deployability(net, "xylo-audio-2", dt=DT)
    assert [f.rule for f in report.errors] == ["time-constant-nan"]


def rescaled(quantize, spec):
    """Whether Rockpool's quantizer took its second rescaling (it changes its output)."""
    once = quantize(**spec)
    never = quantize(**{**spec, "bits_per_threshold": 64})  # the rescale cannot trigger
    return any(not np.array_equal(once[k], never[k]) for k in once)


thresholds = st.floats(-2000.0, 2000.0) | st.floats(300.0, 400.0)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.lists(thresholds, min_size=4, max_size=4),
    st.floats(-500.0, 500.0),
    st.sampled_from(["global", "channel"]),
)
def test_threshold_rescale_verdict_is_rockpools(rockpool_xylo, th, th_out, method):
    net = net_torch(threshold=th)
    with torch.no_grad():
        net[0].weight.clamp_(-1, 1)
        net[3].threshold.fill_(th_out)
    spec = rockpool_xylo["xylo-audio-2"].mapper(net.as_graph())
    quantize = global_quantize if method == "global" else channel_quantize
    report = deployability(net, "xylo-audio-2", dt=DT, quantize=method)
    ours = any(f.rule == "threshold-rescale" for f in report.errors)
    assert ours == rescaled(quantize, spec), (th, th_out)


def test_threshold_exactly_at_the_rescale_edge():
    net = net_torch()
    with torch.no_grad():
        net[0].weight.fill_(0.5)
        net[1].bias.zero_()
        net[1].threshold.fill_(1.0)
    scale = 127 / 0.5
    for th, expect in ((32767.49 / scale, True), (32767.51 / scale, False)):
        with torch.no_grad():
            net[1].threshold[0] = th
        ok = not any(
            f.rule == "threshold-rescale" for f in deployability(net, "xylo-audio-2", dt=DT).errors
        )
        assert ok == expect, th


def test_biases_count_in_the_global_maximum():
    net = net_torch()
    with torch.no_grad():
        net[0].weight.fill_(0.01)
        net[1].threshold.fill_(10.0)  # 10 * 127/0.01 = 127000: a rescale ...
    assert not deployability(net, "xylo-audio-2", dt=DT).ok
    with torch.no_grad():
        net[1].bias.fill_(1.0)  # ... unless the bias sets the scale: 10 * 127 = 1270
    assert deployability(net, "xylo-audio-2", dt=DT).ok


def test_weights_that_round_to_zero_are_a_warning():
    net = net_torch()
    with torch.no_grad():
        net[0].weight.fill_(1.0)
        net[0].weight[0, 0] = 1e-3
    report = deployability(net, "xylo-audio-2", dt=DT)
    assert report.ok
    (w,) = report.warnings
    assert w.rule == "weights-round-to-zero" and w.where == "0_LinearTorch.weight"
    assert w.message.startswith("1 of 12 non-zero weights round to 0")


def mapper_verdict(mapper, net):
    """``"error"`` when Rockpool's mapper raises, ``"warning"`` on a DRCWarning, else ``"ok"``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            mapper(net.as_graph())
        except Exception:
            return "error"
    return "warning" if any("DRCWarning" in type(w.message).__name__ for w in caught) else "ok"


def two_hidden(n_in, n_hidden, n_out, syn=1):
    half = n_hidden // 2
    return Sequential(
        LinearTorch((n_in, half * syn)),
        LIFTorch((half * syn, half), dt=DT),
        LinearTorch((half, (n_hidden - half))),
        LIFTorch(n_hidden - half, dt=DT),
        LinearTorch((n_hidden - half, n_out)),
        LIFTorch(n_out, dt=DT),
    )


@pytest.mark.parametrize(
    ("device", "rule", "at", "rockpool_above"),
    [
        ("xylo-audio-2", "hidden-neurons", 1000, "error"),
        ("xylo-audio-3", "hidden-neurons", 992, "error"),
        ("xylo-imu", "hidden-neurons", 496, "error"),
        ("xylo-audio-2", "output-neurons", 8, "error"),
        ("xylo-audio-3", "output-neurons", 16, "warning"),
        ("xylo-imu", "output-neurons", 16, "error"),
        ("xylo-audio-2", "input-channels", 16, "warning"),
        ("xylo-imu", "input-channels", 16, "warning"),
    ],
)
def test_size_limits_on_both_sides_agree_with_rockpool(
    rockpool_xylo, device, rule, at, rockpool_above
):
    def make(n):
        if rule == "hidden-neurons":
            return net_torch(4, n, 2) if device == "xylo-audio-2" else three_hidden(n)
        sizes = (4, 8, n) if rule == "output-neurons" else (n, 8, 2)
        return two_hidden(*sizes) if device == "xylo-imu" else net_torch(*sizes)

    mapper = rockpool_xylo[device].mapper
    for n, expect in ((at, "ok"), (at + 1, rockpool_above)):
        net = make(n)
        assert mapper_verdict(mapper, net) == expect, (n, expect)
        fails = [f.rule for f in deployability(net, device, dt=DT).errors]
        assert fails == ([rule] if expect != "ok" else []), (n, fails)


def three_hidden(n_hidden):
    """IENs and OENs at 100 each, the rest in the middle layer."""
    mid = n_hidden - 200
    return Sequential(
        LinearTorch((4, 100)),
        LIFTorch(100, dt=DT),
        LinearTorch((100, mid)),
        LIFTorch(mid, dt=DT),
        LinearTorch((mid, 100)),
        LIFTorch(100, dt=DT),
        LinearTorch((100, 2)),
        LIFTorch(2, dt=DT),
    )


def test_imu_needs_separate_input_and_output_layers_as_its_mapper_does(rockpool_xylo):
    mapper = rockpool_xylo["xylo-imu"].mapper
    one = net_torch()
    assert mapper_verdict(mapper, one) == "error"
    assert [f.rule for f in deployability(one, "xylo-imu", dt=DT).errors] == ["structure"]
    two = two_hidden(3, 8, 2)
    assert mapper_verdict(mapper, two) == "ok"
    assert deployability(two, "xylo-imu", dt=DT).ok
    assert deployability(one, "xylo-audio-3", dt=DT).ok  # XyloAudio 3's mapper handles it
    assert mapper_verdict(rockpool_xylo["xylo-audio-3"].mapper, one) == "ok"


def test_two_synapses_fail_on_the_imu_only(rockpool_xylo):
    net = Sequential(
        LinearTorch((3, 8)), LIFTorch((8, 4), dt=DT), LinearTorch((4, 4)), LIFTorch(4, dt=DT),
        LinearTorch((4, 2)), LIFTorch(2, dt=DT),
    )  # fmt: skip
    assert mapper_verdict(rockpool_xylo["xylo-imu"].mapper, net) == "error"
    assert [f.rule for f in deployability(net, "xylo-imu", dt=DT).errors] == ["synapses"]
    assert mapper_verdict(rockpool_xylo["xylo-audio-2"].mapper, net) == "ok"
    assert deployability(net, "xylo-audio-2", dt=DT).ok


def test_expansion_limits_at_128():
    ok, over = three_hidden(328), three_hidden(328)
    over = Sequential(
        LinearTorch((4, 129)), LIFTorch(129, dt=DT), LinearTorch((129, 100)),
        LIFTorch(100, dt=DT), LinearTorch((100, 2)), LIFTorch(2, dt=DT),
    )  # fmt: skip
    assert deployability(ok, "xylo-imu", dt=DT).ok
    assert [f.rule for f in deployability(over, "xylo-imu", dt=DT).errors] == ["input-expansion"]
    rules = [f.rule for f in deployability(over, "xylo-audio-2", dt=DT).errors]
    assert rules == ["fan-out"]  # 129 -> 100: any XyloAudio 2 neuron may take input


def test_fan_out_limit():
    net = two_hidden(3, 130, 2)  # 65 -> 65 hidden connections, all non-zero
    (f,) = deployability(net, "xylo-audio-2", dt=DT).errors
    assert f.rule == "fan-out" and f.where == "2_LinearTorch.weight"
    assert f.message.startswith("a hidden neuron connects to 65 hidden neurons > 64")
    with torch.no_grad():
        net[2].weight[:, 64] = 0.0
    assert deployability(net, "xylo-audio-2", dt=DT).ok


def test_a_network_without_two_neuron_layers():
    net = Sequential(LinearTorch((3, 4)), LIFTorch(4, dt=DT))
    (f,) = deployability(net, "xylo-audio-2", dt=DT).errors
    assert f.rule == "structure"
    assert "needs at least two" in f.message


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_weights_and_thresholds(value):
    net = net_torch()
    with torch.no_grad():
        net[2].weight[0, 0] = value
        net[1].threshold[1] = value
    rules = {(f.rule, f.where) for f in deployability(net, "xylo-audio-2", dt=DT).errors}
    assert {("not-finite", "2_LinearTorch.weight"), ("not-finite", "1_LIFTorch.threshold")} <= rules


def test_dt_mismatch_is_reported():
    report = deployability(net_torch(), "xylo-audio-2", dt=2e-3)
    assert [(f.rule, f.where) for f in report.errors] == [
        ("dt", "1_LIFTorch.dt"),
        ("dt", "3_LIFTorch.dt"),
    ]


def test_a_checkpoint_gets_its_time_constants_checked():
    net = net_torch(tau_mem=[1e-3, 0.01, 50.0, 0.01])
    report = deployability(net.state_dict(), "xylo-audio-2", dt=DT)
    assert [(f.rule, f.where) for f in report.errors] == [
        ("time-constant-above-dt", "1_LIFTorch.tau_mem"),
        ("dash-range", "1_LIFTorch.tau_mem"),
    ]
    assert report.checked == ("time constants",)
    assert "a checkpoint does not hold the structure" in str(report)
    assert deployability(net_torch().state_dict(), "xylo-audio-2", dt=DT).ok


def test_the_report_reads_and_serialises():
    report = deployability(net_torch(tau_mem=[1e-3, 0.01, 0.01, 0.01]), "xylo-audio-2", dt=DT)
    text = str(report)
    assert text.splitlines()[0] == (
        "xylo-audio-2 at dt=0.001 s (global quantization): NOT deployable: 1 rule(s) fail"
    )
    assert "error [time-constant-above-dt] 1_LIFTorch.tau_mem: 1 of 4" in text
    d = report.to_dict()
    assert d["ok"] is False and d["findings"][0]["rule"] == "time-constant-above-dt"
    import json

    json.dumps(d)


# -- bad input ---------------------------------------------------------------------------


def test_unknown_device_lists_the_known_ones():
    msg = "unknown device 'xylo'; known devices: xylo-audio-2, xylo-audio-3, xylo-imu"
    with pytest.raises(BoundsError, match=msg):
        bounds_for("xylo", dt=DT)
    with pytest.raises(BoundsError, match=msg):
        deployability(net_torch(), "xylo", dt=DT)


@pytest.mark.parametrize("dt", [0.0, -1e-3, math.nan, math.inf, "1e-3", None, True])
def test_bad_dt(dt):
    with pytest.raises(BoundsError, match="dt must be a positive"):
        bounds_for("xylo-audio-2", dt=dt)


def test_bad_leak_mode_and_quantizer_and_model():
    with pytest.raises(BoundsError, match="unknown leak_mode 'tau' for device 'xylo-imu'"):
        bounds_for("xylo-imu", dt=DT, leak_mode="tau")
    with pytest.raises(BoundsError, match="unknown quantize 'fuzzy'"):
        deployability(net_torch(), "xylo-imu", dt=DT, quantize="fuzzy")
    with pytest.raises(BoundsError, match="needs a Rockpool network .* got int"):
        deployability(3, "xylo-imu", dt=DT)


def test_a_preset_matches_networks_without_lif_layers():
    net = torch.nn.Linear(2, 2)
    bounds_for("xylo-audio-2", dt=DT).project_(net)  # nothing to bound, no error


# -- the command line --------------------------------------------------------------------


def run_cli(capsys, *argv):
    from parambounds.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_check_device_exit_codes(tmp_path, capsys):
    good, bad = tmp_path / "good.pt", tmp_path / "bad.pt"
    torch.save(net_torch().state_dict(), good)
    torch.save(net_torch(tau_mem=[1e-3, 0.01, 0.01, 0.01]).state_dict(), bad)
    code, out, _ = run_cli(capsys, "check", str(good), "--device", "xylo-audio-2", "--dt", "1e-3")
    assert code == 0 and out.startswith(
        "xylo-audio-2 at dt=0.001 s (global quantization): deployable"
    )
    code, out, _ = run_cli(capsys, "check", str(bad), "--device", "xylo-imu", "--dt", "1e-3")
    assert code == 1 and "error [time-constant-above-dt] 1_LIFTorch.tau_mem" in out
    code, out, _ = run_cli(
        capsys, "check", str(bad), "--device", "xylo-imu", "--dt", "1e-3", "--json"
    )
    import json

    data = json.loads(out)
    assert code == 1 and data["ok"] is False and data["file"] == str(bad)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--device", "xylo"], "unknown device 'xylo'; known devices: xylo-audio-2, xylo-audio-3"),
        (["--device", "xylo-imu"], "--device and --dt go together: give both"),
        (["--dt", "1e-3"], "--device and --dt go together: give both"),
        (["--device", "xylo-imu", "--dt", "0"], "dt must be a positive finite number"),
        (["--device", "xylo-imu", "--dt", "1e-3", "--bounds", "b.toml"], "not both"),
    ],
)
def test_cli_check_device_bad_input(tmp_path, capsys, args, message):
    path = tmp_path / "m.pt"
    torch.save(net_torch().state_dict(), path)
    if args[:2] == ["--device", "xylo"]:
        args = [*args, "--dt", "1e-3"]
    code, out, err = run_cli(capsys, "check", str(path), *args)
    assert code == 2 and out == "" and message in err and err.count("\n") == 1


def test_cli_check_without_bounds_or_device_is_a_usage_error(tmp_path, capsys):
    from parambounds.cli import main

    with pytest.raises(SystemExit) as e:
        main(["check", str(tmp_path / "m.pt")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "check: the following arguments are required: --bounds (or --device and --dt)" in err


def test_cli_check_device_on_a_file_without_time_constants(tmp_path, capsys):
    path = tmp_path / "lin.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), path)
    code, _, err = run_cli(capsys, "check", str(path), "--device", "xylo-imu", "--dt", "1e-3")
    assert code == 2
    assert err.startswith(f"parambounds: error: {path}: no time constants to check for xylo-imu")


# -- the example -------------------------------------------------------------------------


def test_the_xylo_example_keeps_its_accuracy_through_quantization(tmp_path):
    import re
    import subprocess

    root = pathlib.Path(__file__).resolve().parent.parent
    out = subprocess.run(
        [
            sys.executable,
            "-W",
            "ignore",
            "examples/xylo_deploy.py",
            "--plot",
            str(tmp_path / "p.png"),
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=1800,  # a hang guard only
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr
    assert "with the preset: deployable as trained" in out.stdout
    assert "without: NOT deployable as trained" in out.stdout
    ((f, q),) = [
        tuple(map(float, m))
        for m in re.findall(
            r"with the preset: float accuracy ([\d.]+), quantized accuracy ([\d.]+)", out.stdout
        )
    ]
    assert f >= 0.9 and abs(f - q) <= 0.05, out.stdout
    assert (tmp_path / "p.png").stat().st_size > 10_000
