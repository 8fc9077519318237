"""Differential fuzz: each adapter against the reference on random inputs with extremes.

Hypothesis draws a batch in one fixed shape (a jitting backend compiles once per configuration
and dtype, never per example) with ragged masks, empty rows, garbage (NaN, +-inf, +-1e30) at
invalid positions, log-ratios up to +-inf at valid tokens and advantages up to 1e30 (within
the dtype's range), under a fixed set of configurations that includes the extreme
temperatures. The inputs are rounded to the dtype and the float64 reference is evaluated on
the rounded inputs (clause C.1); the adapter must match its loss, gradient and metrics, or,
where the reference raises (a sequence row with both infinite signs, clause 5.5), raise the
same error. Inputs a dtype cannot hold are rejected, not counted.

With the clause 10 terms: per configuration fixed weights (layout and kind) and KL estimator
and coefficient, random weights (zeros, up to 1e4, garbage where masked) and reference
log-probabilities with extreme ``u = log pi_ref - log pi_theta`` (both signs in float64, u <= 0
with negative advantages in lower precision, so that no sum cancels beyond the dtype).

Examples per adapter and dtype: ``SAPO_FUZZ_EXAMPLES``, default 500 (the CI budget: about 90 s
for the three adapters and four dtypes on two busy cores), half as many with the terms; set it
lower for a quick local run.
"""

from __future__ import annotations

import dataclasses
import os
import re
import zlib

import numpy as np
import pytest
from backends._inputs import DTYPES, Terms
from hypothesis import HealthCheck, given, note, reject, settings
from hypothesis import strategies as st
from sapo_conformance.cases import Case, materialize, round_to

import sapo_ref

BACKENDS = ("torch", "jax", "mlx")
EXAMPLES = int(os.environ.get("SAPO_FUZZ_EXAMPLES", 500))
#: The one shape bucket (rows of any length and empty rows come from the mask).
N, T = 4, 8
#: Fixed configurations: every method and aggregation, extreme temperatures, dual clip,
#: count_empty_rows; per-token advantages for half of them (the shape is part of the program).
CONFIGS: tuple[tuple[dict, bool], ...] = (
    ({"method": "sapo", "loss_agg": "token-mean"}, False),
    (
        {"method": "sapo", "loss_agg": "seq-mean-token-sum", "tau_pos": 1e-6, "tau_neg": 1e3},
        True,
    ),
    (
        {"method": "sapo-seq", "loss_agg": "seq-mean-token-mean", "tau_pos": 2.0, "tau_neg": 0.5},
        True,
    ),
    (
        {
            "method": "grpo",
            "loss_agg": "seq-mean-token-sum-norm",
            "norm_length": 7.0,
            "dual_clip": 3.0,
        },
        True,
    ),
    ({"method": "gspo", "loss_agg": "seq-mean-token-mean", "count_empty_rows": True}, False),
    ({"method": "gspo-token", "loss_agg": "token-mean", "eps_low": 0.2, "eps_high": 0.28}, False),
)
#: Extreme log-ratios placed at valid tokens.
EXTREME_DELTAS = (np.inf, -np.inf, 1e4, -1e4, 700.0, -700.0, 90.0, -90.0, 40.0, -40.0, 20.0)
#: Low precision: a finite delta enters the row mean mu_i and the kl/k1 mean with the compute
#: dtype's absolute error |delta| * eps, which cancelling extremes (+90 beside -90) leave larger
#: than the dtype's tolerance: the conditioning of the problem, not an error of the backend.
#: Large positive finite extremes stay float64's; large negative ones cannot cancel.
LOW_PRECISION_DELTAS = (np.inf, -np.inf, 40.0, -40.0, 20.0, -20.0, -90.0, -700.0, -1e4)
GARBAGE = (np.nan, np.inf, -np.inf, 1e30, -1e30, 0.0)
#: Largest advantage magnitude drawn per dtype (the reference's outputs must fit the dtype).
MAX_ADV = {"float64": 1e30, "float32": 1e30, "bfloat16": 1e30, "float16": 1e2}


