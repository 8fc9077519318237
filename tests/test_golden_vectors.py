"""The reference against the golden vectors (spec/vectors/<version>/*.json), and the vectors
themselves: schema, coverage, and that regenerating them reproduces the committed files.

Every published version is checked: spec 0.2.0 (clause 10) changes no value of 0.1.0, so the
reference must pass the 0.1.0 files as they were published, and every 0.1.0 case must reappear
unchanged in the current version.

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
from test_vs_mpmath import reference_grad_ref_logp

import sapo_ref
from sapo_ref import spec

ROOT = Path(__file__).resolve().parents[1]

#: Published spec versions whose vectors the reference must still pass (0.1.0 stays citable).
VERSIONS = tuple(dict.fromkeys(("0.1.0", spec.VERSION)))
POLICY = V.load_vectors()
TOOLS = [v for v in V.load_vectors(kind=None) if v.kind != "policy_loss"]
ALL_POLICY = [(ver, v) for ver in VERSIONS for v in V.load_vectors(ver)]
ALL_TOOLS = [(ver, v) for ver in VERSIONS for v in V.load_vectors(ver, kind=None)
             if v.kind != "policy_loss"]  # fmt: skip
TOL = spec.TOLERANCES["golden"]
#: Strict xfails until the reference catches up (tests/conftest.py); findings-vectors.md.
PENDING: dict[str, str] = {}


def _check(name: str, got, want, kind: str) -> None:
    c = compare(name, got, want, TOL[kind])
    assert c.ok, c.message


@pytest.mark.parametrize(
    "vec",
    [pytest.param(v, marks=pytest.mark.clause("C.1", *v.clauses), id=f"{ver}:{v.id}")
     for ver, v in ALL_POLICY],
)  # fmt: skip
def test_reference_matches_golden_vector(vec: V.Vector) -> None:
    with np.errstate(all="ignore"):  # extreme cases may overflow on the way to an inf result
        res = sapo_ref.policy_loss(*vec.args(), **vec.kwargs())
    _check("loss", res.loss, vec.loss, "value")
    _check("grad", res.grad, vec.grad, "grad")
    if vec.grad_ref_logp is not None:
        got = reference_grad_ref_logp(*vec.args(), **vec.kwargs())
        _check("grad_ref_logp", got, vec.grad_ref_logp, "grad")
    assert list(res.metrics) == list(vec.metrics)
    for key, want in vec.metrics.items():
        _check(f"metrics[{key!r}]", res.metrics[key], want, "value")


@pytest.mark.parametrize(
    "vec",
    [pytest.param(v, marks=pytest.mark.clause("C.1", *v.clauses), id=f"{ver}:{v.id}")
     for ver, v in ALL_TOOLS],
)  # fmt: skip
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


def test_a_new_version_changes_no_published_value() -> None:
    """Every case of every earlier version is in the current files, byte-identical (same
    inputs, options, expected values, clauses and text): only the header's version moved."""
    current = {c["id"]: c for p in V.vector_files() for c in json.loads(p.read_text())["cases"]}
    for ver in VERSIONS[:-1]:
        for path in V.vector_files(ver):
            old = json.loads(path.read_text(encoding="utf-8"))
            assert (V.vectors_dir() / path.name).is_file(), f"{path.name} dropped"
            for case in old["cases"]:
                assert current.get(case["id"]) == case, f"{ver}:{case['id']} changed"


@pytest.mark.parametrize(
    "path", [p for ver in VERSIONS for p in V.vector_files(ver)],
    ids=lambda p: f"{p.parent.name}/{p.name}",
)  # fmt: skip
def test_files_follow_the_schema(path: Path) -> None:
    def no_constant(name: str) -> None:
        raise AssertionError(f"{path.name}: non-standard JSON constant {name}")

    doc = json.loads(path.read_text(encoding="utf-8"), parse_constant=no_constant)
    jsonschema.Draft202012Validator.check_schema(dict(V.VECTOR_SCHEMA))
    jsonschema.validate(doc, dict(V.VECTOR_SCHEMA), cls=jsonschema.Draft202012Validator)
    assert doc["spec_version"] == path.parent.name


