"""Matching bound patterns to parameter names: plain strings in, plain data out.

The part of the spec that every backend needs, below both the spec and the backends
(see docs/architecture.md): :func:`match_indices` (the first ``fnmatch`` pattern of each
name, cached), :class:`Resolved` (a spec matched to one model's names), the message
for patterns that bound nothing, and :class:`Spec`, what a backend may use of a
:class:`~parambounds.Bounds`. No framework is imported here.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Protocol

from .errors import BoundsError

__all__ = [
    "Resolved",
    "Spec",
    "match_indices",
    "matched_patterns",
    "unused_message",
    "with_pattern",
]


@functools.lru_cache(maxsize=256)
def match_indices(patterns: tuple[str, ...], names: tuple[str, ...]) -> tuple[int, ...]:
    """For each name, the index of the first ``fnmatch`` pattern that matches it, or -1.

    Plain strings in, plain integers out (cached): backends can run it once, outside
    any traced region (``torch.compile``, ``jax.jit``), and treat the result as a constant.

    >>> match_indices(("*.weight", "*"), ("0.weight", "0.bias"))
    (0, 1)
    """
    return _Index(patterns).first_all(names)


_WILD = re.compile(r"[*?\[]")


class _Index:
    """The patterns compiled once: literal ones in a dict, the others by literal prefix.

    A name's first pattern is then found among the patterns that could match it (the
    literal equal to it, those whose prefix begins it), not by trying every pattern:
    checking costs about the same with 1 or 10 000 patterns. The answer is exactly
    :func:`fnmatch.fnmatchcase`'s (tests/test_matching.py compares it with the plain loop).
    """

    def __init__(self, patterns: tuple[str, ...]) -> None:
        self.literal: dict[str, int] = {}
        self.by_prefix: dict[str, list[tuple[int, str]]] = {}
        self.compiled: dict[str, Any] = {}  # compiled when first a candidate
        for k, p in enumerate(patterns):
            wild = _WILD.search(p)
            if wild is None:
                self.literal.setdefault(p, k)
            else:
                self.by_prefix.setdefault(p[: wild.start()], []).append((k, p))
        self.lengths = sorted({len(prefix) for prefix in self.by_prefix})

    def first(self, name: str) -> int:
        best = self.literal.get(name, -1)
        candidates: list[tuple[int, str]] = []
        for n in self.lengths:
            if n > len(name):
                break
            found = self.by_prefix.get(name[:n])
            if found:
                candidates.extend(found)
        if len(self.lengths) > 1:
            candidates.sort(key=lambda c: c[0])
        for k, p in candidates:
            if best >= 0 and k > best:
                break
            match = self.compiled.get(p)
            if match is None:  # as fnmatchcase compiles it
                match = self.compiled[p] = re.compile(fnmatch.translate(p)).match
            if match(name):
                return k
        return best

    def first_all(self, names: tuple[str, ...]) -> tuple[int, ...]:
        return tuple(self.first(name) for name in names)


def matched_patterns(patterns: tuple[str, ...], names: tuple[str, ...]) -> set[str]:
    """The patterns that match at least one of ``names`` (shadowed ones included)."""
    first = match_indices(patterns, names)
    found = {patterns[k] for k in first if k >= 0}
    rest = [p for p in dict.fromkeys(patterns) if p not in found]
    if rest:
        known = set(names)
        for p in rest:
            if p in known or (
                _WILD.search(p) is not None and any(fnmatchcase(n, p) for n in names)
            ):
                found.add(p)
    return found


def _quoted(items: list[str]) -> str:
    return ", ".join(f"'{i}'" for i in items)


def unused_message(unused: list[str], names: tuple[str, ...], winners: dict[str, str]) -> str:
    """Say why each pattern in ``unused`` bounds nothing: shadowed, or matching no name.

    A pattern is shadowed when every name it matches is taken by an earlier pattern
    (the first match wins); the others match no name at all and get the closest names.
    """
    shadowed: list[str] = []
    missing: list[str] = []
    for pattern in unused:
        hits = [n for n in names if fnmatchcase(n, pattern)]
        if hits:
            earlier = list(dict.fromkeys(winners[n] for n in hits))
            which = "pattern" if len(earlier) == 1 else "patterns"
            shadowed.append(
                f"pattern '{pattern}' is shadowed by the earlier {which} {_quoted(earlier)}: "
                f"every parameter it matches ({_quoted(hits[:3])}"
                f"{', ...' if len(hits) > 3 else ''}) is bounded by {_quoted(earlier)} "
                "first (the first matching pattern wins; put the more specific one first)"
            )
        else:
            missing.append(pattern)
    parts = []
    if missing:
        shown = _quoted(list(names[:6])) + (", ..." if len(names) > 6 else "")
        subject = (
            f"pattern '{missing[0]}' matches"
            if len(missing) == 1
            else f"patterns {_quoted(missing)} match"
        )
        hints = []
        for pattern in missing:
            if pattern in names:  # a literal name with '[': a character class in fnmatch
                literal = "".join(f"[{c}]" if c in "*?[" else c for c in pattern)
                hints.append(
                    f"'{pattern}' is the name of a parameter, but '[' starts a character "
                    f"class in a pattern: write '{literal}' to match it literally"
                )
                continue
            close = difflib.get_close_matches(pattern, names, n=3, cutoff=0.5)
            if close:
                hints.append(f"'{pattern}' is closest to {_quoted(close)}")
        parts.append(
            f"{subject} no parameter of the model (its parameters: {shown or 'none'})"
            + (f"; {'; '.join(hints)}" if hints else "")
        )
    return "; ".join(parts + shadowed)


@dataclass
class Resolved:
    """A spec matched to the names of one model's parameters."""

    names: tuple[str, ...]
    lower: dict[str, Any]
    upper: dict[str, Any]
    patterns: dict[str, str]  # parameter name -> the pattern that bounds it


def with_pattern(err: BoundsError, resolved: Resolved) -> BoundsError:
    """``err`` with the pattern that bounds the parameter it names, when it names one."""
    msg = str(err)
    for name, pattern in resolved.patterns.items():
        if f"'{name}'" in msg:
            return type(err)(f"{msg} (from pattern '{pattern}')")
    return err


class Spec(Protocol):
    """What a backend uses of a :class:`~parambounds.Bounds` (the backends never import it)."""

    penalty: Any
    strict: bool
    _entries: list[tuple[str, Any, Any]]
    _cache: Any
    _jax_plans: Any

    def _match(
        self, names: tuple[str, ...], matcher: Callable[..., tuple[int, ...]] | None = None
    ) -> Resolved: ...

    def project_(self, model: Any) -> None:
        """Clamp ``model``'s bounded parameters into their bounds, in place."""

    def reparametrize_(self, model: Any) -> Any:
        """Reparametrize ``model``'s bounded parameters, in place."""
