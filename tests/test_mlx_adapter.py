"""sapo_mlx against the reference: every method x aggregation x dtype, value, VJP and metrics,
under mx.grad, mx.value_and_grad, mx.compile and mx.vmap, and against mx.grad of the plain
formula. Tolerances come only from the spec's table (sapo_ref.spec.TOLERANCES)."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

import sapo_mlx
from sapo_mlx.plain import plain_loss

import sapo_ref
from sapo_ref import spec

DTYPES = ("float64", "float32", "bfloat16", "float16")
OPTIONS = {
    "sapo": [{}, {"tau_pos": 0.5, "tau_neg": 2.0}, {"tau_pos": 3.0, "tau_neg": 1.0}],
    "sapo-seq": [{}, {"tau_pos": 2.0, "tau_neg": 0.7}],
    "grpo": [{}, {"eps_low": 0.2, "eps_high": 0.28}, {"dual_clip": 1.5}],
    "gspo": [{}, {"eps_low": 0.05, "eps_high": 0.08, "dual_clip": 1.05}],
    "gspo-token": [{}, {"eps_low": 0.05, "eps_high": 0.08, "dual_clip": 1.05}],
}
CASES = [(m, i) for m, opts in OPTIONS.items() for i in range(len(opts))]


def assert_close(got, want, tol: spec.Tolerance, what: str) -> None:
    """Clause C.1: |got - want| <= atol * scale + rtol * |want|, scale = max(1, max |want|)."""
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    fin = np.isfinite(want)
    assert np.all(np.isfinite(got[fin])), f"{what}: non-finite where the reference is finite"
    assert np.array_equal(got[~fin], want[~fin]), f"{what}: non-finite values differ"
    scale = max(1.0, float(np.max(np.abs(want[fin]), initial=0.0)))
    err = np.abs(got[fin] - want[fin])
    bound = tol.atol * scale + tol.rtol * np.abs(want[fin])
    assert np.all(err <= bound), f"{what}: worst excess {np.max(err - bound):.3g} (max err {np.max(err):.3g})"


def _options(method: str, index: int, loss_agg: str) -> dict:
    opts = dict(OPTIONS[method][index], method=method, loss_agg=loss_agg)
    if loss_agg == "seq-mean-token-sum-norm":
        opts["norm_length"] = 12.0
    return opts


def _kinks(options: dict) -> list[float]:
    cfg = sapo_ref.resolve_config(**options)
    if cfg.is_soft:
        return []
    return [1.0 - cfg.eps_low, 1.0 + cfg.eps_high] + ([cfg.dual_clip] if cfg.dual_clip else [])


def _near_kink(lp, old, mask, options) -> bool:
    """Clause 2.5: cases keep every ratio (token and sequence) 1e-3 away from a clip kink."""
    kinks = _kinks(options)
    if not kinks:
        return False
    d = np.where(mask, lp, 0.0) - np.where(mask, old, 0.0)
    lengths = mask.sum(1)
    s = np.exp(d.sum(1) / np.maximum(lengths, 1))[lengths > 0]
    ratios = np.concatenate([np.exp(d[mask]), s])
    return any(np.any(np.abs(ratios / k - 1) < 1e-3) for k in kinks)


def make_case(seed: int, dtype: str, options: dict, per_token: bool, n: int = 5, t: int = 9):
    """Random inputs rounded to ``dtype`` (as mx arrays) and their float64 NumPy values.

    Ragged mask with an empty row, A = 0 somewhere, garbage (NaN, inf, 1e30) at invalid slots.
    """
    for attempt in range(100):
        rng = np.random.default_rng(1000 * seed + attempt)
        old = np.log(rng.uniform(0.05, 1.0, (n, t)))
        lp = old + rng.normal(0.0, 0.3, (n, t))
        mask = rng.random((n, t)) < 0.75
        mask[0, :] = False  # an empty row
        mask[1, 0] = True
        adv = rng.normal(size=(n, t) if per_token else n)
        adv.flat[2] = 0.0
        garbage = rng.choice([np.nan, np.inf, -np.inf, 1e30], size=(n, t))
        lp = np.where(mask, lp, garbage)
        old = np.where(mask, old, garbage[::-1])
        if per_token:
            adv = np.where(mask, adv, garbage)
        arrays = [sapo_mlx.to_mx(a, dtype) for a in (lp, old, adv)]
        rounded = [sapo_mlx.to_numpy(a).astype(np.float64) for a in arrays]
        if not _near_kink(rounded[0], rounded[1], mask, options):
            return arrays + [mx.array(mask)], rounded + [mask]
    raise AssertionError("no case away from the kinks")  # pragma: no cover


def _cotangent(seed: int) -> float:
    rng = np.random.default_rng(seed)
    return float(rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 2.0))


@pytest.mark.parametrize("per_token", [False, True], ids=["adv-seq", "adv-tok"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loss_agg", sapo_ref.LOSS_AGG_NAMES)
@pytest.mark.parametrize("method,index", CASES)
def test_matches_reference(method, index, loss_agg, dtype, per_token):
    options = _options(method, index, loss_agg)
    seed = zlib.crc32(f"{method}/{index}/{loss_agg}/{dtype}/{per_token}".encode()) % 10_000
    (lp, old, adv, mask), np_in = make_case(seed, dtype, options, per_token)
    ref = sapo_ref.policy_loss(*np_in, **options)
    cot = _cotangent(seed)

    loss, metrics = sapo_mlx.policy_loss(lp, old, adv, mask, **options)
    _, (grad,) = mx.vjp(
        lambda x: [sapo_mlx.policy_loss(x, old, adv, mask, **options)[0]],
        [lp],
        [mx.array(cot, dtype=loss.dtype)],
    )
    assert grad.dtype == lp.dtype  # gradient in the input dtype (clause 6.4)
    assert loss.dtype == sapo_mlx.compute_dtype(lp.dtype)
    tol = spec.TOLERANCES[dtype]
    assert_close(sapo_mlx.to_numpy(loss), ref.loss, tol["value"], "loss")
    assert_close(sapo_mlx.to_numpy(grad), cot * ref.grad, tol["grad"], "vjp")
    assert set(metrics) == set(sapo_ref.metric_keys(method))
    for key, want in ref.metrics.items():
        assert_close(sapo_mlx.to_numpy(metrics[key]), want, tol["value"], key)


@pytest.mark.parametrize("loss_agg", sapo_ref.LOSS_AGG_NAMES)
@pytest.mark.parametrize("method,index", CASES)
def test_custom_vjp_equals_autodiff_of_plain_formula(method, index, loss_agg):
    """mx.grad through the custom VJP vs mx.grad of the straightforward formula (float32,
    moderate log-ratios where the plain formula is finite)."""
    options = _options(method, index, loss_agg)
    (lp, old, adv, mask), np_in = make_case(7, "float32", options, per_token=True)
    # The plain formula multiplies and so needs clean padding (it is not the adapter's job).
    lp, old, adv = (mx.where(mask, a, 0.0) for a in (lp, old, adv))
    config = sapo_ref.resolve_config(**options)
    norm = sapo_ref.normalizer(np_in[3])
    den = float(sapo_ref.denominator(norm, config.loss_agg, config.norm_length))

    def ours(x):
        return sapo_mlx.policy_loss(x, old, adv, mask, **options)[0]

    def plain(x):
        return plain_loss(x, old, adv, mask, config, den)

    v1, g1 = mx.value_and_grad(ours)(lp)
    v2, g2 = mx.value_and_grad(plain)(lp)
    tol = spec.TOLERANCES["float32"]
    assert_close(np.array(v1), np.array(v2), tol["value"], "loss")
    assert_close(np.array(g1), np.array(g2), tol["grad"], "grad")


def _full_case(method: str, seed: int = 3):
    options = _options(method, 0, "seq-mean-token-mean")
    return options, make_case(seed, "float64", options, per_token=True)


@pytest.mark.parametrize("method", sapo_ref.METHOD_NAMES)
def test_compile_and_value_and_grad(method):
    options, ((lp, old, adv, mask), np_in) = _full_case(method)
    ref = sapo_ref.policy_loss(*np_in, **options)
    tol = spec.TOLERANCES["float64"]

    def f(x, o, a, m):
        return sapo_mlx.policy_loss(x, o, a, m, **options)[0]

    for vg in (mx.value_and_grad(f), mx.compile(mx.value_and_grad(f))):
        v, g = vg(lp, old, adv, mask)
        assert_close(np.array(v), ref.loss, tol["value"], "loss")
        assert_close(np.array(g), ref.grad, tol["grad"], "grad")
    g = mx.compile(mx.grad(f))(lp, old, adv, mask)
    assert_close(np.array(g), ref.grad, tol["grad"], "compiled grad")
    # Metrics come out of a compiled function too (nothing inside forces evaluation).
    m = mx.compile(lambda *a: sapo_mlx.policy_loss(*a, **options)[1])(lp, old, adv, mask)
    for key, want in ref.metrics.items():
        assert_close(np.array(m[key]), want, tol["value"], key)


@pytest.mark.parametrize("in_axis", [0, 1])
@pytest.mark.parametrize("method", sapo_ref.METHOD_NAMES)
def test_vmap(method, in_axis):
    """vmap over a batch of losses, and grad(vmap) / vmap(grad), equal the reference per item.
    The log-ratios include extremes where autodiff of the forward (instead of the custom
    VJP) would give NaN, so the custom VJP must survive vmap."""
    options = _options(method, 0, "token-mean")
    (_, old, adv, mask), (lp0, old_np, adv_np, mask_np) = make_case(11, "float64", options, True)
    shifts = [0.0, 0.3, -0.2]
    batch = np.stack([np.where(mask_np, lp0 + s, lp0) for s in shifts])
    batch[1, 1, 0] = old_np[1, 0] + 800.0  # r = e^800 at a valid token
    batch[2, 1, 0] = old_np[1, 0] + 1e4
    refs = [sapo_ref.policy_loss(b, old_np, adv_np, mask_np, **options) for b in batch]
    tol = spec.TOLERANCES["float64"]
    x = sapo_mlx.to_mx(np.moveaxis(batch, 0, in_axis))

    def f(lp):
        return sapo_mlx.policy_loss(lp, old, adv, mask, **options)[0]

    losses = mx.vmap(f, in_axes=in_axis)(x)
    assert_close(np.array(losses), [r.loss for r in refs], tol["value"], "vmap loss")
    want = np.moveaxis(np.stack([r.grad for r in refs]), 0, in_axis)
    cot = mx.array(np.random.default_rng(0).uniform(0.5, 2.0, len(refs)))
    g1 = mx.grad(lambda x: mx.sum(cot * mx.vmap(f, in_axes=in_axis)(x)))(x)
    cot_b = np.moveaxis(np.array(cot)[:, None, None], 0, in_axis)
    assert_close(np.array(g1), cot_b * want, tol["grad"], "grad of vmap")
    g2 = mx.vmap(mx.grad(f), in_axes=in_axis, out_axes=in_axis)(x)
    assert_close(np.array(g2), want, tol["grad"], "vmap of grad")


def test_vmap_batched_old_logp_and_mask():
    """Every input batched (a vmapped custom function with several batched arguments)."""
    options = _options("sapo-seq", 0, "seq-mean-token-sum")
    cases = [make_case(s, "float64", options, True) for s in (1, 2, 3)]
    stacked = [mx.stack([c[0][k] for c in cases]) for k in range(4)]
    refs = [sapo_ref.policy_loss(*c[1], **options) for c in cases]

    def f(*a):
        return sapo_mlx.policy_loss(*a, **options)[0]

    v, g = mx.vmap(mx.value_and_grad(f))(*stacked)
    tol = spec.TOLERANCES["float64"]
    assert_close(np.array(v), [r.loss for r in refs], tol["value"], "loss")
    assert_close(np.array(g), np.stack([r.grad for r in refs]), tol["grad"], "grad")
    metrics = mx.vmap(lambda *a: sapo_mlx.policy_loss(*a, **options)[1])(*stacked)
    for key in refs[0].metrics:
        assert_close(np.array(metrics[key]), [r.metrics[key] for r in refs], tol["value"], key)


@pytest.mark.parametrize("loss_agg", sapo_ref.LOSS_AGG_NAMES)
@pytest.mark.parametrize("count_empty_rows", [False, True])
def test_shards_with_global_normalizer_sum_to_the_batch(loss_agg, count_empty_rows):
    """Clause 3.8: shard losses and gradients with the global counts sum to the batch's."""
    options = _options("sapo", 0, loss_agg)
    if "norm_length" in options:
        options["norm_length"] = 1000.1  # R * L_norm is not a float32 number
    (lp, old, adv, mask), np_in = make_case(5, "float64", options, per_token=False, n=6)
    full = sapo_ref.policy_loss(*np_in, **options, count_empty_rows=count_empty_rows)
    parts = [slice(0, 2), slice(2, 6)]
    shard_norms = [sapo_mlx.normalizer(mask[s], count_empty_rows=count_empty_rows) for s in parts]
    norm = shard_norms[0] + shard_norms[1]
    total, grads = 0.0, []
    for s in parts:
        f = lambda x, s=s: sapo_mlx.policy_loss(x, old[s], adv[s], mask[s], **options, normalizer=norm)[0]
        v, g = mx.value_and_grad(f)(lp[s])
        total += v.item()
        grads.append(np.array(g))
    tol = spec.TOLERANCES["float64"]
    assert_close(total, full.loss, tol["value"], "sum of shard losses")
    assert_close(np.concatenate(grads), full.grad, tol["grad"], "shard gradients")
    # The reference's own Normalizer (Python floats) is accepted as well.
    ref_norm = sapo_ref.normalizer(np_in[3], count_empty_rows=count_empty_rows)
    v = sapo_mlx.policy_loss(lp, old, adv, mask, **options, normalizer=ref_norm)[0]
    assert_close(v.item(), full.loss, tol["value"], "reference normalizer")


