"""sapo_jax under JAX transformations: jit, grad, value_and_grad, vjp, jacrev, vmap, shard_map;
compile counts (no retrace for the same options; small eager inputs share one program per
method and aggregation); the custom_vjp gradient against ``jax.grad`` of a plain jnp formula
written here independently of sapo_ref; metrics only when asked (``metrics=True``).
"""

from __future__ import annotations

import numpy as np
import pytest

import sapo_ref
from sapo_ref import spec

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

import sapo_jax  # noqa: E402
import sapo_jax.vjp  # noqa: E402

pytestmark = pytest.mark.jax

F64 = spec.TOLERANCES["float64"]
METHODS = sapo_ref.METHOD_NAMES
LOSS_AGGS = sapo_ref.LOSS_AGG_NAMES
CLIP_OPTS = {"eps_low": 0.2, "eps_high": 0.28}


def opts(method: str, loss_agg: str = "seq-mean-token-mean") -> dict:
    kw = {"method": method, "loss_agg": loss_agg}
    if loss_agg == "seq-mean-token-sum-norm":
        kw["norm_length"] = 6.0
    if spec.METHODS[method].gate == "clip":
        kw.update(CLIP_OPTS)
    return kw


def batch(seed: int, n: int = 4, t: int = 6, per_token: bool = False, spread: float = 0.3):
    rng = np.random.default_rng(seed)
    logp = -np.abs(rng.normal(1.0, 0.6, (n, t)))
    old = logp - rng.normal(0.0, spread, (n, t))
    mask = np.arange(t)[None, :] < rng.integers(1, t + 1, (n, 1))
    adv = rng.normal(size=(n, t) if per_token else n)
    return tuple(jnp.asarray(x) for x in (logp, old, adv, mask))


def close(got, want, tol=F64["grad"]):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = max(1.0, float(np.max(np.abs(want), initial=0.0)))
    np.testing.assert_allclose(got, want, rtol=tol.rtol, atol=tol.atol * scale)


# ------------------------------------------------------------------ plain formulas (autodiff)
def plain_loss(
    logp,
    old,
    adv,
    mask,
    *,
    method,
    loss_agg,
    tau_pos=1.0,
    tau_neg=1.05,
    eps_low=0.2,
    eps_high=0.2,
    norm_length=None,
):
    """Each method and aggregation written directly in jnp (paper eq. 1-11), for jax.grad.

    Finite only where every intermediate is (moderate log-ratios, no masked garbage)."""
    m = mask.astype(logp.dtype)
    lengths = m.sum(1)
    a = jnp.broadcast_to(adv[:, None], logp.shape) if adv.ndim == 1 else adv
    delta = (logp - old) * m
    mu = delta.sum(1) / jnp.maximum(lengths, 1.0)
    if method == "gspo-token":  # s_it = sg[s_i] * pi / sg[pi]  (GSPO eq. 13)
        x = jax.lax.stop_gradient(jnp.exp(mu))[:, None] * jnp.exp(
            logp - jax.lax.stop_gradient(logp)
        )
    elif method in ("sapo-seq", "gspo"):
        x = jnp.broadcast_to(jnp.exp(mu)[:, None], logp.shape)
    else:
        x = jnp.exp(delta)
    if method in ("sapo", "sapo-seq"):
        tau = jnp.where(a > 0, tau_pos, tau_neg)
        term = 4.0 / tau * jax.nn.sigmoid(tau * (x - 1.0)) * a
    else:
        term = jnp.minimum(x * a, jnp.clip(x, 1.0 - eps_low, 1.0 + eps_high) * a)
    rows = (lengths > 0).sum()
    if loss_agg == "token-mean":
        return -(term * m).sum() / m.sum()
    if loss_agg == "seq-mean-token-mean":
        return -((term * m).sum(1) / jnp.maximum(lengths, 1.0)).sum() / rows
    den = rows if loss_agg == "seq-mean-token-sum" else rows * norm_length
    return -(term * m).sum() / den


@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
@pytest.mark.parametrize("method", METHODS)
def test_custom_vjp_equals_autodiff_of_plain_formula(method, loss_agg):
    kw = opts(method, loss_agg)
    for seed, per_token in ((1, False), (2, True)):
        lp, o, a, m = batch(seed, per_token=per_token)
        want_loss, want_grad = jax.value_and_grad(lambda *args: plain_loss(*args, **kw))(
            lp, o, a, m
        )
        assert np.all(np.isfinite(np.asarray(want_grad)))
        loss, grad = jax.jit(
            jax.value_and_grad(lambda *args: sapo_jax.policy_loss(*args, **kw)[0])
        )(lp, o, a, m)
        close(loss, want_loss, F64["value"])
        close(grad, want_grad)


