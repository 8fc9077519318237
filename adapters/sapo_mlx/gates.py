r"""The SAPO and hard-clip gates in MLX: the twins of :mod:`sapo_ref.gates`, same formulas.

.. math::

    x = \tau\,\operatorname{expm1}(\min(\delta, \delta_\text{sat})),\quad
    f = \tfrac{4}{\tau}\sigma(x),\quad w = \frac{4e^{-|x|}}{(1+e^{-|x|})^2},\quad
    \frac{\partial f}{\partial\delta} = w\,e^{\min(\delta,\delta_\text{sat})}

(clause 6.3: exact for every :math:`\delta \in [-\infty, \infty]`, no clamp), and for the clip
:math:`g = \min(r, 1+\epsilon_h)` (:math:`A > 0`), :math:`\min(\max(r, 1-\epsilon_l), c)`
(:math:`A < 0`), 0 (:math:`A = 0`), with the eq. 24 indicator. The result containers and
:math:`\delta_\text{sat}` are the reference's own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from sapo_ref.gates import X_SAT, ClipParts, SapoParts, saturation_log_ratio

from .numerics import exp_and_expm1, half_exp_and_expm1, logistic_and_weight

__all__ = [
    "ClipParts",
    "HalfClipParts",
    "SapoParts",
    "clip_parts",
    "sapo_parts",
    "signed_sapo_parts",
]


@dataclass(frozen=True)
class HalfClipParts(ClipParts):
    r""":class:`sapo_ref.ClipParts` plus ``half`` :math:`= e^{\delta/2}`, finite up to twice the
    largest exponent: :math:`cAr = (cA\,e^{\delta/2})\,e^{\delta/2}` where ``r`` overflows (5.4)."""

    half: Any = None


def _sapo(delta: mx.array, tau: Any, delta_sat: Any, four_over_tau: Any) -> SapoParts:
    # r = e^d and u = r - 1 both to a few ulps (u exact near r = 1, r exact for tiny r).
    r, u = exp_and_expm1(mx.minimum(delta, delta_sat))
    p, w = logistic_and_weight(tau * u)
    return SapoParts(f=four_over_tau * p, w=w, dlog=w * r)


def sapo_parts(delta: mx.array, tau: Any) -> SapoParts:
    r"""SAPO value ``f``, gate weight ``w`` and ``dlog`` :math:`= w\,r` at log-ratios ``delta``.

    ``tau`` is a Python float or an array broadcastable to ``delta``.

    >>> import mlx.core as mx, numpy as np, sapo_ref
    >>> d = [0.0, 0.5, float("inf"), -float("inf")]
    >>> got = sapo_parts(mx.array(d, dtype=mx.float64), 1.05)
    >>> want = sapo_ref.sapo_parts(np.array(d), 1.05)
    >>> np.allclose(np.array(got.dlog), want.dlog, rtol=1e-15, atol=0)
    True
    """
    if isinstance(tau, (int, float)):
        return _sapo(delta, tau, saturation_log_ratio(float(tau)), 4.0 / tau)
    return _sapo(delta, tau, mx.log1p(X_SAT / tau), 4.0 / tau)


def signed_sapo_parts(delta: mx.array, pos: mx.array, tau_pos: float, tau_neg: float) -> SapoParts:
    r""":func:`sapo_parts` with :math:`\tau = \tau_\text{pos}` where ``pos`` else :math:`\tau_\text{neg}`
    (clause 1.6); :math:`\delta_\text{sat}` and :math:`4/\tau` are selected from Python floats, not
    recomputed per token.

    >>> import mlx.core as mx
    >>> signed_sapo_parts(mx.array([0.0, 0.0]), mx.array([True, False]), 1.0, 2.0).f.tolist()
    [2.0, 1.0]
    """

    s = pos.astype(delta.dtype)
    not_s = 1.0 - s

    def pick(a: float, b: float) -> mx.array:
        # a*1 + b*0 is exactly a for finite a, b: a select without `where`, whose branch
        # mispredicts on per-token advantages (see sapo_mlx.numerics._sign_select).
        return a * s + b * not_s

    return _sapo(
        delta,
        pick(tau_pos, tau_neg),
        pick(saturation_log_ratio(tau_pos), saturation_log_ratio(tau_neg)),
        pick(4.0 / tau_pos, 4.0 / tau_neg),
    )


def clip_parts(
    delta: mx.array,
    adv: mx.array,
    eps_low: float,
    eps_high: float,
    dual_clip: float | None = None,
) -> ClipParts:
    r"""Hard-clip factor ``g`` (term :math:`= A g`), ``dlog`` :math:`= \mathbb{1}\,r`, the eq. 24
    indicator ``active`` and the sides ``low``, ``high``, ``dual`` (clause 2.4-2.6).

    >>> import mlx.core as mx, math
    >>> c = clip_parts(mx.array([math.log(0.5), 0.0, math.log(1.5)]), mx.array([1.0, 1.0, 1.0]), 0.2, 0.2)
    >>> c.active.tolist()
    [True, True, False]
    """
    half = half_exp_and_expm1(delta)[0]
    r = half * half  # +inf past the largest finite exponent (clause 6.3)
    hi = 1.0 + eps_high
    lo = 1.0 - eps_low
    pos = adv > 0
    neg = adv < 0
    g_pos = mx.minimum(r, hi)
    g_neg = mx.maximum(r, lo)
    high = pos & (r > hi)
    low = neg & (r < lo)
    if dual_clip is not None:
        g_neg = mx.minimum(g_neg, dual_clip)
        dual = neg & (r > dual_clip)
    else:
        dual = mx.zeros_like(pos)
    # g = 0 at A = 0 so that A * g never meets 0 * inf (clause 5.1).
    g = mx.where(pos, g_pos, mx.where(neg, g_neg, 0.0))
    active = (pos | neg) & ~high & ~low & ~dual
    return HalfClipParts(
        g=g, dlog=mx.where(active, r, 0.0), active=active, r=r, low=low, high=high, dual=dual,
        half=half,
    )