@st.composite
def cases(draw, dtype: str, k: int | None = None) -> Case:
    """A random batch: ragged mask, empty rows, extremes at valid tokens, garbage elsewhere;
    configuration ``k`` of :data:`CONFIGS` (drawn when None)."""
    if k is None:
        k = draw(st.integers(0, len(CONFIGS) - 1), label="configuration")
    options, per_token = CONFIGS[k]
    low = dtype != "float64"
    pool = LOW_PRECISION_DELTAS if low else EXTREME_DELTAS
    seed = draw(st.integers(0, 2**32 - 1), label="seed")
    rng = np.random.default_rng(seed)
    sigma = draw(st.sampled_from((1e-3, 0.1, 0.5, 2.0)), label="log-ratio scale")
    old = -rng.exponential(1.5, size=(N, T)) - 0.05
    delta = rng.normal(0.0, sigma, size=(N, T))
    lengths = rng.integers(0, T + 1, size=N)
    mask = np.arange(T)[None, :] < lengths[:, None]
    if draw(st.booleans(), label="holes"):
        mask = rng.permuted(mask, axis=1)
    extremes = draw(
        st.lists(
            st.tuples(st.integers(0, N - 1), st.integers(0, T - 1), st.sampled_from(pool)),
            max_size=4,
        ),
        label="extreme log-ratios (row, col, delta)",
    )
    if draw(st.integers(0, 7), label="a row with both infinities (1 in 8)") == 0:
        extremes += [(0, 0, np.inf), (0, T - 1, -np.inf)]  # sequence methods: clause 5.5 error
    for i, t, d in extremes:
        mask[i, t] = True
        delta[i, t] = d
    logp = old + delta
    for i, t, d in extremes:
        if np.isinf(d) and rng.random() < 0.5:  # the infinity from old_logp instead
            logp[i, t], old[i, t] = -1.0, -1.0 - d
    top = draw(st.sampled_from((1.0, 1e3, 1e15, MAX_ADV[dtype])), label="advantage scale")
    adv = rng.normal(0.0, 1.0, size=(N, T) if per_token else N) * min(top, MAX_ADV[dtype])
    if low:  # one sign: terms of opposite signs would make the sum ill-conditioned in float32
        adv = np.abs(adv) * draw(st.sampled_from((1.0, -1.0)), label="advantage sign")
    invalid = ~mask
    garbage = np.array(GARBAGE)
    logp = np.where(invalid, rng.choice(garbage, size=(N, T)), logp)
    old = np.where(invalid, rng.choice(garbage, size=(N, T)), old)
    if per_token:
        adv = np.where(invalid, rng.choice(garbage, size=(N, T)), adv)
    return Case(f"fuzz-{k}-{seed}", ("C.1",), logp, old, adv, mask, dict(options), fd=False)


def _fuzz(backend, case: Case, dtype: str) -> None:
    note(
        f"options={case.options}\nlogp={case.logp.tolist()}\nold_logp={case.old_logp.tolist()}\n"
        f"advantages={case.advantages.tolist()}\nmask={case.mask.astype(int).tolist()}"
    )
    m = materialize(case, dtype)
    if isinstance(m, str):
        if not m.startswith("undefined in"):
            reject()  # out of the dtype's range: not an example of this dtype
        rounded = [round_to(getattr(case, k), dtype) for k in ("logp", "old_logp", "advantages")]
        with pytest.raises(ValueError) as want:
            sapo_ref.policy_loss(*rounded, case.mask, **case.options)
        arrays = [backend.to_array(a, dtype) for a in rounded] + [backend.to_array(case.mask)]
        with pytest.raises(ValueError) as got:
            backend.api(*arrays, **case.options)
        drop = r"\b(?:torch|mlx\.core|jax\.numpy|numpy)\.(?=[a-z])"
        assert re.sub(drop, "", str(got.value)) == re.sub(drop, "", str(want.value))
        return
    if dtype != "float64" and _ratio_overflows(m):
        # ratio means computed from compute-dtype ratios are +inf here: reported, see
        # test_ratio_metrics_when_a_ratio_overflows_float32
        keep = {k: v for k, v in m.want_metrics.items() if k not in OVERFLOW_METRICS}
        m = dataclasses.replace(m, want_metrics=keep)
    # |c| <= 1: the pullback c * grad stays within the dtype wherever grad does (float16)
    cotangent = COTANGENTS[zlib.crc32(case.id.encode()) % len(COTANGENTS)]
    backend.assert_matches(m, backend.run(m, cotangent=cotangent))


