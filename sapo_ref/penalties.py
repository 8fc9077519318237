r"""The KL-penalty estimators of clause 10.2, values and derivatives, generic over array namespaces.

With :math:`u = \log\pi_\text{ref} - \log\pi_\theta` at a token (the log of the reference-to-policy
probability ratio), the estimators of :math:`\mathrm{KL}(\pi_\theta\,\|\,\pi_\text{ref})` and their
derivatives with respect to :math:`\log\pi_\theta` are

.. math::

    k_1 = -u,\ k_1' = 1;\qquad k_2 = \tfrac{u^2}{2},\ k_2' = -u;\qquad
    k_3 = e^{u} - 1 - u,\ k_3' = -(e^{u} - 1);\qquad
    k_3^\text{low-var} = \min(k_3, 10),\ \text{derivative } k_3' \text{ where } k_3 \le 10,
    \text{ else } 0.

``k3`` is summed as its Taylor series for small :math:`|u|` (clause 10.5): ``expm1(u) - u``
cancels to no correct digit there.
"""

from __future__ import annotations

import math
from typing import Any

from . import spec
from ._xp import namespace

__all__ = ["kl_penalty", "KL_ESTIMATOR_NAMES"]

KL_ESTIMATOR_NAMES: tuple[str, ...] = tuple(spec.KL_ESTIMATORS)


def _series_terms(eps: float) -> tuple[float, ...]:
    """1/n! for n = 2..N, N the fewest terms that sum e^u - 1 - u to the dtype's precision.

    For |u| < b the tail past u^N, relative to the leading u^2/2, is below 2 * 2 b^(N-1)/(N+1)!;
    N makes it <= eps/8 (float64: N = 15, float32: N = 9), so the series is exact to rounding.
    """
    b, n = spec.K3_SERIES_BELOW, 2
    while 4.0 * b ** (n - 1) / math.factorial(n + 1) > eps / 8.0:
        n += 1
    return tuple(1.0 / math.factorial(k) for k in range(2, n + 1))


# By machine epsilon (float64, float32, float16, bfloat16), built at import: a plain dict lookup
# inside traced code (torch.compile warns on functools caches).
_SERIES = {eps: _series_terms(eps) for eps in (2.0**-52, 2.0**-23, 2.0**-10, 2.0**-7)}


def _series(eps: float) -> tuple[float, ...]:
    terms = _SERIES.get(eps)
    return _series_terms(eps) if terms is None else terms


def _k3(xp: Any, u: Any) -> tuple[Any, Any]:
    zero = xp.zeros_like(u)
    # Past the dtype's largest exponent e^u - 1 - u and -(e^u - 1) are +-inf: selected, so that
    # expm1 never overflows (no warning) and u = +inf never meets inf - inf. One expm1 serves the
    # value above the series' range and the derivative everywhere.
    over = u > math.log(float(xp.finfo(u.dtype).max))
    inf = xp.full_like(u, math.inf)
    uo = xp.where(over, zero, u)
    em1 = xp.expm1(uo)
    small = xp.abs(u) < spec.K3_SERIES_BELOW
    us = xp.where(small, u, zero)
    coefs = _series(float(xp.finfo(u.dtype).eps))
    poly = xp.full_like(u, coefs[-1])
    for coef in reversed(coefs[:-1]):
        poly = poly * us + coef
    value = xp.where(small, poly * us * us, xp.where(over, inf, em1 - uo))
    return value, xp.where(over, -inf, -em1)


def kl_penalty(u: Any, estimator: str) -> tuple[Any, Any]:
    r"""KL estimator :math:`k(u)` and :math:`\partial k/\partial\log\pi_\theta`, elementwise (clause 10.2).

    Args:
        u: :math:`\log\pi_\text{ref} - \log\pi_\theta`, any shape, a floating array of any
            array-API namespace (0 where a token is invalid is fine: every estimator is 0 there).
        estimator: ``"k1"``, ``"k2"``, ``"k3"`` or ``"low-var-k3"``.

    Returns:
        ``(value, dlogp)``, both shaped like ``u``.

    >>> import numpy as np
    >>> value, dlogp = kl_penalty(np.array([1e-9, -1.0, 800.0]), "k3")
    >>> value  # e^u - 1 - u: 5e-19 exactly to double precision, then e^-1, then overflow
    array([5.00000000e-19, 3.67879441e-01,            inf])
    >>> kl_penalty(np.array([800.0]), "low-var-k3")
    (array([10.]), array([0.]))
    """
    if estimator not in spec.KL_ESTIMATORS:
        raise ValueError(
            f"unknown kl_estimator {estimator!r}; expected one of: {', '.join(KL_ESTIMATOR_NAMES)}"
        )
    xp = namespace(u)
    if estimator == "k1":
        return -u, xp.ones_like(u)
    if estimator == "k2":
        # u^2 / 2 past sqrt(max float) is +inf: selected, so that u * u never overflows (warns).
        big = xp.abs(u) > math.sqrt(float(xp.finfo(u.dtype).max))
        us = xp.where(big, xp.zeros_like(u), u)
        return xp.where(big, xp.full_like(u, math.inf), 0.5 * (us * us)), -u
    value, dlogp = _k3(xp, u)
    if estimator == "k3":
        return value, dlogp
    clipped = value > spec.KL_CLIP
    return (
        xp.where(clipped, xp.full_like(u, spec.KL_CLIP), value),
        xp.where(clipped, xp.zeros_like(u), dlogp),
    )
