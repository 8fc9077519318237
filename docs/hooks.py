"""MkDocs hooks: build-time pages that cannot drift from the code.

* ``spec.md`` holds the marker ``<!-- sapo-ref:spec -->``; it is replaced by the specification
  rendered from ``spec/clauses.toml`` at every build, by the same renderer that writes
  ``spec/SPEC.md`` (``sapo_ref.spec.render.render_body``).
* The API pages of the backend packages (``sapo_torch``, ``sapo_jax``, ``sapo_mlx``) and of the
  conformance suite (``sapo_conformance``) are generated, and put in the navigation, only
  for the packages that exist with content in this checkout; the site builds either way.
* ``conformance.md`` holds ``<!-- sapo-ref:deviations -->``; it is replaced by the table of
  known deviations the suite recognises, read from ``conformance_tests/deviations.toml``.
* ``distributed.md`` is put in the navigation when the file exists.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent
SPEC_MARKER = "<!-- sapo-ref:spec -->"
DEVIATIONS_MARKER = "<!-- sapo-ref:deviations -->"
DEVIATIONS_FILE = ROOT / "conformance_tests" / "deviations.toml"

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
    return any(f"def {marker}(" in p.read_text(encoding="utf-8") for p in path.glob("*.py"))


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
        f'      filters: ["!^_", "!^test_"]\n'
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
        for _name, (page, title) in landed_api().items():
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
    if DEVIATIONS_MARKER in markdown:
        markdown = markdown.replace(DEVIATIONS_MARKER, render_deviations())
    return markdown


def render_spec() -> str:
    """The specification body in Markdown with ``clause-<id>`` anchors (``sapo_ref.spec.render``)."""
    from sapo_ref.spec.render import render_body

    return render_body(anchors=True)


def render_deviations() -> str:
    """The suite's catalogue of known deviations (``deviations.toml``) as a Markdown table."""
    import tomllib

    if not DEVIATIONS_FILE.is_file():
        return "*The deviation catalogue is not part of this checkout.*\n"
    data = tomllib.loads(DEVIATIONS_FILE.read_text(encoding="utf-8"))
    rows = [
        "| id | deviation | clause | seen in | recognised from numbers | fix |",
        "|---|---|---|---|---|---|",
    ]
    for d in data.get("deviation", []):
        clause = d.get("clause", "")
        link = f"[{clause}](spec.md#clause-{clause.lower().replace('.', '')})" if clause else ""
        rows.append(
            f"| `{d['id']}` | {_cell(d['title'])} | {link} | {_cell(', '.join(d.get('peers', [])))} | "
            f"{'yes' if d.get('model') else 'no'} | {_cell(d.get('fix', ''))} |"
        )
    return "\n".join(rows) + "\n"


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|")
