"""Packaging: what ``import sapo_ref`` pulls in, installed names, shipped data, spec consistency."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from importlib import resources

import numpy as np
import pytest

import sapo_ref
from sapo_ref import spec

#: Array libraries and frameworks the reference must never import (style.md 3).
FRAMEWORKS = (
    "torch",
    "jax",
    "jaxlib",
    "mlx",
    "tensorflow",
    "cupy",
    "array_api_strict",
    "dask",
    "sparse",
    "ndonnx",
    "paddle",
    "flax",
    "optax",
    "numba",
)
#: Repository folders mapped onto sapo_ref.spec, sapo_<backend> and sapo_conformance.
GENERIC_NAMES = ("spec", "adapters", "tests", "conformance_tests", "benchmarks", "tools")


def run_python(code: str, cwd) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_import_pulls_in_no_framework(tmp_path):
    """``import sapo_ref`` imports NumPy and array-api-compat and no framework (subprocess)."""
    code = "import sys, json, sapo_ref; print(json.dumps(sorted(sys.modules)))"
    modules = set(json.loads(run_python(code, tmp_path)))
    assert {"numpy", "array_api_compat", "sapo_ref", "sapo_ref.spec"} <= modules
    leaked = sorted(m for m in modules if m.split(".")[0] in FRAMEWORKS)
    assert not leaked, f"import sapo_ref imported {leaked}"


@pytest.mark.parametrize("name", GENERIC_NAMES)
def test_no_generic_top_level_name_installed(tmp_path, name):
    """Repository folders are installed under project names only: from a directory that is not
    the repository, ``spec``, ``tests``... resolve to nothing of ours."""
    code = (
        "import importlib.util, json, sys\n"
        "sys.path = [p for p in sys.path if p not in ('', '.')]\n"
        f"s = importlib.util.find_spec({name!r})\n"
        "print(json.dumps(None if s is None else str(s.origin or s.submodule_search_locations)))"
    )
    found = json.loads(run_python(code, tmp_path))
    assert found is None, f"top-level {name!r} is importable from {found}"


def test_py_typed_shipped():
    assert resources.files("sapo_ref").joinpath("py.typed").is_file()


def test_spec_data_loads():
    """The installed ``sapo_ref.spec`` reads its TOML; the tables are non-empty and typed."""
    assert re.fullmatch(r"\d+\.\d+\.\d+", spec.VERSION)
    assert sapo_ref.SPEC_VERSION == spec.VERSION
    assert spec.METHODS and spec.LOSS_AGGS and spec.DOMAINS and spec.METRICS and spec.CLAUSES
    assert spec.DATA["defaults"]["method"] in spec.METHODS
    assert spec.DATA["defaults"]["loss_agg"] in spec.LOSS_AGGS
    for table in spec.TOLERANCES.values():
        assert set(table) == {"value", "grad"}
        assert all(t.rtol > 0 and t.atol > 0 for t in table.values())
    ids = [c.id for c in spec.CLAUSES]
    assert len(ids) == len(set(ids)), "duplicate clause id"


def test_every_method_parameter_has_a_domain():
    for name, m in spec.METHODS.items():
        for p in m.params:
            assert p in spec.DOMAINS, (name, p)
        assert set(m.defaults) <= set(m.params), name
        for p, v in m.defaults.items():
            assert v is None or spec.DOMAINS[p].contains(v), (name, p, v)
    for agg in spec.LOSS_AGGS.values():
        assert set(agg.requires) <= set(spec.DOMAINS)


@pytest.mark.parametrize("terms", [(), ("weights",), ("ref_logp",), ("weights", "ref_logp")])
@pytest.mark.parametrize("method", list(spec.METHODS))
def test_metric_keys_match_the_spec(method, terms):
    """The keys policy_loss reports are exactly the spec's for the method and the clause 10 terms
    it is given (a metric with `requires` exists only with that input), in spec order."""
    want = tuple(
        k
        for k, m in spec.METRICS.items()
        if (m["methods"] == "all" or method in m["methods"])
        and m.get("requires", "") in ("", *terms)
    )
    kl, weighted = "ref_logp" in terms, "weights" in terms
    assert sapo_ref.metric_keys(method, kl=kl, weights=weighted) == want
    extra: dict = {}
    if weighted:
        extra["weights"] = np.ones(2)
    if kl:
        extra.update(ref_logp=np.zeros((2, 2)), kl_coef=0.1)
    res = sapo_ref.policy_loss(
        np.zeros((2, 2)),
        np.zeros((2, 2)),
        np.ones(2),
        np.ones((2, 2), bool),
        method=method,
        **extra,
    )
    assert tuple(res.metrics) == want


def test_metric_method_lists_name_known_methods():
    for key, m in spec.METRICS.items():
        assert m["methods"] == "all" or set(m["methods"]) <= set(spec.METHODS), key


def _clause_refs(text: str) -> set[str]:
    """Clause ids cited in prose: 'clause 2.1', 'clauses 3.8-3.11', 'clause C.1'."""
    refs = set()
    for m in re.finditer(
        r"[Cc]lauses? ((?:[0-9C]+\.[0-9]+)(?:\s*(?:,|and|-)\s*[0-9C]+\.[0-9]+)*)", text
    ):
        refs.update(re.findall(r"[0-9C]+\.[0-9]+", m.group(1)))
    return refs


def test_every_cited_clause_exists():
    """Clause ids in spec data (methods, aggregations) and cited in clause texts all exist."""
    known = {c.id for c in spec.CLAUSES}
    cited = {m.clause for m in spec.METHODS.values()} | {a.clause for a in spec.LOSS_AGGS.values()}
    for c in spec.CLAUSES:
        cited |= _clause_refs(c.text)
    assert cited - known == set()
    assert _clause_refs("see clauses 3.8-3.11 and clause C.1") == {"3.8", "3.11", "C.1"}


def test_spec_clause_kinds_are_known():
    kinds = {
        "definition",
        "method",
        "gradient",
        "aggregation",
        "default",
        "special-case",
        "numerics",
        "metrics",
        "error",
        "tool",
        "conformance",
    }
    assert {c.kind for c in spec.CLAUSES} <= kinds


def test_committed_spec_document_is_rendered():
    """spec/SPEC.md is generated: it must equal the renderer's output for clauses.toml."""
    from pathlib import Path

    from sapo_ref.spec import render

    committed = Path(__file__).resolve().parents[1] / "spec" / "SPEC.md"
    assert committed.read_text(encoding="utf-8") == render.render(), (
        "spec/SPEC.md is stale: run `python -m sapo_ref.spec.render` and commit the result"
    )


def test_rendered_spec_covers_the_data():
    """Every clause, method, aggregation, domain, metric key and tolerance row is in the text."""
    from sapo_ref.spec import render

    text = render.render()
    for c in spec.CLAUSES:
        assert f"### {c.id} {c.title}" in text
    for names in (spec.METHODS, spec.LOSS_AGGS, spec.DOMAINS, spec.METRICS, spec.TOLERANCES):
        for name in names:
            assert f"| `{name}` |" in text, name
