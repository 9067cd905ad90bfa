"""The torch backend: bounds applied to torch modules, state_dicts and trees of tensors.

- :mod:`._spec`: the backend of :class:`~parambounds.Bounds` (``cost``, ``project_``,
  ``report``, ...), chosen by :mod:`parambounds._backends`;
- :mod:`._trees`: walking parameter trees, matching bound trees by key, ``make_bounds``;
- :mod:`._plan` (with :mod:`._plan_cache`): bounds checked against the parameters
  once, cached; :mod:`._rounding`: bounds rounded inward to a dtype;
- :mod:`._kernels` (with :mod:`._native` and ``csrc/``): the per-step value and
  gradient; :mod:`._cost`: ``bounds_cost``; :mod:`._loss`: Rockpool's loss and module;
- :mod:`._constraints`: projection and reparametrization; :mod:`._report`: report
  statistics;
- :mod:`._distributed` (with :mod:`._collectives`): DTensor shards and ranks.

The public names are re-exported by :mod:`parambounds`.
"""
