"""Every backend computes the reference's loss, gradient and metrics (clauses 2, 3, 7.1, C.1).

Every method x aggregation x dtype, on the same rounded inputs as the float64 reference, with
a random upstream cotangent; per-sequence and per-token advantages alternate over the grid and
every case holds an empty row and finite garbage at invalid positions. With the clause 10 terms
(weights of every layout and kind, every KL estimator, NaN/inf garbage in the terms' padding)
the reference is re-evaluated with the same rounded terms.
"""

from __future__ import annotations

import pytest
from backends._inputs import (
    DTYPES,
    KL_ESTIMATORS,
    LOSS_AGGS,
    METHODS,
    make_case,
    make_terms,
    materialized,
    materialized_with_terms,
)

from sapo_ref import spec

#: The method clauses (2.x) and aggregation clauses (3.x) the grid exercises.
GRID_CLAUSES = tuple(
    dict.fromkeys(
        [*(s.clause for s in spec.METHODS.values()), *(s.clause for s in spec.LOSS_AGGS.values())]
    )
)


@pytest.mark.clause(*GRID_CLAUSES, "1.5", "7.1", "C.1")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
@pytest.mark.parametrize("method", METHODS)
def test_matches_reference(backend, method, loss_agg, dtype):
    backend.require_dtype(dtype)
    per_token = (METHODS.index(method) + LOSS_AGGS.index(loss_agg)) % 2 == 1
    m = materialized(make_case(method, loss_agg, per_token=per_token), dtype)
    backend.assert_matches(m, backend.run(m))


#: Every method with every estimator in float64, each method once more in float32, bfloat16
#: and float16 (each JAX configuration is one more compilation); the weights alternate between
#: [N, T] floats, [N] floats, [N, T] bools and [N] integers, and are absent for one estimator.
WEIGHTS = (("token", "float"), ("row", "float"), ("token", "bool"), ("row", "int"))
TERMS_GRID = [(m, e, "float64") for m in METHODS for e in KL_ESTIMATORS] + [
    (m, KL_ESTIMATORS[(i + j) % len(KL_ESTIMATORS)], d)
    for i, m in enumerate(METHODS)
    for j, d in enumerate(DTYPES[1:])
]


@pytest.mark.clause("10.1", "10.2", "10.3", "7.1", "C.1")
@pytest.mark.parametrize(
    "method,estimator,dtype", TERMS_GRID, ids=["-".join(g) for g in TERMS_GRID]
)
def test_matches_reference_with_weights_and_kl(backend, method, estimator, dtype):
    """Loss, gradient and metrics (kl_ref/mean, weights/mean) with the clause 10 terms."""
    backend.require_dtype(dtype)
    i, j = METHODS.index(method), KL_ESTIMATORS.index(estimator)
    loss_agg = LOSS_AGGS[(i + j) % len(LOSS_AGGS)]
    layout, kind = WEIGHTS[(i + j) % len(WEIGHTS)]
    case = make_case(method, loss_agg, seed=7, per_token=(i + j) % 2 == 0)
    terms = make_terms(
        case,
        seed=i + 5 * j,
        weights=None if j == (i + 1) % len(KL_ESTIMATORS) else layout,
        weights_kind=kind,
        kl_estimator=estimator,
        kl_coef=(0.05, 0.5, 2.0, 0.0)[(i + j) % 4],
    )
    m, rounded = materialized_with_terms(case, dtype, terms)
    out = backend.run(m, options={**case.options, **rounded.options(backend, dtype)})
    backend.assert_matches(m, out)


@pytest.mark.clause("10.1", "7.1")
@pytest.mark.parametrize("layout,kind", WEIGHTS, ids=["-".join(w) for w in WEIGHTS])
def test_weights_alone_match_reference(backend, layout, kind):
    """Weights without a KL term (float64): the policy term scaled, counts unchanged."""
    case = make_case("sapo", "seq-mean-token-mean", seed=8, per_token=layout == "token")
    terms = make_terms(case, seed=1, weights=layout, weights_kind=kind, kl_estimator=None)
    m, rounded = materialized_with_terms(case, "float64", terms)
    out = backend.run(m, options={**case.options, **rounded.options(backend, "float64")})
    backend.assert_matches(m, out)