def test_jit_grad_vjp_agree():
    lp, o, a, m = batch(3)
    f = lambda x: sapo_jax.policy_loss(x, o, a, m)[0]
    g_eager = jax.grad(f)(lp)
    g_jit = jax.jit(jax.grad(f))(lp)
    loss, g_vg = jax.jit(jax.value_and_grad(f))(lp)
    _, vjp = jax.vjp(f, lp)
    (g_vjp,) = vjp(jnp.asarray(2.5))
    ref = sapo_ref.policy_loss(*(np.asarray(x) for x in (lp, o, a, m)))
    close(loss, ref.loss, F64["value"])
    for g in (g_eager, g_jit, g_vg):
        close(g, ref.grad)
    close(g_vjp, 2.5 * ref.grad)


def test_value_and_grad_has_aux_metrics():
    lp, o, a, m = batch(4)
    (_, metrics), grad = jax.jit(
        jax.value_and_grad(
            lambda x: sapo_jax.policy_loss(x, o, a, m, method="grpo", metrics=True), has_aux=True
        )
    )(lp)
    ref = sapo_ref.policy_loss(*(np.asarray(x) for x in (lp, o, a, m)), method="grpo")
    assert set(metrics) == set(ref.metrics) == set(sapo_ref.metric_keys("grpo"))
    for k, v in metrics.items():
        close(v, ref.metrics[k], F64["value"])
    close(grad, ref.grad)


def test_metrics_carry_no_gradient():
    lp, o, a, m = batch(5)
    g = jax.grad(lambda x: sapo_jax.policy_loss(x, o, a, m, metrics=True)[1]["ratio/mean"])(lp)
    assert np.all(np.asarray(g) == 0.0)


@pytest.mark.parametrize("method", METHODS)
def test_vmap_over_problems(method):
    """vmap over a leading batch of B problems equals B separate reference calls."""
    kw = opts(method) | {"metrics": True}
    problems = [batch(10 + b, per_token=b % 2 == 1) for b in range(3)]

    def f(lp, o, a, m):
        return jax.value_and_grad(lambda *args: sapo_jax.policy_loss(*args, **kw), has_aux=True)(
            lp, o, a, m
        )

    for per_token in (False, True):
        chosen = [p for b, p in enumerate(problems) if (b % 2 == 1) == per_token] * 2
        stacked = [jnp.stack(xs) for xs in zip(*chosen)]
        (loss, metrics), grad = jax.jit(jax.vmap(f))(*stacked)
        for b, p in enumerate(chosen):
            ref = sapo_ref.policy_loss(*(np.asarray(x) for x in p), **opts(method))
            close(loss[b], ref.loss, F64["value"])
            close(grad[b], ref.grad)
            close(metrics["tokens"][b], ref.metrics["tokens"], F64["value"])


def test_vmap_with_batched_normalizer():
    """Traced normalizer counts under vmap (each problem its own counts, doubled)."""
    problems = [batch(20 + b) for b in range(3)]
    stacked = [jnp.stack(xs) for xs in zip(*problems)]

    def f(lp, o, a, m):
        local = sapo_jax.normalizer(m)
        norm = sapo_ref.Normalizer(2 * local.num_tokens, 2 * local.num_rows)
        return sapo_jax.policy_loss(lp, o, a, m, loss_agg="token-mean", normalizer=norm)[0]

    losses = jax.jit(jax.vmap(f))(*stacked)
    for b, p in enumerate(problems):
        ref = sapo_ref.policy_loss(*(np.asarray(x) for x in p), loss_agg="token-mean")
        close(losses[b], ref.loss / 2, F64["value"])


@pytest.fixture
def traces(monkeypatch):
    """How many times the formula is traced (each trace is one compilation)."""
    count = []
    real = sapo_jax.vjp.evaluate

    def counting(*args, **kwargs):
        count.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(sapo_jax.vjp, "evaluate", counting)
    return count


