"""Properties of the reference (math.md "Properties worth testing", spec clauses 2, 3, 5, 6, 9.2).

Every assertion compares the reference with something independent of it: a closed form
evaluated with :mod:`math`, a Newton iteration, an algebraic identity between two calls, or the
same call on transformed input. Every hypothesis draw is labelled, and a failing example prints
a runnable snippet (``note``) that reproduces the failing call.
"""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pytest
from hypothesis import assume, given, note
from hypothesis import strategies as st
from sapo_conformance.compare import compare
from test_vs_mpmath import reference_grad_ref_logp

import sapo_ref
from sapo_ref import spec
from sapo_ref.gates import logistic_and_weight, sapo_parts

METHODS = sapo_ref.METHOD_NAMES
LOSS_AGGS = sapo_ref.LOSS_AGG_NAMES
SOFT = tuple(m for m in METHODS if spec.METHODS[m].gate == "soft")
TAU = spec.DOMAINS["tau_pos"]
F64 = spec.TOLERANCES["float64"]
GARBAGE = (math.nan, math.inf, -math.inf, 1e30, -1e30)
#: Strict xfails until the reference catches up (tests/conftest.py); findings-vectors.md.
PENDING: dict[str, str] = {}


# --------------------------------------------------------------------------- repro snippets
def _literal(x: np.ndarray) -> str:
    body = repr(np.asarray(x).tolist())
    body = re.sub(r"\bnan\b", "np.nan", body)
    body = re.sub(r"(?<![\w.])inf\b", "np.inf", body)
    return f"np.array({body}, dtype=np.{np.asarray(x).dtype})"


def repro(logp, old_logp, adv, mask, **kw) -> str:
    """A runnable snippet reproducing one ``policy_loss`` call; recorded with ``note``."""
    args = ", ".join(f"{k}={v!r}" for k, v in kw.items())
    snippet = (
        "import numpy as np, sapo_ref\n"
        f"logp = {_literal(logp)}\nold_logp = {_literal(old_logp)}\n"
        f"advantages = {_literal(adv)}\nmask = {_literal(mask)}\n"
        f"res = sapo_ref.policy_loss(logp, old_logp, advantages, mask{', ' if args else ''}{args})"
    )
    note("Reproduce with:\n" + snippet)
    return snippet


def call(logp, old_logp, adv, mask, **kw) -> sapo_ref.PolicyLossResult:
    repro(logp, old_logp, adv, mask, **kw)
    return sapo_ref.policy_loss(logp, old_logp, adv, mask, **kw)


def agg_kwargs(loss_agg: str, norm_length: float = 7.0) -> dict:
    kw = {"loss_agg": loss_agg}
    if "norm_length" in spec.LOSS_AGGS[loss_agg].requires:
        kw["norm_length"] = norm_length
    return kw


def bits(x) -> bytes:
    return np.asarray(x, dtype=np.float64).tobytes()


def assert_close(got, want, tol=F64["value"]):
    """The clause C.1 comparison (the suite's one helper), as an assertion."""
    c = compare("value", got, want, tol)
    assert c.ok, c.message


# --------------------------------------------------------------------------- strategies
@st.composite
def batches(draw, max_rows=5, max_len=6, max_abs_delta=2.0, per_token=None, empty_rows=True):
    """(logp, old_logp, advantages, mask): float64, ragged masks, optional empty rows."""
    n = draw(st.integers(1, max_rows), label="N")
    t = draw(st.integers(1, max_len), label="T")
    seed = draw(st.integers(0, 2**32 - 1), label="seed")
    rng = np.random.default_rng(seed)
    old = np.log(rng.uniform(0.05, 1.0, size=(n, t)))
    delta = rng.uniform(-max_abs_delta, max_abs_delta, size=(n, t))
    logp = old + delta
    lengths = rng.integers(0 if empty_rows else 1, t + 1, size=n)
    mask = np.arange(t)[None, :] < lengths[:, None]
    if draw(st.booleans(), label="shuffle_mask_columns"):  # holes inside rows, not only padding
        mask = rng.permuted(mask, axis=1)
    if per_token is None:
        per_token = draw(st.booleans(), label="per_token_advantages")
    shape = (n, t) if per_token else (n,)
    adv = rng.normal(size=shape)
    if draw(st.booleans(), label="some_zero_advantages"):
        adv = np.where(rng.random(shape) < 0.2, 0.0, adv)
    return logp, old, adv, mask


# --------------------------------------------------------------------------- the gate, scalar
def sech2(x: float) -> float:
    if abs(x) > 300:  # cosh(x)**2 would overflow; there sech^2 = 4 e^{-2|x|} to float64 precision
        return 4.0 * math.exp(-2.0 * abs(x))
    return 1.0 / math.cosh(x) ** 2


@pytest.mark.clause("2.2")
@given(data=st.data())
def test_weight_in_unit_interval_max_only_at_one(data):
    """math.md 1: w in (0, 1], w = 1 exactly at r = 1 for every tau, w < 1 elsewhere."""
    tau = data.draw(st.floats(0.05, 20.0), label="tau")
    r = data.draw(st.floats(0.0, 50.0), label="r")
    note(f"sapo_ref.sapo_weight(np.array([{r!r}]), {tau!r})")
    w = float(sapo_ref.sapo_weight(np.array([r]), tau)[0])
    assert 0.0 <= w <= 1.0
    if tau * abs(r - 1.0) < 700:  # sech^2 is representable (> 0) there
        assert w > 0.0
    if tau * abs(r - 1.0) > 1e-6:
        assert w < 1.0
    assert float(sapo_ref.sapo_weight(np.array([1.0]), tau)[0]) == 1.0
    want = sech2(tau * (r - 1.0) / 2.0)
    assert math.isclose(w, want, rel_tol=1e-12, abs_tol=1e-300)