def test_every_case_names_existing_clauses_and_sets_only_known_options() -> None:
    clauses = {c.id: c.since for c in spec.CLAUSES}
    options = {"method", "loss_agg", "tau_pos", "tau_neg", "eps_low", "eps_high", "dual_clip",
               "norm_length", "count_empty_rows", "normalizer", "kl_coef",
               "kl_estimator"}  # fmt: skip
    for ver in VERSIONS:
        for v in V.load_vectors(ver, kind=None):
            assert set(v.clauses) <= set(clauses), (v.id, set(v.clauses) - set(clauses))
            # A case only cites clauses its version has (0.1.0 files never cite clause 10).
            assert all(_version(clauses[c]) <= _version(ver) for c in v.clauses), (ver, v.id)
            if v.kind == "policy_loss":
                assert set(v.options) <= options, v.id
                assert v.grad.shape == v.inputs["logp"].shape
                has_ref = "ref_logp" in v.inputs
                assert has_ref == ("kl_coef" in v.options) == (v.grad_ref_logp is not None)
                if has_ref:
                    assert v.grad_ref_logp.shape == v.inputs["ref_logp"].shape
                if "weights" in v.inputs:
                    assert v.inputs["weights"].shape in (v.grad.shape, v.grad.shape[:1])


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split("."))


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
    garbage = [v for v in POLICY if "masked-garbage" in v.id and v.group == "masking"]
    assert all(
        np.isnan(v.inputs["logp"][~v.inputs["mask"]]).any()
        or np.isinf(v.inputs["old_logp"][~v.inputs["mask"]]).any()
        for v in garbage
    )


@pytest.mark.skipif(_version(spec.VERSION) < (0, 2, 0), reason="clause 10 is spec 0.2.0")
def test_vectors_cover_the_added_terms() -> None:
    """Clause 10: weights with every method x aggregation ([N] and [N, T]), every estimator
    with every method, every aggregation with the KL term, near-zero and huge u, infinite
    log-probs, beta = 0, shards; the extremes really are extreme."""
    terms = [v for v in POLICY if v.group == "terms"]
    ids = {v.id for v in terms}
    for m in spec.METHODS:
        for a in spec.LOSS_AGGS:
            assert {f"{m}/{a}/weights/w-token", f"{m}/{a}/weights/w-row"} & ids, (m, a)
        assert {v.options.get("kl_estimator") for v in terms if v.options["method"] == m} >= set(
            spec.KL_ESTIMATORS
        ), m
    kl = [v for v in terms if "kl_coef" in v.options]
    assert {v.options["loss_agg"] for v in kl} == set(spec.LOSS_AGGS)
    assert {c for v in terms for c in v.clauses} >= {"10.1", "10.2", "10.3", "10.4", "10.5"}
    assert any(v.inputs["weights"].ndim == 1 for v in terms if "weights" in v.inputs)
    assert any(v.options.get("kl_coef") == 0.0 for v in kl)
    assert any("normalizer" in v.options for v in kl)
    with np.errstate(all="ignore"):
        us = np.concatenate([(v.inputs["ref_logp"] - v.inputs["logp"])[v.inputs["mask"]]
                             for v in kl])  # fmt: skip
    assert (np.abs(us) <= 1e-8).any() and (us >= 800).any() and np.isneginf(us).any()
    assert np.isposinf(us).any()
    k3 = [v for v in kl if v.options["kl_estimator"] == "k3"]
    assert any(v.loss == np.inf for v in k3) and any(v.metrics["kl_ref/mean"] == np.inf for v in k3)
    assert any(np.isfinite(v.loss) and abs(v.loss) > 1e300 for v in k3)
    assert any(np.isnan(v.loss) for v in kl)  # inf - inf with k1 (clause 10.5)


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
    old = V.load_vectors("0.1.0")
    assert old and all(v.grad_ref_logp is None and set(v.kwargs()) == set(v.options) for v in old)
    with_terms = [v for v in POLICY if "weights" in v.inputs or "ref_logp" in v.inputs]
    for v in with_terms:  # the keyword inputs travel through kwargs(), not args()
        assert len(v.args()) == 4
        assert {k for k in ("weights", "ref_logp") if k in v.inputs} <= set(v.kwargs())
    with pytest.raises(FileNotFoundError, match="no golden vectors"):
        V.load_vectors("0.0.0")
    with pytest.raises(ValueError, match="kind must be"):
        V.load_vectors(kind="loss")
    with pytest.raises(ValueError, match="number or 'nan'"):
        V.decode_float("Infinity")
    assert all(v.inputs["logp"].dtype == np.float64 and v.inputs["mask"].dtype == bool
               for v in POLICY)  # fmt: skip
