r"""Xylo's limits, each with its source, and the bounds derived from its export rules.

Every number here comes from Rockpool 3.1.0 (``synsense/rockpool``); the comment beside
it names the file. ``tests/test_devices.py`` computes again from Rockpool's own code the
numbers that Rockpool exposes (the mappers' defaults, the quantizer's integer ranges, the
dash conversion).

How Rockpool exports a time constant (``devices/xylo/syns61201/xylo_graph_modules.py``,
``Xylo2Neurons._convert_from``, the same for the other chips): it raises when
``tau <= dt``, and otherwise computes

.. math::

    \mathrm{dash} = \log_2(\tau / \mathrm{dt})

which ``transform/quantize_methods.py`` (``global_quantize``, ``channel_quantize``)
rounds with ``np.round`` (half to even) and casts to ``int``. Xylo stores a dash in
4 bits, 0..15 (``docs/devices/quick-xylo/deploy_to_xylo.ipynb``), and decays a state by
``x -= x >> dash`` each step, so dash 15 is the longest time constant, :math:`2^{15}`
steps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import BoundsError
from ..spec import Bounds

__all__ = ["DEVICES", "Device", "bounds_for", "get_device"]

#: Where the numbers come from (Rockpool 3.1.0, paths inside the ``rockpool`` package or
#: its repository's ``docs/``).
ROCKPOOL = "rockpool 3.1.0"

#: Bits of a dash (bit-shift decay); largest dash 15. Source: docs/devices/quick-xylo/
#: deploy_to_xylo.ipynb ("4-bit" bitshift decay parameters).
DASH_BITS = 4
MAX_DASH = 2**DASH_BITS - 1
#: Signed integer weights and thresholds: transform/quantize_methods.py, global_quantize
#: and channel_quantize defaults ``bits_per_weight=8``, ``bits_per_threshold=16``; the
#: largest magnitudes are ``2 ** (bits - 1) - 1``.
WEIGHT_BITS = 8
THRESHOLD_BITS = 16
MAX_WEIGHT = 2 ** (WEIGHT_BITS - 1) - 1  # 127
MAX_THRESHOLD = 2 ** (THRESHOLD_BITS - 1) - 1  # 32767
#: The lower time-constant bound sits this far (relatively) above ``dt``: the mapper needs
#: ``tau > dt`` strictly, and a closed bound must be strictly above. ``2**-9`` is four
#: times float16's half-ulp, so ``tau`` stays above ``dt`` after rounding either of them
#: to float16, float32 or float64 (the mapper compares in the parameter's dtype).
LOWER_MARGIN = 2.0**-9

LEAK_MODES = ("taus", "decays", "bitshifts")


@dataclass(frozen=True)
class Device:
    """One Xylo chip's limits, as Rockpool states them.

    Attributes:
        name: the preset's name (``"xylo-audio-2"``).
        part: SynSense's part number (``"SYNS61201"``).
        input_channels: input channels (spike inputs).
        hidden_neurons: hidden neurons (the mapper's ``max_hidden_neurons`` default).
        output_neurons: output (readout) neurons.
        synapses: synaptic states per hidden neuron (1 or 2).
        fan_out: largest number of hidden neurons one hidden neuron may connect to.
        input_expansion: largest number of hidden neurons the input channels may feed.
        output_expansion: largest number of hidden neurons that may feed the readout.
        sources: for each field, where its number comes from.
        notes: where Rockpool's sources disagree, which one the preset follows and why.
    """

    name: str
    part: str
    input_channels: int
    hidden_neurons: int
    output_neurons: int
    synapses: int
    fan_out: int
    input_expansion: int
    output_expansion: int
    sources: Mapping[str, str]
    notes: tuple[str, ...] = ()


_OVERVIEW = "docs/devices/xylo-overview.ipynb"

DEVICES: dict[str, Device] = {
    "xylo-audio-2": Device(
        name="xylo-audio-2",
        part="SYNS61201",
        input_channels=16,  # xylo_mapper.le_16_input_channels; xylo-overview
        hidden_neurons=1000,  # syns61201/xylo_mapper.py, mapper(max_hidden_neurons=1000)
        output_neurons=8,  # syns61201/xylo_mapper.py, mapper(max_output_neurons=8)
        synapses=2,  # syns61201/xylo_samna.py, config_from_specification (syn2)
        fan_out=64,  # xylo-overview
        input_expansion=1000,  # xylo-overview: every hidden neuron may take input
        output_expansion=1000,  # xylo-overview: every hidden neuron may drive the readout
        sources={
            "input_channels": "devices/xylo/syns61201/xylo_mapper.py (le_16_input_channels); "
            + _OVERVIEW,
            "hidden_neurons": "devices/xylo/syns61201/xylo_mapper.py (max_hidden_neurons=1000)",
            "output_neurons": "devices/xylo/syns61201/xylo_mapper.py (max_output_neurons=8, "
            "le_8_output_channels)",
            "synapses": "devices/xylo/syns61201/xylo_samna.py (config_from_specification)",
            "fan_out": _OVERVIEW,
            "input_expansion": _OVERVIEW,
            "output_expansion": _OVERVIEW,
        },
    ),
    "xylo-audio-3": Device(
        name="xylo-audio-3",
        part="SYNS65302",
        input_channels=16,  # xylo_mapper.le_16_input_channels; xylo-overview
        hidden_neurons=992,  # syns65302/xylo_mapper.py, mapper(max_hidden_neurons=992)
        output_neurons=16,  # syns65302/xylo_mapper.py, le_16_output_channels (not 32)
        synapses=2,  # syns65302/xylo_samna.py: "Max of 2 input synapses"
        fan_out=1024,  # xylo-overview
        input_expansion=128,  # syns65302/xylo_samna.py: only the first 128 IENs are used
        output_expansion=128,  # syns65302/xylo_samna.py: only the last 128 OENs are used
        sources={
            "input_channels": "devices/xylo/syns61201/xylo_mapper.py (le_16_input_channels, "
            "used by syns65302); " + _OVERVIEW,
            "hidden_neurons": "devices/xylo/syns65302/xylo_mapper.py (max_hidden_neurons=992)",
            "output_neurons": "devices/xylo/syns65302/xylo_mapper.py (le_16_output_channels)",
            "synapses": "devices/xylo/syns65302/xylo_samna.py (config_from_specification)",
            "fan_out": _OVERVIEW,
            "input_expansion": "devices/xylo/syns65302/xylo_samna.py (weights_in[:, :128])",
            "output_expansion": "devices/xylo/syns65302/xylo_samna.py (weights_out[-128:])",
        },
        notes=(
            "output neurons: the mapper's default max_output_neurons is 32, but its design "
            "rule le_16_output_channels warns above 16, as the overview states; the preset "
            "follows 16, because a network that draws the warning is one the chip's "
            "documentation does not promise to run",
            "synapses: config_from_specification's docstring shows weights (Nin, Nin_res, 1), "
            "but its code accepts two synapses (it raises only above 2); the preset follows "
            "the code",
        ),
    ),
    "xylo-imu": Device(
        name="xylo-imu",
        part="SYNS63300",
        input_channels=16,  # xylo_mapper.le_16_input_channels; xylo-overview
        hidden_neurons=496,  # syns63300/xylo_mapper.py, mapper(max_hidden_neurons=496)
        output_neurons=16,  # syns63300/xylo_mapper.py, mapper(max_output_neurons=16)
        synapses=1,  # syns63300/xylo_mapper.py, max_synapses_per_neuron(max_syns=1)
        fan_out=512,  # xylo-overview
        input_expansion=128,  # syns63300/xylo_samna.py: only the first 128 IENs are used
        output_expansion=128,  # syns63300/xylo_samna.py: only the last 128 OENs are used
        sources={
            "input_channels": "devices/xylo/syns61201/xylo_mapper.py (le_16_input_channels, "
            "used by syns63300); " + _OVERVIEW,
            "hidden_neurons": "devices/xylo/syns63300/xylo_mapper.py (max_hidden_neurons=496)",
            "output_neurons": "devices/xylo/syns63300/xylo_mapper.py (max_output_neurons=16, "
            "le_16_output_channels)",
            "synapses": "devices/xylo/syns63300/xylo_mapper.py (max_synapses_per_neuron)",
            "fan_out": _OVERVIEW,
            "input_expansion": "devices/xylo/syns63300/xylo_samna.py (weights_in[:, :128]); "
            "the mapper's le_128_input_expansion_neurons is an empty stub",
            "output_expansion": "devices/xylo/syns63300/xylo_samna.py (weights_out[-128:]); "
            "the mapper's le_128_output_expansion_neurons is an empty stub",
        },
        notes=(
            "the 128-neuron expansion limits are checked by no Rockpool design rule (both "
            "are `pass`); config_from_specification only warns and drops the neurons "
            "beyond 128, so the preset treats more as an error",
        ),
    ),
}


def get_device(device: str | Device) -> Device:
    """The preset called ``device`` (or ``device`` itself).

    Raises:
        BoundsError: for an unknown name, listing the known ones.
    """
    if isinstance(device, Device):
        return device
    if isinstance(device, str) and device in DEVICES:
        return DEVICES[device]
    raise BoundsError(f"unknown device {device!r}; known devices: {', '.join(sorted(DEVICES))}")


def check_dt(dt: Any) -> float:
    """``dt`` as a positive finite float.

    Raises:
        BoundsError: naming ``dt`` and its value.
    """
    if isinstance(dt, bool) or not isinstance(dt, (int, float)):
        raise BoundsError(f"dt must be a positive number of seconds, got {type(dt).__name__}")
    value = float(dt)
    if not (math.isfinite(value) and value > 0.0):
        raise BoundsError(f"dt must be a positive finite number of seconds, got {dt!r}")
    return value


def tau_range(dt: float) -> tuple[float, float]:
    r"""The time constants Xylo can run at step ``dt``: ``(dt·(1 + 2⁻⁹), 2¹⁵·dt)``.

    The lower end is the mapper's strict ``tau > dt`` (dash 0) with a margin that
    survives rounding to any float format; the upper end is dash 15 exactly:
    :math:`\log_2(2^{15}\,\mathrm{dt}/\mathrm{dt}) = 15`. Time constants up to
    :math:`2^{15.5}\,\mathrm{dt}` would also round to 15, but the chip then runs them as
    :math:`2^{15}\,\mathrm{dt}`: the bound keeps the float model at the value the chip runs.
    """
    dt = check_dt(dt)
    return dt * (1.0 + LOWER_MARGIN), dt * 2.0**MAX_DASH


def bounds_for(device: str | Device, *, dt: float, leak_mode: str = "taus") -> Bounds:
    r"""Box bounds that keep a Rockpool LIF network exportable to ``device`` at step ``dt``.

    Every time constant projected into these bounds exports: Rockpool's mapper requires
    :math:`\tau > \mathrm{dt}` and computes
    :math:`\mathrm{dash} = \mathrm{round}(\log_2(\tau/\mathrm{dt}))`, which Xylo stores in
    4 bits:

    .. math::

        \mathrm{dt}\,(1 + 2^{-9}) \le \tau \le 2^{15}\,\mathrm{dt}
        \quad\Rightarrow\quad \mathrm{dash} \in \{0, \dots, 15\}

    and dash 15 (the longest time constant, 32768 steps) is the upper bound itself. The
    same range is given for the parameters of the other leak modes of ``LIFTorch``,
    through Rockpool's own conversions to the ``tau`` that its export reads:
    ``decays`` bounds ``alpha``/``beta`` (:math:`\tau = -\mathrm{dt}/\ln\alpha`),
    ``bitshifts`` bounds ``dash_mem``/``dash_syn``
    (:math:`\tau = -\mathrm{dt}/\ln(1 - 2^{-d})`).

    Thresholds get no box bound: the chip limits the *quantized* threshold,
    :math:`\mathrm{round}(\theta \cdot 127/\max|W|) \le 32767`, which depends on the
    weights; :func:`~parambounds.devices.deployability` checks it. The sizes of the
    network are checked there too.

    Args:
        device: a name from :data:`DEVICES` (``"xylo-audio-2"``, ``"xylo-audio-3"``,
            ``"xylo-imu"``) or a :class:`Device`.
        dt: the simulation and chip time step in seconds (the ``dt`` of the LIF modules).
        leak_mode: the ``leak_mode`` of the network's ``LIFTorch`` modules: ``"taus"``
            (also ``LIFJax``), ``"decays"`` or ``"bitshifts"``.

    Returns:
        A non-strict :class:`~parambounds.Bounds` (patterns that match nothing are fine:
        one preset serves many network shapes) over ``*.tau_mem`` and ``*.tau_syn``, or
        ``*.alpha``/``*.beta``, or ``*.dash_mem``/``*.dash_syn``.

    Raises:
        BoundsError: for an unknown device (listing the known ones), a ``dt`` that is
            not a positive finite number, or an unknown ``leak_mode``.

    Examples:
        >>> bounds = bounds_for("xylo-audio-2", dt=1e-3)
        >>> lo, hi = bounds.spec["*.tau_mem"]
        >>> round(lo, 7), hi
        (0.001002, 32.768)
    """
    get_device(device)  # the limits that are not box bounds are checked by deployability
    lo, hi = tau_range(dt)
    if leak_mode == "taus":
        names, pair = ("tau_mem", "tau_syn"), (lo, hi)
    elif leak_mode == "decays":
        names, pair = ("alpha", "beta"), (math.exp(-dt / lo), math.exp(-dt / hi))
    elif leak_mode == "bitshifts":
        names = ("dash_mem", "dash_syn")
        pair = (-math.log2(-math.expm1(-dt / lo)), -math.log2(-math.expm1(-dt / hi)))
    else:
        raise BoundsError(
            f"unknown leak_mode {leak_mode!r} for device {get_device(device).name!r}; "
            f"expected one of {', '.join(map(repr, LEAK_MODES))}"
        )
    return Bounds({f"*.{name}": pair for name in names}, strict=False)
