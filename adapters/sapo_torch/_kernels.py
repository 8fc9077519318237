r"""Loss, closed-form gradient and metrics in one forward pass of PyTorch ops (no autograd graph).

Token SAPO (method ``sapo``, the default) has a fused pass of its own, the one specialised copy of
the formula in this package, benchmarked (``benchmarks/bench_torch.py``) and held to
:func:`sapo_ref.gates.sapo_parts` at ulp level by ``tests/test_torch_kernels.py``:

.. math::

    \mathcal{L} = -\sum_{i,t} m_{it}\,k_{it}\,\tfrac{4}{\tau_{it}}\,p_{it},\qquad
    \frac{\partial\mathcal{L}}{\partial\log\pi_\theta(y_{it})} = -4\,k_{it}\,m_{it}\,p_{it}\,q_{it}\,r_{it}

with :math:`k_{it} = A_{it}\rho_i/D` (clause 3.1), :math:`x = \tau\operatorname{expm1}(\delta)`,
:math:`p = \sigma(x)`, :math:`q = \sigma(-x)` (so the gate weight is :math:`w = 4pq`, the reference's
:math:`4e^{-|x|}/(1+e^{-|x|})^2`) and :math:`r = e^{\min(\delta,\delta_\text{sat})}` (clause 6.3: past
:math:`\delta_\text{sat}`, :math:`q = 0` exactly and :math:`r` stays finite, so :math:`qr = 0`). The
temperature cancels from the gradient, which is therefore never formed as :math:`k\cdot 4/\tau`
(that product overflows float32 for :math:`\tau = 10^{-6}`, :math:`|A| \ge 10^{32}`). Invalid tokens
are removed by selection (a bitwise AND, clause 6.1); the metrics of clause 7.1 come from the
same buffers (a few reductions).

Every other method runs the reference's own code, :func:`sapo_ref.evaluate.evaluate` and
:func:`sapo_ref.metrics.compute_metrics`, on tensors.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from sapo_ref import spec
from sapo_ref.aggregation import Normalizer, denominator, normalizer
from sapo_ref.config import LossConfig
from sapo_ref.evaluate import evaluate
from sapo_ref.gates import logistic_and_weight, saturation_log_ratio
from sapo_ref.metrics import compute_metrics, metric_keys
from sapo_ref.penalties import kl_penalty

__all__ = ["Pass", "forward_pass", "generic_pass", "sapo_token_pass", "expm1"]

Tensor = torch.Tensor

_INT_OF = {torch.float32: torch.int32, torch.float64: torch.int64}


def _as(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x`` in ``dtype`` (a no-op ``.to`` still costs a dispatch, a small batch's budget)."""
    return x if x.dtype == dtype else x.to(dtype)


def _select_(x: Tensor, bits: Tensor) -> Tensor:
    """``x`` where valid, +0.0 elsewhere, in place: its bit pattern times the mask as 0/1
    integers of its width, so exactly a selection (NaN or inf in x cannot leak) without the slow
    CPU path of ``torch.where`` with a broadcast scalar (an order of magnitude slower)."""
    if torch.compiler.is_compiling():  # Inductor: a blend, where bit casts would go by memory
        return torch.where(bits != 0, x, 0.0)
    x.view(bits.dtype).mul_(bits)
    return x


#: Taylor coefficients 1/k! of expm1, k = 1..17: below |d| = 0.5 the truncation error is
#: 0.5**18 / 18! < 1e-21, relative, so the polynomial is exact to float64 rounding (float32:
#: the first 9, 0.5**10 / 10! < 3e-10).
_EXPM1_TAYLOR = tuple(1.0 / math.factorial(k) for k in range(1, 18))


