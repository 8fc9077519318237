"""Griffe extension: the reST bits of our docstrings, shown as Markdown by mkdocstrings.

The docstrings are written for ``help()`` and Sphinx-style readers (equation first,
``:math:`` roles, ``.. math::`` blocks, bare doctests). mkdocstrings renders Markdown, so
before the docstrings are parsed this rewrites

* ``.. math::`` + indented block  -> ``$$ ... $$`` (pymdownx.arithmatex renders it);
* ``:math:`x```                   -> ``$x$``;
* ``:class:`x``` and other roles  -> ```x``` (plain code, no cross-reference to resolve);
* bare doctest blocks (``>>>`` lines and their output) -> fenced ``pycon`` code, which would
  otherwise render as nested block quotes;
* an ``Args:`` entry naming several parameters (``tau_pos, tau_neg: ...``, possibly over
  several lines) -> one entry per parameter, as the Google style parser expects.

The source files are untouched; only the documentation's copy of each docstring changes.
"""

from __future__ import annotations

import re
import textwrap
from typing import Any

import griffe

_MATH_ROLE = re.compile(r":math:`([^`]+)`")
_OTHER_ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|obj|exc|ref|py:\w+):`~?([^`]+)`")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _math_blocks(lines: list[str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.strip() == ".. math::":
            base = _indent(line)
            i += 1
            block: list[str] = []
            while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > base):
                block.append(lines[i])
                i += 1
            while block and not block[-1].strip():
                block.pop()
            body = textwrap.dedent("\n".join(block)).strip("\n")
            pad = " " * base
            out += [pad + "$$"] + [pad + b for b in body.splitlines()] + [pad + "$$", ""]
            continue
        out.append(line)
        i += 1
    return out


_SECTION = re.compile(r"^(\s*)(Args|Arguments|Parameters|Keyword Args|Other Parameters):\s*$")
_NAMES = re.compile(r"^\*{0,2}\w+(\s*,\s*\*{0,2}\w+)+$")


def _split_names(lines: list[str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        head = _SECTION.match(line)
        out.append(line)
        i += 1
        if not head:
            continue
        base = len(head.group(1))
        while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > base):
            entry = lines[i]
            # Names listed over several lines end with a comma: join them up to the colon.
            while entry.rstrip().endswith(",") and ":" not in entry and i + 1 < len(lines):
                i += 1
                entry = entry.rstrip() + " " + lines[i].strip()
            i += 1
            names, sep, desc = entry.strip().partition(":")
            if not sep or not _NAMES.match(names.strip()):
                out.append(entry)
                continue
            pad = " " * _indent(entry)
            cont = []
            while i < len(lines) and lines[i].strip() and _indent(lines[i]) > len(pad):
                cont.append(lines[i])
                i += 1
            for name in (n.strip() for n in names.split(",")):
                out.append(f"{pad}{name}:{desc}")
                out += cont
    return out


def _doctest_blocks(lines: list[str]) -> list[str]:
    out: list[str] = []
    i = 0
    fenced = False
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("```"):
            fenced = not fenced
        if not fenced and line.lstrip().startswith(">>>"):
            pad = " " * _indent(line)
            block = []
            while i < len(lines) and lines[i].strip():
                block.append(lines[i])
                i += 1
            out += [pad + "```pycon"] + block + [pad + "```"]
            continue
        out.append(line)
        i += 1
    return out


def rst_to_markdown(text: str) -> str:
    r"""Rewrite the reST constructs of a docstring as Markdown.

    >>> rst_to_markdown("Value :math:`x^2`, see :func:`f`.")
    'Value $x^2$, see `f`.'
    >>> rst_to_markdown(">>" + "> f(1)\n1").splitlines()  # a doctest, fenced
    ['```pycon', '>>> f(1)', '1', '```']
    >>> print(rst_to_markdown("Args:\n    a, b: two\n        numbers.\n    c: one."))
    Args:
        a: two
            numbers.
        b: two
            numbers.
        c: one.
    """
    lines = _math_blocks(text.splitlines())
    lines = _split_names(lines)
    lines = _doctest_blocks(lines)
    text = "\n".join(lines)
    text = _MATH_ROLE.sub(lambda m: f"${m.group(1)}$", text)
    return _OTHER_ROLE.sub(lambda m: f"`{m.group(1)}`", text)


class RstToMarkdown(griffe.Extension):
    """Apply :func:`rst_to_markdown` to every docstring griffe loads."""

    def on_instance(self, *, obj: Any, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rst_to_markdown(obj.docstring.value)
