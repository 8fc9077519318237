"""sapo_torch's fused token-SAPO pass, the one specialised copy of the formula in the adapter.

It is held to the reference's own functions on the same tensors: the gate value and the
log-derivative to a few ulps against :func:`sapo_ref.gates.sapo_parts` for log-ratios from -inf to
+inf (float32 and float64, the whole temperature domain), so that the two cannot drift apart;
its metrics against :func:`sapo_ref.metrics.compute_metrics`; and float32 products that must not
overflow where the true value is finite (issue 11), against the float64 reference.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from sapo_conformance.compare import compare  # noqa: E402 (after the torch skip)
from sapo_torch._kernels import expm1, sapo_token_pass  # noqa: E402 (after the torch skip)

import sapo_ref  # noqa: E402 (after the torch skip)
from sapo_ref import spec  # noqa: E402 (after the torch skip)
from sapo_ref.aggregation import Normalizer  # noqa: E402 (after the torch skip)
from sapo_ref.gates import sapo_parts, saturation_log_ratio  # noqa: E402 (after the torch skip)

pytestmark = pytest.mark.torch

TAUS = (1e-6, 0.1, 1.0, 1.05, 10.0, 1e6)  # the domain's ends and the defaults
#: Gate and derivative may differ by this many units in the last place (3 seen): both are products of
#: 3-5 correctly rounded factors, written differently (4 sigma(x) sigma(-x) r vs 4e/(1+e)^2 r).
MAX_ULPS = 4


def log_ratios(dtype: torch.dtype) -> list[float]:
    """-inf .. +inf: tiny, moderate, each temperature's saturation point and the overflow edges."""
    mags = [1e-300, 1e-30, 1e-8, 1e-4, 0.1, 0.5, 1.0, 3.0, 30.0, 69.0, 88.7, 88.8, 100.0]
    mags += [200.0, 700.0, 709.8, 800.0, math.inf]
    mags += [saturation_log_ratio(t) * f for t in TAUS for f in (0.999, 1.0, 1.001)]
    vals = sorted({s * m for m in mags for s in (1.0, -1.0)} | {0.0})
    return [float(torch.tensor(v, dtype=dtype)) for v in vals]  # as the dtype holds them


def ulps(got: torch.Tensor, want: torch.Tensor, floor: Any = 0.0) -> np.ndarray:
    """|got - want| in units of the dtype's spacing at ``want``, after subtracting ``floor``."""
    g, w = got.numpy(), want.numpy()
    same = (g == w) | (np.isnan(g) & np.isnan(w))
    err = np.maximum(np.abs(g.astype(np.float64) - w) - floor, 0.0)
    return np.where(same, 0.0, err / np.spacing(np.abs(w)))


@pytest.mark.clause("2.1", "2.2", "5.3", "6.3")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("tau", TAUS)
def test_fused_gate_matches_sapo_parts_to_the_ulp(dtype: torch.dtype, tau: float) -> None:
    """One token per call (k = 1): loss = -f(delta), gradient = -df/d delta (= -w r)."""
    config = sapo_ref.resolve_config("sapo", "seq-mean-token-sum", tau_pos=tau, tau_neg=tau)
    deltas = log_ratios(dtype)
    f, dlog = [], []
    for d in deltas:
        lp = torch.tensor([[d]], dtype=dtype)
        loss, grad, *_ = sapo_token_pass(
            lp,
            torch.zeros_like(lp),
            torch.ones(1, dtype=dtype),
            torch.ones(1, 1, dtype=torch.bool),
            config,
            Normalizer(1.0, 1.0),
            dtype,
            False,
        )
        f.append(-loss)
        dlog.append(-grad[0, 0])
    x = torch.tensor(deltas, dtype=dtype)
    want = sapo_parts(x, tau)
    # torch.sigmoid returns 0 where exp(|x|) overflows (|x| > 88.7 in float32, 709.8 in float64)
    # while the reference's e^{-|x|} is still a subnormal: an absolute difference below the
    # smallest normal number times the factor it is multiplied by (4/tau for f, 4 r for dlog).
    tiny = torch.finfo(dtype).tiny
    r = torch.exp(torch.clamp(x, max=saturation_log_ratio(tau))).double().numpy()
    floors = {"f": 4.0 / tau * tiny, "dlog": 4.0 * r * tiny}
    for name, got, ref in (("f", torch.stack(f), want.f), ("dlog", torch.stack(dlog), want.dlog)):
        assert torch.isfinite(got).all(), (name, got)
        err = ulps(got, ref, floors[name])
        worst = int(np.argmax(err))
        assert err[worst] <= MAX_ULPS, (
            f"{name} at delta={deltas[worst]!r}, tau={tau}: {float(got[worst])!r} vs "
            f"sapo_parts {float(ref[worst])!r} ({err[worst]:.1f} ulps)"
        )


