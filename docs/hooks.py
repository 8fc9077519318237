"""MkDocs hooks: build-time pages that cannot drift from the code.

* ``spec.md`` holds the marker ``<!-- sapo-ref:spec -->``; it is replaced by the specification
  rendered from ``spec/clauses.toml`` (``sapo_ref.spec``) at every build.
* The API pages of the backend packages (``sapo_torch``, ``sapo_jax``, ``sapo_mlx``) and of the
  conformance suite (``sapo_conformance``) are generated, and put in the navigation, only
  for the packages that exist with content in this checkout; the site builds either way.
* ``distributed.md`` is put in the navigation when the file exists.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

log = logging.getLogger("mkdocs.hooks.sapo_ref")

ROOT = Path(__file__).resolve().parent.parent
SPEC_MARKER = "<!-- sapo-ref:spec -->"

#: import name -> (folder in the repository, title, what must exist for the page to be made)
OPTIONAL_API = {
    "sapo_torch": ("adapters/sapo_torch", "sapo_torch (PyTorch)", "policy_loss"),
    "sapo_jax": ("adapters/sapo_jax", "sapo_jax (JAX)", "policy_loss"),
    "sapo_mlx": ("adapters/sapo_mlx", "sapo_mlx (MLX)", "policy_loss"),
    "sapo_conformance": ("conformance_tests", "sapo_conformance (suite)", "cli.py"),
}


def _landed(folder: str, marker: str) -> bool:
    """A package has landed when it has the file ``marker`` or defines ``marker`` in __init__."""
    path = ROOT / folder
    if marker.endswith(".py"):
        return (path / marker).is_file()
    init = path / "__init__.py"
    return init.is_file() and f"def {marker}" in init.read_text(encoding="utf-8") or any(
        f"def {marker}(" in p.read_text(encoding="utf-8") for p in path.glob("*.py")
    )


def _api_page(name: str, folder: str, title: str) -> str:
    # mkdocstrings finds adapters/<name> through `paths`; conformance_tests/ is documented by
    # its folder name (griffe loads it statically) under its import name.
    ident = name if folder.startswith("adapters/") else folder
    return (
        f"# {title}\n\n"
        f"Import name `{name}`, source folder `{folder}/` of the repository.\n\n"
        f"::: {ident}\n"
        f"    options:\n"
        f"      heading: {name}\n"
        f"      show_submodules: true\n"
    )


def landed_api() -> dict[str, tuple[str, str]]:
    """Import name -> (page path, title) of the optional API pages this checkout can build."""
    out = {}
    for name, (folder, title, marker) in OPTIONAL_API.items():
        if _landed(folder, marker):
            out[name] = (f"api/{name}.md", title)
    return out


def on_config(config: Any, **kwargs: Any) -> Any:
    nav = config["nav"]
    api = next((item for item in nav if isinstance(item, dict) and "API reference" in item), None)
    if api is not None:
        for name, (page, title) in landed_api().items():
            api["API reference"].append({title: page})
    if (Path(config["docs_dir"]) / "distributed.md").is_file():
        at = next(
            (i for i, item in enumerate(nav) if isinstance(item, dict) and "Conformance" in item),
            len(nav),
        )
        nav.insert(at, {"Distributed and micro-batching": "distributed.md"})
    return config


def on_files(files: Files, config: Any, **kwargs: Any) -> Files:
    for name, (page, title) in landed_api().items():
        folder = OPTIONAL_API[name][0]
        files.append(File.generated(config, page, content=_api_page(name, folder, title)))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files, **kwargs: Any) -> str:
    if SPEC_MARKER in markdown:
        markdown = markdown.replace(SPEC_MARKER, render_spec())
    return markdown


# ------------------------------------------------------------------------------------------
# The specification as Markdown, from the clause data.
# ------------------------------------------------------------------------------------------


def _render_with_project_renderer() -> str | None:
    """The project's own renderer (sapo_ref.spec.render), when it offers a body function."""
    try:
        from sapo_ref.spec import render  # type: ignore[attr-defined]
    except ImportError:
        return None
    fn = getattr(render, "render_body", None)
    return fn() if callable(fn) else None


