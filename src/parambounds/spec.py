"""The spec: bounds declared once, by parameter name, and used three ways.

``Bounds({"*.tau_mem": (1e-3, 0.1), "*.threshold": (0.0, None)})`` maps ``fnmatch``
patterns over ``named_parameters()`` names to bounds. The same object gives the
penalty (:meth:`Bounds.cost`), the projection after each optimizer step
(:meth:`Bounds.project_`, :meth:`Bounds.attach`), the reparametrization that can never
leave the bounds (:meth:`Bounds.reparametrize_`), and a report (:meth:`Bounds.report`,
:meth:`Bounds.check`).
"""

from __future__ import annotations

import collections
import math
import numbers
import sys
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union, overload

from ._backends import get_backend
from .errors import BoundsError, BoundsViolationError, number_bound, order_error
from .matching import Resolved, match_indices, unused_message
from .penalties import Penalty, get_penalty
from .report import Report

if TYPE_CHECKING:  # for the annotations only: the core never imports a framework
    from typing import TypeAlias

    import jax
    import torch
    from torch.utils.hooks import RemovableHandle

__all__ = ["Bounds", "Model", "PyTree"]

PyTree: TypeAlias = Any
"""A JAX pytree: nested dicts, lists, tuples and registered nodes with arrays as leaves.

Its structure is open-ended, so a type checker sees ``Any``.
"""

Model: TypeAlias = Union["torch.nn.Module", Mapping[str, "torch.Tensor"], PyTree]
"""What bounds apply to.

A torch module (bounded by the names of ``named_parameters()``), a flat mapping of names
to tensors such as a ``state_dict``, or a JAX pytree (`PyTree`, names joined with dots).
"""


def _is_array(b: Any) -> bool:
    """Whether ``b`` is an array of some framework (checked against its parameter later)."""
    return hasattr(b, "shape") and hasattr(b, "dtype")


def _parse_entry(pattern: str, value: Any) -> tuple[Any, Any]:
    """Turn one spec value into ``(lower, upper)``."""
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - {"lower", "upper"})
        if unknown:
            raise BoundsError(
                f"bounds for pattern '{pattern}' have unknown key(s) "
                f"{', '.join(map(repr, unknown))}; expected 'lower' and/or 'upper'"
            )
        return value.get("lower"), value.get("upper")
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return value[0], value[1]
    raise BoundsError(
        f"bounds for pattern '{pattern}' must be a (lower, upper) pair or a dict with "
        f"'lower'/'upper', got {type(value).__name__}"
        + (f" of length {len(value)}" if isinstance(value, (tuple, list)) else "")
    )


def _check_side(pattern: str, side: str, b: Any) -> None:
    """Reject what cannot be a bound before any model is seen."""
    if b is None or _is_array(b):
        return
    where = f"{side} bound for pattern '{pattern}'"
    if isinstance(b, bool) or not isinstance(b, numbers.Real):
        raise BoundsError(f"{where} must be a number, None or a tensor, got {type(b).__name__}")
    number_bound(where, side, b)  # NaN, or infinite on the side nothing satisfies


def _check_pair(pattern: str, lo: Any, hi: Any) -> None:
    """Reject scalar bounds in the wrong order, before any model is seen."""
    if isinstance(lo, numbers.Real) and isinstance(hi, numbers.Real):
        lo_v = number_bound(f"lower bound for pattern '{pattern}'", "lower", lo)
        hi_v = number_bound(f"upper bound for pattern '{pattern}'", "upper", hi)
        if lo_v > hi_v:
            raise order_error(f"pattern '{pattern}'", lo, hi)


_EXACT = 2**53  # integers up to this size are floats exactly: no overflow, same order


def _plainly_valid(lo: Any, hi: Any) -> bool:
    """Whether the checks above would accept ``(lo, hi)``, told fast for plain numbers.

    True only for two plain ``float`` or small ``int`` bounds (not ``bool``) in order,
    neither NaN (``lo <= hi`` is false then), with no infinity on the side nothing
    satisfies; anything else goes through the checks (a bounds file of 10 000 patterns
    is read in a fraction of the time). tests/test_spec.py compares the two.
    """
    for b in (lo, hi):
        kind = type(b)
        if kind is not float and not (kind is int and -_EXACT <= b <= _EXACT):
            return False
    return bool(lo <= hi and lo != math.inf and hi != -math.inf)


