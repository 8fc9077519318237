r"""The loss and its closed-form gradient in one pass of PyTorch ops (no autograd graph).

Same formulas as :func:`sapo_ref.evaluate` (clauses 1-3, 5, 6), specialised for PyTorch so that the
eager call issues few kernels and keeps no intermediate beyond the pass:

.. math::

    \mathcal{L} = -\sum_{i,t} m_{it}\,k_{it}\,g_{it},\qquad
    \frac{\partial\mathcal{L}}{\partial\log\pi_\theta(y_{it'})} = \begin{cases}
    -m_{it'}\,k_{it'}\,\partial_\delta g_{it'} & \text{token ratio, gspo-token}\\
    -\frac{m_{it'}}{L_i}\sum_t m_{it}\,k_{it}\,\partial_\mu g_{it} & \text{gspo, sapo-seq}
    \end{cases}

with :math:`k_{it} = A_{it}\,\rho_i / D` (clause 3.1) and :math:`g` the gate of clause 2: SAPO
:math:`g = \frac{4}{\tau}\sigma(x)`, :math:`\partial_\delta g = 4\sigma(x)\sigma(-x)\,e^{d}` with
:math:`d = \min(\delta, \delta_\text{sat})`, :math:`x = \tau\operatorname{expm1}(d)` (clause 6.3; the
reference's :math:`w = 4e^{-|x|}/(1+e^{-|x|})^2` equals :math:`4\sigma(x)\sigma(-x)`, and ``torch.sigmoid``
gives both factors to full relative precision); the hard clip of clause 2.4-2.6 as
:func:`sapo_ref.clip_parts`. Invalid tokens are removed by selection (clause 6.1); nothing is clamped
except the saturation of clause 6.3, which changes no bit of any result.

Inputs are only read; in-place ops touch only buffers the pass created, so the code traces under
``torch.compile`` and runs under ``torch.func`` transforms. Eager CPU cost is dominated by fresh
[N, T] allocations (page faults) and by ``torch.where``'s broadcast-scalar path, hence the in-place
chain and the bitwise selection of :func:`_select_` on the hot path (token SAPO); the other
methods use plain ops.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from sapo_ref.aggregation import Normalizer, denominator
from sapo_ref.config import LossConfig
from sapo_ref.gates import saturation_log_ratio

__all__ = ["local_counts", "loss_and_grad"]

Tensor = torch.Tensor


def local_counts(
    valid: Tensor, lengths: Tensor, count_empty_rows: bool, dtype: torch.dtype
) -> Normalizer:
    """This batch's counts :math:`(n, R)` (clause 3.6), summed as integers (exact), then cast."""
    n = lengths.sum().to(dtype)
    if count_empty_rows:
        return Normalizer(n, float(valid.shape[-2]))
    return Normalizer(n, (lengths > 0).sum().to(dtype))


_INT_OF = {torch.float32: torch.int32, torch.float64: torch.int64}


def _mask_bits(valid: Tensor, dtype: torch.dtype) -> Tensor:
    """The mask as integers of ``dtype``'s width: all bits set (-1) where valid, 0 elsewhere."""
    return valid.to(_INT_OF[dtype]).neg_()


def _select_(x: Tensor, bits: Tensor) -> Tensor:
    """``x`` where valid, +0.0 elsewhere, in place: a bitwise AND, so exactly a selection
    (clause 6.1; NaN or inf in x cannot leak) without ``torch.where``'s slow CPU path."""
    x.view(bits.dtype).bitwise_and_(bits)
    return x


def _log_ratio(logp: Tensor, old_logp: Tensor, dtype: torch.dtype) -> Tensor:
    """``logp - old_logp`` in ``dtype``, in a fresh buffer, with one conversion copy at most."""
    if torch.promote_types(old_logp.dtype, dtype) != dtype:
        old_logp = old_logp.to(dtype)
    if logp.dtype == dtype:
        return logp - old_logp
    return logp.to(dtype, copy=True).sub_(old_logp)  # sub_ computes in dtype: no rounding


def _row_weights(lengths_f: Tensor, norm: Normalizer, config: LossConfig, like: Tensor) -> Tensor:
    r""":math:`\rho_i / D` for every row, [N]; :math:`0/0 = 0` (clause 3.7) as in sapo_ref.token_weights."""
    den = denominator(norm, config.loss_agg, config.norm_length)
    den = torch.as_tensor(den, dtype=like.dtype, device=like.device)
    den_safe = torch.where(den > 0, den, torch.ones_like(den))
    if config.per_row_mean:
        rho = 1.0 / torch.where(lengths_f > 0, lengths_f, torch.ones_like(lengths_f))
    else:
        rho = torch.ones_like(lengths_f)
    return rho / den_safe


