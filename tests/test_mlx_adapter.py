"""What is MLX's own in sapo_mlx: the ``mx.custom_function`` wrapper (closed-form VJP vs MLX's
autodiff of the same formula), mx.compile, mx.vmap, mixed dtypes and what is differentiated
(clause 8.9), low-precision dtypes. Agreement with the reference per method, aggregation and
dtype is tests/backends' (one test for every backend)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

pytest.importorskip("mlx.core")

import mlx.core as mx
import sapo_mlx

import sapo_ref
from sapo_ref import Normalizer, spec
from sapo_ref.evaluate import evaluate

pytestmark = pytest.mark.mlx

F64 = spec.TOLERANCES["float64"]
OPTIONS = {
    "sapo": {"tau_pos": 0.5, "tau_neg": 2.0},
    "sapo-seq": {"tau_pos": 2.0, "tau_neg": 0.7},
    "grpo": {"eps_low": 0.2, "eps_high": 0.28, "dual_clip": 1.5},
    "gspo": {"eps_low": 0.05, "eps_high": 0.08},
    "gspo-token": {"eps_low": 0.05, "eps_high": 0.08, "dual_clip": 1.05},
}


def assert_close(got, want, tol: spec.Tolerance, what: str) -> None:
    """Clause C.1: |got - want| <= atol * scale + rtol * |want|, scale = max(1, max |want|)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    fin = np.isfinite(want)
    assert np.all(np.isfinite(got[fin])), f"{what}: non-finite where the reference is finite"
    assert np.array_equal(got[~fin], want[~fin]), f"{what}: non-finite values differ"
    scale = max(1.0, float(np.max(np.abs(want[fin]), initial=0.0)))
    err = np.abs(got[fin] - want[fin])
    assert np.all(err <= tol.atol * scale + tol.rtol * np.abs(want[fin])), (
        f"{what}: max err {np.max(err):.3g}"
    )


def make_case(seed: int, n: int = 5, t: int = 9, per_token: bool = True):
    """float64 NumPy inputs: ragged mask with an empty row, A = 0 somewhere, garbage (NaN, inf)
    at invalid slots, log-ratios near 0 (ratios 1e-3 or more from every clip kink)."""
    rng = np.random.default_rng(seed)
    old = np.log(rng.uniform(0.05, 1.0, (n, t)))
    lp = old + rng.choice([-1, 1], (n, t)) * rng.uniform(0.003, 0.03, (n, t))
    mask = rng.random((n, t)) < 0.75
    mask[0, :] = False
    mask[1, 0] = True
    adv = rng.normal(size=(n, t) if per_token else n)
    adv.flat[2] = 0.0
    garbage = rng.choice([np.nan, np.inf, -np.inf, 1e30], size=(n, t))
    lp, old = np.where(mask, lp, garbage), np.where(mask, old, garbage[::-1])
    if per_token:
        adv = np.where(mask, adv, garbage)
    return lp, old, adv, mask


def _mx(case):
    return [sapo_mlx.to_mx(a) for a in case]


@pytest.mark.clause("1.7")
@pytest.mark.parametrize("loss_agg", sapo_ref.LOSS_AGG_NAMES)
@pytest.mark.parametrize("method", sapo_ref.METHOD_NAMES)
def test_custom_vjp_equals_mlx_autodiff_of_the_formula(method, loss_agg):
    """mx.grad through the custom function (closed form) vs mx.grad of sapo_ref.evaluate's loss
    differentiated by MLX itself, on clean float64 inputs; cotangent != 1."""
    opts = dict(OPTIONS[method], method=method, loss_agg=loss_agg)
    if loss_agg == "seq-mean-token-sum-norm":
        opts["norm_length"] = 12.0
    lp, old, adv, mask = make_case(7)
    lp, old, adv = (np.where(mask, a, 0.0) for a in (lp, old, adv))  # autodiff needs clean padding
    x, o, a, m = _mx((lp, old, adv, mask))
    config = sapo_ref.resolve_config(**opts)
    counts = sapo_ref.normalizer(mask)
    norm = Normalizer(*(mx.array(c, mx.float64) for c in (counts.num_tokens, counts.num_rows)))

    def autodiff(x):
        return evaluate(x, o, a, m, config, norm).loss

    v1, g1 = mx.value_and_grad(lambda x: 1.7 * sapo_mlx.policy_loss(x, o, a, m, **opts)[0])(x)
    if config.method_spec.ratio == "sequence-token":  # sg[s_i] (eq. 13-14): the reference instead
        ref = sapo_ref.policy_loss(lp, old, adv, mask, **opts)
        want_v, want_g = 1.7 * ref.loss, 1.7 * ref.grad
    else:
        v2, g2 = mx.value_and_grad(lambda x: 1.7 * autodiff(x))(x)
        want_v, want_g = np.array(v2), np.array(g2)
    assert_close(np.array(v1), want_v, F64["value"], "loss")
    assert_close(np.array(g1), want_g, F64["grad"], "grad")


