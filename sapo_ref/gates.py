r"""Gates: the per-token functions f(x) of the unified surrogate and their derivatives.

Every function here is written against the Python array API standard and evaluates in the
dtype of its input, so the adapters reuse them on framework arrays. The reference calls them
in float64.

For SAPO (paper eq. 6, 8, 16) with temperature :math:`\tau`,

.. math::

    f(r) = \frac{4}{\tau}\,\sigma\big(\tau (r-1)\big), \qquad
    w(r) = f'(r) = 4p(1-p) = \operatorname{sech}^2\!\big(\tfrac{\tau}{2}(r-1)\big),\quad p = \sigma(\tau(r-1)).

For the hard clip (paper eq. 1, 12, 24) the term is :math:`A\,g(r)` with
:math:`g = \min(r, 1+\epsilon_h)` for :math:`A > 0` and :math:`g = \min(\max(r, 1-\epsilon_l), c)` for
:math:`A \le 0` (:math:`c = \infty` without dual clip).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from . import spec
from ._xp import namespace

__all__ = [
    "SapoParts",
    "ClipParts",
    "sapo_gate",
    "sapo_weight",
    "sapo_parts",
    "sapo_parts_signed",
    "clip_parts",
    "saturation_log_ratio",
    "safe_exp",
    "logistic_and_weight",
]

#: tau * (r - 1) beyond which every SAPO quantity is at its float32/float64 limit (clause 6.3).
X_SAT: float = spec.X_SATURATION


@dataclass(frozen=True)
class SapoParts:
    """SAPO quantities at a log-ratio: value ``f``, gate weight ``w`` and ``dlog = w * r``.

    ``dlog`` is :math:`\\partial f/\\partial \\delta = f'(r)\\,r`, the factor that multiplies
    :math:`A` in the gradient with respect to the log-probability (eq. 7).
    """

    f: Any
    w: Any
    dlog: Any


@dataclass(frozen=True)
class ClipParts:
    """Hard-clip quantities: ``g`` (term = A * g, 0 where A = 0), ``dlog`` = 1[active] * r
    (d term / d delta = A * dlog), the eq. 24 indicator ``active`` and the ratio ``r``.

    ``low``, ``high`` and ``dual`` flag which side of the band zeroed the gradient.
    """

    g: Any
    dlog: Any
    active: Any
    r: Any
    low: Any
    high: Any
    dual: Any


def saturation_log_ratio(tau: Any) -> Any:
    r"""The log-ratio :math:`\delta_\text{sat} = \log(1 + X_\text{sat}/\tau)` of clause 6.3.

    Works on Python floats and on arrays.

    >>> round(saturation_log_ratio(1.0), 3)
    69.078
    """
    if isinstance(tau, (int, float)):
        return math.log1p(X_SAT / tau)
    xp = namespace(tau)
    return xp.log1p(X_SAT / tau)


def safe_exp(delta: Any) -> Any:
    r""":math:`e^\delta`, giving :math:`+\infty` past the dtype's largest finite exponent without a
    floating-point overflow (clause 6.3).

    >>> import numpy as np
    >>> safe_exp(np.array([0.0, 1000.0, -np.inf])).tolist()
    [1.0, inf, 0.0]
    """
    xp = namespace(delta)
    log_max = math.log(float(xp.finfo(delta.dtype).max))
    big = delta > log_max
    inner = xp.where(big, xp.zeros_like(delta), delta)
    return xp.where(big, xp.full_like(delta, math.inf), xp.exp(inner))


def sapo_parts(delta: Any, tau: Any) -> SapoParts:
    r"""SAPO value, gate weight and log-derivative at log-ratios ``delta`` (eq. 6, 8, 16).

    .. math::

        x = \tau\,\operatorname{expm1}(\min(\delta, \delta_\text{sat})),\quad
        f = \tfrac{4}{\tau}\sigma(x),\quad w = \frac{4e^{-|x|}}{(1+e^{-|x|})^2},\quad
        \frac{\partial f}{\partial\delta} = w\,e^{\min(\delta,\delta_\text{sat})}.

    Exact for every :math:`\delta\in[-\infty, +\infty]` (clause 5.3, 6.3): no NaN, no overflow,
    no clamp that changes a value.

    Args:
        delta: log-ratios :math:`\log\pi_\theta - \log\pi_\text{old}`, any shape, real floating.
        tau: temperature, a Python float or an array broadcastable to ``delta``.

    >>> import numpy as np
    >>> p = sapo_parts(np.array([0.0, np.inf, -np.inf]), 1.0)
    >>> p.w.round(12).tolist()  # w(1) = 1; w(inf) = 0; w(0) = sech^2(1/2)
    [1.0, 0.0, 0.786447732966]
    >>> p.dlog.tolist()
    [1.0, 0.0, 0.0]
    """
    xp = namespace(delta)
    return _sapo_core(xp, delta, tau, _broadcast(xp, saturation_log_ratio(tau), delta), 4.0 / tau)


def sapo_parts_signed(delta: Any, positive: Any, tau_pos: float, tau_neg: float) -> SapoParts:
    r""":func:`sapo_parts` with :math:`\tau = \tau_\text{pos}` where ``positive`` holds and
    :math:`\tau_\text{neg}` elsewhere (clause 1.6), the per-temperature constants
    (:math:`\delta_\text{sat}`, :math:`4/\tau`) computed once in Python rather than per token.

    >>> import numpy as np
    >>> d = np.array([0.3, -0.2])
    >>> a = sapo_parts_signed(d, np.array([True, False]), 1.0, 1.05)
    >>> b = sapo_parts(d, np.array([1.0, 1.05]))
    >>> bool(np.all(a.f == b.f) and np.all(a.dlog == b.dlog))
    True
    """
    xp = namespace(delta, positive)

    def pick(pos_value: float, neg_value: float) -> Any:
        return xp.where(positive, xp.full_like(delta, pos_value), xp.full_like(delta, neg_value))

    tau = pick(tau_pos, tau_neg)
    d_sat = pick(saturation_log_ratio(tau_pos), saturation_log_ratio(tau_neg))
    return _sapo_core(xp, delta, tau, d_sat, pick(4.0 / tau_pos, 4.0 / tau_neg))


def _sapo_core(xp: Any, delta: Any, tau: Any, d_sat: Any, scale: Any) -> SapoParts:
    d = xp.minimum(delta, d_sat)
    u = xp.expm1(d)  # r - 1, exact near r = 1
    p, w = logistic_and_weight(tau * u)
    # r = e^d, not u + 1: u + 1 rounds to 0 for r < 1e-16 and w * r would lose every digit.
    return SapoParts(f=scale * p, w=w, dlog=w * xp.exp(d))


def logistic_and_weight(x: Any) -> tuple[Any, Any]:
    r""":math:`\sigma(x)` and :math:`4\sigma(x)(1-\sigma(x)) = \operatorname{sech}^2(x/2)`, from
    :math:`e^{-|x|}` only, so both are exact and finite for every :math:`x \in [-\infty, \infty]`.

    >>> import numpy as np
    >>> p, w = logistic_and_weight(np.array([0.0, np.inf]))
    >>> p.tolist(), w.tolist()
    ([0.5, 1.0], [1.0, 0.0])
    """
    xp = namespace(x)
    e = xp.exp(-xp.abs(x))
    one_e = 1.0 + e
    p = xp.where(x >= 0, 1.0 / one_e, e / one_e)
    return p, 4.0 * e / (one_e * one_e)


def sapo_gate(r: Any, tau: Any) -> Any:
    r"""SAPO's soft gate :math:`f(r) = \frac{4}{\tau}\sigma(\tau(r-1))` (eq. 6) at ratios ``r >= 0``.

    >>> import numpy as np
    >>> sapo_gate(np.array([1.0]), 1.0).tolist()  # 2/tau at r = 1
    [2.0]
    """
    return sapo_parts(_log_ratio(r), tau).f


def sapo_weight(r: Any, tau: Any) -> Any:
    r"""SAPO's gate weight :math:`w(r) = f'(r) = \operatorname{sech}^2(\frac{\tau}{2}(r-1))` (eq. 8, 16).

    >>> import numpy as np
    >>> sapo_weight(np.array([1.0, 2.0]), 1.0).round(4).tolist()
    [1.0, 0.7864]
    """
    return sapo_parts(_log_ratio(r), tau).w


def clip_parts(
    delta: Any,
    adv: Any,
    eps_low: float,
    eps_high: float,
    dual_clip: float | None = None,
) -> ClipParts:
    r"""Hard-clip term factor and gradient indicator at log-ratios ``delta`` (eq. 1, 12, 24).

    With :math:`r = e^\delta`, the term is :math:`A\,g` and :math:`\partial(Ag)/\partial\delta = A\,\mathbb{1}\,r`:

    .. math::

        g = \begin{cases}\min(r, 1+\epsilon_h) & A > 0\\ \min(\max(r, 1-\epsilon_l), c) & A \le 0\end{cases}
        \qquad
        \mathbb{1} = \begin{cases} [r \le 1+\epsilon_h] & A > 0\\ [r \ge 1-\epsilon_l]\,[r \le c] & A < 0\\ 0 & A = 0\end{cases}

    :math:`r` may be :math:`+\infty` (clause 5.4).

    >>> import numpy as np
    >>> c = clip_parts(np.log(np.array([0.5, 1.0, 1.5])), np.array([1.0, 1.0, 1.0]), 0.2, 0.2)
    >>> c.g.tolist(), c.active.tolist()
    ([0.5, 1.0, 1.2], [True, True, False])
    >>> c.dlog.tolist()
    [0.5, 1.0, 0.0]
    """
    xp = namespace(delta, adv)
    r = safe_exp(delta)
    hi = 1.0 + eps_high
    lo = 1.0 - eps_low
    pos = adv > 0
    neg = adv < 0
    g_pos = xp.minimum(r, xp.full_like(r, hi))
    g_neg = xp.maximum(r, xp.full_like(r, lo))
    high = pos & (r > hi)
    low = neg & (r < lo)
    if dual_clip is not None:
        g_neg = xp.minimum(g_neg, xp.full_like(r, dual_clip))
        dual = neg & (r > dual_clip)
    else:
        dual = xp.zeros_like(pos)
    zero = xp.zeros_like(r)
    # g = 0 at A = 0 so that A * g never meets 0 * inf (clause 5.1).
    g = xp.where(pos, g_pos, xp.where(neg, g_neg, zero))
    active = (pos | neg) & ~high & ~low & ~dual
    return ClipParts(
        g=g, dlog=xp.where(active, r, zero), active=active, r=r, low=low, high=high, dual=dual
    )


def _log_ratio(r: Any) -> Any:
    # log(0) = -inf is the right log-ratio (clause 5.3) but NumPy warns on it: select instead.
    xp = namespace(r)
    pos = r > 0
    return xp.where(pos, xp.log(xp.where(pos, r, xp.ones_like(r))), xp.full_like(r, -math.inf))


def _broadcast(xp: Any, value: Any, like: Any) -> Any:
    if isinstance(value, (int, float)):
        return xp.full_like(like, value)
    return value
