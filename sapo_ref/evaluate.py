r"""The loss and its closed-form gradient, generic over array namespaces (clauses 1-3, 5, 6, 10).

:func:`evaluate` is the whole computation on already validated arrays of one floating dtype.
The reference (:func:`sapo_ref.policy_loss`) calls it in float64 on NumPy; adapters may call it
on their own arrays (e.g. inside a custom autograd function) and specialise where speed needs.

.. math::

    \mathcal{L} = -\sum_{i,t} c_{it}\,m_{it}\,w_{it}\,A_{it}\,f_{it}(x_{it})
        + \beta\sum_{i,t} c_{it}\,m_{it}\,k(u_{it}),\qquad
    \frac{\partial\mathcal{L}}{\partial\log\pi_\theta(y_{it'})} =
    \begin{cases}
    -c_{it'}\,m_{it'}\,w_{it'}\,A_{it'}\,\partial_\delta f_{it'} & \text{token ratio, gspo-token}\\
    -\frac{m_{it'}}{L_i}\sum_t c_{it}\,m_{it}\,w_{it}\,A_{it}\,\partial_\mu f_{it} & \text{sequence ratio (gspo, sapo-seq)}
    \end{cases} + \beta\,c_{it'}\,m_{it'}\,k'(u_{it'})

with the per-token weights :math:`w` (1 when absent) and the KL penalty
:math:`u = \log\pi_\text{ref} - \log\pi_\theta` of clause 10 (0 when absent).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ._xp import namespace
from .aggregation import Normalizer, denominator, row_lengths, token_weights
from .config import LossConfig
from .gates import clip_parts, safe_exp, sapo_parts_signed
from .penalties import kl_penalty

__all__ = ["Evaluation", "evaluate", "prepare", "Prepared"]


@dataclass(frozen=True)
class Prepared:
    """Sanitised inputs: invalid positions replaced by 0 by selection (clause 6.1).

    ``delta`` [N, T] log-ratios, ``adv`` [N, T] advantages, ``valid`` [N, T] bool,
    ``lengths`` [N] row lengths, ``log_x`` [N, T] the log of the ratio the gate sees
    (``delta`` for token methods, the row mean ``mu_i`` broadcast for sequence methods).
    """

    delta: Any
    adv: Any
    valid: Any
    lengths: Any
    log_x: Any
    mu: Any = None  # [N] row means of delta (sequence methods), 0 for empty rows


@dataclass(frozen=True)
class Evaluation:
    """Loss (0-d), gradient [N, T] and the intermediates metrics are computed from."""

    loss: Any
    grad: Any
    prepared: Prepared
    term: Any  # [N, T] per-token term A * f(x), 0 where invalid
    gate: Any  # SapoParts or ClipParts
    weights: Any  # [N, T] aggregation weights c_it
    token_scale: Any = None  # [N, T] per-token weights w_it (clause 10.1), 0 where invalid
    kl: Any = None  # [N, T] KL estimator k(u_it) (clause 10.2), 0 where invalid
    kl_grad: Any = None  # [N, T] beta c k'(u): the KL part of grad (d loss / d ref_logp = -this)
    policy_grad: Any = None  # [N, T] the policy part of grad (grad itself without a KL term);
    # d loss / d old_logp is -this for every method but gspo-token (clause 8.9), kept apart so
    # that it is never recovered as grad - kl_grad (cancellation when the KL part dominates)


def prepare(logp: Any, old_logp: Any, advantages: Any, mask: Any, config: LossConfig) -> Prepared:
    """Select valid positions and form the log-ratios, in the dtype of ``logp``."""
    xp = namespace(logp, old_logp, advantages)
    dtype = logp.dtype
    valid = mask if mask.dtype == xp.bool else mask != 0
    zero = xp.zeros_like(logp)
    delta = xp.where(valid, logp, zero) - xp.where(valid, old_logp, zero)
    adv = advantages
    if adv.ndim == 1:
        adv = xp.broadcast_to(xp.expand_dims(adv, axis=1), logp.shape)
    adv = xp.where(valid, adv, zero)
    lengths = row_lengths(valid, dtype)
    if config.sequence_value:
        one = xp.ones_like(lengths)
        mu = xp.sum(delta, axis=1) / xp.where(lengths > 0, lengths, one)
        log_x = xp.where(valid, xp.broadcast_to(xp.expand_dims(mu, axis=1), delta.shape), zero)
        return Prepared(delta=delta, adv=adv, valid=valid, lengths=lengths, log_x=log_x, mu=mu)
    return Prepared(delta=delta, adv=adv, valid=valid, lengths=lengths, log_x=delta)


def evaluate(
    logp: Any,
    old_logp: Any,
    advantages: Any,
    mask: Any,
    config: LossConfig,
    norm: Normalizer,
    *,
    weights: Any = None,
    ref_logp: Any = None,
) -> Evaluation:
    """Loss and closed-form gradient d loss / d logp for validated inputs of one dtype.

    ``norm`` holds the (global) counts; see :func:`sapo_ref.normalizer`. ``weights`` ([N] or
    [N, T], in the compute dtype) and ``ref_logp`` ([N, T], with ``config.kl_coef``) are the
    optional terms of clause 10.
    """
    xp = namespace(logp, old_logp, advantages)
    p = prepare(logp, old_logp, advantages, mask, config)
    zero = xp.zeros_like(p.delta)
    den = denominator(norm, config.loss_agg, config.norm_length)
    c = token_weights(p.valid, p.lengths, config.loss_agg, den)

    gate_x, gate_adv = p.log_x, p.adv
    if p.mu is not None and advantages.ndim == 1:
        # A sequence gate with per-sequence advantages depends on the row only: evaluate it once
        # per row, [N, 1], and let broadcasting spread it (empty rows: mu = 0, A = 0).
        rows = xp.expand_dims(p.lengths > 0, axis=1)
        gate_x = xp.expand_dims(p.mu, axis=1)
        gate_adv = xp.expand_dims(advantages, axis=1)
        gate_adv = xp.where(rows, gate_adv, xp.zeros_like(gate_adv))
    if config.is_soft:
        gate = sapo_parts_signed(gate_x, gate_adv > 0, config.tau_pos, config.tau_neg)
        g, dlog = gate.f, gate.dlog
    else:
        gate = clip_parts(gate_x, gate_adv, config.eps_low, config.eps_high, config.dual_clip)
        g, dlog = gate.g, gate.dlog
    if gate_x is not p.log_x:  # per-row gate: spread to the valid tokens (never 0 * inf)
        g, dlog = xp.where(p.valid, g, zero), xp.where(p.valid, dlog, zero)

    term = xp.where(p.valid, p.adv * g, zero)
    ca = c * p.adv  # 0 at invalid tokens
    scale = None
    if weights is not None:  # clause 10.1: the policy term only, counts (c) unchanged
        w = weights
        if w.ndim == 1:
            w = xp.broadcast_to(xp.expand_dims(w, axis=1), zero.shape)
        scale = xp.where(p.valid, w, zero)
        ca = ca * scale
    inv_len = 1.0 / xp.where(p.lengths > 0, p.lengths, xp.ones_like(p.lengths))
    inv_len = xp.broadcast_to(xp.expand_dims(inv_len, axis=1), zero.shape)
    spread = inv_len if config.spreads_gradient else xp.ones_like(zero)
    weighted = ca * g  # c * term
    coef = ca * dlog * spread  # dJ/d log x per token, already divided by L_i when spread
    if not config.is_soft:
        # Clause 5.4/6.3: where r = e^{log x} overflows but c*A*r need not (A < 0, no dual clip:
        # the only unbounded case), take c*A*r = ((c*A*h)*h)*k with h = e^a, a = log x / 3 and
        # k = e^{log x - 2a} (an exact difference, Sterbenz): finite whenever the true value is
        # (h and k stay finite up to log x = 3 * 709.8, past the largest log x where c*A*r can
        # be finite even for the smallest subnormal c*A), +inf only when it truly overflows, with
        # no rounding of the exponent amplified.
        big = gate.active & (gate.r == math.inf)
        log_x = xp.where(big, p.log_x, zero)
        third = log_x / 3.0
        finite_third = xp.where(log_x == math.inf, zero, third)  # log x = +inf: k = +inf too
        h, k = safe_exp(third), safe_exp(log_x - 2.0 * finite_third)
        weighted = xp.where(big, ((ca * h) * h) * k, weighted)
        coef = xp.where(big, ((ca * spread * h) * h) * k, coef)
    if scale is not None:
        # Clause 10.1: a weight of 0 removes the token's term, also where it is infinite (0 * inf).
        removed = scale == 0
        weighted, coef = xp.where(removed, zero, weighted), xp.where(removed, zero, coef)
    kl = kl_grad = None
    if ref_logp is not None and config.kl_coef is not None:  # clause 10.2
        u = xp.where(p.valid, ref_logp, zero) - xp.where(p.valid, logp, zero)
        k, dk = kl_penalty(u, config.kl_estimator)
        kl = xp.where(p.valid, k, zero)
        if config.has_kl:  # beta = 0 adds exactly nothing, not 0 * inf
            bc = config.kl_coef * c
            weighted = weighted - bc * kl  # one reduction for both terms
            kl_grad = xp.where(p.valid, bc * dk, zero)
    loss = 0.0 - xp.sum(xp.where(p.valid, weighted, zero))  # 0.0 - x keeps an empty batch +0.0
    coef = xp.where(p.valid, coef, zero)
    if config.spreads_gradient:
        row = xp.sum(coef, axis=1)
        grad = xp.where(p.valid, -xp.broadcast_to(xp.expand_dims(row, axis=1), zero.shape), zero)
    else:
        grad = xp.where(p.valid, -coef, zero)
    policy_grad = grad
    if kl_grad is not None:
        grad = grad + kl_grad
    return Evaluation(
        loss=loss,
        grad=grad,
        prepared=p,
        term=term,
        gate=gate,
        weights=c,
        token_scale=scale,
        kl=kl,
        kl_grad=kl_grad,
        policy_grad=policy_grad,
    )