@pytest.mark.clause("2.2")
@given(data=st.data())
def test_weight_symmetric_in_r_minus_one(data):
    """math.md 1: w(1 + d) = w(1 - d): bitwise in x = tau (r - 1), to rounding through log r."""
    tau = data.draw(st.floats(0.05, 20.0), label="tau")
    d = data.draw(st.floats(0.0, 1.0), label="d")
    x = tau * d
    _, w = logistic_and_weight(np.array([x, -x]))
    assert w[0] == w[1]
    wr = sapo_ref.sapo_weight(np.array([1.0 + d, 1.0 - d]), tau)
    # log(1 +- d) then expm1 round-trips r - 1 to a few ulps of r; w' / w <= tau bounds the effect.
    assert math.isclose(wr[0], wr[1], rel_tol=1e-13 * (1 + tau), abs_tol=1e-300)


@pytest.mark.clause("2.1", "2.2", "5.3")
@given(data=st.data())
def test_limits_r_to_infinity(data):
    """math.md 2: w ~ 4 exp(-tau (r - 1)) -> 0, w r -> 0, f -> 4 / tau; exact at delta = +inf."""
    tau = data.draw(st.floats(0.05, 20.0), label="tau")
    x = data.draw(st.floats(20.0, 600.0), label="x = tau (r - 1)")
    r = 1.0 + x / tau
    p = sapo_parts(np.log(np.array([r])), tau)
    # x is recovered from log r to a few ulps of x: relative error <= ~10 x eps in w.
    assert math.isclose(float(p.w[0]), sech2(x / 2.0), rel_tol=1e-11)
    # sech^2(x/2) = 4 e^-x / (1 + e^-x)^2: the asymptote's relative error is below 2 e^-x.
    asymptote = 2.0 * math.exp(-x) + 1e-11
    assert math.isclose(float(p.w[0]), 4.0 * math.exp(-x), rel_tol=asymptote)
    assert math.isclose(float(p.dlog[0]), 4.0 * r * math.exp(-x), rel_tol=asymptote)
    at_inf = sapo_parts(np.array([math.inf]), tau)
    assert (float(at_inf.w[0]), float(at_inf.dlog[0])) == (0.0, 0.0)
    assert float(at_inf.f[0]) == 4.0 / tau


@pytest.mark.clause("2.2")
@given(data=st.data())
def test_limits_r_to_zero(data):
    """math.md 2: as r -> 0+, w -> sech^2(tau / 2) (not 0) and w r -> 0 linearly."""
    tau = data.draw(st.floats(0.05, 20.0), label="tau")
    log_r = data.draw(st.floats(-600.0, -40.0), label="log r")  # w r stays normal
    limit = sech2(tau / 2.0)
    p = sapo_parts(np.array([log_r, -math.inf]), tau)
    assert math.isclose(float(p.w[1]), limit, rel_tol=1e-14)
    assert math.isclose(float(p.w[0]), limit, rel_tol=1e-13)
    assert math.isclose(float(p.dlog[0]) / math.exp(log_r), limit, rel_tol=1e-13)
    assert float(p.dlog[1]) == 0.0
    assert math.isclose(float(p.f[1]), 4.0 / tau / (1.0 + math.exp(tau)), rel_tol=1e-14)


def test_limit_r_to_zero_value_at_paper_tau():
    """math.md 2 states sech^2(1/2) is about 0.786 for tau = 1: check the statement itself."""
    assert round(sech2(0.5), 3) == 0.786
    assert round(float(sapo_parts(np.array([-math.inf]), 1.0).w[0]), 3) == 0.786


def _argmax_w_r(tau: float) -> float:
    """Independent: Newton on h(r) = 1 - r tau tanh(tau (r - 1) / 2), the zero of d(w r)/dr.

    d(w r)/dr = sech^2(u) (1 - r tau tanh u), u = tau (r - 1) / 2; the zero is unique and lies in
    r > 1 because r tanh(u) is negative for r < 1 and strictly increasing for r > 1.
    """
    r = 1.0 + 2.0 / tau  # right of the root's neighbourhood; h is concave there
    for _ in range(200):
        u = tau * (r - 1.0) / 2.0
        h = 1.0 - r * tau * math.tanh(u)
        dh = -tau * math.tanh(u) - r * tau * tau / 2.0 * sech2(u)
        step = h / dh
        r = max(r - step, 1.0 + 1e-12)
        if abs(step) < 1e-15 * r:
            break
    return r


def test_w_r_maximum_at_paper_tau():
    """math.md 3: max of w r is about 1.5747 at r about 2.060 for tau = 1 (independent Newton)."""
    r_star = _argmax_w_r(1.0)
    peak = r_star * sech2((r_star - 1.0) / 2.0)
    assert round(r_star, 3) == 2.060 and round(peak, 4) == 1.5747
    got = sapo_parts(np.log(np.array([r_star])), 1.0).dlog[0]
    assert math.isclose(float(got), peak, rel_tol=1e-13)


@pytest.mark.clause("2.2")
@given(data=st.data())
def test_w_r_unimodal(data):
    """math.md 3: w r increases up to the Newton maximiser and decreases after it, for any tau."""
    tau = data.draw(st.floats(0.05, 20.0), label="tau")
    r_star = _argmax_w_r(tau)
    note(f"tau={tau!r}, Newton argmax r*={r_star!r}")
    r = np.concatenate(
        [np.linspace(1e-6, r_star, 800), np.linspace(r_star, r_star + 40.0 / tau, 800)[1:]]
    )
    wr = sapo_parts(np.log(r), tau).dlog
    k = 799  # index of r_star
    assert np.all(np.diff(wr[: k - 1]) > 0)
    assert np.all(np.diff(wr[k + 1 :]) < 0)
    assert wr[k] >= wr.max() * (1 - 1e-15)


