r"""Exponentials that are accurate in the dtype they are given, on every MLX backend.

MLX's CPU ``exp`` and ``sigmoid`` are float32 approximations even for float64 arrays (relative
error ~1e-7, overflow to ``inf`` past :math:`x \approx 88`, flush to 0 below
:math:`x \approx -87`; upstream ml-explore/mlx#3047), and the float32 ``exp`` already overflows
at :math:`x = 88.0` although :math:`e^x` is finite up to 88.72. ``expm1`` and the arithmetic
operations are correctly rounded in float64 (checked by tests/test_mlx_numerics.py), so the
float64 exponential is built from them:

.. math::

    e^x = 1 + \operatorname{expm1}(x)\quad (x \ge 0),\qquad
    e^x = \Big(\frac{1}{1 + \operatorname{expm1}(-x/2)}\Big)^2\quad (x < 0),

a few ulps from the true value over the whole float64 range (the square reaches the subnormals
down to :math:`e^{-745}`; the halving is exact in binary).
"""

from __future__ import annotations

import math

import mlx.core as mx

__all__ = ["exp", "exp_nonpositive", "exp_capped", "logistic_and_weight"]


def exp(x: mx.array) -> mx.array:
    r""":math:`e^x` accurate in the dtype of ``x``, :math:`+\infty` past the largest finite exponent.

    float64 uses the expm1 form above; other dtypes use ``mx.exp``, squared from the half
    argument where ``mx.exp`` would overflow before the dtype does.

    >>> import math, mlx.core as mx
    >>> xs = [1e-10, 88.5, -700.0]
    >>> got = exp(mx.array(xs, dtype=mx.float64)).tolist()
    >>> all(abs(g / math.exp(x) - 1) < 1e-15 for g, x in zip(got, xs))
    True
    >>> exp(mx.array([88.5, 100.0])).tolist()[1]  # float32: finite below 88.72, inf above
    inf
    """
    if x.dtype == mx.float64:
        pos = x >= 0
        e = 1.0 + mx.expm1(mx.where(pos, x, -0.5 * x))
        q = 1.0 / e
        return mx.where(pos, e, q * q)
    half_from = 0.5 * math.log(float(mx.finfo(x.dtype).max))
    big = x > half_from
    e = mx.exp(mx.where(big, 0.5 * x, x))
    return mx.where(big, e * e, e)


def exp_nonpositive(x: mx.array) -> mx.array:
    r""":math:`e^x` for :math:`x \le 0` (or :math:`-\infty`): :func:`exp` without its overflow branch.

    >>> import mlx.core as mx
    >>> exp_nonpositive(mx.array([0.0, -float("inf")], dtype=mx.float64)).tolist()
    [1.0, 0.0]
    """
    if x.dtype == mx.float64:
        q = 1.0 / (1.0 + mx.expm1(-0.5 * x))
        return q * q
    return mx.exp(x)


def exp_capped(x: mx.array) -> mx.array:
    r""":math:`e^x` for :math:`x \le 87`: :func:`exp` without the float32 overflow branch
    (``mx.exp`` overflows only from 88.0). SAPO's capped log-ratio
    :math:`\min(\delta, \delta_\text{sat})` is at most :math:`\log(1 + 10^{30}/10^{-6}) \approx 82.9`.

    >>> import mlx.core as mx
    >>> exp_capped(mx.array([0.0, -float("inf")])).tolist()
    [1.0, 0.0]
    """
    if x.dtype == mx.float64:
        return exp(x)
    return mx.exp(x)


def logistic_and_weight(x: mx.array) -> tuple[mx.array, mx.array]:
    r""":math:`\sigma(x)` and :math:`w = 4\sigma(x)(1-\sigma(x)) = \frac{4e^{-|x|}}{(1+e^{-|x|})^2}`
    from :math:`e^{-|x|}` only (clause 6.3), exact and finite for :math:`x \in [-\infty, \infty]`.

    The MLX twin of :func:`sapo_ref.logistic_and_weight` (``mx.sigmoid`` is float32-accurate
    in float64).

    >>> import mlx.core as mx
    >>> p, w = logistic_and_weight(mx.array([0.0, float("inf"), -float("inf")]))
    >>> p.tolist(), w.tolist()
    ([0.5, 1.0, 0.0], [1.0, 0.0, 0.0])
    """
    e = exp_nonpositive(-mx.abs(x))
    one_e = 1.0 + e
    p = mx.where(x >= 0, 1.0 / one_e, e / one_e)
    return p, 4.0 * e / (one_e * one_e)