@pytest.mark.clause("6.3")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_compile_safe_expm1_is_exact(dtype: torch.dtype) -> None:
    """The expm1 the fused pass and the namespace shim use when compiled, against math.expm1."""
    x = [-3.0, -0.5, -0.4999, -0.3, -0.1, -1e-5, -1e-30, 0.0, 1e-30, 1e-7, 0.1, 0.4999, 0.5, 0.7]
    x = torch.tensor(x, dtype=dtype)
    want = torch.tensor([math.expm1(float(v)) for v in x], dtype=dtype)
    got = torch.compile(expm1, fullgraph=True)(x)
    assert (ulps(got, want) <= 4).all(), (got, want)


def _batch(dtype: torch.dtype, per_token: bool) -> dict[str, torch.Tensor]:
    """Rows of extreme valid log-ratios, an empty row, A of both signs and 0, garbage if masked."""
    rows = [
        [0.1, -0.2, 0.05, 0.0],
        [math.inf, 1.0, 0.0, 0.0],
        [-math.inf, -1e30, 0.3, 0.0],
        [95.0, 50.0, -800.0, 1e-7],
        [0.0, 0.0, 0.0, 0.0],  # empty
        [1e-6, -1e-6, 2.0, -3.0],
    ]
    lp = torch.tensor(rows, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1], [0] * 4, [1] * 4])
    mask = mask.bool()
    adv = torch.tensor([1.0, -0.5, 2.0, -1.0, math.nan, 0.0], dtype=torch.float64)
    if per_token:
        adv = adv.unsqueeze(-1) * torch.tensor([1.0, -1.0, 0.5, 2.0], dtype=torch.float64)
    lp = torch.where(mask, lp, math.nan)
    return {
        "logp": lp.to(dtype),
        "old_logp": torch.zeros_like(lp).to(dtype),
        "adv": adv.to(dtype),
        "mask": mask,
    }


@pytest.mark.clause("7.1")
@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_fused_metrics_match_the_reference(dtype: str, per_token: bool) -> None:
    """Metrics folded into the pass: the reference's values (inf where it says inf), at extremes."""
    import sapo_torch

    b = _batch(getattr(torch, dtype), per_token)
    _, got = sapo_torch.policy_loss(b["logp"], b["old_logp"], b["adv"], b["mask"], metrics=True)
    ref = sapo_ref.policy_loss(
        *(b[k].double().numpy() for k in ("logp", "old_logp", "adv")), b["mask"].numpy()
    )
    tol = spec.TOLERANCES[dtype]["value"]
    assert list(got) == list(ref.metrics)
    for key, want in ref.metrics.items():
        value = float(got[key])
        if not math.isfinite(want):
            assert value == want, key
        else:
            assert abs(value - want) <= tol.atol * max(1.0, abs(want)) + tol.rtol * abs(want), (
                key,
                value,
                want,
            )


@pytest.mark.clause("7.1", "3.7")
def test_fused_metrics_of_an_empty_batch_are_zero() -> None:
    import sapo_torch

    z = torch.zeros(2, 3)
    _, got = sapo_torch.policy_loss(
        z, z, torch.ones(2), torch.zeros(2, 3, dtype=torch.bool), metrics=True
    )
    ref = sapo_ref.policy_loss(z.numpy(), z.numpy(), np.ones(2), np.zeros((2, 3), bool))
    assert {k: float(v) for k, v in got.items()} == ref.metrics


