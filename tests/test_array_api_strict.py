"""The reference runs on array_api_strict: its formulas use nothing outside the array API standard.

array_api_strict implements the standard and nothing else (no NumPy extras, no implicit
conversions), so any reliance on NumPy behaviour beyond the standard fails here. Results must
match the NumPy reference.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from sapo_conformance.compare import compare

import sapo_ref
from sapo_ref import spec

xps = pytest.importorskip("array_api_strict")

F64 = spec.TOLERANCES["float64"]


def batch(seed: int, per_token: bool, extreme: bool):
    """Ragged masks with holes and an empty row; optionally +-inf and huge log-ratios."""
    rng = np.random.default_rng(seed)
    n, t = 5, 7
    old = np.log(rng.uniform(0.05, 1.0, size=(n, t)))
    logp = old + rng.normal(scale=0.3, size=(n, t))
    mask = rng.random((n, t)) < 0.7
    mask[1] = False  # an empty row
    mask[2, 0] = True
    if extreme:
        logp[2, 0] = math.inf  # one sign of infinity per row: valid for sequence methods too
        logp[3, mask[3].argmax()] = old[3, mask[3].argmax()] - 900.0
        old[4, 0], mask[4, 0] = -math.inf, True
    logp[~mask] = rng.choice([math.nan, math.inf, -1e30], size=int((~mask).sum()))  # garbage
    adv = rng.normal(size=(n, t) if per_token else n)
    return logp, old, adv, mask


def to_strict(*arrays):
    return tuple(xps.asarray(a) for a in arrays)


def to_numpy(x) -> np.ndarray:
    return np.from_dlpack(x)


def assert_matches(strict_res, numpy_res):
    """Loss, gradient and metrics of the strict run against the NumPy run (clause C.1)."""
    assert isinstance(strict_res.grad, type(xps.asarray(0.0)))  # stays in the caller's namespace
    assert strict_res.metrics.keys() == numpy_res.metrics.keys()
    keys = list(numpy_res.metrics)
    checks = [
        compare("loss", strict_res.loss, numpy_res.loss, F64["value"]),
        compare("grad", to_numpy(strict_res.grad), numpy_res.grad, F64["grad"]),
        compare(
            "metrics",
            np.array([strict_res.metrics[k] for k in keys]),
            np.array([numpy_res.metrics[k] for k in keys]),
            F64["value"],
        ),
    ]
    bad = [c.message for c in checks if not c.ok]
    assert not bad, "; ".join(bad)


@pytest.mark.clause("C.1", "5.3", "5.4", "6.1")
@pytest.mark.parametrize("extreme", [False, True], ids=["moderate", "extreme"])
@pytest.mark.parametrize("per_token", [False, True], ids=["adv[N]", "adv[N,T]"])
@pytest.mark.parametrize("loss_agg", list(spec.LOSS_AGGS))
@pytest.mark.parametrize("method", list(spec.METHODS))
def test_policy_loss_on_array_api_strict(method, loss_agg, per_token, extreme):
    seed = list(spec.METHODS).index(method) * 10 + list(spec.LOSS_AGGS).index(loss_agg)
    logp, old, adv, mask = batch(seed, per_token, extreme)
    kw = {"method": method, "loss_agg": loss_agg}
    if "norm_length" in spec.LOSS_AGGS[loss_agg].requires:
        kw["norm_length"] = 11.0
    if spec.METHODS[method].gate == "clip":
        kw["dual_clip"] = 3.0  # keeps extreme clipped cases finite, exercises the dual branch
    want = sapo_ref.policy_loss(logp, old, adv, mask, **kw)
    got = sapo_ref.policy_loss(*to_strict(logp, old, adv, mask), **kw)
    assert_matches(got, want)


@pytest.mark.clause("3.8")
@pytest.mark.parametrize("method", list(spec.METHODS))
def test_shard_with_normalizer_on_array_api_strict(method):
    logp, old, adv, mask = batch(7, False, False)
    norm = sapo_ref.normalizer(xps.asarray(mask), count_empty_rows=True)
    want = sapo_ref.policy_loss(
        logp[:2],
        old[:2],
        adv[:2],
        mask[:2],
        method=method,
        normalizer=sapo_ref.normalizer(mask, count_empty_rows=True),
    )
    got = sapo_ref.policy_loss(
        *to_strict(logp[:2], old[:2], adv[:2], mask[:2]), method=method, normalizer=norm
    )
    assert_matches(got, want)


def test_int_mask_on_array_api_strict():
    logp, old, adv, mask = batch(3, True, False)
    want = sapo_ref.policy_loss(logp, old, adv, mask)
    got = sapo_ref.policy_loss(*to_strict(logp, old, adv, mask.astype(np.int64)))
    assert_matches(got, want)


@pytest.mark.clause("9.1", "9.2")
def test_tools_on_array_api_strict():
    """group_advantages, sequence_gate_diagnostics and the gate functions are standard too."""
    rewards = np.array([1.0, 0.0, 0.5, 2.0, 2.0, 2.0])
    logp, old, _, mask = batch(5, False, False)
    logp = np.where(mask, logp, 0.0)
    d_np = sapo_ref.sequence_gate_diagnostics(logp, old, mask, 1.5)
    d_xs = sapo_ref.sequence_gate_diagnostics(*to_strict(logp, old, mask), 1.5)
    r = np.array([0.0, 0.5, 1.0, 3.0, math.inf])
    pairs = [
        (
            "group_advantages",
            sapo_ref.group_advantages(xps.asarray(rewards), 3),
            sapo_ref.group_advantages(rewards, 3),
        ),
        *[
            (f, getattr(d_xs, f), getattr(d_np, f))
            for f in ("var", "gap", "bound", "mean_log_ratio")
        ],
        *[
            (fn.__name__, fn(xps.asarray(r), 1.0), fn(r, 1.0))
            for fn in (sapo_ref.sapo_gate, sapo_ref.sapo_weight)
        ],
    ]
    bad = [
        c.message
        for n, got, want in pairs
        if not (c := compare(n, to_numpy(got), want, F64["value"])).ok
    ]
    assert not bad, "; ".join(bad)


@pytest.mark.clause("8.5")
def test_data_errors_on_array_api_strict():
    """The data checks (clause 8.5, 8.6, 5.5) work on strict arrays and name the position."""
    logp, old, adv, mask = batch(1, False, False)
    adv[2] = math.nan
    with pytest.raises(ValueError, match="advantages"):
        sapo_ref.policy_loss(*to_strict(logp, old, adv, mask))


@pytest.mark.parametrize("method", list(spec.METHODS))
def test_no_data_dependent_shapes_and_oldest_standard(method):
    """The reference needs neither boolean indexing nor data-dependent shapes (what jit-compiled
    adapters calling ``sapo_ref.evaluate`` require) and only the 2023.12 standard
    (``maximum``/``minimum`` are 2023.12 functions)."""
    logp, old, adv, mask = batch(11, True, True)
    kw = {"method": method}
    if spec.METHODS[method].gate == "clip":
        kw["dual_clip"] = 3.0
    want = sapo_ref.policy_loss(logp, old, adv, mask, **kw)
    with xps.ArrayAPIStrictFlags(
        api_version="2023.12", boolean_indexing=False, data_dependent_shapes=False
    ):
        got = sapo_ref.policy_loss(*to_strict(logp, old, adv, mask), **kw)
        assert_matches(got, want)


def terms(seed: int, mask: np.ndarray, logp: np.ndarray, weights_kind: str):
    """Clause 10 inputs: weights ([N] float, [N, T] float, bool or int) and ref_logp near logp,
    one ref_logp = -inf at a valid token, garbage at invalid slots."""
    rng = np.random.default_rng(seed)
    n, t = mask.shape
    weights = {
        "row": rng.uniform(0.0, 2.0, n),
        "token": np.where(mask, rng.uniform(0.0, 2.0, (n, t)), np.nan),
        "bool": rng.random((n, t)) < 0.7,
        "int": rng.integers(0, 3, (n, t)),
    }[weights_kind]
    ref = np.where(mask & np.isfinite(logp), logp + rng.normal(scale=0.5, size=(n, t)), np.nan)
    ref[2, 0] = -math.inf  # u = -inf: k = inf (low-var-k3: 10)
    return weights, ref


@pytest.mark.clause("C.1", "10.1", "10.2", "10.3")
@pytest.mark.parametrize("weights_kind", ["row", "token", "bool", "int"])
@pytest.mark.parametrize("kl_estimator", list(spec.KL_ESTIMATORS))
@pytest.mark.parametrize("method", list(spec.METHODS))
def test_weights_and_kl_on_array_api_strict(method, kl_estimator, weights_kind):
    """The clause 10 keywords on strict arrays: loss, gradient and metrics as NumPy's."""
    seed = list(spec.METHODS).index(method) * 10 + list(spec.KL_ESTIMATORS).index(kl_estimator)
    logp, old, adv, mask = batch(seed, per_token=seed % 2 == 0, extreme=False)
    weights, ref = terms(seed, mask, logp, weights_kind)
    agg = list(spec.LOSS_AGGS)[seed % len(spec.LOSS_AGGS)]
    kw = {"method": method, "loss_agg": agg, "kl_coef": 0.3, "kl_estimator": kl_estimator}
    if "norm_length" in spec.LOSS_AGGS[agg].requires:
        kw["norm_length"] = 11.0
    want = sapo_ref.policy_loss(logp, old, adv, mask, weights=weights, ref_logp=ref, **kw)
    got = sapo_ref.policy_loss(
        *to_strict(logp, old, adv, mask), weights=xps.asarray(weights),
        ref_logp=xps.asarray(ref), **kw,
    )  # fmt: skip
    assert_matches(got, want)
    assert {"kl_ref/mean", "weights/mean"} <= set(got.metrics)


