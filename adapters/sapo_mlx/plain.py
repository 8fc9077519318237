r"""The straightforward MLX formulation, differentiated by ``mx.grad``: an independent oracle.

Written the way trainers write it (``exp``, ``sigmoid``, ``clip``, ``min``, a masked mean) and
sharing no formula code with :func:`sapo_mlx.policy_loss`: the tests compare the closed-form
VJP with ``mx.grad`` of this where it is finite, and ``benchmarks/bench_mlx.py`` uses it as the
baseline. Not for training: it overflows for large log-ratios (NaN gradients) and in float64
inherits MLX's float32-accurate ``exp``/``sigmoid``.

.. math::

    \mathcal{L} = -\frac{1}{D}\sum_{i,t} m_{it}\,\rho_{it}\,\ell_{it},\quad
    \ell^\text{SAPO} = \frac{4}{\tau}\sigma(\tau(x-1))A,\quad
    \ell^\text{clip} = \min\big(xA, \operatorname{clip}(x, 1-\epsilon_l, 1+\epsilon_h)A\big)
"""

from __future__ import annotations

import mlx.core as mx

from sapo_ref.config import LossConfig

__all__ = ["plain_loss"]


def plain_loss(
    logp: mx.array,
    old_logp: mx.array,
    advantages: mx.array,
    mask: mx.array,
    config: LossConfig,
    denominator: float,
) -> mx.array:
    """The loss of ``config`` with the aggregation denominator ``denominator`` given.

    >>> import mlx.core as mx, sapo_ref
    >>> cfg = sapo_ref.resolve_config("sapo", "token-mean")
    >>> plain_loss(mx.zeros((1, 2)), mx.zeros((1, 2)), mx.array([1.0]), mx.ones((1, 2)), cfg, 2.0).item()
    -2.0
    """
    valid = mask.astype(mx.bool_)
    delta = mx.where(valid, logp - old_logp, 0.0)
    adv = advantages if advantages.ndim == 2 else advantages[:, None]
    adv = mx.where(valid, adv, 0.0)
    lengths = valid.sum(axis=1, keepdims=True).astype(logp.dtype)
    if config.method_spec.ratio == "token":
        x = mx.exp(delta)
    else:
        s = mx.exp(delta.sum(axis=1, keepdims=True) / mx.maximum(lengths, 1.0))
        if config.method_spec.ratio == "sequence-token":  # GSPO eq. 13-14
            s = mx.stop_gradient(s) * mx.exp(delta - mx.stop_gradient(delta))
        x = s
    if config.is_soft:
        tau = mx.where(adv > 0, config.tau_pos, config.tau_neg)
        term = 4.0 / tau * mx.sigmoid(tau * (x - 1.0)) * adv
    else:
        term = mx.minimum(x * adv, mx.clip(x, 1.0 - config.eps_low, 1.0 + config.eps_high) * adv)
        if config.dual_clip is not None:
            term = mx.where(adv < 0, mx.maximum(term, config.dual_clip * adv), term)
    if config.per_row_mean:
        term = term / mx.maximum(lengths, 1.0)
    return -mx.where(valid, term, 0.0).sum() / denominator
