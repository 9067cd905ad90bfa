"""The report: what is out of bounds, per parameter; its data and formatting.

Shared by every framework: each backend computes the numbers where the parameters live
(copying them to the host once) and returns a :class:`Report`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["ParamReport", "Report"]


@dataclass(frozen=True)
class ParamReport:
    """Bound violations of one parameter."""

    name: str
    numel: int
    below: int
    above: int
    max_excess: float
    nan: int
    lower: float | str | None
    upper: float | str | None

    @property
    def violated(self) -> bool:
        """Whether any element is below, above, or NaN."""
        return bool(self.below or self.above or self.nan)

    @classmethod
    def from_stats(
        cls, name: str, numel: int, stats: Any, lower: Any, upper: Any, kind: str = "tensor"
    ) -> ParamReport:
        """Build from a backend's ``[below, above, max_excess, nan]`` row and its bounds.

        A bound is shown as its number, ``None`` when open, or ``"<kind>(shape)"`` for a
        per-element bound (``kind``: what the framework calls an array).
        """

        def show(b: Any) -> float | str | None:
            return b if b is None or isinstance(b, float) else f"{kind}{tuple(b.shape)}"

        below, above, excess, nan = stats
        return cls(
            name, numel, int(below), int(above), float(excess), int(nan), show(lower), show(upper)
        )


@dataclass(frozen=True)
class Report:
    """Per bounded parameter: elements below and above, the largest excess, NaNs, bounds.

    ``str(report)`` is a table with the violators first; :meth:`to_dict` is
    JSON-serialisable.
    """

    entries: tuple[ParamReport, ...]

    @property
    def violators(self) -> list[ParamReport]:
        """The parameters with a violation, worst first (NaNs, then the largest excess)."""
        bad = [e for e in self.entries if e.violated]
        return sorted(bad, key=lambda e: (e.nan > 0, e.max_excess, e.below + e.above), reverse=True)

    @property
    def ok(self) -> bool:
        """Whether every bounded parameter is inside its bounds."""
        return not self.violators

    def ordered(self) -> list[ParamReport]:
        """Violators first (worst first), then the others in model order."""
        bad = self.violators
        return bad + [e for e in self.entries if not e.violated]

    def to_dict(self) -> dict[str, dict[str, int | float | str | None]]:
        """``{name: {"numel", "below", "above", "max_excess", "nan", "lower", "upper"}}``."""
        out: dict[str, dict[str, int | float | str | None]] = {}
        for e in self.ordered():
            d = asdict(e)
            del d["name"]
            out[e.name] = d
        return out

    def summary(self, limit: int = 5) -> str:
        """One line naming the worst offenders, for errors and logs."""
        bad = self.violators
        if not bad:
            return f"all {len(self.entries)} bounded parameters are inside their bounds"
        parts = [
            f"'{e.name}' ({e.below} below, {e.above} above"
            + (f", {e.nan} NaN" if e.nan else "")
            + f", max excess {e.max_excess:.6g})"
            for e in bad[:limit]
        ]
        more = f" and {len(bad) - limit} more" if len(bad) > limit else ""
        return (
            f"{len(bad)} of {len(self.entries)} bounded parameters are out of bounds: "
            + ", ".join(parts)
            + more
        )

    def __str__(self) -> str:
        head = ("parameter", "numel", "below", "above", "max excess", "nan", "lower", "upper")
        rows = [
            (
                e.name,
                str(e.numel),
                str(e.below),
                str(e.above),
                f"{e.max_excess:.6g}",
                str(e.nan),
                "-"
                if e.lower is None
                else (f"{e.lower:g}" if isinstance(e.lower, float) else e.lower),
                "-"
                if e.upper is None
                else (f"{e.upper:g}" if isinstance(e.upper, float) else e.upper),
            )
            for e in self.ordered()
        ]
        widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(head)]

        def line(cells: tuple[str, ...]) -> str:
            return "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
            ).rstrip()

        lines = [line(head), line(tuple("-" * w for w in widths))] + [line(r) for r in rows]
        lines.append(self.summary())
        return "\n".join(lines)