def expm1(d: Tensor, r: Tensor | None = None) -> Tensor:
    r""":math:`e^d - 1` to full relative precision, eagerly and under ``torch.compile``.

    Inductor's CPU code emits ``exp(d) - 1`` for ``expm1``, which cancels near 0 (and
    :math:`\tau\operatorname{expm1}(\delta)` with a large :math:`\tau` would lose every digit): compiled,
    the Taylor polynomial is used below :math:`|d| = 1/2` (9 terms in float32, 17 in float64:
    truncation below half an ulp) and :math:`e^d - 1` above, where the cancellation costs at most
    a factor :math:`e^{1/2}/(e^{1/2}-1) < 2.6` (a few ulps). ``r``: :math:`e^d` if already known.

    >>> import torch
    >>> expm1(torch.tensor([1e-10], dtype=torch.float64)).item()
    1.00000000005e-10
    """
    if not torch.compiler.is_compiling():
        return torch.expm1(d)
    terms = _EXPM1_TAYLOR if d.dtype == torch.float64 else _EXPM1_TAYLOR[:9]
    poly = torch.full_like(d, terms[-1])
    for c in reversed(terms[:-1]):
        poly = poly * d + c
    return torch.where(torch.abs(d) < 0.5, poly * d, (torch.exp(d) if r is None else r) - 1.0)


def _row_weights(lengths: Tensor, norm: Normalizer, config: LossConfig) -> Tensor:
    r""":math:`\rho_i/D`, [N, 1], with :math:`0/0 = 0` (clause 3.7).

    :func:`sapo_ref.aggregation.token_weights` on one column, written with torch ops: its
    array-API dispatch costs about 0.1 ms per call, the whole budget of a small batch.
    """
    den = denominator(norm, config.loss_agg, config.norm_length)  # which count, from the spec
    if isinstance(den, (int, float)):
        den = float(den) if den > 0 else 1.0
    else:
        den = den.to(lengths.dtype)
        den = den + (den == 0)  # D = 0 only when no token is valid: every weight meets A = 0
    if config.per_row_mean:
        return (lengths.clamp(min=1.0) * den).reciprocal_().unsqueeze(-1)
    return (1.0 / den) * lengths.new_ones(lengths.shape[0], 1)