#: Upstream cotangents, exact in every dtype.
COTANGENTS = (0.625, 0.75, -0.75, 1.0, -1.0)
#: Metrics that average ratios: +inf in float32 once one valid ratio exceeds float32's range.
OVERFLOW_METRICS = ("ratio/mean", "seq_ratio/mean", "kl/k3")


def _ratio_overflows(m) -> bool:
    with np.errstate(all="ignore"):
        delta = np.where(m.mask, m.logp.astype(np.float64) - m.old_logp.astype(np.float64), 0.0)
        mu = delta.sum(axis=1) / np.maximum(m.mask.sum(axis=1), 1)
    limit = np.log(np.finfo(np.float32).max)
    return bool(
        np.any(m.mask & np.isfinite(delta) & (delta > limit))
        or np.any(np.isfinite(mu) & (mu > limit))
    )


@pytest.mark.clause("C.1", "5.3", "5.4", "5.5", "6.1", "6.2", "6.3", "3.6")
@pytest.mark.parametrize("dtype", DTYPES)
def test_adapter_matches_reference_on_random_extreme_inputs(backend, dtype):
    backend.require_dtype(dtype)

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    @given(case=cases(dtype))
    def fuzz(case):
        _fuzz(backend, case, dtype)

    fuzz()


@pytest.mark.clause("7.1", "6.3")
@pytest.mark.parametrize("dtype", ("float32", "bfloat16"))
def test_ratio_metrics_when_a_ratio_overflows_float32(backend, dtype):
    """One valid ratio e^90 (beyond float32) among ordinary ones: the true ratio/mean and kl/k3
    (about 1e38) fit in float32, so they must be finite (clause 7.1 with the overflow rule)."""
    backend.require_dtype(dtype)
    old = np.full((2, 4), -1.0)
    logp = old + np.array([[90.0, 0.1, -0.2, 0.0], [0.3, 0.0, -0.1, 0.2]])
    case = Case("ratio-overflow", ("7.1",), logp, old, np.array([1.0, 0.5]), np.ones((2, 4), bool))
    m = materialize(case, dtype)
    assert not isinstance(m, str), m
    backend.assert_matches(m, backend.run(m))


# ----------------------------------------------------------------------------- clause 10 terms
#: Per configuration of CONFIGS: the weights' layout and kind (None: no weights), the KL
#: estimator and kl_coef (fixed: each is one more program for a jitting backend).
TERM_CONFIGS: tuple[tuple[str | None, str, str, float], ...] = (
    ("token", "float", "k3", 0.1),
    ("row", "float", "k1", 1.0),
    ("token", "bool", "k2", 0.01),
    ("row", "int", "low-var-k3", 10.0),
    (None, "float", "k3", 0.0),
    ("token", "float", "k1", 100.0),
)
TERM_EXAMPLES = max(1, EXAMPLES // 2)
#: Extreme u = log pi_ref - log pi_theta at valid tokens: float64 takes both signs (k3 and k2
#: past exp's and the square's overflow); lower precision u <= 0 only (with A < 0 every term
#: then has one sign: no cancellation beyond the dtype's tolerance, as for the advantages).
EXTREME_U = (-np.inf, -1e4, -700.0, -50.0, 50.0, 700.0, 1e4)
LOW_PRECISION_U = (-np.inf, -80.0, -20.0)


@st.composite
def term_cases(draw, dtype: str) -> tuple[Case, Terms]:
    """A random batch of :func:`cases` with the clause 10 terms: weights (zeros, up to 1e4,
    garbage where masked), ref_logp = logp + u with random and extreme u, garbage where masked."""
    k = draw(st.integers(0, len(CONFIGS) - 1), label="configuration")
    case = draw(cases(dtype, k))
    layout, kind, estimator, beta = TERM_CONFIGS[k]
    low = dtype != "float64"
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1), label="terms seed"))
    n, t = case.mask.shape
    if low and np.any(case.advantages > 0):  # one sign for every term (see LOW_PRECISION_U)
        case = dataclasses.replace(case, advantages=-np.abs(case.advantages))
    w = None
    if layout is not None:
        shape = (n, t) if layout == "token" else (n,)
        if kind == "bool":
            w = rng.random(shape) < 0.7
        elif kind == "int":
            w = rng.integers(0, 4, size=shape).astype(np.int64)
        else:
            scale = draw(st.sampled_from((1e-6, 1.0, 1e4)), label="weight scale")
            w = rng.uniform(0.0, 2.0, size=shape) * scale
            w[rng.random(shape) < 0.2] = 0.0
            if layout == "token":
                w = np.where(case.mask, w, rng.choice(np.array(GARBAGE), size=shape))
    sigma = draw(st.sampled_from((1e-3, 0.1, 1.0, 5.0)), label="u scale")
    u = rng.normal(0.0, sigma, size=(n, t))
    if low:
        u = -np.abs(u)
    pool = LOW_PRECISION_U if low else EXTREME_U
    for i, j, v in draw(
        st.lists(
            st.tuples(st.integers(0, n - 1), st.integers(0, t - 1), st.sampled_from(pool)),
            max_size=2,
        ),
        label="extreme u (row, col, u)",
    ):
        u[i, j] = v
    with np.errstate(invalid="ignore"):
        ref = np.where(case.mask, case.logp + u, rng.choice(np.array(GARBAGE), size=(n, t)))
    terms = Terms(w, ref, {"kl_coef": beta, "kl_estimator": estimator})
    return case, terms


