"""sapo_jax against the reference: every method x aggregation, in float64 (x64), float32,
bfloat16 and float16, values, gradients (through ``jax.vjp`` with a random cotangent) and
metrics; masked garbage; extreme valid log-ratios; global normalizers.

Low-precision inputs are compared with the float64 reference evaluated on the same rounded
inputs, with the tolerances of ``spec.TOLERANCES`` and the criterion of clause C.1.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

import sapo_jax

import sapo_ref
from sapo_ref import spec

pytestmark = [
    pytest.mark.jax,
    # Masked garbage (1e30) cast to float16 overflows to inf on purpose.
    pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning"),
]

METHODS = sapo_ref.METHOD_NAMES
LOSS_AGGS = sapo_ref.LOSS_AGG_NAMES
CLIP = tuple(m for m in METHODS if spec.METHODS[m].gate == "clip")
DTYPES = {
    "float64": jnp.float64,
    "float32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "float16": jnp.float16,
}
#: How far (relative) from a clip kink every sampled ratio stays (clause 2.5).
KINK_GAP = 1e-3


def options(method: str, loss_agg: str, **extra) -> dict:
    kw = {"method": method, "loss_agg": loss_agg}
    if "norm_length" in spec.LOSS_AGGS[loss_agg].requires:
        kw["norm_length"] = 7.0
    if method in CLIP:
        kw.update(eps_low=0.2, eps_high=0.28)  # clip-higher, a band the samples straddle
    kw.update(extra)
    return kw


def assert_close(got, want, dtype: str, kind: str, what: str = "") -> None:
    """Clause C.1: |got - want| <= atol * scale + rtol * |want|, scale = max(1, max|want|);
    non-finite wants must be matched exactly, finite wants by finite values."""
    tol = spec.TOLERANCES[dtype][kind]
    # The correctly rounded value of a number beyond the output dtype's range is +-inf.
    limit = float(jnp.finfo(jnp.asarray(got).dtype).max)
    got = np.asarray(np.asarray(got, dtype=np.float64))
    want = np.asarray(want, dtype=np.float64)
    want = np.where(np.abs(want) > limit, np.copysign(np.inf, want), want)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    finite = np.isfinite(want)
    assert np.array_equal(got[~finite], want[~finite], equal_nan=True), (what, got, want)
    assert np.all(np.isfinite(got[finite])), (what, "non-finite where the reference is finite", got)
    scale = max(1.0, float(np.max(np.abs(want[finite]), initial=0.0)))
    err = np.abs(got[finite] - want[finite])
    bound = tol.atol * scale + tol.rtol * np.abs(want[finite])
    worst = int(np.argmax(err - bound)) if err.size else 0
    assert np.all(err <= bound), (
        f"{what} {dtype} {kind}: |got - want| = {err.flat[worst]:.3g} > {bound.flat[worst]:.3g} "
        f"(got {got[finite].flat[worst]!r}, want {want[finite].flat[worst]!r})"
    )


def rounded(x: np.ndarray, dtype: str) -> np.ndarray:
    """``x`` rounded to ``dtype`` and back to float64 (what both sides see)."""
    return np.asarray(jnp.asarray(x, DTYPES[dtype]).astype(jnp.float64))


def kink_free(logp, old, adv, mask, kw) -> bool:
    """Whether every valid ratio (token or sequence) is KINK_GAP away from each clip edge."""
    if kw["method"] not in CLIP:
        return True
    delta = np.where(mask, logp - old, 0.0)
    if spec.METHODS[kw["method"]].ratio == "token":
        x = np.exp(delta)[mask]
    else:
        lengths = mask.sum(1)
        x = np.exp(delta.sum(1)[lengths > 0] / lengths[lengths > 0])
    edges = [1 - kw.get("eps_low", 0.2), 1 + kw.get("eps_high", 0.2)]
    if kw.get("dual_clip") is not None:
        edges.append(kw["dual_clip"])
    return all(np.all(np.abs(x / e - 1) > KINK_GAP) for e in edges)


def make_case(seed: int, kw: dict, dtype: str, per_token: bool, n=5, t=7, spread=0.35):
    """A ragged batch (one empty row, garbage at masked slots) whose rounded inputs keep clipped
    ratios away from the kinks; retries seeds until they do."""
    for attempt in range(200):
        rng = np.random.default_rng(1000 * seed + attempt)
        logp = -np.abs(rng.normal(1.0, 0.8, (n, t)))
        old = logp - rng.normal(0.0, spread, (n, t))
        lengths = rng.integers(1, t + 1, n)
        lengths[1] = 0  # an empty row
        mask = np.arange(t)[None, :] < lengths[:, None]
        adv = rng.normal(size=(n, t) if per_token else n)
        adv[0] = 0.0  # A = 0 (clause 5.1): a whole row, or a token
        logp, old, adv = (rounded(a, dtype) for a in (logp, old, adv))
        if kink_free(logp, old, adv, mask, kw):
            # Masked slots hold garbage (clause 6.1): NaN, infinities, huge values.
            garbage = np.array([np.nan, np.inf, -np.inf, 1e30])[rng.integers(0, 4, (n, t))]
            logp = np.where(mask, logp, garbage)
            old = np.where(mask, old, garbage[::-1])
            if per_token:
                adv = np.where(mask, adv, garbage)
            return logp, old, adv, mask
    raise AssertionError("no kink-free sample")  # pragma: no cover


def jax_inputs(logp, old, adv, mask, dtype: str):
    d = DTYPES[dtype]
    return jnp.asarray(logp, d), jnp.asarray(old, d), jnp.asarray(adv, d), jnp.asarray(mask)


@functools.partial(jax.jit, static_argnames="options")
def loss_grad_metrics(lp, o, a, m, ct, options: tuple):
    """Loss, metrics and the VJP of a cotangent ``ct``, all in one compiled call per case."""
    (loss, metrics), vjp = jax.vjp(lambda x: sapo_jax.policy_loss(x, o, a, m, **dict(options)), lp)
    (grad,) = vjp((ct.astype(loss.dtype), jax.tree.map(jnp.zeros_like, metrics)))
    return loss, grad, metrics


def check_against_reference(logp, old, adv, mask, dtype: str, kw: dict, seed: int = 0) -> None:
    ref = sapo_ref.policy_loss(logp, old, adv, mask, **kw)
    lp, o, a, m = jax_inputs(logp, old, adv, mask, dtype)
    ct = float(np.random.default_rng(seed).uniform(0.5, 2.0)) * (1 if seed % 2 else -1)
    loss, grad, metrics = loss_grad_metrics(lp, o, a, m, jnp.asarray(ct), tuple(sorted(kw.items())))
    what = f"{kw}"
    assert grad.dtype == lp.dtype, (what, grad.dtype)
    assert_close(loss, ref.loss, dtype, "value", what + " loss")
    assert_close(grad, ct * ref.grad, dtype, "grad", what + " grad")
    assert set(metrics) == set(sapo_ref.metric_keys(kw["method"]))  # JAX transforms sort dict keys
    for key, value in metrics.items():
        assert value.shape == ()
        assert_close(value, ref.metrics[key], dtype, "value", f"{what} metric {key}")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
@pytest.mark.parametrize("method", METHODS)
def test_matches_reference(method, loss_agg, dtype):
    for seed, per_token in enumerate((False, True)):
        kw = options(method, loss_agg)
        case = make_case(seed, kw, dtype, per_token)
        check_against_reference(*case, dtype, kw, seed)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("method", METHODS)
def test_low_precision_matches_reference_on_rounded_inputs(method, dtype):
    """bfloat16/float16 are computed in float32 (clause 6.4): compared with the reference on the
    same rounded inputs; the gradient comes back in the input dtype. Aggregation code does not
    depend on the dtype, so two aggregations (one per advantage shape) suffice here."""
    for seed, (loss_agg, per_token) in enumerate(
        (("seq-mean-token-mean", False), ("token-mean", True))
    ):
        kw = options(method, loss_agg)
        case = make_case(seed, kw, dtype, per_token)
        check_against_reference(*case, dtype, kw, seed)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize(
    "extra",
    [
        {"method": "sapo", "tau_pos": 0.5, "tau_neg": 3.0},
        {"method": "sapo-seq", "tau_pos": 2.0, "tau_neg": 0.25},
        {"method": "sapo", "tau_pos": 1e3, "tau_neg": 1e-3},
        {"method": "grpo", "dual_clip": 3.0},
        {"method": "gspo", "dual_clip": 1.5},
        {"method": "gspo-token", "eps_low": 0.1, "eps_high": 0.1, "dual_clip": 2.0},
        {"method": "grpo", "count_empty_rows": True},
        {"method": "sapo", "count_empty_rows": True, "loss_agg": "seq-mean-token-sum"},
    ],
    ids=str,
)
def test_matches_reference_with_options(extra, dtype):
    extra = dict(extra)
    kw = options(extra.pop("method"), extra.pop("loss_agg", "seq-mean-token-mean"), **extra)
    per_token = kw["method"] != "gspo"  # both advantage shapes across the list
    case = make_case(7, kw, dtype, per_token, spread=1.2)
    check_against_reference(*case, dtype, kw, 1)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("method", ["sapo", "sapo-seq"])
def test_gspo_defaults_near_on_policy(method, dtype):
    """GSPO's default band (3e-4, 4e-4) with ratios a few 1e-5 from 1, and SAPO there."""
    for m in ("gspo", "gspo-token", method):
        kw = {"method": m}
        rng = np.random.default_rng(3)
        logp = rounded(-np.abs(rng.normal(1.0, 0.5, (4, 6))), dtype)
        old = rounded(logp - rng.normal(0.0, 2e-5, (4, 6)), dtype)
        if dtype == "float32":  # keep s_i away from 1 + 4e-4 and 1 - 3e-4 in float32 too
            old = logp
        mask = np.ones((4, 6), bool)
        adv = rounded(rng.normal(size=4), dtype)
        check_against_reference(logp, old, adv, mask, dtype, kw)


