r"""The loss and its closed-form gradient in ``jax.numpy``: :func:`sapo_ref.evaluate`'s formulas,
arranged for XLA.

Same equations as the reference (clauses 1-3, 5, 6: selection masking, exact saturation
:math:`\delta \le \delta_\text{sat}`, no clamp), reusing its :func:`~sapo_ref.evaluate.prepare`,
aggregation weights and hard clip. Three arrangements differ, for speed only:

- SAPO's temperature takes two values, so :math:`\delta_\text{sat}(\tau)` and :math:`4/\tau` are
  Python constants selected by the sign of :math:`A` instead of a ``log1p`` and a division per
  token, and :math:`\sigma`, :math:`w` share one reciprocal :math:`1/(1+e^{-|x|})`;
- a sequence method with per-sequence advantages evaluates its gate once per row ([N]) and
  broadcasts, instead of at every token;
- SAPO's loss sums each row before weighting it, :math:`-\sum_i c_i \sum_t m_{it}\ell_{it}` with the
  row factor :math:`c_i = \rho_i/D`: XLA on CPU turns :math:`\sum_{it} c_{it}\ell_{it}` over two
  [N, T] arrays into a dot product that runs several times slower. (The clipped methods keep
  the reference's per-token :math:`c_{it}A_{it}r_{it}`, exact in the overflow band, clause 6.3.)
"""

from __future__ import annotations

import math
from dataclasses import fields
from typing import Any

import jax.numpy as jnp

from sapo_ref.aggregation import Normalizer, denominator, token_weights
from sapo_ref.config import LossConfig
from sapo_ref.evaluate import Evaluation, prepare
from sapo_ref.gates import ClipParts, SapoParts, clip_parts, safe_exp, saturation_log_ratio

from .counts import local_normalizer

__all__ = ["evaluate_jax", "sapo_parts_two_temperatures"]


def sapo_parts_two_temperatures(log_x: Any, pos: Any, tau_pos: float, tau_neg: float) -> SapoParts:
    r""":func:`sapo_ref.sapo_parts` with :math:`\tau = \tau_\text{pos}` where ``pos`` else
    :math:`\tau_\text{neg}` (clause 1.6):

    .. math::

        x = \tau\,\operatorname{expm1}(\min(\delta, \delta_\text{sat}(\tau))),\quad
        f = \tfrac{4}{\tau}\sigma(x),\quad w = \frac{4e^{-|x|}}{(1+e^{-|x|})^2},\quad
        \partial_\delta f = w\,e^{\min(\delta, \delta_\text{sat})}.

    >>> import jax.numpy as jnp
    >>> p = sapo_parts_two_temperatures(jnp.array([0.0, jnp.inf], jnp.float32),
    ...                                 jnp.array([True, False]), 1.0, 2.0)
    >>> p.f.tolist(), p.w.tolist(), p.dlog.tolist()  # f(1) = 2/tau; f(inf) = 4/tau, w = 0
    ([2.0, 2.0], [1.0, 0.0], [1.0, 0.0])
    """

    def pick(a: float, b: float) -> Any:
        return jnp.where(pos, jnp.asarray(a, log_x.dtype), jnp.asarray(b, log_x.dtype))

    d = jnp.minimum(log_x, pick(saturation_log_ratio(tau_pos), saturation_log_ratio(tau_neg)))
    u = jnp.expm1(d)  # r - 1, exact near r = 1 (tau up to 1e6 magnifies its error)
    x = pick(tau_pos, tau_neg) * u
    e = jnp.exp(-jnp.abs(x))
    inv = 1.0 / (1.0 + e)
    p = jnp.where(x >= 0, inv, e * inv)
    w = 4.0 * e * inv * inv
    return SapoParts(f=pick(4.0 / tau_pos, 4.0 / tau_neg) * p, w=w, dlog=w * (u + 1.0))


def _gate(log_x: Any, adv: Any, config: LossConfig) -> tuple[Any, Any, SapoParts | ClipParts]:
    if config.is_soft:
        parts = sapo_parts_two_temperatures(log_x, adv > 0, config.tau_pos, config.tau_neg)
        return parts.f, parts.dlog, parts
    parts = clip_parts(log_x, adv, config.eps_low, config.eps_high, config.dual_clip)
    return parts.g, parts.dlog, parts