def test_soft_trust_region_width_at_paper_tau():
    """math.md 9 at tau = 1: w(2) = 0.79, w(3) = 0.42, and the coefficient w r on grad log pi
    exceeds its on-policy value 1 exactly on (1, r1). math.md puts r1 at about 3.6; the
    bisection below gives r1 = 3.466, which is what is tested."""
    assert round(float(sapo_ref.sapo_weight(np.array([2.0]), 1.0)[0]), 2) == 0.79
    assert round(float(sapo_ref.sapo_weight(np.array([3.0]), 1.0)[0]), 2) == 0.42

    def excess(r):
        return r * sech2((r - 1.0) / 2.0) - 1.0

    lo, hi = _argmax_w_r(1.0), 10.0  # w r - 1 > 0 at the maximiser, < 0 at 10
    for _ in range(100):
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if excess(mid) > 0 else (lo, mid)
    r1 = lo
    assert round(r1, 2) == 3.47
    r = np.linspace(1.0 + 1e-9, r1 * (1 - 1e-9), 1000)
    assert np.all(sapo_parts(np.log(r), 1.0).dlog > 1.0)
    beyond = np.linspace(r1 * (1 + 1e-9), 50.0, 1000)
    assert np.all(sapo_parts(np.log(beyond), 1.0).dlog < 1.0)


@pytest.mark.clause("2.1")
@given(data=st.data())
def test_f_increasing_with_range(data):
    """math.md 4: f strictly increasing on r > 0 with range ((4/tau) sigmoid(-tau), 4/tau)."""
    tau = data.draw(st.floats(0.05, 20.0), label="tau")
    r1 = data.draw(st.floats(0.0, 1e6), label="r1")
    r2 = data.draw(st.floats(0.0, 1e6), label="r2")
    assume(r1 != r2)
    lo, hi = sorted((r1, r2))
    f_lo, f_hi = sapo_ref.sapo_gate(np.array([lo, hi]), tau)
    bottom = 4.0 / tau / (1.0 + math.exp(tau))
    top = 4.0 / tau
    assert f_lo <= f_hi
    # Strict where the difference is representable: both ends away from the float plateaus.
    # (differences of r below ~1e-15 * max(1, r) vanish in tau (r - 1)).
    if tau * (hi - 1.0) < 30 and tau * (1.0 - lo) < 30 and (hi - lo) > 1e-9 * max(1.0, hi):
        assert f_lo < f_hi
    for v in (f_lo, f_hi):
        assert bottom * (1 - 1e-15) <= v <= top
    ends = sapo_parts(np.array([-math.inf, math.inf]), tau).f
    assert math.isclose(float(ends[0]), bottom, rel_tol=1e-14) and float(ends[1]) == top
    if lo > 1e-9 and tau * (hi - 1.0) < 30:
        assert bottom < f_lo and f_hi < top


@pytest.mark.clause("2.1")
@given(data=st.data())
def test_small_tau_expansion(data):
    """math.md 5: f = 2/tau + (r - 1) + O(tau^2); the alternating sigmoid series bounds the rest
    by tau^2 |r - 1|^3 / 12."""
    tau = data.draw(st.floats(1e-3, 0.1), label="tau")
    r = data.draw(st.floats(0.0, 3.0), label="r")
    f = float(sapo_ref.sapo_gate(np.array([r]), tau)[0])
    rest = abs(f - 2.0 / tau - (r - 1.0))
    rounding = 8 * np.finfo(float).eps * (4.0 / tau)
    assert rest <= tau * tau * abs(r - 1.0) ** 3 / 12.0 + rounding


@pytest.mark.clause("2.2")
@given(data=st.data())
def test_large_tau_is_not_the_clip(data):
    """math.md 5: tau -> inf gives w -> 1[r = 1], not GRPO's band: w vanishes inside the band."""
    r = data.draw(st.floats(1.01, 1.19), label="r inside GRPO's band (eps = 0.2)")
    w = float(sapo_ref.sapo_weight(np.array([r]), TAU.max)[0])
    assert w == 0.0 and float(sapo_ref.sapo_weight(np.array([1.0]), TAU.max)[0]) == 1.0


@pytest.mark.clause("1.6", "2.2")
@given(data=st.data())
def test_hotter_negative_temperature_damps_more(data):
    """math.md 7: tau_neg > tau_pos implies w(r; tau_neg) < w(r; tau_pos) for r != 1."""
    tau_pos = data.draw(st.floats(0.05, 5.0), label="tau_pos")
    tau_neg = tau_pos * (1.0 + data.draw(st.floats(0.01, 1.0), label="relative excess"))
    r = data.draw(st.floats(0.0, 10.0), label="r")
    assume(abs(r - 1.0) > 1e-3 and tau_neg * abs(r - 1.0) < 30)
    w_pos = float(sapo_ref.sapo_weight(np.array([r]), tau_pos)[0])
    w_neg = float(sapo_ref.sapo_weight(np.array([r]), tau_neg)[0])
    assert w_neg < w_pos