class Bounds:
    """Bounds declared by parameter name, resolved against a model once.

    Args:
        spec: maps ``fnmatch`` patterns (matched against ``named_parameters()`` names,
            such as ``1_LIFTorch.tau_mem``) to bounds: a ``(lower, upper)`` pair with
            ``None`` for an open side, or ``{"lower": ..., "upper": ...}``. A bound is a
            number or a tensor that broadcasts to the parameter (per-element bounds).
            The first matching pattern wins; parameters that match none are unbounded.
        penalty: the penalty shape of :meth:`cost` (see :func:`~parambounds.bounds_cost`).
        strict: when true (the default), a pattern that matches no parameter is an
            error; ``strict=False`` lets one spec serve several models.

    Raises:
        BoundsError: for a malformed entry or an unknown penalty, here; for a pattern
            that matches no parameter, ``lower > upper``, a NaN bound or a tensor that
            does not broadcast, when first used with a model (naming pattern and parameter).

    Examples:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1)
        >>> bounds = Bounds({"weight": (-0.1, 0.1), "bias": {"lower": 0.0}})
        >>> bounds.project_(model)
        >>> bool(model.weight.abs().max() <= 0.1), bool(model.bias.min() >= 0.0)
        (True, True)
    """

    def __init__(
        self, spec: Mapping[str, Any], *, penalty: str | Penalty = "exp", strict: bool = True
    ) -> None:
        if not isinstance(spec, Mapping):
            raise BoundsError(
                f"spec must be a mapping of patterns to bounds, got {type(spec).__name__}"
            )
        self.penalty = get_penalty(penalty)
        self.strict = strict
        entries = []
        for pattern, value in spec.items():
            if not isinstance(pattern, str):
                raise BoundsError(f"pattern {pattern!r} must be a string")
            lo, hi = _parse_entry(pattern, value)
            if not _plainly_valid(lo, hi):  # the full checks, with their messages
                _check_side(pattern, "lower", lo)
                _check_side(pattern, "upper", hi)
                _check_pair(pattern, lo, hi)
            entries.append((pattern, lo, hi))
        self._entries: list[tuple[str, Any, Any]] = entries
        # Resolved matches by model (torch modules), kept as long as the model lives.
        self._cache: weakref.WeakKeyDictionary[Any, Resolved] = weakref.WeakKeyDictionary()
        # Checked plans for JAX pytrees, by structure, shapes and dtypes (an LRU).
        self._jax_plans: collections.OrderedDict[Any, Any] = collections.OrderedDict()

    # ------------------------------------------------------------ pickling

    def __getstate__(self) -> dict[str, Any]:
        """What pickling keeps: the spec and its options, not the per-model caches.

        The caches hold weak references to models and checked plans of JAX arrays;
        they are rebuilt, empty, on unpickling (and found again on first use).
        """
        state = dict(self.__dict__)
        state.pop("_cache", None)
        state.pop("_jax_plans", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._cache = weakref.WeakKeyDictionary()
        self._jax_plans = collections.OrderedDict()

    @classmethod
    def from_trees(cls, lower: Any, upper: Any, *, penalty: str | Penalty = "exp") -> Bounds:
        """Wrap the two trees of :func:`~parambounds.make_bounds` (keys joined with ``.``).

        Trees of :func:`parambounds.jax.make_bounds` (JAX pytrees, such as equinox
        modules) are read by key path when torch is not loaded.

        Raises:
            BoundsError: when the two trees do not have the same leaves.
        """
        if sys.modules.get("torch") is None and sys.modules.get("jax") is not None:
            from .jax._trees import bound_leaves

            lo, hi = bound_leaves(lower), bound_leaves(upper)
        else:
            from .torch._trees import named_leaves

            lo, hi = dict(named_leaves(lower)), dict(named_leaves(upper))
        if set(lo) != set(hi):
            missing = sorted(set(lo) ^ set(hi))[0]
            raise BoundsError(f"lower and upper trees differ: '{missing}' is in only one of them")
        return cls({_escape(name): (lo[name], hi[name]) for name in lo}, penalty=penalty)

    @classmethod
    def from_toml(cls, path: str | Path, *, strict: bool = True) -> Bounds:
        """Load bounds from a TOML file.

        ```toml
        penalty = "exp"            # optional
        [bounds]
        "*.tau_mem"      = [0.001, 0.1]
        "*.threshold"    = { lower = 0.0 }
        "readout.weight" = { lower = -1.0, upper = 1.0 }
        ```

        ``inf`` and ``-inf`` are TOML literals; an open side is left out of the table.

        Raises:
            BoundsError: naming the file and the key or pattern at fault.
        """
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover - Python 3.10
            import tomli as tomllib
        path = Path(path)
        try:
            if path.exists() and not path.is_file():  # a folder, /dev/zero, a pipe
                raise BoundsError(f"{path}: not a regular file")
            if path.exists() and path.stat().st_size > _MAX_TOML_BYTES:
                raise BoundsError(f"{path}: too large for a bounds file")
            data = tomllib.loads(path.read_bytes().decode("utf-8-sig"))  # BOM or not
        except tomllib.TOMLDecodeError as err:
            raise BoundsError(f"{path}: malformed TOML: {err}") from None
        except UnicodeDecodeError as err:
            raise BoundsError(f"{path}: not UTF-8 text (byte {err.start})") from None
        except RecursionError:
            raise BoundsError(f"{path}: malformed TOML: nested too deeply") from None
        except OSError as err:
            raise BoundsError(f"{path}: cannot read: {err.strerror or err}") from None
        unknown = sorted(set(data) - {"penalty", "bounds"})
        if unknown:
            raise BoundsError(
                f"{path}: unknown top-level key '{unknown[0]}'; expected 'penalty' and [bounds]"
            )
        table = data.get("bounds")
        if not isinstance(table, dict):
            raise BoundsError(f"{path}: missing [bounds] table")
        penalty = data.get("penalty", "exp")
        for pattern, value in table.items():
            nested = isinstance(value, dict)  # `lif.tau_mem = [...]`: the nested key lif.tau_mem
            extra = [k for k, v in value.items() if isinstance(v, (list, dict))] if nested else []
            if extra:
                raise BoundsError(
                    f"{path}: [bounds] entry '{pattern}' is a table with key '{extra[0]}'; "
                    f'a pattern with dots must be quoted: "{pattern}.{extra[0]}" = [lower, upper]'
                )
        try:
            return cls(table, penalty=penalty, strict=strict)
        except BoundsError as err:
            raise BoundsError(f"{path}: {err}") from None

    @property
    def spec(self) -> dict[str, tuple[Any, Any]]:
        """The patterns and their ``(lower, upper)`` bounds, in order."""
        return {p: (lo, hi) for p, lo, hi in self._entries}

    def __repr__(self) -> str:
        return f"Bounds({self.spec!r}, penalty={self.penalty.name!r})"

    # ------------------------------------------------------------ resolving

    def _resolve(self, model: Model) -> tuple[Resolved, Any]:
        return get_backend(model).resolve(self, model)  # type: ignore[no-any-return]

    def _match(
        self, names: tuple[str, ...], matcher: Callable[..., tuple[int, ...]] | None = None
    ) -> Resolved:
        """Resolve the spec against ``names`` (``matcher``: :func:`match_indices` or a wrapper)."""
        for name in names:
            if not isinstance(name, str):
                raise BoundsError(
                    f"parameter name {name!r} must be a string, got {type(name).__name__}"
                )
        patterns = tuple(p for p, _, _ in self._entries)
        first = (matcher or match_indices)(patterns, names)
        lower: dict[str, Any] = {}
        upper: dict[str, Any] = {}
        winners: dict[str, str] = {}
        used = set()
        for name, k in zip(names, first):
            if k < 0:
                lower[name] = upper[name] = None
                continue
            pattern, lower[name], upper[name] = self._entries[k]
            winners[name] = pattern
            used.add(k)
        if len(used) < len(patterns) and self.strict:
            unused = [p for k, p in enumerate(patterns) if k not in used]
            raise BoundsError(unused_message(unused, names, winners))
        return Resolved(names, lower, upper, winners)

    def bounds_of(self, model: Model) -> tuple[dict[str, Any], dict[str, Any]]:
        """Return flat ``(lower, upper)`` dicts by parameter name, as ``bounds_cost`` takes."""
        return get_backend(model).bounds_of(self, model)  # type: ignore[no-any-return]

    # ------------------------------------------------------------ the three uses

    @overload
    def cost(self, model: torch.nn.Module | Mapping[str, torch.Tensor]) -> torch.Tensor: ...

    @overload
    def cost(self, model: PyTree) -> jax.Array: ...

    def cost(self, model: Model) -> torch.Tensor | jax.Array:
        """The penalty of every bounded parameter, as :func:`~parambounds.bounds_cost`.

        Returns:
            a differentiable scalar of the parameters' framework (a torch tensor or a JAX
                array), to add to the loss.
        """
        return get_backend(model).cost(self, model)  # type: ignore[no-any-return]

    def project_(self, model: Model) -> None:
        """Clamp every bounded parameter into its bounds, in place and without autograd.

        Parameter objects are kept (optimizers hold references to them); parameters that
        share scalar bounds are clamped with one multi-tensor operation. NaN stays NaN.
        """
        get_backend(model).project_(self, model)

    def project(self, tree: PyTree) -> PyTree:
        """Return a new JAX pytree with every bounded leaf clipped into its bounds.

        The projection for immutable arrays (torch modules use :meth:`project_`):
        call it after each ``optax.apply_updates``; it works under ``jax.jit``. NaN stays
        NaN; each value is inside its bound exactly (bounds rounded inward to the dtype).
        """
        return get_backend(tree).project(self, tree)

    def unconstrain(self, tree: PyTree) -> PyTree:
        r"""The unconstrained JAX pytree ``z`` with ``constrain(z) == tree``.

        Bounded leaves get the transforms of :meth:`reparametrize_`, element by element
        (two-sided :math:`l + (u - l)\,\sigma(z)`, one-sided :math:`l + \mathrm{softplus}(z)`
        or :math:`u - \mathrm{softplus}(z)`, identity where both sides are open); values
        on or outside a bound are first moved just inside. Train ``z`` and use
        :meth:`constrain` in the model. Torch modules use :meth:`reparametrize_`.
        """
        return get_backend(tree).unconstrain(self, tree)

    def constrain(self, z: PyTree) -> PyTree:
        """Map an unconstrained JAX pytree into the bounds (inverse of :meth:`unconstrain`).

        Inside the bounds for every finite ``z``; differentiable, and traceable by
        ``jax.jit``.
        """
        return get_backend(z).constrain(self, z)

    def attach(self, optimizer: torch.optim.Optimizer, model: Model) -> RemovableHandle:
        """Project ``model`` after every ``optimizer.step()`` (torch).

        Returns:
            the optimizer's step-hook handle, a ``torch.utils.hooks.RemovableHandle``;
                ``handle.remove()`` stops the projection.
        """
        return get_backend(model).attach(self, optimizer, model)  # type: ignore[no-any-return]

    def reparametrize_(self, model: torch.nn.Module) -> torch.nn.Module:
        r"""Make every bounded parameter a smooth function of an unconstrained one.

        Registers ``torch.nn.utils.parametrize`` parametrizations: two-sided bounds use
        :math:`l + (u - l)\,\sigma(z)`, one-sided ones :math:`l + \mathrm{softplus}(z)` or
        :math:`u - \mathrm{softplus}(z)`. Current values are kept (values on or outside a
        bound are first moved just inside). Afterwards ``state_dict`` holds
        ``<module>.parametrizations.<name>.original`` (the unconstrained tensor) instead
        of ``<module>.<name>``; ``torch.nn.utils.parametrize.remove_parametrizations(
        module, name, leave_parametrized=True)`` turns it back into a plain parameter
        holding the bounded value. Before saving for someone who does not reparametrize
        (``save_pretrained``, ``torch.save``, Rockpool's ``save``), call :meth:`bake_`.

        Returns:
            ``model``, modified in place.
        """
        return get_backend(model).reparametrize_(self, model)  # type: ignore[no-any-return]

    def bake_(self, model: Any) -> Any:
        """Undo :meth:`reparametrize_`, keeping the trained values: plain parameters again.

        Every bounded parameter that :meth:`reparametrize_` changed becomes a plain
        ``nn.Parameter`` under its original name, holding its current bounded value, so
        ``state_dict()`` has the original keys and ``save_pretrained``/``from_pretrained``,
        ``torch.save``/``load_state_dict`` and Rockpool's ``save``/``load`` round-trip
        with the trained values. Parameters not reparametrized are left as they are.
        The Parameter objects an optimizer holds (the unconstrained ``original`` tensors) now
        hold the bounded values: to train on, build a new optimizer or
        :meth:`reparametrize_` again.

        Returns:
            ``model``, modified in place.

        Raises:
            BoundsError: for a parameter with other parametrizations stacked on the
                bounded one, naming it (nothing is changed), or a model that is not a
                torch module.

        Examples:
            >>> import torch
            >>> model = torch.nn.Linear(2, 1)
            >>> bounds = Bounds({"weight": (-0.1, 0.1)})
            >>> "weight" in bounds.reparametrize_(model).state_dict()
            False
            >>> sorted(bounds.bake_(model).state_dict())
            ['bias', 'weight']
        """
        return _torch_only(model, "bake_").bake_(self, model)

    def metrics(
        self, model: Model, *, prefix: str = "bounds/", per_parameter: bool = True
    ) -> dict[str, Any]:
        """What to log each step: a flat dict of 0-d tensors, never read on the host.

        Keys (``prefix`` first): ``outside`` (elements below, above or NaN, summed over
        the bounded parameters), ``excess`` (the largest distance beyond a bound, as
        :attr:`~parambounds.ParamReport.max_excess`) and ``penalty`` (the spec's
        penalty, summed: :meth:`cost`'s value); then, with ``per_parameter``, the same
        three under ``<name>/`` for each bounded parameter, in model order. Values are
        float64 tensors on the parameters' device: pass them to
        ``LightningModule.log_dict``, ``SummaryWriter.add_scalar``, ``wandb.log`` or
        ``mlflow.log_metrics`` as they are (the logger reads them when it writes).
        Costs about one :meth:`report`.

        Raises:
            BoundsError: as :meth:`report`, or for a model that is not a torch model.

        Examples:
            >>> import torch
            >>> model = torch.nn.Linear(2, 1)
            >>> with torch.no_grad():
            ...     _ = model.weight.copy_(torch.tensor([[0.5, 3.0]]))
            >>> m = Bounds({"weight": (-1, 1)}).metrics(model)
            >>> list(m)[:3]
            ['bounds/outside', 'bounds/excess', 'bounds/penalty']
            >>> list(m)[3:]
            ['bounds/weight/outside', 'bounds/weight/excess', 'bounds/weight/penalty']
            >>> m["bounds/weight/outside"].item(), m["bounds/weight/excess"].item()
            (1.0, 2.0)
        """
        backend = _torch_only(model, "metrics")
        return backend.metrics(  # type: ignore[no-any-return]
            self, model, prefix=prefix, per_parameter=per_parameter
        )

    # ------------------------------------------------------------ reporting

    def report(self, model: Model) -> Report:
        """Count, per bounded parameter, the elements below and above, NaNs, the largest excess."""
        return get_backend(model).report(self, model)  # type: ignore[no-any-return]

    def check(self, model: Model) -> None:
        """Return quietly when every bounded parameter is inside its bounds.

        Raises:
            BoundsViolationError: listing the worst offenders by name.
        """
        report = self.report(model)
        if report.violators:
            raise BoundsViolationError(report.summary())


_MAX_TOML_BYTES = 16 * 2**20


def _torch_only(model: Model, what: str) -> Any:
    """The backend of ``model``, which must be torch's for ``what``."""
    backend = get_backend(model)
    if getattr(backend, "framework_name", None) != "torch":
        raise BoundsError(
            f"{what} is for torch models and state_dicts, got {type(model).__name__}; "
            "for JAX pytrees use report"
        )
    return backend


def _escape(name: str) -> str:
    """Escape ``fnmatch`` wildcards so that a name matches only itself."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)
