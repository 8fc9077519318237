"""The reference against the golden vectors (spec/vectors/<version>/*.json), and the vectors
themselves: schema, coverage, and that regenerating them reproduces the committed files.

The expected values come from ``tools/mpmath_reference.py`` (an independent 60-digit
implementation of the clause text) correctly rounded to float64; the tolerance is the spec's
``[tolerances.golden]`` and the comparison is clause C.1's (``sapo_conformance.compare``).
"""

from __future__ import annotations

import ast
import doctest
import json
from pathlib import Path

import jsonschema
import make_vectors
import numpy as np
import pytest
from sapo_conformance.compare import compare
from sapo_ref.spec import vectors as V

import sapo_ref
from sapo_ref import spec

ROOT = Path(__file__).resolve().parents[1]

POLICY = V.load_vectors()
TOOLS = [v for v in V.load_vectors(kind=None) if v.kind != "policy_loss"]
TOL = spec.TOLERANCES["golden"]


def _check(name: str, got, want, kind: str) -> None:
    c = compare(name, got, want, TOL[kind])
    assert c.ok, c.message


@pytest.mark.parametrize(
    "vec", [pytest.param(v, marks=pytest.mark.clause("C.1", *v.clauses), id=v.id) for v in POLICY]
)
def test_reference_matches_golden_vector(vec: V.Vector) -> None:
    res = sapo_ref.policy_loss(*vec.args(), **vec.kwargs())
    _check("loss", res.loss, vec.loss, "value")
    _check("grad", res.grad, vec.grad, "grad")
    assert list(res.metrics) == list(vec.metrics)
    for key, want in vec.metrics.items():
        _check(f"metrics[{key!r}]", res.metrics[key], want, "value")


@pytest.mark.parametrize(
    "vec", [pytest.param(v, marks=pytest.mark.clause("C.1", *v.clauses), id=v.id) for v in TOOLS]
)
def test_tools_match_golden_vector(vec: V.Vector) -> None:
    if vec.kind == "group_advantages":
        got = {"advantages": sapo_ref.group_advantages(*vec.args(), **vec.kwargs())}
    else:
        d = sapo_ref.sequence_gate_diagnostics(*vec.args(), **vec.kwargs())
        got = {k: getattr(d, k) for k in ("var", "gap", "bound", "mean_log_ratio")}
    assert set(got) == set(vec.expected)
    for key, want in vec.expected.items():
        _check(key, got[key], want, "value")


def test_regenerating_reproduces_the_committed_files() -> None:
    """Nobody edits the vectors by hand: the generator rewrites them byte for byte."""
    rendered = make_vectors.render_all()
    on_disk = {p.name: p.read_text(encoding="utf-8") for p in V.vector_files()}
    assert set(rendered) == set(on_disk), "run: python tools/make_vectors.py"
    for name, text in rendered.items():
        assert on_disk[name] == text, (
            f"{name} differs from the generator: python tools/make_vectors.py"
        )


@pytest.mark.parametrize("path", V.vector_files(), ids=lambda p: p.name)
def test_files_follow_the_schema(path: Path) -> None:
    def no_constant(name: str) -> None:
        raise AssertionError(f"{path.name}: non-standard JSON constant {name}")

    doc = json.loads(path.read_text(encoding="utf-8"), parse_constant=no_constant)
    jsonschema.Draft202012Validator.check_schema(dict(V.VECTOR_SCHEMA))
    jsonschema.validate(doc, dict(V.VECTOR_SCHEMA), cls=jsonschema.Draft202012Validator)
    assert doc["spec_version"] == spec.VERSION


def test_every_case_names_existing_clauses_and_sets_only_known_options() -> None:
    known = {c.id for c in spec.CLAUSES}
    options = {"method", "loss_agg", "tau_pos", "tau_neg", "eps_low", "eps_high", "dual_clip",
               "norm_length", "count_empty_rows", "normalizer"}  # fmt: skip
    for v in V.load_vectors(kind=None):
        assert set(v.clauses) <= known, (v.id, set(v.clauses) - known)
        if v.kind == "policy_loss":
            assert set(v.options) <= options, v.id
            assert v.grad.shape == v.inputs["logp"].shape


def test_vectors_cover_the_spec() -> None:
    """Every method x aggregation with both advantage shapes, and each special case per method."""
    ids = {v.id for v in POLICY}
    for m in spec.METHODS:
        for a in spec.LOSS_AGGS:
            assert {f"{m}/{a}/adv-seq", f"{m}/{a}/adv-token"} <= ids
        for suffix in ("empty-row/count_empty_rows=false/seq-mean-token-mean",
                       "empty-row/count_empty_rows=true/seq-mean-token-mean",
                       "fully-masked/seq-mean-token-mean", "zero-advantage",
                       "masked-garbage/adv-seq", "masked-garbage/adv-token"):  # fmt: skip
            assert f"{m}/{suffix}" in ids
    clauses = {c for v in V.load_vectors(kind=None) for c in v.clauses}
    wanted = {"1.5", "1.6", "2.1", "2.3", "2.4", "2.6", "2.7", "2.8", "3.2", "3.3", "3.4", "3.5",
              "3.6", "3.7", "3.8", "5.1", "5.2", "5.3", "5.4", "6.1", "9.1", "9.2"}  # fmt: skip
    assert wanted <= clauses, wanted - clauses
    # The extreme cases really are extreme, and the masking cases really hold garbage.
    assert any(v.loss == np.inf for v in POLICY)
    assert any(np.isposinf(v.grad).any() for v in POLICY if v.options["method"] == "gspo")
    garbage = [v for v in POLICY if "masked-garbage" in v.id]
    assert all(
        np.isnan(v.inputs["logp"][~v.inputs["mask"]]).any()
        or np.isinf(v.inputs["old_logp"][~v.inputs["mask"]]).any()
        for v in garbage
    )


def test_mpmath_reference_is_independent_of_sapo_ref() -> None:
    """The oracle must not import the code it judges."""
    tree = ast.parse((ROOT / "tools" / "mpmath_reference.py").read_text(encoding="utf-8"))
    imported = {
        (n.module or "") if isinstance(n, ast.ImportFrom) else a.name
        for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
        for a in n.names
    }  # fmt: skip
    assert not any(name.split(".")[0] in ("sapo_ref", "spec") for name in imported), imported


def test_loader_doctests_and_errors() -> None:
    assert doctest.testmod(V, optionflags=doctest.ELLIPSIS).failed == 0
    assert doctest.testmod(make_vectors.M).failed == 0  # the mpmath reference's examples
    with pytest.raises(FileNotFoundError, match="no golden vectors"):
        V.load_vectors("0.0.0")
    with pytest.raises(ValueError, match="kind must be"):
        V.load_vectors(kind="loss")
    with pytest.raises(ValueError, match="number or 'nan'"):
        V.decode_float("Infinity")
    assert all(v.inputs["logp"].dtype == np.float64 and v.inputs["mask"].dtype == bool
               for v in POLICY)  # fmt: skip