def evaluate_jax(
    logp: Any,
    old_logp: Any,
    advantages: Any,
    valid: Any,
    config: LossConfig,
    norm: Normalizer | None = None,
) -> Evaluation:
    r"""Loss and closed-form gradient, as :func:`sapo_ref.evaluate` (same :class:`Evaluation`, so
    :func:`sapo_ref.compute_metrics` applies), for JAX arrays of one floating dtype:

    .. math::

        \mathcal{L} = -\sum_i \sum_t c_{it}\,m_{it}\,A_{it}\,f_{it}(x_{it}),\qquad
        \frac{\partial\mathcal{L}}{\partial\log\pi_\theta(y_{it'})} =
        -c_{it'}m_{it'}A_{it'}\partial_\delta f_{it'}\ \ \text{or}\ \
        -\frac{m_{it'}}{L_i}\sum_t c_{it}m_{it}A_{it}\partial_\mu f_{it}.
    """
    p = prepare(logp, old_logp, advantages, valid, config)
    zero = jnp.zeros_like(p.delta)
    if norm is None:  # this batch's counts, from the row lengths already at hand
        norm = local_normalizer(p.lengths, config.count_empty_rows)
    den = denominator(norm, config.loss_agg, config.norm_length)
    # c_it = m_it * rho_i / D: the [N, 1] row factor is what the loss needs.
    c_row = token_weights((p.lengths > 0)[:, None], p.lengths, config.loss_agg, den)
    c = jnp.where(p.valid, c_row, zero)
    if config.sequence_value and advantages.ndim == 1:
        # s_i and A_i are constant along a row: one gate evaluation per row.
        nonempty = p.lengths > 0
        mu = jnp.sum(p.delta, axis=1) / jnp.where(nonempty, p.lengths, 1.0)
        g, dlog, parts = _gate(mu, jnp.where(nonempty, advantages, 0.0), config)
        g, dlog = g[:, None], dlog[:, None]
        gate = type(parts)(
            **{
                f.name: jnp.broadcast_to(getattr(parts, f.name)[:, None], zero.shape)
                for f in fields(parts)
            }
        )
    else:
        g, dlog, gate = _gate(p.log_x, p.adv, config)

    term = jnp.where(p.valid, p.adv * g, zero)
    ca = c * p.adv  # 0 at invalid tokens
    spread = (
        (1.0 / jnp.where(p.lengths > 0, p.lengths, 1.0))[:, None]
        if config.spreads_gradient
        else 1.0
    )
    coef = ca * dlog * spread  # dJ/d log x per token, already divided by L_i when spread
    if config.is_soft:
        loss = 0.0 - jnp.sum(c_row[:, 0] * jnp.sum(term, axis=1))  # 0.0 - x: empty batch +0.0
    elif config.dual_clip is not None:  # every term is bounded: c*A*r never overflows alone
        loss = 0.0 - jnp.sum(jnp.sum(jnp.where(p.valid, ca * g, zero), axis=1))
    else:
        # Clause 6.3: where r overflows but c*A*r need not (A < 0, no dual clip), take
        # c*A*r = -exp(log x + log|cA|): finite whenever the true value is.
        # log|cA| = log c_i + log|A|, per row when the advantages are (log and exp per token
        # are the cost of this exactness).
        big = gate.active & (gate.r == math.inf)
        neg_adv = jnp.where(advantages < 0, -advantages, 1.0)
        log_adv = jnp.log(neg_adv)[:, None] if advantages.ndim == 1 else jnp.log(neg_adv)
        log_ca = jnp.log(jnp.where(c_row > 0, c_row, 1.0)) + log_adv
        huge = jnp.where(big, p.log_x + log_ca, -math.inf)
        band = -safe_exp(huge)  # c*A*r there (g = dlog = r in the band)
        weighted = jnp.where(big, band, ca * g)
        if config.spreads_gradient:  # divide by L_i inside the exp: band itself may overflow
            band = -safe_exp(huge + jnp.log(spread))
        coef = jnp.where(big, band, coef)
        loss = 0.0 - jnp.sum(jnp.sum(jnp.where(p.valid, weighted, zero), axis=1))
    coef = jnp.where(p.valid, coef, zero)
    if config.spreads_gradient:
        grad = jnp.where(p.valid, -jnp.sum(coef, axis=1)[:, None], zero)
    else:
        grad = jnp.where(p.valid, -coef, zero)
    return Evaluation(loss=loss, grad=grad, prepared=p, term=term, gate=gate, weights=c)