@pytest.mark.clause("8.9")
@pytest.mark.parametrize("method", sapo_ref.METHOD_NAMES)
def test_compile_and_value_and_grad(method):
    """Eager, mx.compile(value_and_grad), mx.compile(grad) and compiled metrics agree with the
    reference; the old_logp cotangent is -G (0 for gspo-token); advantages/mask get zeros."""
    opts = {"method": method, "loss_agg": "seq-mean-token-mean"}
    case = make_case(3)
    ref = sapo_ref.policy_loss(*case, **opts)
    lp, old, adv, mask = _mx(case)

    def f(x, o, a, m):
        return sapo_mlx.policy_loss(x, o, a, m, **opts)[0]

    want_old = np.zeros_like(ref.grad) if method == "gspo-token" else -ref.grad
    for vg in (mx.value_and_grad(f, (0, 1, 2)), mx.compile(mx.value_and_grad(f, (0, 1, 2)))):
        v, (g, g_old, g_adv) = vg(lp, old, adv, mask)
        assert_close(np.array(v), ref.loss, F64["value"], "loss")
        assert_close(np.array(g), ref.grad, F64["grad"], "grad")
        assert_close(np.array(g_old), want_old, F64["grad"], "old_logp grad")
        assert not np.any(np.array(g_adv))
    g = mx.compile(mx.grad(f))(lp, old, adv, mask)
    assert_close(np.array(g), ref.grad, F64["grad"], "compiled grad")
    m = mx.compile(lambda *a: sapo_mlx.policy_loss(*a, **opts, metrics=True)[1])(lp, old, adv, mask)
    assert set(m) == set(ref.metrics)
    for key, want in ref.metrics.items():
        assert_close(np.array(m[key]), want, F64["value"], key)


@pytest.mark.parametrize("in_axis", [0, 1])
@pytest.mark.parametrize("method", sapo_ref.METHOD_NAMES)
def test_vmap(method, in_axis):
    """vmap over a batch of losses, grad(vmap) and vmap(grad) equal the reference per item;
    extreme log-ratios where autodiff of the forward would give NaN keep the custom VJP."""
    opts = {"method": method, "loss_agg": "token-mean"}
    lp0, old_np, adv_np, mask_np = make_case(11)
    batch = np.stack([np.where(mask_np, lp0 + s, lp0) for s in (0.0, 0.3, -0.2)])
    batch[1, 1, 0] = old_np[1, 0] + 800.0  # r = e^800 at a valid token
    batch[2, 1, 0] = old_np[1, 0] + 1e4
    refs = [sapo_ref.policy_loss(b, old_np, adv_np, mask_np, **opts) for b in batch]
    _, old, adv, mask = _mx((lp0, old_np, adv_np, mask_np))
    x = sapo_mlx.to_mx(np.moveaxis(batch, 0, in_axis))

    def f(lp):
        return sapo_mlx.policy_loss(lp, old, adv, mask, **opts)[0]

    assert_close(
        np.array(mx.vmap(f, in_axes=in_axis)(x)), [r.loss for r in refs], F64["value"], "loss"
    )
    want = np.moveaxis(np.stack([r.grad for r in refs]), 0, in_axis)
    cot = mx.array(np.random.default_rng(0).uniform(0.5, 2.0, len(refs)))
    g1 = mx.grad(lambda x: mx.sum(cot * mx.vmap(f, in_axes=in_axis)(x)))(x)
    cot_b = np.moveaxis(np.array(cot)[:, None, None], 0, in_axis)
    assert_close(np.array(g1), cot_b * want, F64["grad"], "grad of vmap")
    g2 = mx.vmap(mx.grad(f), in_axes=in_axis, out_axes=in_axis)(x)
    assert_close(np.array(g2), want, F64["grad"], "vmap of grad")


def test_vmap_batched_old_logp_and_mask():
    """Every input batched: several batched arguments of the vmapped custom function."""
    opts = {"method": "sapo-seq", "loss_agg": "seq-mean-token-sum"}
    cases = [make_case(s) for s in (1, 2, 3)]
    stacked = [mx.stack([_mx(c)[k] for c in cases]) for k in range(4)]
    refs = [sapo_ref.policy_loss(*c, **opts) for c in cases]

    def f(*a):
        return sapo_mlx.policy_loss(*a, **opts)[0]

    v, g = mx.vmap(mx.value_and_grad(f))(*stacked)
    assert_close(np.array(v), [r.loss for r in refs], F64["value"], "loss")
    assert_close(np.array(g), np.stack([r.grad for r in refs]), F64["grad"], "grad")
    metrics = mx.vmap(lambda *a: sapo_mlx.policy_loss(*a, **opts, metrics=True)[1])(*stacked)
    for key in refs[0].metrics:
        assert_close(np.array(metrics[key]), [r.metrics[key] for r in refs], F64["value"], key)


