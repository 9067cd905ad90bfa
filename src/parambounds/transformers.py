"""Bounds in a Hugging Face ``Trainer``: :class:`BoundsCallback`.

The Trainer builds its optimizer as usual; the callback projects in ``on_optimizer_step``
(after ``optimizer.step()``, before the gradients are zeroed), except after a step that
AMP's gradient scaler skipped (``optimizer.step_was_skipped``), and adds
:meth:`~parambounds.Bounds.metrics` to the Trainer's logs in ``on_log``. With gradient
accumulation the Trainer calls ``on_optimizer_step`` on the real steps only.

The Trainer calls its reporting callbacks (``report_to``: TensorBoard, W&B, MLflow)
before the ones passed as ``callbacks=``; :meth:`BoundsCallback.add_to` puts the
callback ahead of them, so that they write the metrics too. ``transformers`` is no
dependency of parambounds; nothing in parambounds imports this module.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import TrainerCallback

from parambounds import Bounds, BoundsError

__all__ = ["BoundsCallback"]


def _bounded_tensors(bounds: Bounds, module: Any) -> dict[int, str]:
    """``id`` of the tensor an optimizer trains for each bounded name -> the name."""
    lower, upper = bounds.bounds_of(module)
    params = dict(module.named_parameters())
    out = {}
    for name in lower:
        if lower[name] is None and upper[name] is None:
            continue
        p = params.get(name)
        if p is None:  # changed by reparametrize_: the optimizer trains its original
            owner_path, _, attr = name.rpartition(".")
            owner = module.get_submodule(owner_path) if owner_path else module
            p = getattr(getattr(owner.parametrizations, attr), "original", None)
        if p is not None:
            out[id(p)] = name
    return out


class BoundsCallback(TrainerCallback):  # type: ignore[misc]
    """Keep a ``Trainer``'s model inside ``bounds`` and add the bounds' metrics to its logs.

    Patterns match the model's ``named_parameters()`` names
    (``bert.encoder.layer.0.output.LayerNorm.weight``, ``*.LayerNorm.weight``).

    Args:
        bounds: the spec.
        project: project after every optimizer step that ran; with ``False``, only
            the metrics are logged.
        log: add :meth:`~parambounds.Bounds.metrics` to the logs (as numbers, read at
            each of the Trainer's logging steps only) and to ``state.log_history``.
        prefix: the metrics' key prefix.
        per_parameter: log each bounded parameter's metrics, not only the totals.

    Raises:
        BoundsError: when training begins, for bounds that do not fit the model, or
            when ``project`` and the optimizer holds none of the bounded parameters.
    """

    def __init__(
        self,
        bounds: Bounds,
        *,
        project: bool = True,
        log: bool = True,
        prefix: str = "bounds/",
        per_parameter: bool = True,
    ) -> None:
        if not isinstance(bounds, Bounds):
            raise BoundsError(f"bounds must be a parambounds.Bounds, got {type(bounds).__name__}")
        self.bounds = bounds
        self.project = project
        self.log = log
        self.prefix = prefix
        self.per_parameter = per_parameter
        #: Optimizer steps that ran (and were projected, with ``project``).
        self.steps = 0

    def add_to(self, trainer: Any) -> BoundsCallback:
        """Add this callback to ``trainer`` ahead of its reporting callbacks; return it.

        Then TensorBoard, W&B and MLflow (``report_to``) write the metrics too.
        """
        trainer.callback_handler.callbacks.insert(0, self)
        return self

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:  # noqa: ARG002
        """Check the bounds against the model, and that the optimizer trains some of them."""
        self.steps = 0
        model, optimizer = kwargs.get("model"), kwargs.get("optimizer")
        bounded = _bounded_tensors(self.bounds, model)
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
        if not (self.project and bounded and inner is not None):
            return
        held = {id(p) for g in inner.param_groups for p in g["params"]}
        if not held & set(bounded):
            names = list(bounded.values())
            raise BoundsError(
                "the Trainer's optimizer holds none of the bounded parameters ("
                + ", ".join(f"'{n}'" for n in names[:5])
                + (f" and {len(names) - 5} more" if len(names) > 5 else "")
                + ")"
            )

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:  # noqa: ARG002
        """Project, unless the gradient scaler skipped the step."""
        if getattr(kwargs.get("optimizer"), "step_was_skipped", False):
            return
        self.steps += 1
        if self.project:
            self.bounds.project_(kwargs["model"])

    def on_log(
        self,
        args: Any,  # noqa: ARG002
        state: Any,
        control: Any,  # noqa: ARG002
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Add the metrics to ``logs`` (read now: the Trainer's logs hold numbers)."""
        model = kwargs.get("model")
        if not self.log or logs is None or model is None or _not_a_step(logs):
            return
        metrics = self.bounds.metrics(model, prefix=self.prefix, per_parameter=self.per_parameter)
        first = next(iter(metrics.values()))
        # the loggers' read, at the Trainer's logging steps only: one transfer
        numbers = torch.stack([v.to(first.device) for v in metrics.values()]).tolist()
        values = dict(zip(metrics, numbers))
        logs.update(values)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)


def _not_a_step(logs: dict[str, Any]) -> bool:
    """Whether ``logs`` are an evaluation's, or the summary at the end of training."""
    return "train_runtime" in logs or any(
        k.startswith(("eval_", "test_", "predict_")) for k in logs
    )
