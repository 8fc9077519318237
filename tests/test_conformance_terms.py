"""The suite on the terms of spec 0.2.0 (clauses 10.1-10.5): the reference runs every new case;
an implementation that skips a check, drops the gradient of ref_logp, reports a wrong KL metric
or ignores an undeclared term is caught or skipped with the reason; the file protocol carries
the new inputs. Implementations under test are small wrappers of ``sapo_ref`` (NumPy) or of the
plain-autodiff formula of ``tests/conformance_mutants.py`` (torch), each with one change."""

from __future__ import annotations

import json

import conformance_mutants as cm
import numpy as np
import pytest
from sapo_conformance import builtin_target, generate_cases, run_suite
from sapo_conformance.cases import ERROR_KINDS, KL_ESTIMATORS, NUMERICS_KINDS, materialize
from sapo_conformance.protocol import (
    export_cases,
    judge_dir,
    load_inputs,
    read_manifest,
    write_result,
)
from sapo_conformance.targets import Target

import sapo_ref

TERMS = [c for c in generate_cases(seed=0, per_clause=2) if c.clauses[0].startswith("10.")]
DECLARED = {"weights": True, "kl_estimators": KL_ESTIMATORS}


def _numpy_target(fn, **kw) -> Target:
    return Target("t", "numpy", fn, "tests:t", **{**DECLARED, **kw})


def _reference(logp, old_logp, advantages, mask, **options):
    r = sapo_ref.policy_loss(logp, old_logp, advantages, mask, **options)
    return r.loss, r.grad, r.metrics


@pytest.mark.clause("10.1", "10.2", "10.3", "10.4", "10.5")
def test_the_reference_runs_every_case_of_the_new_clauses():
    """Every clause 10 generator draws its cases (10.2 one per estimator, 10.4 one per error,
    10.5 one per kind), and the reference target runs them all: a skip is a range skip of a
    low precision, never a capability."""
    ids = {c.id.rsplit("-", 1)[0] for c in TERMS}
    assert {f"10.2-{e}" for e in KL_ESTIMATORS} <= ids
    assert {f"10.4-{k}" for k in ERROR_KINDS} <= ids
    assert {f"10.5-{k}" for k in NUMERICS_KINDS} <= ids
    res = run_suite([builtin_target("reference")], TERMS, ["float64", "float32", "float16"])
    assert res.passed
    skips = [r for r in res.results if r.status == "skip"]
    assert all("clause 10" not in r.reason and r.dtype != "float64" for r in skips), skips[:3]
    assert sum(r.status == "pass" and r.dtype == "float64" for r in res.results) == len(TERMS)


@pytest.mark.clause("10.4", "8.7")
def test_error_cases_take_a_raise_or_for_data_faults_a_poison():
    """Returning NaN instead of raising conforms for the data faults (a traced call, clause
    8.7) and nowhere else; returning numbers for a bad input never conforms."""

    def poisons(logp, old_logp, advantages, mask, **options):
        try:
            return _reference(logp, old_logp, advantages, mask, **options)
        except ValueError:
            return np.nan, np.full(np.shape(logp), np.nan)

    def ignores_terms(logp, old_logp, advantages, mask, weights=None, ref_logp=None, **options):
        options = {k: v for k, v in options.items() if k not in ("kl_coef", "kl_estimator")}
        return _reference(logp, old_logp, advantages, mask, **options)

    errors = [c for c in TERMS if c.error]
    res = run_suite([_numpy_target(poisons)], errors, ["float64"])
    failed = {r.case.id for r in res.failures}
    assert failed == {c.id for c in errors if not c.poison}, sorted(failed)
    assert all("allowed for data faults only" in r.messages[0] for r in res.failures)
    res = run_suite([_numpy_target(ignores_terms)], errors, ["float64"])
    assert {r.case.id for r in res.failures} == {c.id for c in errors}
    assert all(r.failed_clauses == ("10.4",) for r in res.failures)


@pytest.mark.clause("10.3")
def test_the_gradient_of_ref_logp_is_checked_through_the_autodiff():
    """ref_logp detached: the loss and the logp gradient are right, the ref_logp gradient is
    zero, and the suite says so on every case with a non-zero KL gradient."""
    pytest.importorskip("torch")
    careful = cm.make("torch")

    def detached(logp, old_logp, advantages, mask, ref_logp=None, **options):
        ref = None if ref_logp is None else ref_logp.detach()
        return careful(logp, old_logp, advantages, mask, ref_logp=ref, **options)

    kl = [c for c in TERMS if c.ref_logp is not None and not c.error]
    res = run_suite([Target("t", "torch", detached, "t", **DECLARED)], kl, ["float64"])
    assert not res.passed
    for r in res.failures:
        bad = {c.name for c in r.checks if not c.ok}
        assert bad == {"ref_grad"}, (r.case.id, r.messages)
    beta = [c for c in kl if c.options.get("kl_coef")]
    assert len(res.failures) >= len(beta) // 2 > 0
    good = run_suite([Target("t", "torch", careful, "t", **DECLARED)], kl, ["float64"])
    assert good.passed
    checked = [r for r in good.results if any(c.name == "ref_grad" for c in r.checks)]
    assert len(checked) == len(kl)