def test_no_retrace_for_same_options(traces):
    """Equal options (however spelled) and new array values reuse the compiled computation."""
    shape = (3, 6007)  # past the small-input buckets, a shape no other test uses
    for i, tau in enumerate((1, 1.0, np.float64(1.0))):
        lp, o, a, m = batch(30 + i, *shape)
        sapo_jax.policy_loss(lp, o, a, m, tau_pos=tau, tau_neg=1.05)
    assert len(traces) == 1
    step = jax.jit(
        jax.value_and_grad(lambda x, o, a, m: sapo_jax.policy_loss(x, o, a, m, tau_pos=1)[0])
    )
    for i in range(3):
        step(*batch(40 + i, *shape))
    assert len(traces) == 1  # the user's jit reuses the traced formula


def test_small_eager_inputs_share_one_program_per_method_and_aggregation(traces):
    """Eager calls on small inputs pad to a shape bucket and trace the method parameters: new
    shapes, parameter values, advantage layouts and mask dtypes compile nothing new, and the
    result is the reference's."""
    kw = {"method": "gspo", "loss_agg": "seq-mean-token-sum"}
    lp, o, a, m = batch(80, 2, 3)
    sapo_jax.policy_loss(lp, o, a, m, **kw, metrics=True)
    before = len(traces)
    for i, (n, t) in enumerate([(2, 5), (4, 6), (3, 2), (5, 11)]):
        lp, o, a, m = batch(81 + i, n, t, per_token=i % 2 == 1)
        extra = {
            "eps_low": 0.1 * (i + 1),
            "eps_high": 0.05 * (i + 1),
            "dual_clip": [None, 2.0][i % 2],
        }
        m = m.astype(jnp.int32) if i == 2 else m
        (loss, metrics), grad = jax.value_and_grad(
            lambda x: sapo_jax.policy_loss(x, o, a, m, **kw, **extra, metrics=True), has_aux=True
        )(lp)
        ref = sapo_ref.policy_loss(*(np.asarray(x) for x in (lp, o, a, m)), **kw, **extra)
        close(loss, ref.loss, F64["value"])
        close(grad, ref.grad)
        assert grad.shape == (n, t)
        assert set(metrics) == set(sapo_ref.metric_keys("gspo"))
        for k, v in metrics.items():
            close(v, ref.metrics[k], F64["value"])
    assert len(traces) == before


def test_jacrev_and_grad_compose():
    """custom_vjp composes with reverse mode: jacrev = grad, grad of a function of the loss."""
    lp, o, a, m = batch(6)
    f = lambda x: sapo_jax.policy_loss(x, o, a, m)[0]
    g = jax.grad(f)(lp)
    close(jax.jacrev(f)(lp), g)
    close(jax.grad(lambda x: 3.0 * f(x) ** 2)(lp), 6.0 * f(lp) * g)
    close(jax.jit(jax.grad(lambda x: jnp.sin(f(x))))(lp), jnp.cos(f(lp)) * g)


def test_user_jit_traces_once():
    count = []

    @jax.jit
    def step(lp, o, a, m):
        count.append(1)
        return jax.value_and_grad(lambda x: sapo_jax.policy_loss(x, o, a, m, method="gspo")[0])(lp)

    for i in range(3):
        step(*batch(50 + i))
    assert len(count) == 1


def test_metrics_are_opt_in_and_cost_nothing_without(monkeypatch):
    """The default call returns ``{}`` and computes no metric, eagerly (small bucketed inputs
    and large ones) as under jit: the compiled value_and_grad has no max/min reductions
    (ratio/max, ratio/min) and fewer reductions than the same call with ``metrics=True``."""
    built = []
    real = sapo_jax.vjp.compute_metrics
    monkeypatch.setattr(
        sapo_jax.vjp, "compute_metrics", lambda *a, **k: built.append(1) or real(*a, **k)
    )
    for shape in ((2, 3), (2, 8209)):  # a bucketed and an unbucketed eager call
        lp, o, a, m = batch(61, *shape)
        loss, metrics = sapo_jax.policy_loss(lp, o, a, m)
        assert metrics == {}
        close(
            loss, sapo_ref.policy_loss(*(np.asarray(x) for x in (lp, o, a, m))).loss, F64["value"]
        )
        assert not built
    with pytest.raises(TypeError, match="metrics must be a bool"):
        sapo_jax.policy_loss(lp, o, a, m, metrics=1)
    lp, o, a, m = batch(60, 8, 64)

    def compiled(want):
        f = lambda x: sapo_jax.policy_loss(x, o, a, m, metrics=want)
        return jax.jit(jax.value_and_grad(f, has_aux=True)).lower(lp).compile().as_text()

    lean, full = compiled(False), compiled(True)
    assert lean.count(" reduce(") < full.count(" reduce(")
    assert " maximum(" in full and " minimum(" in full
    reducers = [blk for blk in lean.split("\n\n") if "reduce" in blk]
    assert not any(
        "ROOT" in blk and "maximum(" in blk.split("ROOT")[1].split("\n")[0] for blk in reducers
    )