@pytest.mark.clause("5.3", "6.3", "6.4")
@pytest.mark.parametrize("tau", [1e-6, 1e6])
@pytest.mark.parametrize("adv", [1e32, -1e32, 3e37])
def test_float32_products_do_not_overflow_where_the_value_fits(tau: float, adv: float) -> None:
    """Issue 11: k * 4 / tau overflowed float32 for tau = 1e-6, |A| >= 1e32 (gradient +-inf where
    the true value, about -2e35, fits). Judged against the float64 reference."""
    import sapo_torch

    deltas = torch.tensor([[0.0, 1e-3, -0.5, 2.0]])
    lp = deltas.clone().requires_grad_(True)
    a = torch.tensor([adv])
    loss, _ = sapo_torch.policy_loss(
        lp, torch.zeros(1, 4), a, torch.ones(1, 4, dtype=torch.bool), tau_pos=tau, tau_neg=tau
    )
    loss.backward()
    ref = sapo_ref.policy_loss(
        deltas.double().numpy(),
        np.zeros((1, 4)),
        np.array([adv]),
        np.ones((1, 4), bool),
        tau_pos=tau,
        tau_neg=tau,
    )
    big = np.finfo(np.float32).max
    for got, want in ((loss.detach().numpy(), ref.loss), (lp.grad.numpy(), ref.grad)):
        want = np.asarray(want)
        fits = np.abs(want) <= big
        assert np.isfinite(got[fits]).all(), (got, want)
        assert np.allclose(
            got[fits], want[fits], rtol=spec.TOLERANCES["float32"]["grad"].rtol, atol=0
        )


EXTREME = (
    -math.inf,
    -1e30,
    -200.0,
    -88.0,
    -30.0,
    30.0,
    60.0,
    80.0,
    88.0,
    89.0,
    200.0,
    1e30,
    math.inf,
)


@pytest.mark.clause("1.6", "5.3", "6.3")
@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("taus", [(1e-6, 1e6), (1e6, 1e-6), (0.5, 2.0)])
def test_one_saturation_point_for_two_temperatures(
    taus: tuple[float, float], per_token: bool
) -> None:
    """The fused pass saturates r at min(dsat_pos, dsat_neg) for every token: with the domain's
    extreme temperatures, the reference's loss and gradient in float32 (clause 6.3), no NaN."""
    import sapo_torch
    from sapo_conformance.compare import compare

    n = len(EXTREME)
    logp = torch.tensor([[v, 0.5 * v] for v in EXTREME], dtype=torch.float32)
    adv = torch.where(torch.arange(n) % 2 == 0, 1.0, -0.5)
    if per_token:
        adv = adv[:, None] * torch.tensor([1.0, -1.0])
    opts = {"tau_pos": taus[0], "tau_neg": taus[1], "loss_agg": "token-mean"}
    lp = logp.clone().requires_grad_(True)
    loss, _ = sapo_torch.policy_loss(
        lp, torch.zeros(n, 2), adv, torch.ones(n, 2, dtype=torch.bool), **opts
    )
    loss.backward()
    ref = sapo_ref.policy_loss(
        logp.double().numpy(), np.zeros((n, 2)), adv.double().numpy(), np.ones((n, 2), bool), **opts
    )
    for name, got, want, kind in (
        ("loss", loss.item(), ref.loss, "value"),
        ("grad", lp.grad.numpy(), ref.grad, "grad"),
    ):
        c = compare(name, got, want, spec.TOLERANCES["float32"][kind])
        assert c.ok, c.message


