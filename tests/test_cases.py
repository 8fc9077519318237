"""Properties of the conformance cases (issue 12): one cause per case, the clamp cases, the
golden vectors' clean-padding twins, and drawing cases for a subset of methods/aggregations.

The checks use independent paths: NumPy on the raw case arrays, the reference ``sapo_ref``, and
the catalogue's clamp model (``sapo_conformance.deviations``), not the generators' own helpers.
"""

from __future__ import annotations

import numpy as np
import pytest
from sapo_conformance import generate_cases, golden_cases, materialize
from sapo_conformance.cases import GENERATORS, case_count
from sapo_conformance.compare import compare
from sapo_conformance.deviations import CATALOGUE_BY_ID, Applied, compose, evaluate_plan

import sapo_ref
from sapo_ref import spec

CASES = generate_cases(seed=0, per_clause=8)
#: Clauses whose cases hold extreme valid values or an empty batch: padding must be clean.
EXTREME = ("3.7", "5.1", "5.3", "5.4", "6.2", "6.3")


def _by_clause(clause: str, cases=CASES):
    return [c for c in cases if c.id.startswith(f"{clause}-")]


def _padding(case):
    """Values at invalid positions (per-sequence advantages have no padding)."""
    arrays = (case.logp, case.old_logp) + ((case.advantages,) if case.advantages.ndim == 2 else ())
    return [a[~case.mask] for a in arrays]


def _delta(case):
    with np.errstate(all="ignore"):
        return (case.logp - case.old_logp)[case.mask]


@pytest.mark.clause("6.1", "6.2", "5.3", "5.4")
@pytest.mark.parametrize("clause", EXTREME)
def test_extreme_and_empty_batch_cases_have_clean_padding(clause):
    cases = _by_clause(clause)
    assert len(cases) == 8
    for c in cases:
        for pad in _padding(c):
            assert np.all(pad == 0.0), (c.id, pad)


@pytest.mark.clause("3.7")
def test_empty_batch_cases_have_no_valid_token():
    assert all(not c.mask.any() for c in _by_clause("3.7"))


@pytest.mark.clause("6.1")
def test_garbage_padding_cases_have_ordinary_ratios():
    """The masking cases carry NaN/inf at padding and nothing else unusual: every valid
    log-ratio is ordinary (|delta| < 5), so a failure there has padding as its one cause."""
    cases = _by_clause("6.1")
    assert any(any((~np.isfinite(p)).any() for p in _padding(c)) for c in cases)
    for c in cases:
        d = _delta(c)
        assert np.all(np.isfinite(d)) and np.all(np.abs(d) < 5.0), (c.id, d)


@pytest.mark.clause("6.2")
def test_clamp_cases_draw_every_method_and_change_the_float64_result():
    """Clause 6.2's cases draw every method (sapo included) with valid log-ratios past +-20, and
    the catalogue's +-20 clamp model gives float64 numbers the reference does not."""
    cases = generate_cases(seed=0, per_clause=30, clauses=("6.2",))
    assert {c.method for c in cases} == set(sapo_ref.METHOD_NAMES)
    clamp = Applied(CATALOGUE_BY_ID["log-ratio-clamp"], {"low": -20.0, "high": 20.0})
    tol = spec.TOLERANCES["float64"]
    for c in cases:
        assert np.any(np.abs(_delta(c)) > 20.0), c.id
        m = materialize(c, "float64")
        assert not isinstance(m, str), (c.id, m)
        plan = compose(m, dict(c.options), (clamp,))
        assert plan is not None, c.id
        loss, grad = evaluate_plan(plan)
        same = (
            compare("loss", loss, m.want_loss, tol["value"]).ok
            and compare("grad", grad, m.want_grad, tol["grad"]).ok
        )
        assert not same, f"{c.id} ({c.method}): a +-20 clamp changes nothing"