def test_empty_batch_is_zero():
    """Clause 3.7: no valid token gives loss 0 and gradient 0 (0/0 = 0)."""
    lp = mx.array(np.full((2, 3), np.nan))
    mask = mx.zeros((2, 3), mx.bool_)
    for method in sapo_ref.METHOD_NAMES:
        f = lambda x, m=method: sapo_mlx.policy_loss(x, x, mx.ones(2), mask, method=m)[0]
        v, g = mx.value_and_grad(f)(lp)
        ref = sapo_ref.policy_loss(np.zeros((2, 3)), np.zeros((2, 3)), np.ones(2), np.zeros((2, 3), bool), method=method)
        assert v.item() == ref.loss and np.array_equal(np.array(g), ref.grad)


def test_advantages_and_mask_are_constants():
    """d loss / d old_logp = -d loss / d logp (the loss depends on delta); advantages have
    zero gradient by definition (they are data)."""
    options, ((lp, old, adv, mask), _) = _full_case("sapo")
    f = lambda x, o, a: sapo_mlx.policy_loss(x, o, a, mask, **options)[0]
    g_lp, g_old, g_adv = mx.grad(f, argnums=(0, 1, 2))(lp, old, adv)
    assert np.array_equal(np.array(g_old), -np.array(g_lp))
    assert not np.any(np.array(g_adv))
    assert not math.isnan(float(np.sum(np.array(g_lp))))
