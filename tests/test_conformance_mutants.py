"""Tests of the tester: the suite rejects single-bug mutants, naming the right clause (and the
known deviation where the catalogue has one), and accepts correct implementations written
differently (custom backward, log-sigmoid arrangement, tau_pos for A >= 0, plain autodiff in
torch, JAX and MLX). The mutants and variants live in ``tests/conformance_mutants.py``.
"""

from __future__ import annotations

import conformance_mutants as cm
import numpy as np
import pytest
from sapo_conformance import DTYPES, generate_cases, golden_cases, run_suite
from sapo_conformance.cases import materialize
from sapo_conformance.compare import compare
from sapo_conformance.deviations import (
    CATALOGUE,
    Applied,
    candidate_params,
    compose,
    evaluate_plan,
    format_applied,
    identify,
)
from sapo_conformance.drivers import Outcome
from sapo_conformance.targets import Target

from sapo_ref import spec

CASES = generate_cases(seed=0, per_clause=3)
FEW = generate_cases(seed=1, per_clause=1)


def _target(framework: str, fn, name: str = "t", caps=None) -> Target:
    t = Target(name, framework, fn, f"tests:{name}")
    t.apply_capabilities(caps if caps is not None else getattr(fn, "sapo_capabilities", None))
    return t


# ----------------------------------------------------------------------------- mutants


@pytest.mark.parametrize("bug", sorted(cm.MUTANTS))
def test_mutant_rejected_with_its_clause_and_deviation(bug):
    pytest.importorskip("torch")
    clause, deviation = cm.MUTANTS[bug]
    res = run_suite(
        [_target("torch", cm.make("torch", bug=bug), bug)], CASES, ("float64", "float32")
    )
    assert not res.passed, f"mutant {bug} passed the suite"
    failed = {cl for r in res.failures for cl in r.failed_clauses}
    assert clause in failed, (
        f"mutant {bug}: clause {clause} not among the failed clauses {sorted(failed)}"
    )
    if deviation is not None:
        found = {d.id for r in res.failures for d in r.deviations}
        assert deviation in found, (
            f"mutant {bug}: deviation {deviation} not identified (found {sorted(found)})"
        )


def test_every_mutant_is_one_bug_not_a_crash():
    """A mutant fails on numbers, not because it raised (it is a realistic bug, not a broken file)."""
    pytest.importorskip("torch")
    for bug in cm.MUTANTS:
        res = run_suite([_target("torch", cm.make("torch", bug=bug), bug)], FEW, ("float64",))
        raised = [r.reason for r in res.failures if r.reason.startswith("raised")]
        assert not raised, (bug, raised[:2])


def test_catalogue_models_are_not_the_reference():
    """Each catalogue model, with each of its default parameters, that applies to some case
    gives numbers the reference does not: a deviation that changes no number could never be
    identified. (float64 cases, where every model has something to change.)"""
    seen: dict[str, bool] = {}
    for case in CASES + golden_cases():
        m = materialize(case, "float64")
        if isinstance(m, str):
            continue
        # A gradient the reference does not give, NaN at padding (for models that leave the
        # padding to the implementation).
        fake = Outcome(m.want_loss, np.where(m.mask, m.want_grad * 1.5, np.nan), None, "float64")
        for dev in CATALOGUE:
            if dev.model is None:
                continue
            for param in candidate_params(dev):
                plan = compose(m, dict(case.options), (Applied(dev, param),))
                if plan is None:
                    continue
                loss, grad = evaluate_plan(plan, fake)
                tol = spec.TOLERANCES["float64"]
                differs = (
                    loss is not None and not compare("loss", loss, m.want_loss, tol["value"]).ok
                ) or (grad is not None and not compare("grad", grad, m.want_grad, tol["grad"]).ok)
                key = format_applied(Applied(dev, param))
                seen[key] = seen.get(key, False) or bool(differs)
    modelled = {
        format_applied(Applied(d, p)) for d in CATALOGUE if d.model for p in candidate_params(d)
    }
    assert modelled <= set(seen), modelled - set(seen)
    assert all(seen.values()), [k for k, v in seen.items() if not v]


def test_reference_matches_no_deviation():
    """The reference's own numbers are reproduced by no deviation model (no false diagnosis)."""
    for case in CASES:
        m = materialize(case, "float64")
        if isinstance(m, str):
            continue
        out = Outcome(m.want_loss, m.want_grad, None, "float64")
        tol = spec.TOLERANCES["float64"]
        hits = [d.id for d in identify(m, dict(case.options), out, tol["value"], tol["grad"])]
        assert not hits, (case.id, hits)


# ----------------------------------------------------------------------------- correct variants


def _assert_passes(res):
    msgs = [f"{r.target} {r.dtype} {r.case.id}: {r.messages}" for r in res.failures[:5]]
    assert res.passed, "\n".join(msgs)
    assert sum(r.status == "pass" for r in res.results) > 0


def test_torch_plain_autodiff_accepted_every_dtype():
    pytest.importorskip("torch")
    _assert_passes(run_suite([_target("torch", cm.make("torch"))], CASES, DTYPES))


def test_plain_autodiff_rejected_on_golden_edge_vectors():
    """The plain formula is right on every random case but not at the golden edges: a float64
    term r*A whose r overflows (the spec's value is finite, clause 5.4) and gspo-token at infinite
    log-ratios (its straight-through term loses the infinite gradient). The suite must see both."""
    pytest.importorskip("torch")
    res = run_suite([_target("torch", cm.make("torch"))], golden_cases(), ("float64",))
    failed = {r.case.id for r in res.failures}
    assert "golden:grpo/overflow-band-finite" in failed
    assert any(c.startswith("golden:gspo-token/extreme") for c in failed)
    # and a weight of 0 on an infinite term (0 * inf in the product's backward, clause 10.1)
    edges = ("extreme", "overflow", "weights/inf-ratio-negative-advantage/w=0.0")
    assert all(any(e in c for e in edges) for c in failed), sorted(failed)