EXTREME = [math.inf, -math.inf, 1e4, -1e4, 88.0, 89.0, 100.0, -100.0, 1e-7, -1e-7, 0.0, 30.0]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("method", METHODS)
def test_extreme_log_ratios_exact_limits(method, dtype):
    """Clauses 5.3, 5.4, 6.3: valid log-ratios up to +-inf give the reference's exact limits (no
    NaN, no clamp), in float32 as in float64; past float32's exp range a clipped term c*A*r is
    still finite where its true value is (delta = 89), +-inf where that overflows (delta = 100)."""
    deltas = np.array(EXTREME)
    n = deltas.size
    rng = np.random.default_rng(5)
    logp = np.where(deltas == -np.inf, -np.inf, -rng.uniform(0.1, 3.0, n))
    finite = np.isfinite(deltas)
    old = np.full(n, -1.0)
    old[deltas == np.inf] = -np.inf
    old[finite] = logp[finite] - deltas[finite]
    # One token per row (sequence methods then see the same extremes) and a second, moderate one.
    logp2 = np.stack([logp, np.full(n, -1.0)], axis=1)
    old2 = np.stack([old, np.full(n, -1.1)], axis=1)
    mask = np.stack([np.ones(n, bool), np.zeros(n, bool)], axis=1)
    for adv in (np.linspace(-2, 2, n), -np.ones(n), np.ones(n)):
        for extra in ({}, {"dual_clip": 3.0} if method in CLIP else {}):
            kw = options(method, "token-mean", **extra)
            check_against_reference(
                rounded(logp2, dtype), rounded(old2, dtype), rounded(adv, dtype), mask, dtype, kw
            )


