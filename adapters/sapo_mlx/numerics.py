r"""Exponentials that are accurate in the dtype they are given, on every MLX backend.

MLX's CPU ``exp`` and ``sigmoid`` are float32 approximations even for float64 arrays (relative
error ~1e-7, overflow to ``inf`` past :math:`x \approx 88`, flush to 0 below
:math:`x \approx -87`; upstream ml-explore/mlx#3047), and its float32 ``exp`` (relative error
~4e-6) already overflows at :math:`x = 88.0` although :math:`e^x` is finite up to 88.72.
``expm1`` and the arithmetic operations are float64-accurate (checked against mpmath by
tests/test_mlx_numerics.py), so every exponential here comes from one ``expm1``:

.. math::

    v = \operatorname{expm1}(y),\quad y = \begin{cases} x & x \ge 0\\ -x/2 & x < 0\end{cases},\qquad
    e^x = \begin{cases} 1 + v\\ q^2,\ q = \frac{1}{1+v}\end{cases},\qquad
    e^x - 1 = \begin{cases} v\\ -(vq)(1+q)\end{cases}

(for :math:`x < 0`, :math:`q = e^{x/2}` and :math:`q - 1 = -vq`, so no digit cancels). Both are
a few ulps from the true values over the whole range of the dtype, subnormals included (the
halving is exact in binary), and cost one transcendental evaluation, which is what dominates
the run time of MLX's CPU kernels.
"""

from __future__ import annotations

import mlx.core as mx

__all__ = ["SUM_BLOCK", "accurate_sum", "exp", "exp_and_expm1", "logistic_and_weight"]

#: Block length of :func:`accurate_sum` (error per level at most SUM_BLOCK/2 ulps).
SUM_BLOCK = 16


def exp_and_expm1(x: mx.array) -> tuple[mx.array, mx.array]:
    r""":math:`(e^x, e^x - 1)`, both accurate to a few ulps in the dtype of ``x`` (one ``expm1``).

    :math:`e^x` is :math:`+\infty` past the largest finite exponent, 0 at :math:`-\infty`;
    :math:`e^x - 1` is exact near 0 and :math:`-1` at :math:`-\infty`.

    >>> import math, mlx.core as mx
    >>> r, u = exp_and_expm1(mx.array([-1e-12, -30.0, -float("inf")], dtype=mx.float64))
    >>> [abs(a / math.exp(x) - 1) < 1e-15 for a, x in zip(r.tolist(), [-1e-12, -30.0])]
    [True, True]
    >>> abs(u.tolist()[0] / math.expm1(-1e-12) - 1) < 1e-15, u.tolist()[2]
    (True, -1.0)
    """
    pos = x >= 0
    v = mx.expm1(mx.where(pos, x, -0.5 * x))
    q = 1.0 / (1.0 + v)
    # v q = v / (1 + v) -> 1 when v overflows (q = 0), where the product would be inf * 0.
    vq = mx.where(q > 0, v * q, 1.0)
    return mx.where(pos, 1.0 + v, q * q), mx.where(pos, v, -vq * (1.0 + q))


def exp(x: mx.array) -> mx.array:
    r""":math:`e^x` accurate in the dtype of ``x``, :math:`+\infty` past the largest finite exponent,
    without the float32 approximation MLX uses for ``mx.exp`` (see the module docstring).

    >>> import math, mlx.core as mx
    >>> xs = [1e-10, 88.5, -700.0, -740.0]
    >>> got = exp(mx.array(xs, dtype=mx.float64)).tolist()
    >>> all(abs(g / math.exp(x) - 1) < 1e-15 for g, x in zip(got[:3], xs))
    True
    >>> exp(mx.array([88.5, 100.0])).tolist()[1]  # float32: finite below 88.72, inf above
    inf
    """
    pos = x >= 0
    v = mx.expm1(mx.where(pos, x, -0.5 * x))
    q = 1.0 / (1.0 + v)
    return mx.where(pos, 1.0 + v, q * q)


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
    q = 1.0 / (1.0 + mx.expm1(0.5 * mx.abs(x)))
    e = q * q  # e^{-|x|}, as in exp() for a non-positive argument
    inv = 1.0 / (1.0 + e)  # one division for p and w
    p = mx.where(x >= 0, inv, e * inv)
    return p, (4.0 * e) * (inv * inv)


def accurate_sum(x: mx.array, axis: int = -1) -> mx.array:
    r"""Sum over ``axis`` in blocks of :data:`SUM_BLOCK`, then the block sums, and so on.

    MLX's CPU reduction accumulates sequentially: summing :math:`n` equal float32 values has a
    relative error growing like :math:`n\epsilon` (6e-5 at :math:`n = 8192`, 2% at
    :math:`2^{21}`), beyond the float32 tolerance. Blocked summation bounds it by
    :math:`\lceil\log_{16} n\rceil \cdot 8\epsilon`, like NumPy's pairwise sum.

    >>> import mlx.core as mx, numpy as np
    >>> x = mx.full((8192,), 0.1)
    >>> exact = 8192 * float(np.float32(0.1))
    >>> abs(accurate_sum(x).item() - exact) / exact < 1e-6 < abs(mx.sum(x).item() - exact) / exact
    True
    """
    if axis not in (-1, x.ndim - 1):
        x = mx.moveaxis(x, axis, -1)
    while x.shape[-1] > SUM_BLOCK:
        n = x.shape[-1]
        blocks = -(-n // SUM_BLOCK)
        if blocks * SUM_BLOCK != n:
            x = mx.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, blocks * SUM_BLOCK - n)])
        x = mx.sum(x.reshape(*x.shape[:-1], blocks, SUM_BLOCK), axis=-1)
    return mx.sum(x, axis=-1)
