"""Every backend computes the reference's loss, gradient and metrics (clauses 2, 3, 7.1, C.1).

Every method x aggregation x dtype, on the same rounded inputs as the float64 reference, with
a random upstream cotangent; per-sequence and per-token advantages alternate over the grid and
every case holds an empty row and finite garbage at invalid positions.
"""

from __future__ import annotations

import pytest
from backends._inputs import DTYPES, LOSS_AGGS, METHODS, make_case, materialized

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