@pytest.mark.parametrize("method", METHODS)
def test_masked_garbage_changes_no_bit(method):
    """Clause 6.1: whatever the masked slots hold, loss, gradient and metrics are bit-identical
    to the same batch with zeros there, and the gradient there is exactly 0."""
    kw = options(method, "seq-mean-token-mean")
    for dtype in ("float64", "float32", "bfloat16"):
        logp, old, adv, mask = make_case(11, kw, dtype, per_token=True)
        clean = [np.where(mask, x, 0.0) for x in (logp, old, adv)]
        outs = []
        step = jax.jit(
            jax.value_and_grad(
                lambda x, o, a, m: sapo_jax.policy_loss(x, o, a, m, **kw), has_aux=True
            )
        )
        for lp_, o_, a_ in ((logp, old, adv), clean):
            (loss, metrics), grad = step(*jax_inputs(lp_, o_, a_, mask, dtype))
            outs.append(
                (
                    np.asarray(loss),
                    np.asarray(grad.astype(jnp.float32)),
                    {k: np.asarray(v) for k, v in metrics.items()},
                )
            )
        (l1, g1, m1), (l2, g2, m2) = outs
        assert np.array_equal(l1, l2) and np.array_equal(g1, g2)
        assert all(np.array_equal(m1[k], m2[k]) for k in m1)
        assert np.all(g1[~mask] == 0.0) and np.all(np.isfinite(g1))