@pytest.mark.clause("7.1")
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_ratio_extremes_when_every_valid_log_ratio_has_one_sign(sign: float) -> None:
    """The padding's zeros must not become ratio/min (or max): the selection fallback."""
    import sapo_torch

    lp = sign * torch.tensor([[0.5, 0.25, 9.0], [1.0, 7.0, 7.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]]).bool()
    old, adv = torch.zeros(2, 3, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    _, got = sapo_torch.policy_loss(lp, old, adv, mask, metrics=True)
    ref = sapo_ref.policy_loss(lp.numpy(), old.numpy(), adv.numpy(), mask.numpy())
    for key in ("ratio/min", "ratio/max", "ratio/mean", "kl/k1", "kl/k3"):
        assert float(got[key]) == pytest.approx(ref.metrics[key], rel=1e-14), key


# ----------------------------------------------------------------------------- clause 10 terms
#: log pi_ref - log pi_theta at valid tokens: tiny (k3's series), moderate, past low-var-k3's
#: clip (k3 > 10 from u = 2.6), past exp's overflow in float32 and float64, and infinite.
KL_US = (0.0, 1e-12, -1e-6, 0.3, -0.5, 2.5, 2.7, -12.0, 60.0, 88.8, 100.0, 709.0, 710.0, -math.inf)


def _term_batch(dtype: torch.dtype, layout: str, per_token: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    n, t = 4, len(KL_US)
    lp = -torch.rand(n, t, generator=g, dtype=torch.float64) * 2.0 - 0.1
    old = lp + 0.2 * torch.randn(n, t, generator=g, dtype=torch.float64)
    u = torch.tensor(KL_US, dtype=torch.float64).expand(n, t)
    mask = torch.rand(n, t, generator=g) < 0.8
    mask[:, 0] = True
    mask[3] = False
    w = torch.rand((n, t) if layout == "token" else (n,), generator=g, dtype=torch.float64) * 3
    adv = torch.randn((n, t) if per_token else (n,), generator=g, dtype=torch.float64)
    out = {"logp": lp, "old_logp": old, "adv": adv, "weights": w, "ref_logp": lp + u}
    out = {k: v.to(dtype) for k, v in out.items()}
    out["mask"] = mask
    return out


@pytest.mark.clause("10.1", "10.2", "10.3", "10.5")
@pytest.mark.parametrize("estimator", sapo_ref.KL_ESTIMATOR_NAMES)
@pytest.mark.parametrize("layout,per_token", [("token", False), ("row", True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_fused_terms_match_the_reference_formula_on_the_same_tensors(
    dtype: torch.dtype, layout: str, per_token: bool, estimator: str
) -> None:
    """The fused pass with weights folded into its coefficient and the KL part from
    sapo_ref.kl_penalty against sapo_ref.evaluate itself on the same tensors (k3's series, the
    low-var clip, +inf past exp's overflow): loss, both gradient parts and the two metrics."""
    from sapo_torch._kernels import forward_pass

    from sapo_ref.evaluate import evaluate
    from sapo_ref.metrics import compute_metrics

    b = _term_batch(dtype, layout, per_token)
    config = sapo_ref.resolve_config(
        "sapo", "seq-mean-token-mean", kl_coef=0.7, kl_estimator=estimator, has_ref_logp=True
    )
    norm = sapo_ref.normalizer(b["mask"])
    norm = Normalizer(float(norm.num_tokens), float(norm.num_rows))
    args = (b["logp"], b["old_logp"], b["adv"], b["mask"], config, norm)
    got = forward_pass(*args, dtype, True, b["weights"], b["ref_logp"])
    with np.errstate(all="ignore"):
        ev = evaluate(*args, weights=b["weights"], ref_logp=b["ref_logp"])
        want_metrics = compute_metrics(ev, config)
        policy = evaluate(*args, weights=b["weights"]).grad  # G - K is NaN where K is inf
    tol = spec.TOLERANCES["float64" if dtype == torch.float64 else "float32"]
    pairs = [
        ("loss", got.loss, ev.loss, "value"),
        ("grad", got.grad, ev.grad, "grad"),
        ("kl part", got.kl_grad, ev.kl_grad, "grad"),
        ("policy part", got.policy_grad, policy, "grad"),
        ("kl_ref/mean", got.metrics["kl_ref/mean"], want_metrics["kl_ref/mean"], "value"),
        ("weights/mean", got.metrics["weights/mean"], want_metrics["weights/mean"], "value"),
    ]
    for name, g, w, kind in pairs:
        c = compare(name, g.double().numpy(), w.double().numpy(), tol[kind])
        assert c.ok, c.message
    assert list(got.metrics) == list(want_metrics)
    assert bool(torch.isfinite(got.policy_grad).all())


@pytest.mark.clause("10.2")
def test_kl_coef_zero_adds_exactly_nothing_beside_infinite_estimators() -> None:
    """beta = 0: not 0 * inf (u = 710 makes k3 +inf): the loss and gradient of no KL term."""
    import sapo_torch

    b = _term_batch(torch.float64, "token", False)
    base = sapo_torch.policy_loss(b["logp"], b["old_logp"], b["adv"], b["mask"])[0]
    lp = b["logp"].clone().requires_grad_()
    ref = b["ref_logp"].clone().requires_grad_()
    loss, m = sapo_torch.policy_loss(
        lp, b["old_logp"], b["adv"], b["mask"], ref_logp=ref, kl_coef=0.0, metrics=True
    )
    loss.backward()
    assert loss.item() == base.item() and torch.all(ref.grad == 0)
    assert float(m["kl_ref/mean"]) == math.inf  # the metric is the estimator's, before beta