def test_golden_twins_have_clean_padding_and_the_same_numbers():
    """Golden vectors with NaN/inf padding that test extremes or an empty batch are followed by
    a clean-padding twin; the spec's numbers do not depend on padding (clause 6.1), so the
    reference gives the twin the vector's own loss and gradient."""
    golden = {c.id: c for c in golden_cases()}
    twins = [c for c in golden.values() if c.id.endswith("/clean-padding")]
    assert twins
    assert "golden:sapo/extreme-log-ratios/token-mean/clean-padding" in golden
    for t in twins:
        orig = golden[t.id.removesuffix("/clean-padding")]
        assert "6.1" not in t.clauses
        assert all(np.all(p == 0.0) for p in _padding(t)), t.id
        assert any((~np.isfinite(p)).any() for p in _padding(orig)), t.id
        a, b = materialize(orig, "float64"), materialize(t, "float64")
        assert a.want_loss == b.want_loss or (np.isnan(a.want_loss) and np.isnan(b.want_loss)), t.id
        np.testing.assert_array_equal(a.want_grad, b.want_grad)
    # a masking vector (garbage padding is its one cause) has no twin
    assert "golden:sapo/masked-garbage/adv-seq/clean-padding" not in golden


@pytest.mark.parametrize(
    ("methods", "loss_aggs"),
    [
        (["sapo"], None),
        (None, ["token-mean"]),
        (["gspo", "gspo-token"], ["seq-mean-token-mean"]),
        (["grpo"], ["seq-mean-token-sum-norm"]),
    ],
)
def test_subset_draws_per_clause_cases_inside_the_subset(methods, loss_aggs):
    per = 4
    cases = generate_cases(seed=5, per_clause=per, methods=methods, loss_aggs=loss_aggs)
    assert cases
    for c in cases:
        assert methods is None or c.method in methods, (c.id, c.method)
        assert loss_aggs is None or c.loss_agg in loss_aggs, (c.id, c.loss_agg)
    counts: dict[str, int] = {}
    for c in cases:
        counts[c.id.split("-")[0]] = counts.get(c.id.split("-")[0], 0) + 1
    # the same count per clause as a full run
    assert counts == {cid: case_count(cid, per) for cid in counts}, counts
    # deterministic per (seed, clause, k)
    again = generate_cases(seed=5, per_clause=per, methods=methods, loss_aggs=loss_aggs)
    assert [c.id for c in again] == [c.id for c in cases]
    assert all(
        np.array_equal(a.logp, b.logp, equal_nan=True) and a.options == b.options
        for a, b in zip(cases, again)
    )


def test_subset_clauses_that_cannot_apply_yield_none():
    sapo_only = {c.id.split("-")[0] for c in generate_cases(0, 1, methods=["sapo"])}
    assert {"2.4", "2.5", "2.7", "2.8", "5.4", "2.6"}.isdisjoint(sapo_only)
    assert {"2.1", "2.2", "6.2", "5.3", "1.6"} <= sapo_only
    token_mean = {c.id.split("-")[0] for c in generate_cases(0, 1, loss_aggs=["token-mean"])}
    assert {"3.3", "3.4", "3.5", "3.6", "4.2"}.isdisjoint(token_mean)
    assert {"3.2", "6.2", "5.3"} <= token_mean


def test_subset_of_everything_is_the_full_run():
    full = generate_cases(seed=2, per_clause=2)
    same = generate_cases(
        seed=2, per_clause=2, methods=sapo_ref.METHOD_NAMES, loss_aggs=sapo_ref.LOSS_AGG_NAMES
    )
    assert [(c.id, c.options) for c in full] == [(c.id, c.options) for c in same]
    assert len(full) == sum(case_count(cid, 2) for cid in GENERATORS)


def test_subset_with_unknown_names_is_rejected():
    with pytest.raises(ValueError, match="methods"):
        generate_cases(0, 1, methods=["sapo", "ppo"])
    with pytest.raises(ValueError, match="loss_aggs"):
        generate_cases(0, 1, loss_aggs=["mean"])


def test_subset_of_advantage_shapes():
    """``advantages=["sequence"]`` (a peer that takes [N] advantages only) draws every clause
    but 1.5 (per-token advantages) with [N] advantages, the same count per clause."""
    seq = generate_cases(seed=1, per_clause=3, advantages=["sequence"])
    assert {c.advantages.ndim for c in seq} == {1}
    clauses = {c.id.split("-")[0] for c in seq}
    assert clauses == set(GENERATORS) - {"1.5"}
    assert len(seq) == sum(case_count(cid, 3) for cid in clauses)
    tok = generate_cases(seed=1, per_clause=3, advantages=["token"])
    assert {c.advantages.ndim for c in tok} == {2}
    assert len(tok) == sum(case_count(cid, 3) for cid in GENERATORS)
    with pytest.raises(ValueError, match="advantages"):
        generate_cases(0, 1, advantages=["row"])