# --------------------------------------------------------------------------- the loss
def unclipped_grad(adv, mask, loss_agg, count_empty_rows=False, norm_length=7.0):
    """Independent on-policy gradient: -m A rho / D written from clause 3 directly."""
    m = mask.astype(bool)
    a = np.broadcast_to(adv[:, None], m.shape) if adv.ndim == 1 else adv
    lengths = m.sum(axis=1)
    rows = m.shape[0] if count_empty_rows else int((lengths > 0).sum())
    den = {
        "token-mean": m.sum(),
        "seq-mean-token-mean": rows,
        "seq-mean-token-sum": rows,
        "seq-mean-token-sum-norm": rows * norm_length,
    }[loss_agg]
    rho = 1.0 / np.maximum(lengths, 1) if loss_agg == "seq-mean-token-mean" else np.ones(len(m))
    out = np.zeros(m.shape)
    if den > 0:
        out[m] = -(a * rho[:, None] / den)[m]
    return out


def method_params(data, method: str) -> dict:
    """Parameters of ``method`` drawn over their whole spec domain (dual clip on or off)."""
    out = {}
    for name in spec.METHODS[method].params:
        d = spec.DOMAINS[name]
        if name == "dual_clip" and not data.draw(st.booleans(), label="dual_clip on"):
            continue
        out[name] = data.draw(st.floats(d.min, d.max, exclude_min=d.min_open), label=name)
    return out


@pytest.mark.clause("5.2")
@pytest.mark.parametrize("method", METHODS)
@given(data=st.data())
def test_on_policy_gradient_is_unclipped(method, data):
    """Clause 5.2: at delta = 0 the gradient is the unclipped -c A for every parameter value:
    SAPO's w = 1 at r = 1 for every tau, and r = 1 is inside every clip band."""
    logp, _, adv, mask = data.draw(batches(), label="batch")
    agg = data.draw(st.sampled_from(LOSS_AGGS), label="loss_agg")
    cer = data.draw(st.booleans(), label="count_empty_rows")
    res = call(
        logp,
        logp.copy(),
        adv,
        mask,
        method=method,
        count_empty_rows=cer,
        **method_params(data, method),
        **agg_kwargs(agg),
    )
    want = unclipped_grad(adv, mask, agg, cer)
    if spec.METHODS[method].ratio == "sequence" and adv.ndim == 2:  # spread over the row
        lengths = np.maximum(mask.sum(axis=1, keepdims=True), 1)
        want = np.where(mask, want.sum(axis=1, keepdims=True) / lengths, 0.0)
    assert_close(res.grad, want, F64["grad"])


@pytest.mark.clause("2.2", "2.3")
@pytest.mark.parametrize("soft,hard", [("sapo", "grpo"), ("sapo-seq", "gspo")])
@given(data=st.data())
def test_small_tau_gradient_tends_to_unclipped(soft, hard, data):
    """math.md 5: as tau -> 0 SAPO's gradient tends to the unclipped objective's, here the clip
    method with the widest band of the spec's domain (no clip for ratios in it).
    1 - w <= tau^2 (r - 1)^2 / 4 bounds the relative gap."""
    logp, old, adv, mask = data.draw(batches(max_abs_delta=2.0), label="batch")
    agg = data.draw(st.sampled_from(LOSS_AGGS), label="loss_agg")
    tau = data.draw(st.floats(TAU.min, 1e-3), label="tau")
    eps = spec.DOMAINS["eps_high"].max
    a = call(logp, old, adv, mask, method=soft, tau_pos=tau, tau_neg=tau, **agg_kwargs(agg))
    b = call(logp, old, adv, mask, method=hard, eps_low=eps, eps_high=eps, **agg_kwargs(agg))
    gap = tau * tau * math.expm1(2.0) ** 2 / 4.0
    np.testing.assert_allclose(a.grad, b.grad, rtol=gap + 1e-13, atol=1e-15)


@pytest.mark.clause("9.2")
@given(data=st.data())
def test_sequence_gate_bound(data):
    """Clause 9.2 / eq. 21: D_i <= tau^2 / 4 Var_i, Var_i the population variance of z."""
    logp, old, _, mask = data.draw(batches(max_abs_delta=3.0), label="batch")
    tau = data.draw(st.floats(0.01, 10.0), label="tau")
    args = f"{_literal(logp)}, {_literal(old)}, {_literal(mask)}, {tau!r}"
    note(f"sapo_ref.sequence_gate_diagnostics({args})")
    d = sapo_ref.sequence_gate_diagnostics(logp, old, mask, tau)
    for i in range(mask.shape[0]):
        z = (logp - old)[i][mask[i]]
        var = float(np.var(z)) if z.size else 0.0
        assert math.isclose(float(d.var[i]), var, rel_tol=1e-12, abs_tol=1e-15)
        assert float(d.gap[i]) <= tau * tau / 4.0 * var + 1e-15
        assert float(d.gap[i]) <= float(d.bound[i]) + 1e-15


@pytest.mark.clause("2.8")
@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
@given(data=st.data())
def test_gspo_token_equals_gspo_for_sequence_advantages(loss_agg, data):
    """Clause 2.8: with per-sequence A, gspo-token equals gspo in value and gradient."""
    scale = data.draw(st.sampled_from([5e-4, 0.5]), label="max |delta| (inside / across the band)")
    logp, old, adv, mask = data.draw(batches(per_token=False, max_abs_delta=scale), label="batch")
    clip = data.draw(st.sampled_from([{}, {"dual_clip": 3.0}]), label="dual")
    a = call(logp, old, adv, mask, method="gspo", **clip, **agg_kwargs(loss_agg))
    b = call(logp, old, adv, mask, method="gspo-token", **clip, **agg_kwargs(loss_agg))
    assert a.loss == b.loss
    assert_close(b.grad, a.grad, F64["grad"])


def _split_rows(rng: np.random.Generator, n: int, shards: int) -> list[np.ndarray]:
    order = rng.permutation(n)
    cuts = (
        np.sort(rng.choice(np.arange(1, n), size=min(shards - 1, n - 1), replace=False))
        if n > 1
        else []
    )
    return [p for p in np.split(order, cuts) if p.size]