def _fuzz_terms(backend, case: Case, terms: Terms, dtype: str) -> None:
    note(
        f"options={case.options} terms={terms.kl}\nlogp={case.logp.tolist()}\n"
        f"old_logp={case.old_logp.tolist()}\nadvantages={case.advantages.tolist()}\n"
        f"mask={case.mask.astype(int).tolist()}\nweights="
        f"{None if terms.weights is None else terms.weights.tolist()}\n"
        f"ref_logp={terms.ref_logp.tolist()}"
    )
    m = materialize(case, dtype)
    if isinstance(m, str):
        reject()  # the base case's own errors and ranges: test_adapter_matches_reference...
    rounded = terms.rounded(dtype)
    valid = m.mask.astype(bool)
    lp = np.where(valid, m.logp.astype(np.float64), 0.0)
    if np.any(valid & np.isinf(lp) & (lp == np.where(valid, rounded.ref_logp, 0.0))):
        reject()  # inf - inf: an error case (test_errors, test_traced)
    if np.any(valid & np.isfinite(terms.ref_logp) & ~np.isfinite(rounded.ref_logp)):
        reject()  # ref_logp out of the dtype's range
    try:
        with np.errstate(all="ignore"):
            res = sapo_ref.policy_loss(
                m.logp, m.old_logp, m.advantages, m.mask, **case.options, **rounded.numpy_options()
            )
    except ValueError:
        reject()
    top = float(np.finfo(np.float32 if dtype == "bfloat16" else dtype).max)
    outs = np.concatenate([[res.loss], np.asarray(res.grad).ravel()])
    if np.any(np.isfinite(outs) & (np.abs(outs) > top)):
        reject()  # the reference's outputs exceed the dtype
    want = dict(res.metrics)
    if dtype != "float64" and _ratio_overflows(m):
        want = {k: v for k, v in want.items() if k not in OVERFLOW_METRICS}
    m = dataclasses.replace(
        m, want_loss=float(res.loss), want_grad=np.asarray(res.grad), want_metrics=want
    )
    cotangent = COTANGENTS[zlib.crc32(case.id.encode()) % len(COTANGENTS)]
    options = {**case.options, **rounded.options(backend, dtype)}
    backend.assert_matches(m, backend.run(m, options=options, cotangent=cotangent))


@pytest.mark.clause("C.1", "10.1", "10.2", "10.5", "6.1")
@pytest.mark.parametrize("dtype", DTYPES)
def test_adapter_matches_reference_with_terms_on_random_extreme_inputs(backend, dtype):
    backend.require_dtype(dtype)

    @settings(
        max_examples=TERM_EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    @given(drawn=term_cases(dtype))
    def fuzz(drawn):
        _fuzz_terms(backend, *drawn, dtype)

    fuzz()