def test_inside_shard_map_single_process():
    """policy_loss inside jax.shard_map with psum'ed counts equals the whole batch."""
    devices = np.array(jax.devices()[:1])
    mesh = jax.sharding.Mesh(devices, ("data",))
    P = jax.sharding.PartitionSpec
    lp, o, a, m = batch(70, n=4)

    def shard_loss(lp, o, a, m):
        local = sapo_jax.normalizer(m)
        norm = sapo_ref.Normalizer(
            jax.lax.psum(local.num_tokens, "data"), jax.lax.psum(local.num_rows, "data")
        )
        loss, grad = jax.value_and_grad(
            lambda x: sapo_jax.policy_loss(x, o, a, m, normalizer=norm)[0]
        )(lp)
        return jax.lax.psum(loss, "data"), grad

    f = jax.jit(
        jax.shard_map(shard_loss, mesh=mesh, in_specs=(P("data"),) * 4, out_specs=(P(), P("data")))
    )
    loss, grad = f(lp, o, a, m)
    ref = sapo_ref.policy_loss(*(np.asarray(x) for x in (lp, o, a, m)))
    close(loss, ref.loss, F64["value"])
    close(grad, ref.grad)


# ------------------------------------------------------------------ clause 10 terms
def plain_kl(u, estimator):
    """The estimators of clause 10.2 written directly in jnp, for jax.grad (moderate u)."""
    k3 = jnp.exp(u) - 1.0 - u
    return {"k1": -u, "k2": 0.5 * u**2, "k3": k3, "low-var-k3": jnp.minimum(k3, 10.0)}[estimator]


def plain_loss_with_terms(logp, old, adv, mask, weights, ref, *, kl_coef, kl_estimator, **kw):
    """plain_loss with per-token weights on the policy term and the KL penalty added per token
    (token-mean: c = 1/n, so the KL term is beta times its masked mean)."""
    assert kw["loss_agg"] == "token-mean"
    m = mask.astype(logp.dtype)
    w = jnp.broadcast_to(weights[:, None], logp.shape) if weights.ndim == 1 else weights
    # the weighted policy term: plain_loss with the advantages scaled by w (w A f = (w A) f
    # for every gate: the clip gates are min(r A, clip(r) A), homogeneous in A for w >= 0)
    a = jnp.broadcast_to(adv[:, None], logp.shape) if adv.ndim == 1 else adv
    policy = plain_loss(logp, old, w * a, mask, **kw)
    kl = (plain_kl((ref - logp) * m, kl_estimator) * m).sum() / m.sum()
    return policy + kl_coef * kl


@pytest.mark.parametrize("estimator", sapo_ref.KL_ESTIMATOR_NAMES)
@pytest.mark.parametrize("method", ("sapo", "grpo"))
def test_custom_vjp_with_terms_equals_autodiff_of_plain_formula(method, estimator):
    """d/d logp and d/d ref_logp of sapo_jax with weights and a KL term against jax.grad of the
    plain formula (clause 10.3); weights get a zero cotangent."""
    lp, old, adv, mask = batch(31, per_token=True)
    rng = np.random.default_rng(32)
    w = jnp.asarray(rng.uniform(0.0, 2.0, lp.shape))
    ref = lp + jnp.asarray(rng.normal(0.0, 0.5, lp.shape))
    kw = opts(method, "token-mean")
    terms = {"kl_coef": 0.3, "kl_estimator": estimator}

    def ours(x, r, v):
        return sapo_jax.policy_loss(x, old, adv, mask, **kw, **terms, weights=v, ref_logp=r)[0]

    def plain(x, r, v):
        return plain_loss_with_terms(x, old, adv, mask, v, r, **kw, **terms)

    got = jax.jit(jax.grad(ours, argnums=(0, 1, 2)))(lp, ref, w)
    want = jax.grad(plain, argnums=(0, 1))(lp, ref, w)
    close(got[0], want[0] * mask)
    close(got[1], want[1] * mask)
    assert not np.any(np.asarray(got[2])), "weights must get a zero cotangent"
    close(ours(lp, ref, w), plain(lp, ref, w), F64["value"])