def _valid_extremes(delta: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Smallest and largest log-ratio over valid tokens (+inf, -inf when there is none).

    ``delta`` is 0 at invalid tokens, so its plain extremes are the valid ones whenever they
    straddle 0: then one ``aminmax`` (eager CPU, where ``torch.where`` is an order of magnitude
    slower than a reduction); otherwise, and on other devices or traced, selections.
    """
    if delta.device.type == "cpu" and not torch.compiler.is_compiling():
        lo, hi = torch.aminmax(delta)
        if bool(lo < 0) and bool(hi > 0):
            return lo, hi
    return torch.where(valid, delta, math.inf).amin(), torch.where(valid, delta, -math.inf).amax()


def _scaled_mean_ratio(delta: Tensor, bits: Tensor, hi: Tensor, lengths: Tensor) -> Any:
    r"""``(mean, where)``: the mean ratio over valid tokens where a ratio :math:`e^\delta` may
    overflow although the mean does not (clause 7.1), :math:`\frac{e^{h}}{n}\sum e^{\delta - h}`
    with :math:`h` the largest valid log-ratio (the scale factor in float64), and where to use it:
    ``None`` eagerly when plain sums cannot overflow, ``True`` eagerly, a 0-d bool when traced.
    """
    n = lengths.sum().to(torch.float64).clamp(min=1.0)
    limit = math.log(torch.finfo(delta.dtype).max) - 1.0
    use: Any = True
    if not torch.compiler.is_compiling():
        h = float(hi)
        if not (math.isfinite(h) and h > limit - math.log(float(n))):
            return None
    else:  # +inf: the plain sum's +inf is right
        use = torch.isfinite(hi) & (hi > limit - torch.log(n))
    scaled = _select_((delta - hi).exp_(), bits).sum()
    mean = torch.exp(hi.double() - torch.log(n)) * scaled.double()
    return mean.to(delta.dtype), use


def sapo_token_pass(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    valid: Tensor,
    config: LossConfig,
    norm: Normalizer | None,
    dtype: torch.dtype,
    want_metrics: bool,
    weights: Tensor | None = None,
    ref_logp: Tensor | None = None,
) -> Pass:
    """Token SAPO: loss (0-d), d loss / d logp ([N, T]) (with a KL term also its two parts) and,
    on request, the clause 7.1 metrics, all in the compute dtype ``dtype``. ``weights`` (clause
    10.1) fold into the per-token coefficient :math:`k`; the KL term (clause 10.2) is added from
    :func:`sapo_ref.kl_penalty`. Inputs are read, never written (clause 6.5)."""
    bits = valid.to(_INT_OF[dtype])  # 1 where valid, 0 elsewhere, as wide as the dtype
    lengths = bits.sum(-1, dtype=bits.dtype)  # L_i, exact integers
    lengths_f = lengths.to(dtype)
    if norm is None:  # this batch's counts; only the one the denominator uses is computed
        uses_tokens = spec.LOSS_AGGS[config.loss_agg].denominator == "num_tokens"
        if uses_tokens:
            norm = Normalizer(lengths_f.sum(), 0.0)
        elif config.count_empty_rows:
            norm = Normalizer(0.0, float(lengths.shape[0]))
        else:
            norm = Normalizer(0.0, (lengths > 0).sum().to(dtype))
    rho = _row_weights(lengths_f, norm, config)  # [N, 1]: c_it, the same on a row
    tp, tn = config.tau_pos, config.tau_neg
    if advantages.dim() == 1:
        # An empty row's advantage may be garbage (it is masked): select it away.
        adv = _as(advantages, dtype).masked_fill(lengths == 0, 0.0).unsqueeze(-1)
    else:
        adv = _select_(advantages.to(dtype, copy=True), bits)
    k = rho * adv  # [N, 1] or [N, T]
    # Clause 10.1: the weights scale the policy term, not the counts. Folded into k, except
    # [N, T] weights beside a per-row k, which stays per row (its row sums come first below).
    scale = None if weights is None else _token_weights(weights, bits, lengths, dtype)
    apart = scale is not None and scale.shape[-1] != 1 and k.shape[-1] == 1
    if scale is not None and not apart:
        k = k * scale
    pos = (adv > 0).to(dtype) if tp != tn or want_metrics else None  # 1.0 where A > 0
    # tau_pos where A > 0, else tau_neg (clause 1.6); lerp is exact at weights 0 and 1.
    tau: Any = (
        tp if tp == tn else torch.lerp(torch.full_like(adv, tn), torch.full_like(adv, tp), pos)
    )

    delta = _select_(_as(logp, dtype) - _as(old_logp, dtype), bits)
    metrics: dict[str, Tensor] = {}
    # Saturation (clause 6.3) at one point for both temperatures: past min(dsat_pos, dsat_neg)
    # every token has x >= X_sat min(tau)/max(tau) >= 1e18, where q = 0 and p = 1 exactly as at
    # its own dsat, so no bit of any result changes; r stays finite there, and q r = 0.
    dsat = min(saturation_log_ratio(tp), saturation_log_ratio(tn))
    if want_metrics:
        s_delta = delta.sum()
        lo, hi = _valid_extremes(delta, valid)
        r = torch.clamp(delta, max=dsat).exp_()
        u = expm1(delta)  # unsaturated; delta is kept for a ratio mean beyond exp's range
        s_u = u.sum()  # 0 at invalid tokens; sum over valid of r - 1, +inf where r overflows
        big_mean = _scaled_mean_ratio(delta, bits, hi, lengths)
    else:
        d = delta.clamp_max_(dsat)
        r = torch.exp(d)  # e^d, not u + 1: exact for tiny r, as in sapo_ref.sapo_parts
        u = expm1(d, r) if torch.compiler.is_compiling() else d.expm1_()  # r - 1, exact near 1
    if torch.compiler.is_compiling():
        # Fused by Inductor: sapo_ref's sigma(x) and w = 4pq from one exp(-|x|), not two sigmoids.
        p, w = logistic_and_weight(u * tau)
        p, q = _select_(p, bits), w.mul_(0.25)  # q here is p q: 0 where p is selected away
    else:
        q = torch.mul(u, -tau).sigmoid_()  # sigma(-x), x = tau (r - 1)
        p = _select_(u.mul_(tau).sigmoid_(), bits)  # sigma(x) at valid tokens, +0 elsewhere
    # loss = -sum k (4/tau) p, each product ordered so that no intermediate overflows where the
    # result does not: k times the smaller of (4/tau, P) first (|k| is finite).
    four_over_tau = 4.0 / tau
    if k.shape[-1] == 1:  # k and tau per row: the row sums P_i of p (of w p) first
        big = p.sum(-1, keepdim=True) if not apart else _row_dot(p, scale)
        if max(tp, tn) <= 4.0:  # 4/tau >= 1: k P is at most the result
            loss = torch.neg((k * big * four_over_tau).sum())
        elif min(tp, tn) > 4.0:  # 4/tau < 1: k 4/tau is at most |k|
            loss = torch.neg((k * four_over_tau * big).sum())
        else:
            small, big = torch.minimum(big, four_over_tau), torch.maximum(big, four_over_tau)
            loss = torch.neg((k * small * big).sum())
    else:  # p <= 1: k p first
        loss = torch.neg((k * p * four_over_tau).sum())
    # p q, exactly 0 at invalid tokens (p = +0 there; compiled, pq times p's selection mask)
    grad = q.mul_(p) if not torch.compiler.is_compiling() else _select_(q, bits)
    if want_metrics:
        metrics = _sapo_metrics(grad, s_delta, s_u, lo, hi, big_mean, lengths, adv, pos, dtype)
    grad = grad.mul_(r).mul_(k * -4.0)  # -4 k p q r: tau cancels, nothing overflows first
    if apart:
        grad = grad.mul_(scale)
    if scale is not None and want_metrics:
        metrics["weights/mean"] = _valid_mean(scale, lengths, dtype)
    if ref_logp is None:
        return Pass(loss, grad, None, None, _ordered(metrics, config, scale is not None, False))
    kl_loss, kl_grad, kl_values = _kl_term(logp, ref_logp, bits, rho, config, dtype)
    if want_metrics:
        metrics["kl_ref/mean"] = _valid_mean(kl_values, lengths, dtype)
    metrics = _ordered(metrics, config, scale is not None, True)
    return Pass(loss + kl_loss, grad + kl_grad, grad, kl_grad, metrics)


def _row_dot(x: Tensor, y: Tensor) -> Tensor:
    """Row sums of ``x * y`` ([N, 1]), without an [N, T] temporary where eager."""
    if torch.compiler.is_compiling():
        return (x * y).sum(-1, keepdim=True)
    return torch.linalg.vecdot(x, y).unsqueeze(-1)


def _token_weights(weights: Tensor, bits: Tensor, lengths: Tensor, dtype: torch.dtype) -> Tensor:
    """The weights in ``dtype`` ([N, 1] or [N, T]), +0 where no token is valid (they may hold
    anything there)."""
    if weights.dim() == 1:
        return _as(weights, dtype).masked_fill(lengths == 0, 0.0).unsqueeze(-1)
    return _select_(weights.to(dtype, copy=True), bits)


def _valid_mean(x: Tensor, lengths: Tensor, dtype: torch.dtype) -> Tensor:
    """Mean over valid tokens of ``x`` ([N, 1] per row or [N, T], 0 at invalid tokens); 0 when
    no token is valid (clause 7.1)."""
    n = lengths.sum().to(dtype)
    total = (x * lengths.unsqueeze(-1).to(dtype)).sum() if x.shape[-1] == 1 else x.sum()
    return total / torch.where(n > 0, n, 1.0)


def _ordered(
    metrics: dict[str, Tensor], config: LossConfig, weights: bool, kl: bool
) -> dict[str, Tensor]:
    return (
        {key: metrics[key] for key in metric_keys(config.method, kl=kl, weights=weights)}
        if metrics
        else metrics
    )


def _kl_term(
    logp: Tensor,
    ref_logp: Tensor,
    bits: Tensor,
    rho: Tensor,
    config: LossConfig,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""The KL penalty of clause 10.2 on the pass's buffers: its loss
    :math:`\beta\sum_{it} c_{it} m_{it} k(u_{it})`, its gradient
    :math:`\beta c_{it} m_{it} k'(u_{it})` and the values :math:`k(u_{it})` (0 at invalid
    tokens), with :math:`u = \log\pi_\text{ref} - \log\pi_\theta` selected to 0 where invalid.
    :func:`sapo_ref.kl_penalty` gives :math:`k` and :math:`k'`; :math:`\beta = 0` adds exactly
    nothing (not :math:`0\cdot\infty`)."""
    u = _select_(_as(ref_logp, dtype) - _as(logp, dtype), bits)
    value, slope = kl_penalty(u, config.kl_estimator)
    if not config.has_kl:
        return torch.zeros((), dtype=dtype, device=u.device), torch.zeros_like(u), value
    beta = config.kl_coef
    loss = beta * (rho * value.sum(-1, keepdim=True)).sum()  # rho per row: row sums first
    return loss, _select_((beta * rho) * slope, bits), value


def _sapo_metrics(
    pq: Tensor,
    s_delta: Tensor,
    s_u: Tensor,
    lo: Tensor,
    hi: Tensor,
    big_mean: tuple[Tensor, Any] | None,
    lengths: Tensor,
    adv: Tensor,
    pos: Tensor,
    dtype: torch.dtype,
) -> dict[str, Tensor]:
    r"""Clause 7.1 metrics of token SAPO from the pass's sums (definitions: sapo_ref.metrics).

    ``pq`` = :math:`p q` (0 at invalid tokens, the gate weight is :math:`w = 4pq`), ``s_delta`` =
    :math:`\sum\delta`, ``s_u`` = :math:`\sum(r - 1)` over valid tokens, ``lo``/``hi`` the extreme valid
    log-ratios, ``big_mean`` the scaled mean ratio and where to use it (or None), ``pos`` 1.0
    where :math:`A > 0` (else 0.0). Mean ratio :math:`1 + \overline{r - 1}`; :math:`\overline{k_3} = \overline{r - 1} -
    \overline{\delta}` (as exact as the per-token :math:`\operatorname{expm1}(\delta) - \delta`).
    """
    n = lengths.sum().to(dtype)
    n_safe = torch.where(n > 0, n, 1.0)
    inf = torch.full_like(n, math.inf)
    neg = (adv < 0).to(dtype)  # 1.0 where A < 0, else 0.0
    if adv.shape[-1] == 1:  # per-row advantages: count and sum per row first
        w_rows = pq.sum(-1, keepdim=True)
        counts = lengths.unsqueeze(-1).to(dtype)
        tokens_pos, tokens_neg = (counts * pos).sum(), (counts * neg).sum()
        w_pos, w_neg = (w_rows * pos).sum(), (w_rows * neg).sum()
        w_all = w_rows.sum()
    else:  # adv is 0 at invalid tokens, so pos and neg imply valid; dot: a sum without a copy
        tokens_pos, tokens_neg = pos.sum(), neg.sum()
        w_pos, w_neg = (
            torch.dot(pq.flatten(), pos.flatten()),
            torch.dot(pq.flatten(), neg.flatten()),
        )
        w_all = pq.sum()
    some = n > 0
    out = {
        "tokens": n,
        "rows": (lengths > 0).sum().to(dtype),
        "ratio/mean": (n + s_u) / n_safe,
        "ratio/min": torch.where(some, torch.exp(lo), 0.0),
        "ratio/max": torch.where(some, torch.exp(hi), 0.0),
        # KL(old || new) is +inf once a valid delta is -inf (as k3 says); k3 is +inf once r is.
        "kl/k1": torch.where(lo == -math.inf, inf, -s_delta / n_safe),
        "kl/k3": torch.where(hi == math.inf, inf, (s_u - s_delta) / n_safe),
        "gate/mean": 4.0 * w_all / n_safe,
        "gate/mean_pos": 4.0 * w_pos / torch.where(tokens_pos > 0, tokens_pos, 1.0),
        "gate/mean_neg": 4.0 * w_neg / torch.where(tokens_neg > 0, tokens_neg, 1.0),
        "tokens_pos": tokens_pos,
        "tokens_neg": tokens_neg,
    }
    if big_mean is not None:  # a ratio overflows, the mean may not; k3 is then mean - 1 - mean(d)
        mean, use = big_mean
        k3 = mean - 1.0 - s_delta / n_safe  # the mean ratio dominates: no cancellation
        if use is True:
            out["ratio/mean"], out["kl/k3"] = mean, k3
        else:
            out["ratio/mean"] = torch.where(use, mean, out["ratio/mean"])
            out["kl/k3"] = torch.where(use, k3, out["kl/k3"])
    return {key: out[key] for key in metric_keys("sapo")}


class Pass(NamedTuple):
    r"""What one forward pass computes, in the compute dtype: the loss (0-d), ``grad`` =
    :math:`\partial\mathcal{L}/\partial\log\pi_\theta` ([N, T]), with a KL term its policy part
    ``policy_grad`` and its KL part ``kl_grad`` (else ``None``), and the metrics (``{}`` unless
    asked)."""

    loss: Tensor
    grad: Tensor
    policy_grad: Tensor | None
    kl_grad: Tensor | None
    metrics: dict[str, Tensor]


def forward_pass(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    valid: Tensor,
    config: LossConfig,
    norm: Normalizer | None,
    dtype: torch.dtype,
    want_metrics: bool,
    weights: Tensor | None = None,
    ref_logp: Tensor | None = None,
) -> Pass:
    """Loss, gradient and metrics in the compute dtype ``dtype``: the fused pass for token SAPO
    (:func:`sapo_token_pass`), the reference's code for every other method
    (:func:`generic_pass`).

    ``valid`` is the boolean mask, ``norm`` the global counts or ``None`` for this batch's own.
    """
    pass_ = sapo_token_pass if config.method == "sapo" else generic_pass
    return pass_(
        logp, old_logp, advantages, valid, config, norm, dtype, want_metrics, weights, ref_logp
    )


def generic_pass(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    valid: Tensor,
    config: LossConfig,
    norm: Normalizer | None,
    dtype: torch.dtype,
    want_metrics: bool,
    weights: Tensor | None = None,
    ref_logp: Tensor | None = None,
) -> Pass:
    """:func:`sapo_ref.evaluate.evaluate` and :func:`sapo_ref.metrics.compute_metrics` on the
    tensors, any method (the arguments of :func:`forward_pass`)."""
    lp, olp, adv = (_as(x, dtype) for x in (logp, old_logp, advantages))
    w, ref = (None if x is None else _as(x, dtype) for x in (weights, ref_logp))
    if norm is None:
        norm = normalizer(valid, count_empty_rows=config.count_empty_rows)
    ev = evaluate(lp, olp, adv, valid, config, norm, weights=w, ref_logp=ref)
    metrics = compute_metrics(ev, config) if want_metrics else {}
    if ref is None:
        return Pass(ev.loss, ev.grad, None, None, metrics)
    # kl_coef = 0: the KL term adds exactly nothing (no KL part)
    kl = torch.zeros_like(ev.grad) if ev.kl_grad is None else ev.kl_grad
    return Pass(ev.loss, ev.grad, ev.policy_grad, kl, metrics)
