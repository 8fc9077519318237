r"""The loss and its closed-form gradient in MLX: the twin of :func:`sapo_ref.evaluate`.

:func:`prepare` selects valid positions (clause 6.1) with ordinary MLX operations;
:func:`loss_core` is an ``mx.custom_function`` that returns the loss and, as its one saved
residual, :math:`G = \partial\mathcal{L}/\partial\delta`; its ``vjp`` is
:math:`\bar\delta = \bar{\mathcal{L}}\,G`. Its ``vmap`` maps over a leading batch axis with the
same closed form (every formula here works on ``[..., N, T]``), so ``mx.grad(mx.vmap(...))``
keeps the closed-form gradient.

.. math::

    \mathcal{L} = -\sum_{i,t} c_{it}\,m_{it}\,A_{it}\,f_{it}(x_{it}),\qquad
    G_{it'} = \begin{cases}
    -c_{it'}\,m_{it'}\,A_{it'}\,\partial_\delta f_{it'} & \text{token ratio, gspo-token}\\
    -\frac{m_{it'}}{L_i}\sum_t c_{it}\,m_{it}\,A_{it}\,\partial_\mu f_{it} & \text{sequence ratio}
    \end{cases}
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, partial
from typing import Any

import mlx.core as mx

from sapo_ref.aggregation import Normalizer, denominator
from sapo_ref.config import LossConfig

from .gates import SapoParts, clip_parts, sapo_parts, signed_sapo_parts
from .numerics import accurate_sum

__all__ = ["Prepared", "gate_parts", "loss_core", "prepare", "token_weights"]


@dataclass(frozen=True)
class Prepared:
    """Sanitised inputs in the compute dtype, invalid positions 0 by selection.

    ``delta`` [N, T] (differentiable), ``adv`` [N, T] (constant), ``valid`` [N, T] bool,
    ``lengths`` [N] row lengths.
    """

    delta: mx.array
    adv: mx.array
    valid: mx.array
    lengths: mx.array


def prepare(
    logp: mx.array, old_logp: mx.array, advantages: mx.array, mask: mx.array, dtype: mx.Dtype
) -> Prepared:
    """Select valid positions and form :math:`\\delta` in ``dtype`` (clause 1.2-1.5, 6.1)."""
    valid = mask if mask.dtype == mx.bool_ else mask != 0
    delta = mx.where(valid, logp.astype(dtype), 0.0) - mx.where(valid, old_logp.astype(dtype), 0.0)
    adv = advantages.astype(dtype)
    if adv.ndim == valid.ndim - 1:
        adv = mx.expand_dims(adv, -1)
    # Advantages are data, not parameters: their gradient is zero by definition (clause 1.7).
    adv = mx.stop_gradient(mx.where(valid, adv, 0.0))
    lengths = mx.sum(valid.astype(dtype), axis=-1)
    return Prepared(delta=delta, adv=adv, valid=valid, lengths=lengths)


def token_weights(p: Prepared, config: LossConfig, norm: Normalizer) -> mx.array:
    r"""Aggregation weights :math:`c_{it} = m_{it}\rho_{it}/D` (clause 3.1); :math:`0/0 = 0`."""
    dtype = p.delta.dtype

    def as_dtype(count: Any) -> mx.array:
        # Before any arithmetic: int32 counts times norm_length would round in float32.
        return count.astype(dtype) if isinstance(count, mx.array) else mx.array(count, dtype=dtype)

    den = denominator(Normalizer(as_dtype(norm.num_tokens), as_dtype(norm.num_rows)),
                      config.loss_agg, config.norm_length)
    row = 1.0 / mx.where(den > 0, den, 1.0)
    if config.per_row_mean:
        row = row / mx.where(p.lengths > 0, p.lengths, 1.0)
    else:
        row = mx.broadcast_to(row, p.lengths.shape)
    return mx.where(p.valid, mx.expand_dims(row, -1), 0.0)


def _log_x(delta: mx.array, valid: mx.array, config: LossConfig) -> tuple[mx.array, mx.array]:
    """The log of the ratio the gate sees, ``delta`` [..., N, T] or the row mean ``mu_i`` as
    [..., N, 1] (the gate is then evaluated once per row), and the safe row lengths."""
    lengths = mx.sum(valid.astype(delta.dtype), axis=-1)
    safe = mx.where(lengths > 0, lengths, 1.0)
    if not config.sequence_value:
        return delta, safe
    return mx.expand_dims(accurate_sum(delta) / safe, -1), safe


def gate_parts(log_x: mx.array, adv: mx.array, config: LossConfig) -> Any:
    """The method's gate at ``log_x`` ([..., N, T], or [..., N, 1] per row) for advantages
    ``adv`` [..., N, T]: ``SapoParts`` (soft) or ``ClipParts`` (clip), shaped like ``adv``."""
    pos = adv > 0
    if not config.is_soft:
        return clip_parts(log_x, adv, config.eps_low, config.eps_high, config.dual_clip)
    if log_x.shape[-1] == adv.shape[-1]:
        return signed_sapo_parts(log_x, pos, config.tau_pos, config.tau_neg)
    # One row ratio, two temperatures: evaluate both per row, then select per token. The parts
    # are finite, so hi*1 + lo*0 selects exactly, without a `where` branch per token.
    hi, lo = sapo_parts(log_x, config.tau_pos), sapo_parts(log_x, config.tau_neg)
    s = pos.astype(log_x.dtype)
    not_s = 1.0 - s
    return SapoParts(*(getattr(hi, k) * s + getattr(lo, k) * not_s for k in ("f", "w", "dlog")))


def _loss_and_grad(
    delta: mx.array, adv: mx.array, c: mx.array, valid: mx.array, config: LossConfig
) -> tuple[mx.array, mx.array]:
    log_x, safe = _log_x(delta, valid, config)
    gate = gate_parts(log_x, adv, config)
    g, dlog = (gate.f, gate.dlog) if config.is_soft else (gate.g, gate.dlog)
    ca = c * adv  # 0 at invalid tokens
    spread = mx.expand_dims(1.0 / safe, -1) if config.spreads_gradient else None
    weighted = ca * g  # c * term
    coef = ca * dlog if spread is None else ca * dlog * spread  # dJ/d log x, / L_i when spread
    if not config.is_soft:
        # Clause 5.4: where r = e^{log x} overflows but c*A*r need not (A < 0, no dual clip:
        # the only unbounded case), c*A*r = (c*A*e^{log x/2})*e^{log x/2}: the finite value,
        # +inf only when it truly overflows (sapo_ref.evaluate takes -exp(log x + log|c A|)).
        big = gate.active & (gate.r == math.inf)
        weighted = mx.where(big, (ca * gate.half) * gate.half, weighted)
        scaled = ca if spread is None else ca * spread
        coef = mx.where(big, (scaled * gate.half) * gate.half, coef)
    # Blocked sums: MLX's own sum loses ~n ulps (sapo_mlx.numerics.accurate_sum).
    loss = 0.0 - accurate_sum(accurate_sum(mx.where(valid, weighted, 0.0)))  # empty batch: +0.0
    coef = mx.where(valid, coef, 0.0)
    if spread is not None:
        grad = mx.where(valid, -mx.expand_dims(accurate_sum(coef), -1), 0.0)
    else:
        grad = mx.where(valid, -coef, 0.0)
    return loss, grad


@cache
def loss_core(config: LossConfig) -> Callable[..., tuple[mx.array, mx.array]]:
    """The custom function ``(delta, adv, c, valid) -> (loss, G)`` of ``config``, built once.

    Shapes ``[..., N, T]`` in, ``([...], [..., N, T])`` out.
    """

    # Compiled once per configuration so that eager callers get MLX's fused kernels as well
    # (about 30% faster than a dozen separate [N, T] passes); a new shape retraces in ms.
    fused = mx.compile(partial(_loss_and_grad, config=config))

    @mx.custom_function
    def core(delta: mx.array, adv: mx.array, c: mx.array, valid: mx.array):
        return fused(delta, adv, c, valid)

    @core.vjp
    def core_vjp(primals, cotangents, outputs):
        _, adv, c, valid = primals
        cot = cotangents[0]
        g = outputs[1]
        return (
            cot.reshape(cot.shape + (1, 1)) * g,
            mx.zeros_like(adv),
            mx.zeros_like(c),
            mx.zeros_like(valid),
        )

    @core.vmap
    def core_vmap(inputs, axes):
        size = next(x.shape[a] for x, a in zip(inputs, axes) if a is not None)
        moved = [
            mx.broadcast_to(x, (size,) + x.shape) if a is None else mx.moveaxis(x, a, 0)
            for x, a in zip(inputs, axes)
        ]
        return core(*moved), (0, 0)

    return core