@pytest.mark.clause("3.8", "3.6")
@pytest.mark.parametrize("count_empty_rows", [False, True])
@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
@given(data=st.data())
def test_shards_sum_to_the_batch(loss_agg, count_empty_rows, data):
    """Clause 3.8: shards given the global Normalizer sum to the unsplit loss and gradient."""
    method = data.draw(st.sampled_from(METHODS), label="method")
    logp, old, adv, mask = data.draw(batches(max_rows=8), label="batch")
    shards = data.draw(st.integers(1, 4), label="shards")
    seed = data.draw(st.integers(0, 2**16), label="split_seed")
    parts = _split_rows(np.random.default_rng(seed), mask.shape[0], shards)
    note(f"row shards: {[p.tolist() for p in parts]}")
    kw = dict(method=method, **agg_kwargs(loss_agg))
    whole = call(logp, old, adv, mask, count_empty_rows=count_empty_rows, **kw)
    norm = sapo_ref.normalizer(mask, count_empty_rows=count_empty_rows)
    shard_norms = [sapo_ref.normalizer(mask[p], count_empty_rows=count_empty_rows) for p in parts]
    assert sum(shard_norms[1:], shard_norms[0]) == norm  # counts of disjoint shards add
    loss, grad = 0.0, np.zeros_like(logp)
    for p in parts:
        res = call(logp[p], old[p], adv[p], mask[p], normalizer=norm, **kw)
        loss += res.loss
        grad[p] = res.grad
    assert_close(loss, whole.loss, F64["value"])
    assert_close(grad, whole.grad, F64["grad"])


@pytest.mark.clause("1.2", "6.1")
@pytest.mark.parametrize("method", METHODS)
@given(data=st.data())
def test_masked_garbage_changes_no_bit(method, data):
    """Clause 1.2 / 6.1: any value at an invalid slot (NaN, +-inf, 1e30) changes no output bit."""
    logp, old, adv, mask = data.draw(batches(), label="batch")
    assume(not mask.all())
    agg = data.draw(st.sampled_from(LOSS_AGGS), label="loss_agg")
    seed = data.draw(st.integers(0, 2**16), label="garbage_seed")
    rng = np.random.default_rng(seed)
    bad = []
    for x in (logp, old) + ((adv,) if adv.ndim == 2 else ()):
        y = x.copy()
        slots = ~mask & (rng.random(mask.shape) < 0.7)
        y[slots] = rng.choice(GARBAGE, size=int(slots.sum()))
        bad.append(y)
    if adv.ndim == 1:
        bad.append(adv)
    kw = dict(method=method, **agg_kwargs(agg))
    clean = call(logp, old, adv, mask, **kw)
    dirty = call(*bad, mask, **kw)
    assert bits(dirty.loss) == bits(clean.loss)
    assert dirty.grad.tobytes() == clean.grad.tobytes()
    assert dirty.metrics.keys() == clean.metrics.keys()
    for k in clean.metrics:
        assert bits(dirty.metrics[k]) == bits(clean.metrics[k]), k


@pytest.mark.clause("1.7", "7.1")
@given(data=st.data())
def test_row_permutation(data):
    """Permuting rows permutes the gradient and keeps loss and metrics (sums reorder only)."""
    method = data.draw(st.sampled_from(METHODS), label="method")
    agg = data.draw(st.sampled_from(LOSS_AGGS), label="loss_agg")
    logp, old, adv, mask = data.draw(batches(), label="batch")
    perm = np.asarray(data.draw(st.permutations(range(mask.shape[0])), label="permutation"))
    kw = dict(method=method, **agg_kwargs(agg))
    a = call(logp, old, adv, mask, **kw)
    b = call(logp[perm], old[perm], adv[perm], mask[perm], **kw)
    assert_close(b.loss, a.loss, F64["value"])
    assert_close(b.grad, a.grad[perm], F64["grad"])
    for k in a.metrics:
        assert_close(b.metrics[k], a.metrics[k], F64["value"])


@st.composite
def extreme_batches(draw, sequence: bool):
    """Valid log-ratios with |delta| up to 1e3 and +-inf; per row one sign of infinity when the
    method is a sequence method (a row with both is an error, clause 5.5)."""
    logp, old, adv, mask = draw(batches(), label="batch")
    seed = draw(st.integers(0, 2**16), label="extreme_seed")
    rng = np.random.default_rng(seed)
    shape = mask.shape
    delta = np.where(
        rng.random(shape) < 0.5,
        rng.choice([-1e3, -750.0, 0.0, 750.0, 1e3], size=shape),
        rng.uniform(-1e3, 1e3, size=shape),
    )
    logp = old + delta
    inf_at = rng.random(shape) < 0.3
    sign = np.broadcast_to(
        rng.choice([-1.0, 1.0], size=(shape[0], 1) if sequence else shape), shape
    )
    # Either side may carry the infinity: logp = s * inf, or old_logp = -s * inf.
    on_old = inf_at & (rng.random(shape) < 0.5)
    on_new = inf_at & ~on_old
    logp = np.where(on_new, sign * np.inf, np.where(on_old, -1.0, logp))
    old = np.where(on_old, -sign * np.inf, old)
    return logp, old, adv, mask


