r"""``mlx.core`` as the array API namespace the reference's formula runs on (issue 15).

``sapo_ref.evaluate``, ``sapo_ref.metrics`` and ``sapo_ref.validation`` are written against the
array API standard. ``mlx.core`` is close to it (``mx.array.__array_namespace__`` returns it);
:data:`MLX` is ``mlx.core`` with only what it lacks or computes too inaccurately overridden:

* ``exp``: MLX's is a float32 approximation in every dtype (about 60 float32 ulps; in float64
  a relative error of 2.6e-6, ml-explore/mlx#3047), it overflows at :math:`x = 88` although
  :math:`e^x` is finite up to 88.72 in float32 and 709.78 in float64, and it flushes results
  below :math:`e^{-87.3}` to 0. MLX's ``expm1`` is accurate (< 1.3 ulps), so

  .. math::

      v = \operatorname{expm1}(|x|/2),\quad a = 1 + v = e^{|x|/2},\qquad
      e^x = \begin{cases} a^2 & x \ge 0\\ (1/a)^2 & x < 0\end{cases}

  (halving is exact in binary; a few ulps over the whole range, subnormals included).
* ``sum``: MLX's CPU reduction adds sequentially, an error growing like :math:`n` ulps (6e-5
  relative for 8192 equal float32 values); :func:`accurate_sum` adds in blocks of 16 (like
  NumPy's pairwise sum), bounding it by :math:`8\lceil\log_{16} n\rceil` ulps.
* ``bool``: MLX spells the dtype ``bool_``.

>>> import math, mlx.core as mx
>>> x = mx.array([88.5, -700.0], dtype=mx.float64)
>>> [abs(v / math.exp(t) - 1) < 1e-15 for v, t in zip(MLX.exp(x).tolist(), [88.5, -700.0])]
[True, True]
>>> MLX.exp(mx.array([88.5])).item() < math.inf   # float32: finite below 88.72
True
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from sapo_ref._xp import register_namespace

__all__ = ["MLX", "MlxNamespace", "SUM_BLOCK", "accurate_sum", "exp", "is_mlx"]

#: Block length of :func:`accurate_sum` (error per level at most SUM_BLOCK/2 ulps).
SUM_BLOCK = 16


def is_mlx(x: Any) -> bool:
    """Whether ``x`` is an ``mx.array`` (the predicate the namespace is registered under)."""
    return isinstance(x, mx.array)


def exp(x: mx.array) -> mx.array:
    r""":math:`e^x` to a few ulps in the dtype of ``x`` (bfloat16/float16 through float32),
    :math:`+\infty` past the largest finite exponent, 0 at :math:`-\infty`.

    >>> import mlx.core as mx
    >>> exp(mx.array([0.0, 1000.0, -float("inf")], dtype=mx.float64)).tolist()
    [1.0, inf, 0.0]
    """
    if x.dtype not in (mx.float32, mx.float64):
        return exp(x.astype(mx.float32)).astype(x.dtype)
    a = 1.0 + mx.expm1(0.5 * mx.abs(x))  # e^{|x|/2}: inf past twice the largest exponent
    half = mx.where(x >= 0, a, 1.0 / a)
    return half * half


def accurate_sum(x: mx.array, axis: int = -1) -> mx.array:
    r"""Sum over ``axis`` in blocks of :data:`SUM_BLOCK`, then the block sums, and so on.

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


class MlxNamespace:
    """``mlx.core`` with the overrides above; every other name is ``mlx.core``'s own."""

    __name__ = "sapo_mlx.namespace.MLX"
    bool = mx.bool_  # MLX names the dtype bool_
    exp = staticmethod(exp)  # MLX's exp is float32-accurate and overflows early (module doc)

    @staticmethod
    def sum(x: mx.array, /, *, axis: int | None = None, dtype: Any = None, keepdims: bool = False):
        """Blocked sum of floating arrays (MLX's own adds sequentially, ~n ulps)."""
        if dtype is not None:
            x = x.astype(dtype)
        if not mx.issubdtype(x.dtype, mx.floating):
            return mx.sum(x, axis=axis, keepdims=keepdims)  # integer and bool sums are exact
        out = accurate_sum(x.reshape(-1) if axis is None else x, -1 if axis is None else axis)
        if keepdims:
            out = mx.expand_dims(out, tuple(range(x.ndim)) if axis is None else axis)
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(mx, name)

    def __repr__(self) -> str:
        return "<array namespace: mlx.core with accurate exp and sum (sapo_mlx.namespace)>"


#: The namespace :func:`sapo_ref._xp.namespace` returns for ``mx.array`` s.
MLX = MlxNamespace()

register_namespace(is_mlx, MLX)  # sapo_ref's formula now runs on mx.array s through MLX