@pytest.mark.clause("8.9")
@pytest.mark.parametrize("method", ["sapo", "gspo-token"])
def test_mixed_dtypes_promote_without_a_warning(method):
    """float32 logp with float64 old_logp: computed and returned in float64, the gradient in
    logp's dtype (float32), old_logp's in float64, no warning; the values are the reference's
    on the same (rounded) inputs."""
    lp, old, adv, mask = make_case(5)
    x = mx.array(lp.astype(np.float32))
    o, a, m = _mx((old, adv, mask))
    ref = sapo_ref.policy_loss(np.array(x).astype(np.float64), old, adv, mask, method=method)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        f = lambda x, o: sapo_mlx.policy_loss(x, o, a, m, method=method)[0]
        v, (g, g_old) = mx.value_and_grad(f, (0, 1))(x, o)
    assert v.dtype == mx.float64 and g.dtype == mx.float32 and g_old.dtype == mx.float64
    assert_close(np.array(v), ref.loss, F64["value"], "loss")
    assert_close(np.array(g), ref.grad, spec.TOLERANCES["float32"]["grad"], "grad")


@pytest.mark.clause("6.4")
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_is_computed_in_float32(dtype):
    """bfloat16/float16 inputs, computed in float32: the loss and the gradient in the input
    dtype (clause 8.9), both the reference's on the rounded inputs at the dtype's tolerance."""
    lp, old, adv, mask = make_case(8)
    x, o, a = (sapo_mlx.to_mx(v, dtype) for v in (lp, old, adv))
    rounded = [sapo_mlx.to_numpy(v).astype(np.float64) for v in (x, o, a)]
    ref = sapo_ref.policy_loss(*rounded, mask)
    v, g = mx.value_and_grad(lambda x: sapo_mlx.policy_loss(x, o, a, mx.array(mask))[0])(x)
    assert v.dtype == g.dtype == getattr(mx, dtype)
    tol = spec.TOLERANCES[dtype]
    assert_close(sapo_mlx.to_numpy(v), ref.loss, tol["value"], "loss")
    assert_close(sapo_mlx.to_numpy(g), ref.grad, tol["grad"], "grad")


@pytest.mark.clause("3.7")
def test_empty_batch_is_zero():
    """No valid token: loss 0 and gradient 0 (0/0 = 0), garbage everywhere."""
    lp = mx.array(np.full((2, 3), np.nan))
    mask = mx.zeros((2, 3), mx.bool_)
    for method in sapo_ref.METHOD_NAMES:
        f = lambda x, m=method: sapo_mlx.policy_loss(x, x, mx.ones(2), mask, method=m)[0]
        v, g = mx.value_and_grad(f)(lp)
        assert v.item() == 0.0 and not np.any(np.array(g))


def test_metrics_keyword(monkeypatch):
    """Metrics are opt-in: the default (metrics=False) returns an empty dict and builds no
    metric; metrics=True returns every key of the method, in the spec's order."""
    lp, old, adv, mask = _mx(make_case(2))
    built = []
    real = sapo_mlx.loss._metrics_fn
    monkeypatch.setattr(sapo_mlx.loss, "_metrics_fn", lambda *a: built.append(1) or real(*a))
    assert sapo_mlx.policy_loss(lp, old, adv, mask)[1] == {}
    assert sapo_mlx.policy_loss(lp, old, adv, mask, metrics=False)[1] == {}
    assert not built
    keys = tuple(sapo_mlx.policy_loss(lp, old, adv, mask, method="grpo", metrics=True)[1])
    assert keys == sapo_ref.metric_keys("grpo")
    with pytest.raises(TypeError, match="metrics must be a bool"):
        sapo_mlx.policy_loss(lp, old, adv, mask, metrics="yes")


def test_copies_out_of_the_trace_are_bit_exact():
    """The forward's inputs are copied out of mx.grad's trace through same-size integers: every
    dtype comes back bit for bit (memoryview alone would turn float64 into float32)."""
    from sapo_mlx.tracing import detached

    rng = np.random.default_rng(0)
    values = rng.normal(size=(3, 5)) * 10.0 ** rng.integers(-300, 300, (3, 5))
    values[0, :3] = [np.nan, np.inf, -0.0]
    arrays = [sapo_mlx.to_mx(values, d) for d in ("float64", "float32", "bfloat16", "float16")]
    arrays += [mx.array(values > 0), mx.array(rng.integers(0, 2, (3, 5)), mx.int8)]
    for a, b in zip(arrays, detached(tuple(arrays))):
        assert a.dtype == b.dtype and a.shape == b.shape
        bits = {1: mx.uint8, 2: mx.uint16, 4: mx.uint32, 8: mx.uint64}[a.dtype.size]
        assert np.array_equal(np.array(a.view(bits)), np.array(b.view(bits)))