@pytest.mark.clause("5.3", "5.4", "6.3")
@pytest.mark.parametrize("method", METHODS)
@given(data=st.data())
def test_extreme_log_ratios(method, data):
    """Clauses 5.3, 5.4, 6.3: SAPO is finite for every valid delta; no loss, gradient or metric
    is ever NaN; no RuntimeWarning (warnings are errors here)."""
    sequence = spec.METHODS[method].is_sequence
    logp, old, adv, mask = data.draw(extreme_batches(sequence), label="extreme batch")
    agg = data.draw(st.sampled_from(LOSS_AGGS), label="loss_agg")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = call(logp, old, adv, mask, method=method, **agg_kwargs(agg))
    assert not math.isnan(res.loss) and not np.isnan(res.grad).any()
    if spec.METHODS[method].gate == "soft":
        assert math.isfinite(res.loss) and np.isfinite(res.grad).all()
    for k, v in res.metrics.items():
        assert not math.isnan(v), k
    # KL(old || new) is +inf once the new policy gives 0 mass to a sampled token (delta = -inf).
    if ((logp - old)[mask.astype(bool)] == -np.inf).any():
        assert res.metrics["kl/k1"] == res.metrics["kl/k3"] == math.inf


@pytest.mark.clause("6.5")
@given(data=st.data())
def test_inputs_never_modified(data):
    """Clause 6.5: no input array is written to (NumPy arrays of any dtype, int or bool mask)."""
    method = data.draw(st.sampled_from(METHODS), label="method")
    logp, old, adv, mask = data.draw(batches(), label="batch")
    mask = mask.astype(data.draw(st.sampled_from([bool, np.int64, np.float32]), label="mask dtype"))
    inputs = (logp, old, adv, mask)
    before = [x.copy() for x in inputs]
    norm = sapo_ref.normalizer(mask)
    call(*inputs, method=method, normalizer=norm)
    for x, y in zip(inputs, before):
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes()
    assert norm == sapo_ref.normalizer(mask)


@pytest.mark.clause("6.4")
@given(data=st.data())
def test_low_precision_inputs_computed_in_float64(data):
    """Clause 6.4: float16/float32 inputs give exactly the float64 call on the upcast inputs."""
    method = data.draw(st.sampled_from(METHODS), label="method")
    agg = data.draw(st.sampled_from(LOSS_AGGS), label="loss_agg")
    logp, old, adv, mask = data.draw(batches(), label="batch")
    dts = [
        data.draw(st.sampled_from([np.float16, np.float32, np.float64]), label=f"dtype {n}")
        for n in ("logp", "old_logp", "advantages")
    ]
    low = [x.astype(d) for x, d in zip((logp, old, adv), dts)]
    kw = dict(method=method, **agg_kwargs(agg))
    got = call(*low, mask, **kw)
    want = call(*(x.astype(np.float64) for x in low), mask, **kw)
    assert got.grad.dtype == np.float64
    assert bits(got.loss) == bits(want.loss)
    assert got.grad.tobytes() == want.grad.tobytes()
    assert {k: bits(v) for k, v in got.metrics.items()} == {
        k: bits(v) for k, v in want.metrics.items()
    }


# --------------------------------------------------------------------------- spec 0.2.0 terms
ESTIMATORS = tuple(spec.KL_ESTIMATORS)
KL_CLIP = spec.KL_CLIP


def call_terms(logp, old_logp, adv, mask, *, weights=None, ref_logp=None, **kw):
    """``call`` with the clause 10 inputs, their arrays in the repro snippet."""
    extra = {k: v for k, v in (("weights", weights), ("ref_logp", ref_logp)) if v is not None}
    note("with " + ", ".join(f"{k} = {_literal(v)}" for k, v in extra.items()) if extra else "")
    repro(logp, old_logp, adv, mask, **kw)
    return sapo_ref.policy_loss(logp, old_logp, adv, mask, **extra, **kw)


@st.composite
def term_inputs(draw, logp, mask, *, kl=True):
    """(weights, ref_logp, kl options) for a batch: weights [N] or [N, T] in [0, 3] with
    zeros, ref_logp = logp + u with |u| from 1e-9 to 3, garbage at invalid slots."""
    seed = draw(st.integers(0, 2**32 - 1), label="terms_seed")
    rng = np.random.default_rng(seed)
    n, t = mask.shape
    shape = (n, t) if draw(st.booleans(), label="per_token_weights") else (n,)
    w = np.where(rng.random(shape) < 0.25, 0.0, rng.uniform(0.0, 3.0, shape))
    if w.ndim == 2:
        w = np.where(mask, w, rng.choice([math.nan, math.inf, -1.0], size=shape))
    if not kl:
        return w, None, {}
    u = np.sign(rng.normal(size=(n, t))) * 10.0 ** rng.uniform(-9, math.log10(3.0), (n, t))
    ref = np.where(mask, logp + u, rng.choice(GARBAGE, size=(n, t)))
    est = draw(st.sampled_from(ESTIMATORS), label="kl_estimator")
    beta = draw(st.sampled_from([0.01, 0.3, 1.0, 7.5]), label="kl_coef")
    return w, ref, {"kl_coef": beta, "kl_estimator": est}


def _same_metrics_but(a: dict, b: dict, skip: set) -> None:
    assert [k for k in a if k not in skip] == [k for k in b if k not in skip]
    for k in a:
        if k not in skip:
            assert bits(a[k]) == bits(b[k]), k


@pytest.mark.clause("10.1")
@pytest.mark.parametrize("method", METHODS)
@given(data=st.data())
def test_unit_weights_equal_no_weights(method, data):
    """Clause 10.1: absent weights mean w = 1; ones of any shape and of float, int or bool
    dtype give the same loss, gradient and metrics, and weights/mean = 1."""
    logp, old, adv, mask = data.draw(batches(), label="batch")
    agg = data.draw(st.sampled_from(LOSS_AGGS), label="loss_agg")
    shape = data.draw(st.sampled_from([(mask.shape[0],), mask.shape]), label="weights shape")
    dtype = data.draw(st.sampled_from([np.float64, np.float32, np.int64, bool]), label="dtype")
    kw = dict(method=method, **agg_kwargs(agg))
    base = call(logp, old, adv, mask, **kw)
    res = call_terms(logp, old, adv, mask, weights=np.ones(shape, dtype=dtype), **kw)
    assert_close(res.loss, base.loss)
    assert_close(res.grad, base.grad, F64["grad"])
    _same_metrics_but(res.metrics, base.metrics, {"weights/mean"})
    assert res.metrics["weights/mean"] == (1.0 if mask.any() else 0.0)


