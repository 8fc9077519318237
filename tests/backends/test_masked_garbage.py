"""Masking by selection: garbage at invalid positions changes no output bit (clause 6.1).

The same case is run twice on a backend: with finite garbage at invalid positions, then with
NaN, +-inf and +-1e30 there (in ``logp``, ``old_logp`` and per-token ``advantages``). Loss,
gradient and metrics must be bit-identical, and the gradient exactly 0 at invalid positions.
"""

from __future__ import annotations

import numpy as np
import pytest
from backends._inputs import DTYPES, LOSS_AGGS, METHODS, make_case, materialized, with_inputs

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