@pytest.mark.parametrize("method", ["sapo", "gspo"])
@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
def test_global_normalizer_shards_sum_to_batch(method, loss_agg):
    """Clause 3.8: shards evaluated with the global counts (Python numbers, or 0-d arrays from
    sapo_jax.normalizer) sum to the whole batch's loss and gradient (reference and float64)."""
    kw = options(method, loss_agg)
    logp, old, adv, mask = make_case(21, kw, "float64", per_token=False, n=6)
    whole = sapo_ref.policy_loss(logp, old, adv, mask, **kw)

    @jax.jit
    @functools.partial(jax.value_and_grad)
    def step(lp, o, a, m, n, r):
        return sapo_jax.policy_loss(lp, o, a, m, normalizer=sapo_ref.Normalizer(n, r), **kw)[0]

    for norm in (sapo_ref.normalizer(mask), sapo_jax.normalizer(jnp.asarray(mask))):
        total, grads = 0.0, []
        for rows in (slice(0, 2), slice(2, 6)):
            args = jax_inputs(logp[rows], old[rows], adv[rows], mask[rows], "float64")
            loss, grad = step(*args, norm.num_tokens, norm.num_rows)
            ref = sapo_ref.policy_loss(
                logp[rows],
                old[rows],
                adv[rows],
                mask[rows],
                normalizer=sapo_ref.Normalizer(float(norm.num_tokens), float(norm.num_rows)),
                **kw,
            )
            assert_close(loss, ref.loss, "float64", "value")
            total += float(loss)
            grads.append(np.asarray(grad))
        assert_close(total, whole.loss, "float64", "value")
        assert_close(np.concatenate(grads), whole.grad, "float64", "grad")


def test_normalizer_counts_match_reference():
    mask = np.array([[1, 1, 0], [0, 0, 0], [1, 0, 0]])
    for empty in (False, True):
        ref = sapo_ref.normalizer(mask, count_empty_rows=empty)
        got = sapo_jax.normalizer(jnp.asarray(mask), count_empty_rows=empty)
        assert (float(got.num_tokens), float(got.num_rows)) == (ref.num_tokens, ref.num_rows)


@pytest.mark.parametrize("mask_dtype", [np.bool_, np.int32, np.float32])
def test_mask_dtypes(mask_dtype):
    kw = options("sapo", "token-mean")
    logp, old, adv, mask = make_case(31, kw, "float64", per_token=False)
    logp, old = np.where(mask, logp, -1.0), np.where(mask, old, -1.0)
    check_against_reference(logp, old, adv, mask.astype(mask_dtype), "float64", kw)


def test_empty_batch_is_zero():
    """Clause 3.7: no valid token: loss +0.0, gradient 0."""
    z = jnp.zeros((2, 3))
    for method in METHODS:
        step = jax.jit(
            jax.value_and_grad(
                lambda x, method=method: sapo_jax.policy_loss(
                    x, z, jnp.ones(2), z > 0, method=method
                )[0]
            )
        )
        loss, grad = step(z)
        assert float(loss) == 0.0 and math.copysign(1.0, float(loss)) == 1.0
        assert np.all(np.asarray(grad) == 0.0)


def test_long_rows_float32():
    """float32 at 8192 tokens a row (sums over long rows stay within the float32 tolerance)."""
    rng = np.random.default_rng(8)
    n, t = 4, 8192
    logp = rounded(-np.abs(rng.normal(1.0, 0.5, (n, t))), "float32")
    old = rounded(logp - rng.normal(0.0, 0.2, (n, t)), "float32")
    mask = np.arange(t)[None, :] < np.array([[t], [t // 2], [1], [t - 3]])
    adv = rounded(rng.normal(size=n), "float32")
    for method in ("sapo", "sapo-seq"):
        for loss_agg in ("token-mean", "seq-mean-token-mean"):
            check_against_reference(logp, old, adv, mask, "float32", options(method, loss_agg))