def _tau(adv: Tensor, config: LossConfig) -> tuple[Any, Any]:
    """Temperature and saturation log-ratio per token (clause 1.6, 6.3): floats when they agree."""
    tp, tn = config.tau_pos, config.tau_neg
    sp, sn = saturation_log_ratio(tp), saturation_log_ratio(tn)
    if tp == tn:
        return tp, sp
    pos = adv > 0
    # full_like, not where(pos, 1.0, 1.05): two Python scalars would give a float32 tensor.
    return torch.where(pos, torch.full_like(adv, tp), tn), torch.where(
        pos, torch.full_like(adv, sp), sn
    )


def _sapo_token_fused(
    delta: Tensor, adv: Tensor, k: Tensor, bits: Tensor, config: LossConfig
) -> tuple[Tensor, Tensor]:
    """Token SAPO on [N, T] with in-place ops on the pass's own buffers (the hot path).

    ``delta`` is the sanitised log-ratio (owned here and overwritten), ``adv`` the sanitised
    advantage and ``k`` the coefficient, each [N, 1] or [N, T]; ``bits`` the mask as bits.
    """
    tau, _ = _tau(adv, config)
    # One scalar saturation for both temperatures, in place: past min(dsat_pos, dsat_neg) every
    # token has x >= X_sat * tau_min / tau_max >= 1e18, where sigma(x) = 1 and sigma(-x) = 0
    # exactly as at its own dsat (clause 6.3), so no bit of any output changes.
    dsat = min(saturation_log_ratio(config.tau_pos), saturation_log_ratio(config.tau_neg))
    d = delta.clamp_max_(dsat)
    r = torch.exp(d)  # e^d, not u + 1: exact for tiny r as in sapo_ref.sapo_parts
    u = _expm1_(d, r)
    q = torch.mul(u, -tau if isinstance(tau, float) else torch.neg(tau)).sigmoid_()  # sigma(-x)
    p = u.mul_(tau).sigmoid_()  # sigma(x); q = 1 - p to full relative precision
    # c = -m k 4/tau: loss = sum c p; grad = -m k 4 p q r = (c p) q r tau (+0 where invalid).
    cp = _select_(p.mul_(k * (-4.0 / tau)), bits)
    loss = cp.sum()
    grad = cp.mul_(q).mul_(r).mul_(tau)
    return loss, grad


#: Taylor coefficients 1/k! of expm1, k = 1..11: below |d| = 0.1 the truncation error is
#: 0.1**12 / 12! < 3e-21, relative, so the polynomial is exact to float64 rounding.
_EXPM1_TAYLOR = tuple(1.0 / math.factorial(k) for k in range(1, 12))


def _expm1_(d: Tensor, r: Tensor) -> Tensor:
    r""":math:`e^d - 1` to full relative precision given :math:`r = e^d` (``d`` may be overwritten).

    Eager: ``expm1``. Under ``torch.compile`` the CPU code generator emits ``exp(d) - 1``, which
    cancels near :math:`d = 0` (and :math:`\tau\,(r - 1)` with a large :math:`\tau` would lose every
    digit), so the compiled path uses :math:`r - 1` where :math:`|d| \ge 0.1` (at most ~10 ulp, no
    cancellation) and the Taylor polynomial below.
    """
    if torch.compiler.is_compiling():
        poly = torch.full_like(d, _EXPM1_TAYLOR[-1])
        for c in reversed(_EXPM1_TAYLOR[:-1]):
            poly = poly * d + c
        return torch.where(torch.abs(d) < 0.1, poly * d, r - 1.0)
    return d.expm1_()


def _sapo_parts(log_x: Tensor, tau: Any, dsat: Any) -> tuple[Tensor, Tensor]:
    r"""SAPO value factor :math:`g = \frac{4}{\tau}\sigma(x)` and :math:`\partial_{\log x} g` (clause 2.1, 2.2, 6.3)."""
    d = torch.minimum(log_x, torch.as_tensor(dsat, dtype=log_x.dtype, device=log_x.device))
    r = torch.exp(d)
    x = tau * _expm1_(d.clone(), r)
    return (4.0 / tau) * torch.sigmoid(x), 4.0 * torch.sigmoid(x) * torch.sigmoid(-x) * r