# ----------------------------------------------------------------------------- clause 10 terms
def make_terms(case, seed: int, layout: str = "token"):
    """float64 weights (a zero among them, garbage where masked) and ref_logp beside ``case``."""
    lp, _, _, mask = case
    rng = np.random.default_rng(seed)
    n, t = mask.shape
    w = rng.uniform(0.0, 2.0, (n, t) if layout == "token" else n)
    w.flat[1] = 0.0
    if layout == "token":
        w = np.where(mask, w, rng.choice([np.nan, -1.0, np.inf], size=(n, t)))
    ref = np.where(mask, np.where(mask, lp, 0.0) + rng.normal(0.0, 0.4, (n, t)), np.nan)
    return w, ref


@pytest.mark.clause("10.1", "10.2", "10.3")
@pytest.mark.parametrize("estimator", sapo_ref.KL_ESTIMATOR_NAMES)
@pytest.mark.parametrize("method", ["sapo", "gspo"])
def test_terms_under_compile_vmap_and_grad(method, estimator):
    """mx.compile(mx.value_and_grad) over (logp, ref_logp) and mx.vmap over problems with
    their own weights and ref_logp: the reference's loss and gradients (ref_logp: minus the KL
    part); the weights are constants."""
    opts = {"method": method, "kl_coef": 0.4, "kl_estimator": estimator}
    cases = [make_case(s) for s in (21, 22)]
    terms = [make_terms(c, 30 + i, ("token", "row")[i]) for i, c in enumerate(cases)]
    for case, (w, ref) in zip(cases, terms):
        want = sapo_ref.policy_loss(*case, **opts, weights=w, ref_logp=ref)
        policy = sapo_ref.policy_loss(*case, method=method, weights=w)
        _, old, adv, mask = _mx(case)

        def f(x, r, v):
            return sapo_mlx.policy_loss(x, old, adv, mask, **opts, weights=v, ref_logp=r)[0]

        args = [sapo_mlx.to_mx(a) for a in (case[0], ref, w)]
        for step in (mx.value_and_grad(f, (0, 1, 2)), mx.compile(mx.value_and_grad(f, (0, 1, 2)))):
            loss, (g, g_ref, g_w) = step(*args)
            assert_close(loss.item(), want.loss, F64["value"], "loss")
            assert_close(np.array(g), want.grad, F64["grad"], "grad")
            assert_close(np.array(g_ref), policy.grad - want.grad, F64["grad"], "ref_logp grad")
            assert not np.any(np.array(g_w)), "weights must get a zero gradient"
    # vmap: each problem its own [N, T] ref_logp and [N] weights
    cases = [make_case(s, per_token=False) for s in (23, 24, 25)]
    terms = [make_terms(c, 40 + i, "row") for i, c in enumerate(cases)]
    stacked = [mx.stack([_mx(c)[k] for c in cases]) for k in range(4)]
    stacked += [mx.stack([sapo_mlx.to_mx(t[k]) for t in terms]) for k in range(2)]

    def g(lp, old, adv, mask, w, ref):
        return sapo_mlx.policy_loss(lp, old, adv, mask, **opts, weights=w, ref_logp=ref)[0]

    v, grads = mx.vmap(mx.value_and_grad(g, (0, 5)))(*stacked)
    for b, (case, (w, ref)) in enumerate(zip(cases, terms)):
        want = sapo_ref.policy_loss(*case, **opts, weights=w, ref_logp=ref)
        policy = sapo_ref.policy_loss(*case, method=method, weights=w)
        assert_close(v[b].item(), want.loss, F64["value"], f"vmap loss {b}")
        assert_close(np.array(grads[0][b]), want.grad, F64["grad"], f"vmap grad {b}")
        assert_close(np.array(grads[1][b]), policy.grad - want.grad, F64["grad"], f"ref {b}")


@pytest.mark.clause("8.7", "10.4")
def test_compiled_invalid_terms_poison():
    case = make_case(26)
    w, ref = make_terms(case, 50)
    i, t = np.argwhere(case[3])[0]
    w[i, t] = -1.0
    _, old, adv, mask = _mx(case)

    def f(x, v, r):
        return sapo_mlx.policy_loss(x, old, adv, mask, weights=v, ref_logp=r, kl_coef=0.1)[0]

    args = [sapo_mlx.to_mx(a) for a in (case[0], w, ref)]
    with pytest.raises(ValueError, match="weights must be finite and >= 0"):
        f(*args)
    loss, g = mx.compile(mx.value_and_grad(f))(*args)
    assert np.isnan(loss.item()) and np.all(np.isnan(np.array(g)))
