"""A dry run of Rockpool's export to Xylo: which rules a network would fail, and where.

:func:`deployability` reads a Rockpool network through its own ``as_graph()`` (the graph
Rockpool's mappers read) and repeats, in the same NumPy arithmetic, the decisions of
Rockpool 3.1.0's mappers (``devices/xylo/*/xylo_mapper.py`` and their graph modules)
and quantizers (``transform/quantize_methods.py``). Unlike the mapper it does not stop
at the first problem: it lists them all, each with the parameter it is about.

numpy is imported here, at module level: this module is reached only through
``parambounds.devices``, never from the core.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..errors import BoundsError
from ._presets import MAX_DASH, MAX_THRESHOLD, MAX_WEIGHT, Device, check_dt, get_device

__all__ = ["Deployability", "Finding", "deployability"]

QUANTIZERS = ("global", "channel")

_NOT_CHECKED = (
    "samna's validate_configuration (the chip's own check, closed source) and the "
    "weight bit-shift ranges it enforces",
    "per-step event limits (input events per channel, spikes per neuron): they depend "
    "on the input, not on the parameters",
)


@dataclass(frozen=True)
class Finding:
    """One rule a network fails, or a warning.

    Attributes:
        rule: the rule's name (``"dash-range"``, ``"hidden-neurons"``, ...).
        where: the parameter or part of the network it is about (``"1_LIFTorch.tau_mem"``).
        message: what is wrong, with the numbers, and what Rockpool would do.
        error: ``True`` when Rockpool would reject or rescale the network (the report is
            then not ok); ``False`` for a warning.
    """

    rule: str
    where: str
    message: str
    error: bool = True


@dataclass(frozen=True)
class Deployability:
    """What would not deploy: :attr:`ok`, ``str()`` and :meth:`to_dict`.

    Attributes:
        device: the preset's name.
        dt: the time step checked against.
        quantize: the quantizer whose rules were checked (``"global"`` or ``"channel"``).
        findings: every failed rule (errors) and warning, errors first.
        checked: the rules that were checked.
        not_checked: what this dry run cannot check.
    """

    device: str
    dt: float
    quantize: str
    findings: tuple[Finding, ...]
    checked: tuple[str, ...]
    not_checked: tuple[str, ...]

    @property
    def errors(self) -> list[Finding]:
        """The rules Rockpool's export would reject or rescale the network for."""
        return [f for f in self.findings if f.error]

    @property
    def warnings(self) -> list[Finding]:
        """What deploys but changes (weights that round to zero, ...)."""
        return [f for f in self.findings if not f.error]

    @property
    def ok(self) -> bool:
        """Whether no rule fails (warnings allowed)."""
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict: device, dt, quantize, ok, findings, checked."""
        return {
            "device": self.device,
            "dt": self.dt,
            "quantize": self.quantize,
            "ok": self.ok,
            "findings": [asdict(f) for f in self.findings],
            "checked": list(self.checked),
            "not_checked": list(self.not_checked),
        }

    def __str__(self) -> str:
        head = f"{self.device} at dt={self.dt:g} s ({self.quantize} quantization): "
        n_err, n_warn = len(self.errors), len(self.warnings)
        if self.ok:
            head += "deployable" + (f", {n_warn} warning(s)" if n_warn else "")
        else:
            head += f"NOT deployable: {n_err} rule(s) fail" + (
                f", {n_warn} warning(s)" if n_warn else ""
            )
        lines = [head]
        for f in self.findings:
            lines.append(f"  {'error' if f.error else 'warning'} [{f.rule}] {f.where}: {f.message}")
        lines.append("checked: " + ", ".join(self.checked))
        lines.append("not checked: " + "; ".join(self.not_checked))
        return "\n".join(lines)


def deployability(
    model: Any, device: str | Device, *, dt: float, quantize: str = "global"
) -> Deployability:
    r"""Dry-run Rockpool's export of ``model`` to ``device``: what would fail, and where.

    Checked for a Rockpool network (torch or JAX, read through ``model.as_graph()``):

    - time constants: Rockpool's mapper raises on :math:`\tau \le \mathrm{dt}`
      (compared in the parameter's dtype); the quantizer's dash
      :math:`\mathrm{round}(\log_2(\tau/\mathrm{dt}))` (half to even) must lie in 0..15;
      NaN time constants, which the mapper lets through and the quantizer casts to an
      arbitrary integer;
    - structure and sizes: at least two neuron layers and one ``dt``; input channels,
      hidden and output neurons, synapses per neuron, the largest fan-out, and the
      input and output expansion neurons, against the preset's limits;
    - quantization (``quantize="global"``, Rockpool's ``global_quantize``):
      :math:`s = 127 / \max(|W_\mathrm{in}|, |W_\mathrm{rec}|, |b|)`, and a threshold
      rescale, which costs weight resolution, when
      :math:`|\max_i \mathrm{round}(\theta_i s)| > 32767`; the same on the output side
      with :math:`W_\mathrm{out}`, :math:`b_\mathrm{out}` and
      :math:`\theta_\mathrm{out}`; ``quantize="channel"`` (``channel_quantize``) does it
      per neuron, over its incoming weights. Non-zero weights that round to 0 at 8 bits
      are warnings.

    For a checkpoint (a mapping of names to tensors, such as a ``state_dict`` or
    Rockpool's nested ``parameters()``) only the time constants can be checked: its
    structure is unknown.

    Args:
        model: a Rockpool network (``Sequential`` of ``LinearTorch``/``LIFTorch`` or
            their JAX twins), or a mapping of parameter names to tensors.
        device: a name from :data:`~parambounds.devices.DEVICES` or a ``Device``.
        dt: the time step in seconds. A network's LIF modules carry their own ``dt``,
            which the export uses; a different one is reported.
        quantize: ``"global"`` or ``"channel"``: the Rockpool quantizer to check for.

    Returns:
        A :class:`Deployability` report.

    Raises:
        BoundsError: for an unknown device, a bad ``dt`` or ``quantize``, or a model
            that is neither a Rockpool network nor a mapping of tensors.
    """
    dev = get_device(device)
    dt = check_dt(dt)
    if quantize not in QUANTIZERS:
        raise BoundsError(
            f"unknown quantize {quantize!r}; expected one of {', '.join(map(repr, QUANTIZERS))}"
        )
    if hasattr(model, "as_graph"):
        findings, checked, extra = _check_network(model, dev, dt, quantize)
    elif isinstance(model, Mapping):
        tensors = dict(_leaves(model))
        if not any(name.rpartition(".")[2] in _TIME_CONSTANTS for name in tensors):
            raise BoundsError(
                f"no time constants to check for {dev.name}: no parameter named "
                + ", ".join(f"*.{n}" for n in _TIME_CONSTANTS)
            )
        findings, checked = _check_parameters(tensors, dt), ["time constants"]
        extra = ["sizes, structure and quantization: a checkpoint does not hold the structure"]
    else:
        raise BoundsError(
            f"deployability needs a Rockpool network (with as_graph()) or a mapping of "
            f"parameter names to tensors, got {type(model).__name__}"
        )
    ordered = tuple(sorted(findings, key=lambda f: not f.error))
    return Deployability(dev.name, dt, quantize, ordered, tuple(checked), (*extra, *_NOT_CHECKED))


# -- reading parameters -----------------------------------------------------------------


def _numpy(x: Any) -> np.ndarray:
    """A tensor or array as NumPy, in its own dtype (what Rockpool's export does)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _leaves(tree: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out += _leaves(value, name + ".")
        elif hasattr(value, "shape"):
            out.append((name, value))
    return out


# -- time constants ---------------------------------------------------------------------


def _tau_findings(tau: Any, dt: float, where: str, shown: str) -> list[Finding]:
    """The mapper's and quantizer's verdict on one array of time constants.

    ``tau`` is the array the export reads (its dtype kept: the mapper's ``tau <= dt``
    compares in it); ``where`` names the trained parameter, ``shown`` how it relates to tau.
    """
    tau = np.asarray(tau).reshape(-1)
    if tau.size == 0:
        return []
    findings = []
    nan = np.isnan(tau)
    if nan.any():
        findings.append(
            Finding(
                "time-constant-nan",
                where,
                f"{int(nan.sum())} of {tau.size} time constants{shown} are NaN; Rockpool's "
                "mapper lets NaN through and the quantizer casts it to an arbitrary integer",
            )
        )
    low = tau <= dt  # xylo_graph_modules: np.array(mod.tau_mem) <= mod.dt
    if low.any():
        worst = float(tau[low].min())
        findings.append(
            Finding(
                "time-constant-above-dt",
                where,
                f"{int(low.sum())} of {tau.size} time constants{shown} are <= dt={dt:g} "
                f"(smallest {worst:.6g}); Rockpool's mapper raises on them",
            )
        )
    ok = ~nan & ~low
    with np.errstate(divide="ignore", invalid="ignore"):
        dash = np.log2(tau[ok] / dt)  # the mapper's formula, in the parameter's dtype
    dash = np.round(np.asarray(dash.tolist(), dtype=np.float64))  # quantizer: np.round
    high = (dash > MAX_DASH) | (dash < 0)
    if high.any():
        worst = float(tau[ok][high].max())
        findings.append(
            Finding(
                "dash-range",
                where,
                f"{int(high.sum())} of {tau.size} time constants{shown} round to a dash "
                f"outside 0..{MAX_DASH} (largest tau {worst:.6g}, dash "
                f"{float(dash[high].max()):g}); Xylo stores 4-bit dashes: tau must stay "
                f"below 2**15.5*dt = {dt * 2**15.5:.6g}",
            )
        )
    return findings


_TIME_CONSTANTS = ("tau_mem", "tau_syn", "alpha", "beta", "dash_mem", "dash_syn")
_LEAK_NAMES = {
    "taus": ("tau_mem", "tau_syn"),
    "decays": ("alpha", "beta"),
    "bitshifts": ("dash_mem", "dash_syn"),
}


def _check_parameters(tensors: dict[str, Any], dt: float) -> list[Finding]:
    """Time constants of a checkpoint, by name: ``*.tau_*``, ``*.alpha``/``beta``, ``*.dash_*``."""
    findings: list[Finding] = []
    for name, value in tensors.items():
        leaf = name.rpartition(".")[2]
        x = _numpy(value)
        if x.dtype.kind != "f":
            continue
        if leaf in ("tau_mem", "tau_syn"):
            findings += _tau_findings(x, dt, name, "")
        elif leaf in ("alpha", "beta"):  # LIFTorch decay_to_tau: -dt / log(alpha)
            with np.errstate(divide="ignore", invalid="ignore"):
                tau = -x.dtype.type(dt) / np.log(x)
            findings += _tau_findings(tau, dt, name, " (as -dt/log(decay))")
        elif leaf in ("dash_mem", "dash_syn"):  # LIFTorch bitshift_to_tau
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                tau = -x.dtype.type(dt) / np.log(1 - 1 / (x.dtype.type(2) ** x))
            findings += _tau_findings(tau, dt, name, " (as -dt/log(1-2**-dash))")
    return findings


# -- networks ---------------------------------------------------------------------------


def _module_paths(net: Any) -> dict[int, str]:
    """``id(module) -> dotted path`` over Rockpool's ``modules()`` (torch and JAX alike)."""
    paths = {id(net): ""}

    def walk(m: Any, prefix: str) -> None:
        children = m.modules() if callable(getattr(m, "modules", None)) else {}
        if not isinstance(children, Mapping):
            return
        for key, child in children.items():
            path = f"{prefix}{key}"
            paths.setdefault(id(child), path)
            walk(child, path + ".")

    walk(net, "")
    return paths


def _param_name(paths: dict[int, str], graph_module: Any, leaf: str) -> str:
    path = paths.get(id(getattr(graph_module, "computational_module", None)))
    base = path if path else (graph_module.name if path is None else "")
    return f"{base}.{leaf}" if base and leaf else (base or leaf)


def _check_network(
    net: Any, dev: Device, dt: float, quantize: str
) -> tuple[list[Finding], list[str], list[str]]:
    from rockpool.graph import GenericNeurons, LinearWeights, find_modules_of_subclass

    try:
        graph = net.as_graph()
    except Exception as err:  # a module Rockpool cannot export at all
        raise BoundsError(
            f"{type(net).__name__}.as_graph() failed, so Rockpool cannot map it to "
            f"{dev.name}: {err}"
        ) from None
    paths = _module_paths(net)
    findings: list[Finding] = []
    checked = ["structure", "time constants", "sizes", f"{quantize} quantization"]

    neurons = list(find_modules_of_subclass(graph, GenericNeurons))
    outputs: list[Any] = []
    for node in graph.output_nodes:
        for m in node.source_modules:
            if isinstance(m, GenericNeurons) and m not in outputs:
                outputs.append(m)
    hidden = [n for n in neurons if n not in outputs]
    weights = list(find_modules_of_subclass(graph, LinearWeights))

    def where(m: Any, leaf: str) -> str:
        return _param_name(paths, m, leaf)

    # - structure (xylo_mapper: at_least_two_neuron_layers_needed, all_neurons_have_same_dt)
    if len(neurons) < 2 or not outputs:
        findings.append(
            Finding(
                "structure",
                "network",
                f"{len(neurons)} neuron layer(s); Rockpool's mapper needs at least two (hidden "
                "and output), the network's output coming from neurons",
            )
        )
    for n in neurons:
        ndt = getattr(n, "dt", None)
        if ndt is not None and not np.isclose(float(ndt), dt):
            findings.append(
                Finding(
                    "dt",
                    where(n, "dt"),
                    f"the module's dt is {float(ndt):g}, not {dt:g}; the export converts time "
                    "constants with the module's own dt",
                )
            )

    # - time constants (Xylo2Neurons._convert_from, global_quantize's np.round)
    for n in neurons:
        if not hasattr(n, "tau_mem"):
            continue
        cm = getattr(n, "computational_module", None)
        mode = getattr(cm, "leak_mode", "taus")
        mem, syn = _LEAK_NAMES.get(mode, _LEAK_NAMES["taus"])
        how = "" if mode == "taus" else f" (from {mode})"
        ndt = float(n.dt) if getattr(n, "dt", None) is not None else dt
        findings += _tau_findings(np.array(n.tau_mem), ndt, where(n, mem), how)
        findings += _tau_findings(np.array(n.tau_syn), ndt, where(n, syn), how)

    # - sizes
    def size(rule: str, what: str, count: int, limit: int, source_field: str) -> None:
        if count > limit:
            findings.append(
                Finding(
                    rule,
                    what,
                    f"{count} > {limit} ({dev.part}; {dev.sources[source_field]})",
                )
            )

    size("input-channels", "network inputs", len(graph.input_nodes), dev.input_channels,
         "input_channels")  # fmt: skip
    n_hidden = sum(len(n.output_nodes) for n in hidden)
    size("hidden-neurons", "hidden neurons", n_hidden, dev.hidden_neurons, "hidden_neurons")
    size("output-neurons", "output neurons", len(graph.output_nodes), dev.output_neurons,
         "output_neurons")  # fmt: skip
    for n in neurons:
        syns = len(n.input_nodes) // max(len(n.output_nodes), 1)
        limit = dev.synapses if n in hidden else 1
        if syns > limit:
            findings.append(
                Finding(
                    "synapses",
                    where(n, "tau_syn"),
                    f"{syns} synapses per neuron > {limit} "
                    f"({'hidden' if n in hidden else 'output'} neurons of {dev.part})",
                )
            )

    def sources_of(w: Any) -> list[Any]:
        found = [m for node in w.input_nodes for m in node.source_modules if m in neurons]
        return list(dict.fromkeys(found))

    def targets_of(w: Any) -> list[Any]:
        found = [m for node in w.output_nodes for m in node.sink_modules if m in neurons]
        return list(dict.fromkeys(found))

    input_ws = [w for w in weights if not sources_of(w)]
    iens = list(dict.fromkeys(t for w in input_ws for t in targets_of(w) if t in hidden))
    out_ws = [w for w in weights if any(t in outputs for t in targets_of(w))]
    oens = list(dict.fromkeys(s for w in out_ws for s in sources_of(w) if s in hidden))
    n_ien = sum(len(n.output_nodes) for n in iens)
    n_oen = sum(len(n.output_nodes) for n in oens)
    if dev.input_expansion < dev.hidden_neurons:
        size("input-expansion", "hidden neurons fed by the inputs", n_ien,
             dev.input_expansion, "input_expansion")  # fmt: skip
        size("output-expansion", "hidden neurons feeding the outputs", n_oen,
             dev.output_expansion, "output_expansion")  # fmt: skip
    if dev.part == "SYNS63300" and any(n in oens for n in iens):
        findings.append(
            Finding(
                "structure",
                _param_name(paths, iens[0], "") or "network",
                "the same hidden layer takes the inputs and drives the outputs; Rockpool "
                "3.1.0's Xylo-IMU mapper (syns63300/xylo_mapper.py) fails on that "
                "(ValueError in allocated_iens.index): give the network at least two hidden "
                "layers",
            )
        )

    # - fan-out: non-zero hidden -> hidden connections per source neuron
    hidden_ws = [w for w in weights if sources_of(w) and all(t in hidden for t in targets_of(w))]
    worst_fan, worst_w = 0, None
    for w in hidden_ws:
        ws = np.asarray(w.weights)
        tgt = targets_of(w)
        nsyn = max(ws.shape[1] // max(sum(len(t.output_nodes) for t in tgt), 1), 1)
        per_target = (ws.reshape(ws.shape[0], -1, nsyn) != 0).any(axis=2)
        fan = int(per_target.sum(axis=1).max()) if per_target.size else 0
        if fan > worst_fan:
            worst_fan, worst_w = fan, w
    if worst_w is not None and worst_fan > dev.fan_out:
        findings.append(
            Finding(
                "fan-out",
                where(worst_w, _weight_leaf(worst_w)),
                f"a hidden neuron connects to {worst_fan} hidden neurons > {dev.fan_out} "
                f"({dev.part}; {dev.sources['fan_out']})",
            )
        )

    # - quantization
    findings += _quantization(
        hidden, outputs, weights, targets_of, lambda m, leaf: where(m, leaf), quantize
    )
    return findings, checked, []


def _weight_leaf(w: Any) -> str:
    cm = getattr(w, "computational_module", None)
    return "w_rec" if cm is not None and hasattr(cm, "tau_mem") else "weight"


def _quantization(
    hidden: list[Any],
    outputs: list[Any],
    weights: list[Any],
    targets_of: Any,
    where: Any,
    quantize: str,
) -> list[Finding]:
    """Rockpool's quantizer, repeated in its own float64 arithmetic, on both sides."""
    findings: list[Finding] = []
    for side, neurons in (("hidden", hidden), ("output", outputs)):
        if not neurons:
            continue
        ws = [w for w in weights if any(t in neurons for t in targets_of(w))]
        mats = [np.asarray(w.weights, dtype=np.float64) for w in ws]
        threshold = np.concatenate(
            [np.asarray(n.threshold, dtype=np.float64).reshape(-1) for n in neurons]
        )
        bias = np.concatenate([np.asarray(n.bias, dtype=np.float64).reshape(-1) for n in neurons])
        named = [(w, m, _weight_leaf(w)) for w, m in zip(ws, mats)]
        named += [(n, np.asarray(n.threshold, dtype=np.float64), "threshold") for n in neurons]
        named += [(n, np.asarray(n.bias, dtype=np.float64), "bias") for n in neurons]
        for module, values, leaf in named:
            if not np.isfinite(values).all():
                findings.append(
                    Finding(
                        "not-finite",
                        where(module, leaf),
                        f"{int((~np.isfinite(values)).sum())} of {values.size} values are NaN "
                        "or infinite; the quantizer's scaling and integer casts are then "
                        "meaningless",
                    )
                )
        if quantize == "global":
            # global_quantize: max over w_in and w_rec and the bias (w_out and bias_out)
            max_w = 0.0
            for m in mats:
                if m.size:
                    max_w = np.max([max_w, np.max(np.abs(m))])
            if bias.size:
                max_w = np.max([max_w, np.max(np.abs(bias))])
            scaling = MAX_WEIGHT / max_w if max_w != 0 else 1
            th_q = np.round(threshold * scaling).astype(int)
            if np.abs(np.max(th_q)) > MAX_THRESHOLD:
                i = int(np.argmax(th_q))
                n, j = _locate(neurons, i)
                findings.append(
                    Finding(
                        "threshold-rescale",
                        where(n, "threshold"),
                        f"{side} threshold {threshold[i]:.6g} (neuron {j}) quantizes to "
                        f"{int(th_q[i])} > {MAX_THRESHOLD} at scale 127/max|W| = "
                        f"{float(scaling):.6g}; global_quantize then rescales every {side} "
                        f"threshold and {'w_in' if side == 'hidden' else 'w_out'} and w_rec"
                        f" by {MAX_THRESHOLD / th_q[i]:.3g}, losing "
                        f"weight resolution: keep thresholds <= {MAX_THRESHOLD}/127*max|W| = "
                        f"{MAX_THRESHOLD / float(scaling):.6g}",
                    )
                )
            scales = [np.full(m.shape, scaling) for m in mats]
        else:
            # channel_quantize: per target neuron, its incoming weights (no bias)
            per_neuron = _incoming_max(neurons, ws, mats, targets_of)
            safe = np.where(per_neuron != 0, per_neuron, 1.0)
            scale_n = np.where(per_neuron != 0, MAX_WEIGHT / safe, np.nan)
            th_q = np.round(np.where(np.isnan(scale_n), threshold, threshold * scale_n))
            over = np.abs(th_q) > MAX_THRESHOLD
            rescaled = over & ~np.isnan(scale_n)
            stuck = over & np.isnan(scale_n)
            if rescaled.any():
                i = int(np.flatnonzero(rescaled)[0])
                n, j = _locate(neurons, i)
                findings.append(
                    Finding(
                        "threshold-rescale",
                        where(n, "threshold"),
                        f"{int(rescaled.sum())} {side} neuron(s) (first: neuron {j}, threshold "
                        f"{threshold[i]:.6g}) quantize to a threshold > {MAX_THRESHOLD}; "
                        "channel_quantize then rescales them and their weights, losing weight "
                        "resolution: keep each threshold <= 32767/127 * max|W| of its inputs",
                    )
                )
            if stuck.any():
                i = int(np.flatnonzero(stuck)[0])
                n, j = _locate(neurons, i)
                findings.append(
                    Finding(
                        "threshold-range",
                        where(n, "threshold"),
                        f"{int(stuck.sum())} {side} neuron(s) without input weights (first: "
                        f"neuron {j}) keep threshold {threshold[i]:.6g}, beyond 16 bits",
                    )
                )
            scales = _incoming_scales(neurons, ws, mats, targets_of, scale_n)
        for w, m, s in zip(ws, mats, scales):
            with np.errstate(invalid="ignore"):
                zero = (m != 0) & (np.round(m * s) == 0)
            if zero.any():
                findings.append(
                    Finding(
                        "weights-round-to-zero",
                        where(w, _weight_leaf(w)),
                        f"{int(zero.sum())} of {int((m != 0).sum())} non-zero weights round to "
                        f"0 at {8} bits (|w| <= 0.5/scale)",
                        error=False,
                    )
                )
    return findings


def _locate(neurons: list[Any], i: int) -> tuple[Any, int]:
    """The neuron module holding the ``i``-th neuron of the concatenation, and its index."""
    for n in neurons:
        k = len(n.output_nodes)
        if i < k:
            return n, i
        i -= k
    raise IndexError(i)  # pragma: no cover


def _blocks(neurons: list[Any], w: Any, targets_of: Any) -> list[tuple[int, slice, int]]:
    """``(offset, columns, count)`` per target module of ``w``: where its neurons sit."""
    out = []
    starts, pos = {}, 0
    for n in neurons:
        starts[id(n)] = pos
        pos += len(n.output_nodes)
    col = 0
    for t in targets_of(w):
        k = len(t.input_nodes)
        if id(t) in starts:
            out.append((starts[id(t)], slice(col, col + k), len(t.output_nodes)))
        col += k
    return out


def _incoming_max(
    neurons: list[Any], ws: list[Any], mats: list[np.ndarray], targets_of: Any
) -> np.ndarray:
    total = sum(len(n.output_nodes) for n in neurons)
    out = np.zeros(total)
    for w, m in zip(ws, mats):
        for start, cols, k in _blocks(neurons, w, targets_of):
            block = np.abs(m[:, cols]).reshape(m.shape[0], k, -1)
            if block.size:
                out[start : start + k] = np.maximum(out[start : start + k], block.max(axis=(0, 2)))
    return out


def _incoming_scales(
    neurons: list[Any], ws: list[Any], mats: list[np.ndarray], targets_of: Any, scale_n: np.ndarray
) -> list[np.ndarray]:
    scales = []
    for w, m in zip(ws, mats):
        s = np.zeros(m.shape)
        for start, cols, k in _blocks(neurons, w, targets_of):
            per = np.nan_to_num(scale_n[start : start + k], nan=0.0)
            nsyn = max((cols.stop - cols.start) // max(k, 1), 1)
            s[:, cols] = np.repeat(per, nsyn)[None, :]
        scales.append(s)
    return scales
