"""Masking by selection: garbage at invalid positions changes no output bit (clause 6.1).

The same case is run twice on a backend: with finite garbage at invalid positions, then with
NaN, +-inf and +-1e30 there (in ``logp``, ``old_logp`` and per-token ``advantages``; in the
clause 10 terms: [N, T] ``weights`` and ``ref_logp``, an empty row's [N] weight). Loss,
gradient and metrics must be bit-identical, and the gradient exactly 0 at invalid positions.
"""

from __future__ import annotations

import numpy as np
import pytest
from backends._inputs import (
    DTYPES,
    KL_ESTIMATORS,
    LOSS_AGGS,
    METHODS,
    Terms,
    make_case,
    make_terms,
    materialized,
    materialized_with_terms,
    with_inputs,
)

GARBAGE = np.array([np.nan, np.inf, -np.inf, 1e30, -1e30])


def _bits(out) -> dict[str, bytes]:
    got = {
        "loss": np.float64(out.loss).tobytes(),
        "grad": np.asarray(out.grad, np.float64).tobytes(),
    }
    for k, v in (out.metrics or {}).items():
        got[f"metrics[{k}]"] = np.float64(v).tobytes()
    return got


@pytest.mark.clause("6.1", "1.5")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", METHODS)
def test_garbage_at_invalid_positions_changes_no_bit(backend, method, dtype):
    backend.require_dtype(dtype)
    loss_agg = LOSS_AGGS[METHODS.index(method) % len(LOSS_AGGS)]
    case = make_case(method, loss_agg, seed=1, per_token=True, empty=True)
    rng = np.random.default_rng(METHODS.index(method))
    invalid = ~case.mask

    def soiled(x):
        return np.where(invalid, rng.choice(GARBAGE, size=x.shape), x)

    dirty = with_inputs(
        case,
        logp=soiled(case.logp),
        old_logp=soiled(case.old_logp),
        advantages=soiled(case.advantages),
    )
    clean_m, dirty_m = materialized(case, dtype), materialized(dirty, dtype)
    clean, messy = backend.run(clean_m, cotangent=1.25), backend.run(dirty_m, cotangent=1.25)
    a, b = _bits(clean), _bits(messy)
    changed = [k for k in a if a[k] != b.get(k)]
    assert not changed, f"{backend.name} {dtype}: garbage at invalid positions changed {changed}"
    assert np.all(messy.grad[invalid] == 0.0), "gradient not exactly 0 at invalid positions"
    assert np.all(np.isfinite(messy.grad)) and np.isfinite(messy.loss)


@pytest.mark.clause("6.1", "10.1", "10.2")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", METHODS)
def test_garbage_in_the_terms_changes_no_bit(backend, method, dtype):
    """NaN, +-inf, -1 and 1e30 in the padding of [N, T] weights and ref_logp, and in the [N]
    weight of an empty row: loss, gradient and metrics bit-identical, the gradient 0 there."""
    backend.require_dtype(dtype)
    i = METHODS.index(method)
    loss_agg = LOSS_AGGS[i % len(LOSS_AGGS)]
    case = make_case(method, loss_agg, seed=12, per_token=True, empty=True)
    empty = case.mask.copy()
    empty[-1] = False  # an empty row, whose [N] weight may be anything
    case = with_inputs(case, mask=empty)
    layout = "token" if i % 2 == 0 else "row"
    estimator = KL_ESTIMATORS[i % len(KL_ESTIMATORS)]
    kw = dict(seed=i, weights=layout, kl_estimator=estimator, kl_coef=0.25)
    clean = make_terms(case, **kw, garbage=False)
    rng = np.random.default_rng([i, 13])
    pool = np.array([np.nan, np.inf, -np.inf, -1.0, 1e30])
    w = clean.weights.copy()
    if layout == "token":
        w = np.where(case.mask, w, rng.choice(pool, size=w.shape))
    else:
        w[~case.mask.any(axis=1)] = np.nan
    ref = np.where(case.mask, clean.ref_logp, rng.choice(pool, size=case.mask.shape))
    dirty = Terms(w, ref, clean.kl)
    runs = []
    for terms in (clean, dirty):
        m, rounded = materialized_with_terms(case, dtype, terms)
        runs.append(
            backend.run(
                m, options={**case.options, **rounded.options(backend, dtype)}, cotangent=1.25
            )
        )
    a, b = _bits(runs[0]), _bits(runs[1])
    changed = [k for k in a if a[k] != b.get(k)]
    assert not changed, f"{backend.name} {dtype}: garbage in the terms' padding changed {changed}"
    assert np.all(runs[1].grad[~case.mask] == 0.0), "gradient not exactly 0 at invalid positions"
    assert np.all(np.isfinite(runs[1].grad)) and np.isfinite(runs[1].loss)