@pytest.mark.clause("10.1", "10.2")
@pytest.mark.parametrize("method", METHODS)
@given(data=st.data())
def test_weights_scale_the_policy_term_and_not_the_counts(method, data):
    """Clause 10.1: L(a w) - KL = a (L(w) - KL), gradient likewise; the counts, so the KL term
    and every metric but weights/mean, do not move; all-zero weights leave the KL term alone,
    which is then the loss with zero advantages."""
    logp, old, adv, mask = data.draw(batches(max_abs_delta=1.0), label="batch")
    agg = data.draw(st.sampled_from(LOSS_AGGS), label="loss_agg")
    w, ref, kl = data.draw(term_inputs(logp, mask), label="terms")
    a = data.draw(st.sampled_from([0.0, 0.25, 0.7, 3.0, 1e3]), label="scale a")
    kw = dict(method=method, **agg_kwargs(agg))
    with np.errstate(invalid="ignore"):  # 0 * inf garbage at invalid slots stays garbage
        w_a = a * w
    pol = call_terms(logp, old, adv, mask, weights=w, **kw)
    pol_a = call_terms(logp, old, adv, mask, weights=w_a, **kw)
    assert_close(pol_a.loss, a * pol.loss)
    assert_close(pol_a.grad, a * pol.grad, F64["grad"])
    _same_metrics_but(pol_a.metrics, pol.metrics, {"weights/mean"})
    assert_close(pol_a.metrics["weights/mean"], a * pol.metrics["weights/mean"])
    both = call_terms(logp, old, adv, mask, weights=w, ref_logp=ref, **kl, **kw)
    both_a = call_terms(logp, old, adv, mask, weights=w_a, ref_logp=ref, **kl, **kw)
    scale = max(1.0, abs(both.loss), abs(pol.loss))
    assert abs((both_a.loss - pol_a.loss) - (both.loss - pol.loss)) <= 1e-13 * scale * (1 + a)
    assert bits(both_a.metrics["kl_ref/mean"]) == bits(both.metrics["kl_ref/mean"])
    if a == 0.0:  # only the KL term is left: the same as A = 0 (clause 5.1)
        zero_adv = call_terms(logp, old, np.zeros_like(adv), mask, ref_logp=ref, **kl, **kw)
        assert_close(both_a.loss, zero_adv.loss)
        assert_close(both_a.grad, zero_adv.grad, F64["grad"])


@pytest.mark.clause("10.2")
@pytest.mark.parametrize("estimator", ESTIMATORS)
@given(data=st.data())
def test_zero_kl_coef_is_no_kl(estimator, data):
    """Clause 10.2: beta = 0 contributes exactly nothing, also where k = inf (ref_logp = -inf
    at a valid token): loss and gradient bit for bit as without ref_logp, d/dref_logp = 0,
    and kl_ref/mean still reported."""
    logp, old, adv, mask = data.draw(batches(), label="batch")
    method = data.draw(st.sampled_from(METHODS), label="method")
    agg = data.draw(st.sampled_from(LOSS_AGGS), label="loss_agg")
    _, ref, _ = data.draw(term_inputs(logp, mask), label="terms")
    if data.draw(st.booleans(), label="ref_logp = -inf somewhere") and mask.any():
        i, t = np.argwhere(mask)[0]
        ref[i, t] = -math.inf
    kw = dict(method=method, **agg_kwargs(agg))
    base = call(logp, old, adv, mask, **kw)
    res = call_terms(logp, old, adv, mask, ref_logp=ref, kl_coef=0.0, kl_estimator=estimator, **kw)
    assert bits(res.loss) == bits(base.loss)
    assert bits(res.grad) == bits(base.grad)
    kw0 = dict(kl_coef=0.0, kl_estimator=estimator, **kw)
    assert not reference_grad_ref_logp(logp, old, adv, mask, ref_logp=ref, **kw0).any()
    _same_metrics_but(res.metrics, base.metrics, {"kl_ref/mean"})
    assert "kl_ref/mean" in res.metrics


@pytest.mark.clause("10.2", "10.3")
@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
@given(data=st.data())
def test_kl_term_is_independent_of_the_method(loss_agg, data):
    """Clause 10.2, 10.3: the KL part of the loss (with minus without ref_logp) and
    d loss / d ref_logp are the same for every method (same k(u), same c, no weights), and
    d loss / d ref_logp is minus the KL part of d loss / d logp."""
    logp, old, adv, mask = data.draw(batches(max_abs_delta=1.0), label="batch")
    w, ref, kl = data.draw(term_inputs(logp, mask), label="terms")
    parts = []
    for method in METHODS:
        kw = dict(method=method, **agg_kwargs(loss_agg))
        pol = call_terms(logp, old, adv, mask, weights=w, **kw)
        both = call_terms(logp, old, adv, mask, weights=w, ref_logp=ref, **kl, **kw)
        ref_grad = reference_grad_ref_logp(
            logp, old, adv, mask, weights=w, ref_logp=ref, **kl, **kw
        )
        g_scale = max(1.0, float(np.abs(both.grad).max(initial=0.0)))
        assert np.abs(ref_grad + (both.grad - pol.grad)).max(initial=0.0) <= 1e-13 * g_scale
        assert not ref_grad[~mask].any()
        scale = max(1.0, abs(both.loss), abs(pol.loss))
        parts.append((both.loss - pol.loss, scale, ref_grad, both.metrics["kl_ref/mean"]))
    loss0, scale0, ref_grad0, kl0 = parts[0]
    for loss_m, scale_m, ref_grad_m, kl_m in parts[1:]:
        assert abs(loss_m - loss0) <= 1e-13 * max(scale0, scale_m)
        assert_close(ref_grad_m, ref_grad0, F64["grad"])
        assert_close(kl_m, kl0)