def render_spec() -> str:
    """The specification body in Markdown (tables and clauses), generated from the data."""
    body = _render_with_project_renderer()
    return body if body is not None else _render_spec_here()


def _fmt(value: Any) -> str:
    if value is None:
        return "disabled"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _render_spec_here() -> str:
    from sapo_ref import spec

    meta = spec.DATA["meta"]
    out: list[str] = []
    out.append(f"**Specification version {spec.VERSION}.** {meta['title']}.\n")
    out.append("References:\n")
    out += [f"- {p}" for p in meta["papers"]]
    out.append("")

    defaults = spec.DATA["defaults"]
    out.append("## Methods and defaults\n")
    out.append(
        f"Defaults: `method = \"{defaults['method']}\"`, `loss_agg = \"{defaults['loss_agg']}\"`, "
        f"`count_empty_rows = {defaults['count_empty_rows']}`.\n"
    )
    out.append("| method | clause | ratio | gate | parameters (defaults) | paper eq. | summary |")
    out.append("|---|---|---|---|---|---|---|")
    for m in spec.METHODS.values():
        params = ", ".join(f"`{p}` = {_fmt(m.defaults.get(p))}" for p in m.params)
        out.append(
            f"| `{m.name}` | [{m.clause}](#clause-{_anchor(m.clause)}) | {m.ratio} | {m.gate} | "
            f"{params} | {m.paper_eq} | {m.summary} |"
        )
    out.append("")

    out.append("## Aggregations\n")
    out.append("| `loss_agg` | clause | row weight $\\rho_{it}$ | denominator $D$ | loss |")
    out.append("|---|---|---|---|---|")
    for a in spec.LOSS_AGGS.values():
        out.append(
            f"| `{a.name}` | [{a.clause}](#clause-{_anchor(a.clause)}) | {a.row_weight} | "
            f"{a.denominator.replace('*', '&times;')} | ${a.formula}$ |"
        )
    out.append("")

    out.append("## Parameter domains\n")
    out.append("| parameter | domain | meaning |")
    out.append("|---|---|---|")
    for d in spec.DOMAINS.values():
        out.append(f"| `{d.name}` | {d.describe()} | {d.meaning} |")
    out.append("")

    num = spec.DATA["numerics"]
    out.append("## Numerics constants\n")
    out.append("| constant | value |")
    out.append("|---|---|")
    for key, value in num.items():
        out.append(f"| `{key}` | {_fmt(value)} |")
    out.append("")

    out.append("## Conformance tolerances\n")
    out.append(
        "A result passes when $|got - want| \\le atol \\cdot scale + rtol\\,|want|$ elementwise, "
        "value and gradient apart ([clause C.1](#clause-c1)).\n"
    )
    out.append("| dtype | value rtol | value atol | gradient rtol | gradient atol |")
    out.append("|---|---|---|---|---|")
    for dtype, tol in spec.TOLERANCES.items():
        v, g = tol["value"], tol["grad"]
        out.append(f"| {dtype} | {v.rtol:g} | {v.atol:g} | {g.rtol:g} | {g.atol:g} |")
    out.append("")

    out.append("## Clauses\n")
    section = None
    for c in spec.CLAUSES:
        head = c.id.split(".")[0]
        if head != section:
            section = head
        eq = f" *(paper eq. {c.eq})*" if c.eq else ""
        out.append(f"### {c.id} {c.title} {{ #clause-{_anchor(c.id)} }}\n")
        out.append(f"*{c.kind}*{eq}\n")
        out.append(c.text.strip() + "\n")
        if c.id == "7.1":
            out.append(_metrics_table(spec))
    return "\n".join(out)


def _metrics_table(spec: Any) -> str:
    rows = ["| key | methods | definition |", "|---|---|---|"]
    for key, m in spec.METRICS.items():
        methods = "all" if m["methods"] == "all" else ", ".join(f"`{x}`" for x in m["methods"])
        rows.append(f"| `{key}` | {methods} | {m['definition']} |")
    return "\n".join(rows) + "\n"


def _anchor(clause_id: str) -> str:
    return clause_id.lower().replace(".", "")
