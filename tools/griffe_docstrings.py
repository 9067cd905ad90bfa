"""A griffe extension for the docs site: the project's docstrings, rendered as Markdown.

The docstrings follow the project's style (``/work/shared/STYLE.md``): Google sections,
math in reStructuredText's ``.. math::`` and ``:math:`` (as optax writes it), roles such
as ``:func:`bounds_cost```, and bare ``>>>`` examples (run by ``pytest --doctest-modules``).
mkdocstrings reads docstrings as Markdown, where ``>>>`` would become nested block quotes
and the math would print as text. Before mkdocstrings parses a docstring, this extension

- fences every run of doctest lines (``>>>``/``...`` lines and their expected output, up
  to a blank line) as a ``pycon`` code block (``Examples:`` sections are left to griffe,
  which renders them itself);
- turns ``.. math::`` blocks into ``$$ ... $$`` and ``:math:`x``` into ``$x$``
  (rendered by ``pymdownx.arithmatex`` and MathJax);
- turns ``:func:``/``:class:``/``:mod:``/``:meth:``/``:attr:`` roles into code spans.

Used from ``mkdocs.yml``; the source is never changed.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_PROMPT = re.compile(r"^(\s*)>>> ")
_MATH = re.compile(r"^(\s*)\.\. math::\s*(.*)$")
_INLINE_MATH = re.compile(r":math:`([^`]+)`")
_ROLE = re.compile(r":(?:func|class|mod|meth|attr|data|obj):`~?([^`]+)`")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def to_markdown(text: str) -> str:
    """Return the docstring ``text`` with doctests fenced and RST math and roles converted."""
    out: list[str] = []
    lines = text.split("\n")
    section: int | None = None  # indentation of an open ``Examples:`` header
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.strip() and section is not None and _indent(line) <= section:
            section = None
        if line.strip() in ("Examples:", "Example:"):
            section = _indent(line)
        math = _MATH.match(line)
        prompt = _PROMPT.match(line)
        if math is not None:
            indent, body = math.group(1), [math.group(2)] if math.group(2) else []
            i += 1
            while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > len(indent)):
                body.append(lines[i].strip())
                i += 1
            while body and not body[-1]:
                body.pop()
            out += [f"{indent}$$", *(f"{indent}{b}" for b in body if b), f"{indent}$$", ""]
        elif prompt is not None and section is None:
            out.append(f"{prompt.group(1)}```pycon")
            while i < len(lines) and lines[i].strip():
                out.append(lines[i])
                i += 1
            out.append(f"{prompt.group(1)}```")
        else:
            out.append(_ROLE.sub(r"`\1`", _INLINE_MATH.sub(r"$\1$", line)))
            i += 1
    return "\n".join(out)


class MarkdownDocstrings(griffe.Extension):
    """Convert every docstring with :func:`to_markdown`."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:  # noqa: ARG002
        """Rewrite the object's docstring in place."""
        if obj.docstring is not None:
            obj.docstring.value = to_markdown(obj.docstring.value)