@pytest.mark.clause("10.4")
def test_term_errors_on_array_api_strict():
    """Clause 10.4 data checks on strict arrays name the input and the position."""
    logp, old, adv, mask = batch(2, False, False)
    weights = np.ones(mask.shape)
    i, t = np.argwhere(mask)[0]
    weights[i, t] = -1.0
    with pytest.raises(ValueError, match="weights"):
        sapo_ref.policy_loss(*to_strict(logp, old, adv, mask), weights=xps.asarray(weights))
    ref = np.where(mask, logp, 0.0)
    ref[i, t] = math.nan
    with pytest.raises(ValueError, match="ref_logp"):
        sapo_ref.policy_loss(
            *to_strict(logp, old, adv, mask), ref_logp=xps.asarray(ref), kl_coef=0.1
        )


def test_terms_without_data_dependent_shapes():
    """The added terms need neither boolean indexing nor data-dependent shapes either."""
    logp, old, adv, mask = batch(13, True, True)
    weights, ref = terms(13, mask, logp, "token")
    kw = {"method": "gspo", "dual_clip": 3.0, "kl_coef": 0.5, "kl_estimator": "low-var-k3"}
    want = sapo_ref.policy_loss(logp, old, adv, mask, weights=weights, ref_logp=ref, **kw)
    with xps.ArrayAPIStrictFlags(
        api_version="2023.12", boolean_indexing=False, data_dependent_shapes=False
    ):
        got = sapo_ref.policy_loss(
            *to_strict(logp, old, adv, mask), weights=xps.asarray(weights),
            ref_logp=xps.asarray(ref), **kw,
        )  # fmt: skip
        assert_matches(got, want)
