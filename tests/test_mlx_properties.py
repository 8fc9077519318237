"""Hypothesis: sapo_mlx equals the reference in float64 on random batches, extremes included
(shapes, ragged masks, empty rows, A = 0, infinite and huge log-ratios, every method and
aggregation), at the spec's float64 tolerance."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

mx = pytest.importorskip("mlx.core")

import sapo_mlx

import sapo_ref
from sapo_ref import spec

DELTAS = st.one_of(
    st.floats(-3.0, 3.0),
    st.sampled_from([0.0, np.inf, -np.inf, 1e4, -1e4, 800.0, -800.0, 700.0, -745.0, 1e-12]),
)


@st.composite
def batches(draw):
    n, t = draw(st.integers(1, 4)), draw(st.integers(1, 6))
    delta = np.array(draw(st.lists(DELTAS, min_size=n * t, max_size=n * t))).reshape(n, t)
    mask = np.array(draw(st.lists(st.booleans(), min_size=n * t, max_size=n * t))).reshape(n, t)
    per_token = draw(st.booleans())
    adv = np.array(draw(st.lists(st.sampled_from([0.0, 1.0, -1.0, 0.37, -2.5]),
                                 min_size=n * t, max_size=n * t))).reshape(n, t)
    adv = adv if per_token else adv[:, 0]
    old = np.full((n, t), -1.5)
    return old + delta, old, adv, mask


@given(
    batch=batches(),
    method=st.sampled_from(sapo_ref.METHOD_NAMES),
    loss_agg=st.sampled_from(sapo_ref.LOSS_AGG_NAMES),
    count_empty_rows=st.booleans(),
)
def test_float64_equals_reference(batch, method, loss_agg, count_empty_rows):
    lp, old, adv, mask = batch
    opts = {"method": method, "loss_agg": loss_agg, "count_empty_rows": count_empty_rows}
    if loss_agg == "seq-mean-token-sum-norm":
        opts["norm_length"] = 5.0
    try:
        ref = sapo_ref.policy_loss(lp, old, adv, mask, **opts)
    except ValueError:  # clause 5.5: a row with +inf and -inf has no sequence ratio
        assume(False)
    x, o, a = (sapo_mlx.to_mx(v) for v in (lp, old, adv))
    (loss, metrics), grad = mx.value_and_grad(
        lambda x: sapo_mlx.policy_loss(x, o, a, mx.array(mask), **opts)
    )(x)
    tol = spec.TOLERANCES["float64"]
    for got, want, kind in ((np.array(loss), ref.loss, "value"), (np.array(grad), ref.grad, "grad")):
        want = np.asarray(want)
        fin = np.isfinite(want)
        assert np.array_equal(got[~fin], want[~fin])
        assert np.all(np.isfinite(got[fin]))
        scale = max(1.0, np.max(np.abs(want[fin]), initial=0.0))
        assert np.all(np.abs(got[fin] - want[fin]) <= tol[kind].atol * scale + tol[kind].rtol * np.abs(want[fin]))
    for key, want in ref.metrics.items():
        got = float(np.array(metrics[key]))
        if np.isfinite(want):
            assert abs(got - want) <= tol["value"].atol * max(1.0, abs(want)) + tol["value"].rtol * abs(want), key
        else:
            assert got == want, key
