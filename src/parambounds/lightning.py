"""Bounds in a Lightning ``Trainer``: :class:`BoundsCallback`.

Lightning has no hook after an optimizer step (its issue #11688), so the callback hooks
the optimizers themselves, as :meth:`~parambounds.Bounds.attach` does: the projection
runs after every ``optimizer.step()`` that actually ran. A step skipped by
gradient accumulation, or by AMP's ``GradScaler`` (inf or NaN gradients), is no
``optimizer.step()`` and projects nothing; several optimizers and manual optimization
(``self.optimizers()``, ``opt.step()``) work alike.

Works with ``lightning`` (``lightning.pytorch``) and with ``pytorch_lightning``: the
callback derives from the ``Callback`` of each one already imported (or, when none is,
of the first installed). Neither is a dependency of parambounds; nothing in parambounds
imports this module.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

from parambounds import Bounds, BoundsError

__all__ = ["BoundsCallback"]

_FLAVOURS = ("lightning.pytorch", "pytorch_lightning")


def _bases() -> tuple[type, ...]:
    """The ``Callback`` classes to derive from: every imported flavour, or the first one."""
    loaded = [sys.modules[name] for name in _FLAVOURS if sys.modules.get(name) is not None]
    if not loaded:
        for name in _FLAVOURS:
            try:
                loaded = [importlib.import_module(name)]
                break
            except ImportError:
                continue
        else:
            raise ImportError(
                "parambounds.lightning needs Lightning: pip install 'parambounds[lightning]'"
            )
    return tuple(module.Callback for module in loaded)


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


class BoundsCallback(*_bases()):  # type: ignore[misc]
    """Keep a ``LightningModule``'s parameters inside ``bounds`` and log how far out they are.

    Patterns match the module's own ``named_parameters()`` names (``self.net`` gives
    ``net.0.weight``).

    Args:
        bounds: the spec.
        project: project after every optimizer step that ran (see the module's notes).
            With ``False``, only the metrics are logged (a penalty in the loss, say).
        log_every_n_steps: ``None`` (the default) logs
            :meth:`~parambounds.Bounds.metrics` through ``LightningModule.log_dict``
            whenever the trainer writes its logs (``Trainer(log_every_n_steps=...)``),
            so they are in ``trainer.callback_metrics`` too; a number ``n`` writes them
            straight to the trainer's loggers after every ``n``-th optimizer step
            instead; ``0`` logs nothing.
        check_on_fit_end: call :meth:`~parambounds.Bounds.check` when ``fit`` ends
            (a :class:`~parambounds.BoundsViolationError` if anything is outside).
        prefix: the metrics' key prefix.
        per_parameter: log each bounded parameter's metrics, not only the totals.

    Raises:
        BoundsError: when fit starts, for bounds that do not fit the module, or when
            ``project`` and no optimizer holds any bounded parameter (naming them).

    Examples:
        >>> import lightning.pytorch as pl  # doctest: +SKIP
        >>> bounds = Bounds({"net.*.weight": (-1, 1)})  # doctest: +SKIP
        >>> pl.Trainer(callbacks=[BoundsCallback(bounds)]).fit(module)  # doctest: +SKIP
    """

    def __init__(
        self,
        bounds: Bounds,
        *,
        project: bool = True,
        log_every_n_steps: int | None = None,
        check_on_fit_end: bool = False,
        prefix: str = "bounds/",
        per_parameter: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(bounds, Bounds):
            raise BoundsError(f"bounds must be a parambounds.Bounds, got {type(bounds).__name__}")
        if log_every_n_steps is not None and (
            isinstance(log_every_n_steps, bool)
            or not isinstance(log_every_n_steps, int)
            or log_every_n_steps < 0
        ):
            raise BoundsError(
                f"log_every_n_steps must be None or an integer >= 0, got {log_every_n_steps!r}"
            )
        self.bounds = bounds
        self.project = project
        self.log_every_n_steps = log_every_n_steps
        self.check_on_fit_end = check_on_fit_end
        self.prefix = prefix
        self.per_parameter = per_parameter
        #: Optimizer steps that ran (and were projected, with ``project``) during fit.
        self.steps = 0
        self._logged_at = 0
        self._handles: list[Any] = []

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Hook every optimizer that holds a bounded parameter."""
        self._remove()
        self.steps = self._logged_at = 0
        bounded = _bounded_tensors(self.bounds, pl_module)  # checks the bounds now
        holding = [
            opt
            for opt in trainer.optimizers
            if any(id(p) in bounded for g in opt.param_groups for p in g["params"])
        ]
        if self.project and bounded and not holding:
            names = list(bounded.values())
            raise BoundsError(
                "no optimizer of the trainer holds any bounded parameter ("
                + ", ".join(f"'{n}'" for n in names[:5])
                + (f" and {len(names) - 5} more" if len(names) > 5 else "")
                + "); BoundsCallback projects after the steps of the optimizers that train them"
            )
        for opt in holding:
            if self.project:
                self._handles.append(self.bounds.attach(opt, pl_module))
            self._handles.append(opt.register_step_post_hook(self._count))

    def _count(self, *_args: Any) -> None:
        self.steps += 1

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *_args: Any) -> None:
        """Log the metrics, when due."""
        n = self.log_every_n_steps
        if n == 0:
            return
        if n is None:
            connector = getattr(trainer, "_logger_connector", None)
            due = getattr(connector, "should_update_logs", True)
        else:
            due = self.steps // n > self._logged_at // n
        if not due:
            return
        self._logged_at = self.steps
        metrics = self.bounds.metrics(
            pl_module, prefix=self.prefix, per_parameter=self.per_parameter
        )
        if n is None:  # written now by the trainer, and kept in its callback_metrics
            pl_module.log_dict(metrics, on_step=True, on_epoch=False, prog_bar=False)
            return
        # Off the trainer's schedule: ``log_dict`` values would be written again, stale,
        # at its later writes; so straight to the loggers, on the trainer's step axis.
        step = getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:  # noqa: ARG002
        """Unhook the optimizers; check the bounds if asked to."""
        self._remove()
        if self.check_on_fit_end:
            self.bounds.check(pl_module)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:  # noqa: ARG002
        """Unhook the optimizers."""
        self._remove()

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