def _clip_terms(log_x: Tensor, adv: Tensor, k: Tensor, config: LossConfig) -> tuple[Tensor, Tensor]:
    r"""Hard clip (clause 2.4-2.6) times the coefficient: :math:`k g` and :math:`k\,\mathbb{1}\,r`.

    As :func:`sapo_ref.clip_parts`: :math:`g = \min(r, 1+\epsilon_h)` for :math:`A > 0`,
    :math:`\min(\max(r, 1-\epsilon_l), c)` for :math:`A < 0`, 0 for :math:`A = 0`; ``exp`` gives
    :math:`r = +\infty` past the largest finite exponent without a warning (clause 6.3). Where
    :math:`r` overflows but :math:`k r` does not (float32, :math:`\delta > 88.7`, small :math:`|k|`),
    :math:`k r = \operatorname{sign}(k)\,e^{\delta + \log|k|}` gives the finite true value.
    """
    r = torch.exp(log_x)
    hi, lo, dual = 1.0 + config.eps_high, 1.0 - config.eps_low, config.dual_clip
    pos, neg = adv > 0, adv < 0
    kr = k * r
    big = torch.isinf(r) & (k != 0)
    kr = torch.where(big, torch.sign(k) * torch.exp(log_x + torch.log(torch.abs(k))), kr)
    g_neg_k = torch.where(r < lo, k * lo, kr)  # k max(r, lo): selection keeps kr exact
    if dual is not None:
        g_neg_k = torch.where(r > dual, k * dual, g_neg_k)
    kg = torch.where(pos, torch.where(r > hi, k * hi, kr), torch.where(neg, g_neg_k, 0.0))
    active_neg = neg & (r >= lo) if dual is None else neg & (r >= lo) & (r <= dual)
    active = (pos & (r <= hi)) | active_neg
    return kg, torch.where(active, kr, 0.0)


def loss_and_grad(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    valid: Tensor,
    config: LossConfig,
    norm: Normalizer | None,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """Loss (0-d) and d loss / d logp ([N, T]), both in the compute dtype ``dtype``.

    ``valid`` is the boolean mask; ``norm`` the global counts (in ``dtype``) or ``None`` for this
    batch's own. Inputs are read, never written (clause 6.5).
    """
    bits = _mask_bits(valid, dtype)
    lengths = torch.neg(bits.sum(-1, dtype=bits.dtype))  # L_i, exact; no int64 copy of bits
    lengths_f = lengths.to(dtype)
    if norm is None:
        norm = local_counts(valid, lengths, config.count_empty_rows, dtype)
    row_w = _row_weights(lengths_f, norm, config, lengths_f)
    if advantages.dim() == 1:
        # A per row: an empty row's advantage may be garbage (it is masked), select it away.
        adv = torch.where(lengths > 0, advantages.to(dtype), 0.0).unsqueeze(-1)
    else:
        adv = _select_(advantages.to(dtype, copy=True), bits)
    k = row_w.unsqueeze(-1) * adv  # [N, 1] or [N, T]
    delta = _select_(_log_ratio(logp, old_logp, dtype), bits)

    if config.method == "sapo":
        return _sapo_token_fused(delta, adv, k, bits, config)

    if config.sequence_value:
        mu = delta.sum(-1, keepdim=True) / torch.where(lengths_f > 0, lengths_f, 1.0).unsqueeze(-1)
        log_x = mu  # [N, 1]
    else:
        log_x = delta
    if config.is_soft:
        tau, dsat = _tau(adv, config)
        g, dlog = _sapo_parts(log_x, tau, dsat)
        kg, kd = k * g, k * dlog  # [N, 1] when everything is per row, else [N, T]
    else:
        kg, kd = _clip_terms(log_x, adv, k, config)
    if kg.shape[-1] == 1 and valid.shape[-1] != 1:
        loss = torch.neg((lengths_f.unsqueeze(-1) * kg).sum())
    else:
        loss = torch.neg(torch.where(valid, kg, 0.0).sum())
    if config.spreads_gradient:
        one = torch.where(lengths_f > 0, lengths_f, 1.0).unsqueeze(-1)
        row = torch.where(valid, kd, 0.0).sum(-1, keepdim=True) / one
        grad = torch.where(valid, torch.neg(row), 0.0)
    else:
        grad = torch.where(valid, torch.neg(kd), 0.0)
    return loss, grad
