r"""Render the specification document ``SPEC.md`` from ``clauses.toml`` (``sapo_ref.spec.render``).

``python -m sapo_ref.spec.render [OUT]`` writes the document to ``OUT`` (``-`` for stdout;
default: ``SPEC.md`` next to ``clauses.toml``). The document is generated, never edited: the
test suite checks that the committed ``spec/SPEC.md`` equals :func:`render`'s output.

Math is written for MkDocs' arithmatex: ``$...$`` inline, ``$$...$$`` in blocks.

>>> text = render()
>>> text.splitlines()[0]
'# SAPO-family policy losses: normative specification'
>>> "### 2.1 SAPO token gate (method `sapo`)" in text
True
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from . import (
    CHANGELOG,
    CLAUSES,
    DATA,
    DOMAINS,
    KL_ESTIMATORS,
    LOSS_AGGS,
    METHODS,
    METRICS,
    TOLERANCES,
    VERSION,
)

__all__ = ["default_path", "main", "render", "render_body"]

#: Section headings by section number where the kind of the first clause does not say it.
_SECTION_TITLES = {"10": "Added per-token terms (since 0.2.0)"}
#: Section headings by the kind of the section's first clause (presentation only).
_SECTION_NAMES = {
    "definition": "Definitions",
    "method": "Methods and their gradients",
    "aggregation": "Aggregation",
    "default": "Defaults",
    "special-case": "Special cases",
    "numerics": "Numerics",
    "metrics": "Metrics",
    "error": "Errors",
    "tool": "Tools",
    "conformance": "Conformance",
}


def default_path() -> Path:
    """``SPEC.md`` next to ``clauses.toml`` (the repository's ``spec/`` folder)."""
    return Path(__file__).resolve().with_name("SPEC.md")


def _cell(value: Any) -> str:
    # A table cell cannot hold a raw pipe or a line break.
    return str(value).replace("|", r"\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return out + [""]


def _anchor(clause_id: str) -> str:
    # The docs site's anchor scheme: "2.1" -> "clause-21", "C.1" -> "clause-c1".
    return "clause-" + clause_id.lower().replace(".", "")


def _ref(clause_id: str, anchors: bool) -> str:
    return f"[{clause_id}](#{_anchor(clause_id)})" if anchors else clause_id


def _number(v: Any) -> str:
    return "disabled" if v is None else f"{v:g}" if isinstance(v, float) else str(v)


def _methods(anchors: bool) -> list[str]:
    rows = []
    for m in METHODS.values():
        defaults = ", ".join(f"`{k}` = {_number(v)}" for k, v in m.defaults.items())
        rows.append(
            (
                f"`{m.name}`",
                _ref(m.clause, anchors),
                m.ratio,
                m.gate,
                ", ".join(f"`{p}`" for p in m.params),
                defaults,
                m.paper_eq,
                m.summary,
            )
        )
    return _table(
        ("Method", "Clause", "Ratio", "Gate", "Parameters", "Defaults", "Paper eq.", "Summary"),
        rows,
    )


def _loss_aggs(anchors: bool) -> list[str]:
    rows = [
        (
            f"`{a.name}`",
            _ref(a.clause, anchors),
            a.row_weight,
            a.denominator,
            ", ".join(f"`{r}`" for r in a.requires) or "",
            f"${a.formula}$",
        )
        for a in LOSS_AGGS.values()
    ]
    return _table(
        ("Aggregation", "Clause", "Row weight $\\rho$", "Denominator $D$", "Requires", "Loss"), rows
    )


def _domains() -> list[str]:
    rows = [(f"`{d.name}`", d.describe(), d.meaning) for d in DOMAINS.values()]
    return _table(("Parameter", "Domain", "Meaning"), rows)


def _numerics() -> list[str]:
    return _table(
        ("Constant", "Value"), ((f"`{k}`", _number(v)) for k, v in DATA["numerics"].items())
    )


def _metrics() -> list[str]:
    rows = [
        (
            f"`{key}`",
            "all" if m["methods"] == "all" else ", ".join(f"`{x}`" for x in m["methods"]),
            m["definition"]
            + (f" (only with `{m['requires']}`; since {m['since']})" if "requires" in m else ""),
        )
        for key, m in METRICS.items()
    ]
    return _table(("Key", "Methods", "Definition"), rows)


def _tolerances() -> list[str]:
    rows = [
        (
            f"`{dtype}`",
            _number(t["value"].rtol),
            _number(t["value"].atol),
            _number(t["grad"].rtol),
            _number(t["grad"].atol),
        )
        for dtype, t in TOLERANCES.items()
    ]
    return _table(("Configuration", "value rtol", "value atol", "grad rtol", "grad atol"), rows)


def _clauses(anchors: bool) -> list[str]:
    out: list[str] = []
    section = None
    for c in CLAUSES:
        head = c.id.split(".")[0]
        if head != section:
            section = head
            name = _SECTION_TITLES.get(head) or _SECTION_NAMES.get(c.kind, c.kind.capitalize())
            out += [f"## {head}. {name}", ""]
        out += [f"### {c.id} {c.title}" + (f" {{ #{_anchor(c.id)} }}" if anchors else ""), ""]
        tag = (
            f"*{c.kind}*"
            + (f" · paper eq. {c.eq}" if c.eq else "")
            + (f" · since {c.since}" if c.since != "0.1.0" else "")
        )
        out += [tag, "", c.text, ""]
    return out


def _changelog() -> list[str]:
    out = ["## Changes by version", ""]
    for entry in CHANGELOG:
        out += [f"**{entry['version']}** ({entry['date']})", ""]
        out += [f"- added: {item}" for item in entry["added"]]
        out += [f"- changed: {item}" for item in entry["changed"]]
        out += [""]
    return out


def _kl_estimators() -> list[str]:
    rows = [
        (f"`{name}`", f"${e['value']}$", f"${e['dlogp']}$", e["summary"])
        for name, e in KL_ESTIMATORS.items()
    ]
    return _table(("kl_estimator", "value k(u)", "d k / d log pi_theta", "note"), rows)


def render() -> str:
    """The whole document, ``SPEC.md``, as Markdown (a function of ``clauses.toml`` only)."""
    return f"# {DATA['meta']['title']}\n\n" + render_body(anchors=False)


def render_body(anchors: bool = True) -> str:
    """The document without its title, for a page that has its own (the docs site).

    With ``anchors`` (MkDocs ``attr_list``) every clause heading gets the id ``clause-<id>``
    (``2.1`` -> ``clause-21``) and the tables link their clause columns to it.

    >>> "### 2.1 SAPO token gate (method `sapo`) { #clause-21 }" in render_body()
    True
    """
    meta = DATA["meta"]
    d = DATA["defaults"]
    out = [
        (
            f"Specification version **{VERSION}**. Generated from `spec/clauses.toml` by "
            "`python -m sapo_ref.spec.render`; edit the TOML, not the generated text."
        ),
        "",
        f"Primary source: {meta['paper']}.",
        "",
    ]
    out += [f"- {p}" for p in meta.get("papers", ())] + [""]
    out += [
        (
            f'Defaults: `method = "{d["method"]}"`, `loss_agg = "{d["loss_agg"]}"`, '
            f"`count_empty_rows = {d['count_empty_rows']}` (clauses {_ref('4.1', anchors)}, "
            f"{_ref('4.2', anchors)}). Clause ids are stable; tests and conformance cases "
            "cite them."
        ),
        "",
    ]
    out += _changelog()
    out += _clauses(anchors)
    out += [
        "## Data tables",
        "",
        (
            "The tables below are the normative data the clauses refer to, as the reference and "
            "the conformance suite read them."
        ),
        "",
    ]
    out += ["### Methods (clauses 2, 4.1)", ""] + _methods(anchors)
    out += [
        "### Aggregations (clause 3)",
        "",
        (
            "$\\ell_{it}$ is the per-token term of clause 1.7; $L_i$ the row length, $R$ the row "
            "count (clause 3.6), $L_\\mathrm{norm}$ = `norm_length`."
        ),
        "",
    ] + _loss_aggs(anchors)
    out += [
        "### Parameter domains (clause 8.4)",
        "",
        "Bounds are inclusive unless the interval is written open; values must be finite.",
        "",
    ] + _domains()
    out += ["### KL-penalty estimators (clause 10.2)", ""] + _kl_estimators()
    out += ["### Numerics constants (clause 6)", ""] + _numerics()
    out += ["### Metrics (clause 7.1)", ""] + _metrics()
    out += [
        "### Conformance tolerances (clause C.1)",
        "",
        (
            "A result passes when $|got - want| \\le atol\\cdot scale + rtol\\,|want|$ "
            "elementwise, value and gradient apart, with $scale = \\max(1, \\max|want|)$. "
            "`golden` is the reference against the independent mpmath implementation."
        ),
        "",
    ] + _tolerances()
    return "\n".join(out).rstrip("\n") + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Write the document: ``python -m sapo_ref.spec.render [OUT | -]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) > 1 or (args and args[0] in ("-h", "--help")):
        print("usage: python -m sapo_ref.spec.render [OUT | -]", file=sys.stderr)
        return 2
    text = render()
    if args and args[0] == "-":
        sys.stdout.write(text)
        return 0
    out = Path(args[0]) if args else default_path()
    out.write_text(text, encoding="utf-8")
    print(f"wrote {out} (spec {VERSION})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