def _k3_series(u: float) -> float:
    """e^u - 1 - u for |u| <= 1e-3 from its series, relative error below u^5/720 / (u^2/2)."""
    return u * u * (1 / 2 + u * (1 / 6 + u * (1 / 24 + u / 120)))


@pytest.mark.clause("10.2", "10.5")
@pytest.mark.parametrize("estimator", ESTIMATORS)
@given(u=st.floats(allow_nan=False))
def test_estimator_signs_and_bounds(estimator, u):
    """Clause 10.2/10.5 per token for every float u: k2, k3 >= 0, 0 <= low-var-k3 <= 10 and
    <= k3, k1 = -u; the derivatives have the sign of -u (k2, k3) and low-var-k3's is 0 past the
    clip; near u = 0 k3 is its series (no digit lost to cancellation, never negative)."""
    note(f"sapo_ref.kl_penalty(np.array([{u!r}]), {estimator!r})")
    with np.errstate(over="ignore"):  # values here; warnings: test_kl_penalty_overflow_is_quiet
        value, dvalue = (float(np.asarray(x).reshape(-1)[0]) for x in
                         sapo_ref.kl_penalty(np.array([u]), estimator))  # fmt: skip
        k3, dk3 = (float(np.asarray(x).reshape(-1)[0])
                   for x in sapo_ref.kl_penalty(np.array([u]), "k3"))  # fmt: skip
    assert not math.isnan(value) and not math.isnan(dvalue)
    if estimator == "k1":
        assert value == -u and dvalue == 1.0
    elif estimator == "k2":
        assert value >= 0.0 and (dvalue <= 0.0 if u >= 0 else dvalue > 0.0)
        assert_close(value, u * u / 2)  # inf past overflow as the true value
    elif estimator == "k3":
        assert value >= 0.0 and (dvalue <= 0.0 if u >= 0 else dvalue > 0.0)
        if abs(u) <= 1e-3:
            assert math.isclose(value, _k3_series(u), rel_tol=1e-14, abs_tol=1e-300)
            assert math.isclose(dvalue, -math.expm1(u), rel_tol=1e-15)
    else:
        assert 0.0 <= value <= KL_CLIP and value <= k3
        if k3 > KL_CLIP:
            assert value == KL_CLIP and dvalue == 0.0
        else:
            assert value == k3 and dvalue == dk3


@pytest.mark.clause("3.8", "10.1", "10.2")
@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
@given(data=st.data())
def test_shards_with_terms_sum_to_the_batch(loss_agg, data):
    """Clause 3.8 with clause 10: shards given the global Normalizer, each with its rows of
    weights and ref_logp, sum to the unsplit loss and both gradients."""
    method = data.draw(st.sampled_from(METHODS), label="method")
    logp, old, adv, mask = data.draw(batches(max_rows=8), label="batch")
    w, ref, kl = data.draw(term_inputs(logp, mask), label="terms")
    cer = data.draw(st.booleans(), label="count_empty_rows")
    shards = data.draw(st.integers(1, 4), label="shards")
    seed = data.draw(st.integers(0, 2**16), label="split_seed")
    parts = _split_rows(np.random.default_rng(seed), mask.shape[0], shards)
    note(f"row shards: {[p.tolist() for p in parts]}")
    kw = dict(method=method, **kl, **agg_kwargs(loss_agg))
    whole = call_terms(logp, old, adv, mask, weights=w, ref_logp=ref, count_empty_rows=cer, **kw)
    norm = sapo_ref.normalizer(mask, count_empty_rows=cer)
    loss, grad, ref_grad = 0.0, np.zeros_like(logp), np.zeros_like(ref)
    for p in parts:
        res = call_terms(logp[p], old[p], adv[p], mask[p], weights=w[p], ref_logp=ref[p],
                         normalizer=norm, **kw)  # fmt: skip
        loss += res.loss
        grad[p] = res.grad
        ref_grad[p] = reference_grad_ref_logp(
            logp[p], old[p], adv[p], mask[p], weights=w[p], ref_logp=ref[p], normalizer=norm, **kw
        )
    assert_close(loss, whole.loss, F64["value"])
    assert_close(grad, whole.grad, F64["grad"])
    whole_ref = reference_grad_ref_logp(
        logp, old, adv, mask, weights=w, ref_logp=ref, count_empty_rows=cer, **kw
    )
    assert_close(ref_grad, whole_ref, F64["grad"])


@pytest.mark.clause("10.5")
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_kl_penalty_overflow_is_quiet(estimator):
    """Clause 10.5: past overflow the value is +inf, the correctly rounded answer, so it comes
    without a warning (RuntimeWarnings from sapo_ref are errors in this suite), at every
    |u| from 1e154 to the largest float and at +-inf."""
    u = np.array([1.5e154, -1.5e154, 1e200, -1e200, 800.0, -800.0, 1.7e308, -1.7e308,
                  math.inf, -math.inf])  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        value, dvalue = sapo_ref.kl_penalty(u, estimator)
    assert not np.isnan(value).any() and not np.isnan(dvalue).any()
