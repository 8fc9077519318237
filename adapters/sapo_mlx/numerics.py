r"""Exponentials that are accurate in the dtype they are given, on every MLX backend.

MLX's CPU ``exp`` and ``sigmoid`` are float32 approximations even for float64 arrays (relative
error ~1e-7, overflow to ``inf`` past :math:`x \approx 88`, flush to 0 below
:math:`x \approx -87`; upstream ml-explore/mlx#3047), and its float32 ``exp`` (relative error
~4e-6) already overflows at :math:`x = 88.0` although :math:`e^x` is finite up to 88.72.
``expm1`` and the arithmetic operations are float64-accurate (checked against mpmath by
tests/test_mlx_numerics.py), so every exponential here comes from one ``expm1``:

.. math::

    v = \operatorname{expm1}(|x|/2),\quad a = 1 + v = e^{|x|/2},\quad b = 1/a,\qquad
    e^x = \begin{cases} a^2 & x \ge 0\\ b^2 & x < 0\end{cases},\qquad
    e^x - 1 = \begin{cases} v(2 + v) & x \ge 0\\ -(vb)(1 + b) & x < 0\end{cases}

(:math:`b - 1 = -vb`, so no digit cancels). Both are a few ulps from the true values over the
whole range of the dtype, subnormals included (halving is exact in binary), for one
transcendental evaluation. The two cases are selected with ``minimum``/``maximum``, not
``where``: see :func:`_sign_select`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any

import mlx.core as mx

__all__ = [
    "SUM_BLOCK",
    "accurate_sum",
    "exp",
    "exp_and_expm1",
    "half_exp_and_expm1",
    "logistic_and_weight",
]

#: Block length of :func:`accurate_sum` (error per level at most SUM_BLOCK/2 ulps).
SUM_BLOCK = 16


def _sign_select(x: mx.array) -> mx.array:
    # +inf for x > 0 (finite only for x < 1e-292, resp. 3e-38 in float32, where it is still
    # >= 1e31 while both candidates equal 1 or x), -inf for x < 0 (same bounds), +-0 at +-0:
    # with minimum/maximum it picks between a candidate for x >= 0 (the larger one) and one for
    # x < 0 (the smaller one) without a branch. MLX's CPU `where` with computed operands runs
    # about 20x slower than arithmetic when the condition flips from element to element (a
    # mispredicted branch, it seems); min/max made these functions 2x faster.
    big = 1e300 if x.dtype == mx.float64 else 1e38
    return (x * big) * big


def _via_float32(fn: Callable[[mx.array], tuple[mx.array, ...]]) -> Callable[..., Any]:
    # bfloat16 and float16 are computed in float32 and rounded once at the end.
    @wraps(fn)
    def wrapped(x: mx.array) -> Any:
        if x.dtype in (mx.float32, mx.float64):
            return fn(x)
        out = fn(x.astype(mx.float32))
        return tuple(o.astype(x.dtype) for o in out) if isinstance(out, tuple) else out.astype(x.dtype)

    return wrapped


@_via_float32
def half_exp_and_expm1(x: mx.array) -> tuple[mx.array, mx.array]:
    r""":math:`(e^{x/2}, e^x - 1)`, both accurate to a few ulps in the dtype of ``x`` (one ``expm1``).

    With :math:`v = \operatorname{expm1}(|x|/2)`, :math:`a = 1 + v = e^{|x|/2}` and :math:`b = 1/a`:
    :math:`e^{x/2} = a` and :math:`e^x - 1 = v(2 + v)` for :math:`x \ge 0`; :math:`e^{x/2} = b` and
    :math:`e^x - 1 = -(vb)(1 + b)` for :math:`x < 0` (:math:`b - 1 = -vb`: no digit cancels).
    :math:`e^x - 1 = -1` at :math:`-\infty`. The half exponential lets a caller form
    :math:`c\,e^x = (c\,e^{x/2})\,e^{x/2}` where :math:`e^x` alone would overflow.

    >>> import math, mlx.core as mx
    >>> h, u = half_exp_and_expm1(mx.array([-1e-12, 1000.0, -float("inf")], dtype=mx.float64))
    >>> abs(h.tolist()[1] / math.exp(500.0) - 1) < 1e-15, u.tolist()[2]
    (True, -1.0)
    >>> abs(u.tolist()[0] / math.expm1(-1e-12) - 1) < 1e-15
    True
    """
    z = _sign_select(x)
    v = mx.expm1(0.5 * mx.abs(x))
    a = 1.0 + v
    b = 1.0 / a
    # v b = v / (1 + v) -> 1 when v overflows (b = 0), where the product would be inf * 0.
    vb = mx.where(b > 0, v * b, 1.0)
    half = mx.minimum(a, mx.maximum(b, z))  # a for x >= 0, b for x < 0
    return half, mx.minimum(v * (2.0 + v), mx.maximum(-vb * (1.0 + b), z))


@_via_float32
def exp_and_expm1(x: mx.array) -> tuple[mx.array, mx.array]:
    r""":math:`(e^x, e^x - 1)` from :func:`half_exp_and_expm1`: :math:`e^x = (e^{x/2})^2`,
    :math:`+\infty` past the largest finite exponent, 0 at :math:`-\infty`.

    >>> import math, mlx.core as mx
    >>> r, u = exp_and_expm1(mx.array([-1e-12, -30.0], dtype=mx.float64))
    >>> [abs(a / math.exp(x) - 1) < 1e-15 for a, x in zip(r.tolist(), [-1e-12, -30.0])]
    [True, True]
    """
    half, u = half_exp_and_expm1(x)
    return half * half, u


@_via_float32
def exp(x: mx.array) -> mx.array:
    r""":math:`e^x` accurate in the dtype of ``x``, :math:`+\infty` past the largest finite exponent,
    without the float32 approximation MLX uses for ``mx.exp`` (see :func:`half_exp_and_expm1`).

    >>> import math, mlx.core as mx
    >>> xs = [1e-10, 88.5, -700.0, -740.0]
    >>> got = exp(mx.array(xs, dtype=mx.float64)).tolist()
    >>> all(abs(g / math.exp(x) - 1) < 1e-15 for g, x in zip(got[:3], xs))
    True
    >>> exp(mx.array([88.5, 100.0])).tolist()[1]  # float32: finite below 88.72, inf above
    inf
    """
    half = half_exp_and_expm1(x)[0]  # the unused e^x - 1 is never evaluated (lazy graph)
    return half * half


@_via_float32
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
    e = q * q  # e^{-|x|}, as in exp_and_expm1
    inv = 1.0 / (1.0 + e)  # one division for p and w
    p = mx.minimum(inv, mx.maximum(e * inv, _sign_select(x)))  # 1/(1+e) for x >= 0, else e/(1+e)
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