def test_torch_tau_pos_for_nonnegative_advantages_accepted():
    """tau_pos chosen for A >= 0 instead of A > 0 changes no number (clause 1.6)."""
    pytest.importorskip("torch")
    _assert_passes(
        run_suite([_target("torch", cm.make("torch", tau_ge=True))], CASES, ("float64", "float32"))
    )


def test_torch_custom_backward_with_metrics_accepted():
    pytest.importorskip("torch")
    res = run_suite(
        [_target("torch", cm.torch_custom_backward)], CASES, ("float64", "float32", "bfloat16")
    )
    # float32 metric sums of ratios near float32's max overflow (a finding of the suite, clause
    # 7.1); the loss and gradient of the custom backward must pass everywhere.
    bad = [r for r in res.failures if set(r.failed_clauses) != {"7.1"}]
    assert not bad, [(r.dtype, r.case.id, r.messages) for r in bad[:3]]
    assert any(r.metrics_compared for r in res.results)


def test_numpy_log_sigmoid_accepted_within_its_declared_methods():
    res = run_suite(
        [_target("numpy", cm.numpy_log_sigmoid)], CASES, ("float64", "float32", "float16")
    )
    _assert_passes(res)
    assert {r.case.method for r in res.results if r.status == "pass"} == {"sapo", "sapo-seq"}


def test_jax_plain_autodiff_accepted():
    jax = pytest.importorskip("jax")
    assert jax.config.jax_enable_x64  # tests/conftest.py enables it
    _assert_passes(run_suite([_target("jax", cm.make("jax"))], FEW, DTYPES))


def test_mlx_plain_autodiff_accepted_with_declared_float64_tolerance():
    """MLX's CPU float64 exp is float32-accurate (ml-explore/mlx#3047): the plain formula passes
    float64 only under a declared deviation (judged with the float32 row), which the report shows;
    without the declaration it fails float64."""
    pytest.importorskip("mlx.core")
    fn = cm.make("mlx")
    caps = {
        "tolerance_deviations": {
            "float64": {"tolerance": "float32", "reason": "mx.exp float32-accurate"}
        }
    }
    # MLX's autodiff of minimum/where gives NaN at infinite ratios for this plain formula: the
    # extreme clauses are the adapter's job (sapo_mlx passes them), not this driver test's.
    finite = [c for c in FEW if c.clauses[0] not in ("5.1", "5.3", "5.4", "6.3")]
    _assert_passes(run_suite([_target("mlx", fn, caps=caps)], finite, DTYPES))
    strict = run_suite([_target("mlx", fn)], finite, ("float64",))
    assert not strict.passed


def test_low_precision_without_upcast_rejected():
    """Computing bfloat16/float16 inputs in their own dtype instead of float32 (clause 6.4) passes
    most cases at those tolerances but not the range-hungry ones (float16 overflow past 65504)."""
    pytest.importorskip("torch")
    fn = cm.make("torch", bug="no-upcast")
    res = run_suite(
        [_target("torch", fn, "no-upcast")], CASES, ("float64", "float32", "bfloat16", "float16")
    )
    assert not res.passed
    assert {r.dtype for r in res.failures} <= {"bfloat16", "float16"}
    assert "float16" in {r.dtype for r in res.failures}


def _numpy_with_opt_in_metrics(bias: float):
    import sapo_ref

    def fn(logp, old_logp, advantages, mask, metrics=False, **options):
        r = sapo_ref.policy_loss(logp, old_logp, advantages, mask, **options)
        if not metrics:
            return r.loss, r.grad
        return r.loss, r.grad, {k: v + bias for k, v in r.metrics.items()}

    fn.sapo_capabilities = {"metrics": False, "metrics_option": {"metrics": True}}
    return fn


def test_opt_in_metrics_are_requested_and_compared_under_clause_7_1():
    good = run_suite([_target("numpy", _numpy_with_opt_in_metrics(0.0))], FEW, ("float64",))
    _assert_passes(good)
    assert all(r.metrics_compared for r in good.results if r.status == "pass")
    bad = run_suite([_target("numpy", _numpy_with_opt_in_metrics(0.5))], FEW, ("float64",))
    assert not bad.passed
    assert {cl for r in bad.failures for cl in r.failed_clauses} == {"7.1"}


# ----------------------------------------------------------------------------- composite mutants


@pytest.mark.parametrize("name", sorted(cm.COMPOSITES))
def test_composite_mutant_rejected_and_explained_by_its_deviations(name):
    """Two or three bugs at once, as real implementations have them: the suite rejects the
    mutant, and its verdict explains every failure with deviations of the mutant's own set
    (tests/test_verdicts.py checks the set is named exactly, with fitted parameters)."""
    pytest.importorskip("torch")
    from sapo_conformance.verdict import diagnose

    bugs, expected = cm.COMPOSITES[name]
    res = run_suite([_target("torch", cm.make("torch", bug=bugs), name)], CASES, ("float64",))
    assert not res.passed, f"composite mutant {name} passed the suite"
    (v,) = diagnose(res)
    assert set(v.names) <= expected and v.names, v.line
    assert v.explained == v.failures, v.line