@pytest.mark.clause("7.1", "10.2")
def test_kl_and_weights_metrics_are_compared_when_returned():
    def wrong_kl(*args, **options):
        loss, grad, metrics = _reference(*args, **options)
        if "kl_ref/mean" in metrics:
            metrics["kl_ref/mean"] = 2.0 * metrics["kl_ref/mean"] + 1.0
        return loss, grad, metrics

    def without_terms_metrics(*args, **options):
        loss, grad, metrics = _reference(*args, **options)
        return (
            loss,
            grad,
            {k: v for k, v in metrics.items() if "kl_ref" not in k and "weights" not in k},
        )

    cases = [c for c in TERMS if not c.error]
    res = run_suite([_numpy_target(wrong_kl)], cases, ["float64"])
    assert {r.case.id for r in res.failures} == {
        c.id
        for c in cases
        if c.ref_logp is not None
        and np.all(np.isfinite(materialize(c, "float64").want_metrics.get("kl_ref/mean", 0.0)))
    }
    assert all(r.failed_clauses == ("7.1",) for r in res.failures)
    assert run_suite([_numpy_target(without_terms_metrics)], cases, ["float64"]).passed


@pytest.mark.clause("10.1", "10.2")
def test_undeclared_terms_are_skipped_with_the_reason_and_reported():
    t = Target("t", "numpy", _reference, "tests:t", kl_estimators=("k3",))
    res = run_suite([t], TERMS, ["float64"])
    reasons = {r.case.id: r.reason for r in res.results if r.status == "skip"}
    for c in TERMS:
        if c.weights is not None:
            assert "weights (clause 10.1)" in reasons[c.id]
        elif c.kl_estimator not in (None, "k3") and not c.error:
            assert "kl_estimator" in reasons[c.id]
    assert "weights (clause 10.1) not declared: those cases are not run" in t.declared_limits
    assert "kl_estimators: k3 only" in t.declared_limits


@pytest.mark.clause("10.1", "10.2", "10.4")
def test_the_file_protocol_carries_the_terms_and_judges_ref_grad_and_errors(tmp_path):
    """Exported weights (bool, int64, float) and ref_logp come back bit for bit; a port that
    reports a wrong ref_grad fails those cases, one that computes numbers for an error case
    fails it, and an export of version 1 is still judged."""
    cases = [c for c in TERMS if c.clauses[0] in ("10.1", "10.2", "10.4")]
    export_cases(tmp_path, cases, ["float64"], {"seed": 0})
    manifest = read_manifest(tmp_path)
    assert manifest["schema"] == "sapo-conformance-export/2"
    port = {
        "name": "p",
        "capabilities": {k: v if isinstance(v, bool) else list(v) for k, v in DECLARED.items()},
    }
    by_id = {c.id: c for c in cases}
    for entry in manifest["cases"]:
        ins = load_inputs(tmp_path, entry)
        m = materialize(by_id[entry["case"]], "float64")
        for key in ("weights", "ref_logp"):
            if getattr(m, key) is not None:
                assert ins[key].dtype == getattr(m, key).dtype
                np.testing.assert_array_equal(ins[key], getattr(m, key))
        if "error" in entry:  # computes numbers for a bad input: must fail
            write_result(tmp_path, entry, 0.0, np.zeros(entry["shape"]), port=port)
            continue
        ref_grad = None if m.want_ref_grad is None else -m.want_ref_grad  # wrong sign
        write_result(tmp_path, entry, m.want_loss, m.want_grad, port=port, ref_grad=ref_grad)
    suite, _ = judge_dir(tmp_path)
    failed = {r.case.id: r for r in suite.failures}
    for c in cases:
        if c.error:
            assert "expected the call to fail" in failed[c.id].messages[0]
        elif c.ref_logp is not None and np.any(materialize(c, "float64").want_ref_grad):
            assert any(ch.name == "ref_grad" and not ch.ok for ch in failed[c.id].checks)
        else:
            assert c.id not in failed
    data = json.loads((tmp_path / "manifest.json").read_text())
    data["schema"] = "sapo-conformance-export/1"
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    assert read_manifest(tmp_path)["schema"] == "sapo-conformance-export/1"
