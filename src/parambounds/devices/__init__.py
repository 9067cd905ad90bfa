"""Device presets: bounds derived from a chip's export rules, and a dry run of the export.

``bounds_for("xylo-audio-2", dt=1e-3)`` gives the :class:`~parambounds.Bounds` that keep a
Rockpool LIF network's time constants exportable to Xylo; ``deployability(net,
"xylo-audio-2", dt=1e-3)`` lists every rule of Rockpool's mapper and quantizer the
network would fail, and where. Every number comes from Rockpool 3.1.0's sources, cited
in :mod:`parambounds.devices._presets`.

This package sits on the core (it produces a ``Bounds``); the core and the backends never
import it. It reads a network's structure through Rockpool, imported when a network is
checked.
"""

from ._deploy import Deployability, Finding, deployability
from ._presets import DEVICES, Device, bounds_for

__all__ = ["DEVICES", "Deployability", "Device", "Finding", "bounds_for", "deployability"]