def test_vmap_with_terms():
    """vmap over problems with their own weights and ref_logp: each is the reference's call."""
    problems = [batch(40 + b, per_token=True) for b in range(3)]
    rng = np.random.default_rng(41)
    ws = [jnp.asarray(rng.uniform(0.0, 2.0, p[0].shape[0])) for p in problems]
    refs = [p[0] + jnp.asarray(rng.normal(0.0, 0.3, p[0].shape)) for p in problems]
    terms = {"kl_coef": 0.2, "kl_estimator": "k2"}

    def f(lp, o, a, m, w, r):
        def loss(x, y):
            return sapo_jax.policy_loss(x, o, a, m, **terms, weights=w, ref_logp=y, metrics=True)

        return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(lp, r)

    stacked = [jnp.stack(xs) for xs in zip(*problems)] + [jnp.stack(ws), jnp.stack(refs)]
    (loss, metrics), (g_lp, g_ref) = jax.jit(jax.vmap(f))(*stacked)
    for b, p in enumerate(problems):
        arrays = [np.asarray(x) for x in p]
        ref = sapo_ref.policy_loss(
            *arrays, **terms, weights=np.asarray(ws[b]), ref_logp=np.asarray(refs[b])
        )
        policy = sapo_ref.policy_loss(*arrays, weights=np.asarray(ws[b]))
        close(loss[b], ref.loss, F64["value"])
        close(g_lp[b], ref.grad)
        close(g_ref[b], policy.grad - ref.grad)
        for key in ("kl_ref/mean", "weights/mean"):
            close(metrics[key][b], ref.metrics[key], F64["value"])


def test_terms_do_not_retrace_for_the_same_options(traces):
    lp, old, adv, mask = batch(50)
    w, ref = jnp.ones(lp.shape[0]), lp - 0.1
    f = jax.jit(
        lambda x, r: sapo_jax.policy_loss(
            x, old, adv, mask, weights=w, ref_logp=r, kl_coef=0.5, kl_estimator="k1"
        )[0]
    )
    f(lp, ref)
    f(lp + 0.1, ref - 0.2)
    assert len(traces) == 1


def test_terms_inside_shard_map_single_process():
    """Weights and ref_logp sharded with the rows inside jax.shard_map, psum'ed counts: the whole
    batch's loss and both gradients."""
    devices = np.array(jax.devices()[:1])
    mesh = jax.sharding.Mesh(devices, ("data",))
    P = jax.sharding.PartitionSpec
    lp, o, a, m = batch(71, n=4)
    rng = np.random.default_rng(72)
    w, ref = jnp.asarray(rng.uniform(0.0, 2.0, lp.shape)), lp + 0.3
    terms = {"kl_coef": 0.5, "kl_estimator": "low-var-k3"}

    def shard_loss(lp, o, a, m, w, ref):
        local = sapo_jax.normalizer(m)
        norm = sapo_ref.Normalizer(
            jax.lax.psum(local.num_tokens, "data"), jax.lax.psum(local.num_rows, "data")
        )
        loss, grads = jax.value_and_grad(
            lambda x, r: sapo_jax.policy_loss(
                x, o, a, m, normalizer=norm, weights=w, ref_logp=r, **terms
            )[0],
            argnums=(0, 1),
        )(lp, ref)
        return jax.lax.psum(loss, "data"), grads

    specs = (P("data"),) * 6
    f = jax.jit(jax.shard_map(shard_loss, mesh=mesh, in_specs=specs, out_specs=(P(), P("data"))))
    loss, (g_lp, g_ref) = f(lp, o, a, m, w, ref)
    arrays = [np.asarray(x) for x in (lp, o, a, m)]
    want = sapo_ref.policy_loss(*arrays, weights=np.asarray(w), ref_logp=np.asarray(ref), **terms)
    policy = sapo_ref.policy_loss(*arrays, weights=np.asarray(w))
    close(loss, want.loss, F64["value"])
    close(g_lp, want.grad)
    close(g_ref, policy.grad - want.grad)
