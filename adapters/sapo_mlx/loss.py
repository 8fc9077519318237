r"""``sapo_mlx.policy_loss``: the reference's formula on MLX arrays, with a closed-form VJP.

The loss, its gradient and (on request) the metrics are :func:`sapo_ref.evaluate.evaluate` and
:func:`sapo_ref.metrics.compute_metrics` themselves, run on ``mx.array`` s through the namespace
of :mod:`sapo_mlx.namespace`. What is MLX's own is the wrapper: an ``mx.custom_function`` whose
forward returns :math:`(\mathcal{L}, G = \partial\mathcal{L}/\partial\log\pi_\theta)` and whose
VJP scales :math:`G` by the cotangent:

.. math::

    \overline{\log\pi_\theta} = \bar{\mathcal{L}}\,G,\qquad
    \overline{\log\pi_\text{old}} = \begin{cases} -\bar{\mathcal{L}}\,G & \text{sapo, sapo-seq,
    grpo, gspo}\\ 0 & \text{gspo-token}\end{cases}\qquad
    \overline{A} = \overline{m} = 0 \quad\text{(clause 8.9)}.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from functools import cache, partial
from typing import Any

import mlx.core as mx
import numpy as np

from sapo_ref import spec
from sapo_ref.aggregation import Normalizer
from sapo_ref.config import LossConfig, resolve_config
from sapo_ref.evaluate import evaluate
from sapo_ref.metrics import compute_metrics
from sapo_ref.validation import any_fault, check_arrays, check_normalizer_type, faults, raise_faults

from .convert import compute_dtype, stand_in, to_mx
from .distributed import valid_counts
from .namespace import MLX  # importing it registers the MLX namespace with sapo_ref
from .tracing import concrete, detached

__all__ = ["policy_loss"]

_DEFAULTS = spec.DATA["defaults"]


def _inputs(
    config: LossConfig, logp, old_logp, advantages, mask, norm: Normalizer | None
) -> tuple[mx.array, ...]:
    """The four arrays, the counts ``(n, R)`` and the shard's own counts (in the compute dtype),
    all as ``mx.array`` s."""
    raw: tuple[Any, ...] = (logp, old_logp, advantages, mask)
    if not all(
        _is_array(a) or isinstance(a, (bool, int, float, complex)) or a is None for a in raw
    ):
        # as the reference (array-api-compat): lists, strings, generators become NumPy arrays,
        # while Python scalars and None stay and are rejected as "not an array" below
        raw = tuple(a if _is_array(a) else np.asarray(a) for a in raw)
    # the reference's shape/dtype errors, on stand-ins: no data read, also while tracing
    check_arrays(*(stand_in(a) if _is_array(a) else a for a in raw))
    logp, old_logp, advantages, mask = (to_mx(a) for a in raw)
    if norm is not None:
        check_normalizer_type(norm)
    valid = mask if mask.dtype == mx.bool_ else mask != 0
    local = valid_counts(valid, config.count_empty_rows)
    given = local if norm is None else norm
    dtype = compute_dtype(logp.dtype, old_logp.dtype, advantages.dtype)
    with mx.stream(mx.cpu):  # float64 counts exist on the CPU device only (Metal has none)
        counts = [
            (c if isinstance(c, mx.array) else mx.array(float(c), mx.float64)).astype(dtype)
            for c in (given.num_tokens, given.num_rows, local.num_tokens, local.num_rows)
        ]
    return logp, old_logp, advantages, mask, *counts


def _is_array(a: Any) -> bool:
    return hasattr(a, "shape") and hasattr(a, "dtype")


def _forward(*args: mx.array, config: LossConfig, check_normalizer: bool) -> tuple[mx.array, ...]:
    """Loss, gradient w.r.t. ``logp`` (compute dtype) and the clause 8.7 fault flag of
    ``args = (logp, old_logp, advantages, mask, n, R, n_local, R_local)``; loss and gradient
    are NaN where the flag holds."""
    lp, olp, adv, _, valid = _in_compute_dtype(args)
    ev = evaluate(lp, olp, adv, valid, config, Normalizer(args[4], args[5]))
    bad = any_fault(_faults(config, args, check_normalizer), MLX)
    return mx.where(bad, math.nan, ev.loss), mx.where(bad, math.nan, ev.grad), bad


def _in_compute_dtype(args: tuple[mx.array, ...]) -> tuple[mx.array, ...]:
    """``(logp, old_logp, advantages)`` in the compute dtype, the mask, and ``mask != 0``."""
    logp, old_logp, advantages, mask = args[:4]
    dtype = compute_dtype(logp.dtype, old_logp.dtype, advantages.dtype)
    lp, olp, adv = (a.astype(dtype) for a in (logp, old_logp, advantages))
    return lp, olp, adv, mask, mask if mask.dtype == mx.bool_ else mask != 0


def _faults(config: LossConfig, args: tuple[mx.array, ...], check_normalizer: bool) -> tuple:
    """sapo_ref's data checks of the call (clauses 5.5, 8.2, 8.5, 8.6, 8.8)."""
    n, rows, local_n, local_rows = args[4:]
    return faults(
        *_in_compute_dtype(args),
        sequence=config.sequence_value,
        normalizer=Normalizer(n, rows) if check_normalizer else None,
        local=Normalizer(local_n, local_rows) if check_normalizer else None,
    )


@cache
def _core(config: LossConfig, check_normalizer: bool) -> Any:
    """The ``mx.custom_function`` of ``config``: ``(logp, old_logp, advantages, mask, n, R,
    n_local, R_local) -> (loss, G, bad)``, built once per configuration."""
    # Compiled once so that eager callers get MLX's fused kernels too (one pass instead of a few
    # dozen [N, T] operations); a new shape retraces in milliseconds.
    fused = mx.compile(partial(_forward, config=config, check_normalizer=check_normalizer))
    old_has_derivative = config.method_spec.ratio != "sequence-token"  # gspo-token: sg[s_i] only

    @mx.custom_function
    def core(*args):
        return fused(*detached(args))

    @core.vjp
    def core_vjp(primals, cotangents, outputs):
        logp, old_logp = primals[0], primals[1]
        _, grad, bad = outputs
        g = cotangents[0] * grad
        d_old = -g if old_has_derivative else mx.where(bad, math.nan, mx.zeros_like(g))
        rest = tuple(mx.zeros_like(a) for a in primals[2:])  # advantages, mask, counts: constants
        return (g.astype(logp.dtype), d_old.astype(old_logp.dtype), *rest)

    @core.vmap
    def core_vmap(inputs, axes):
        # sapo_ref's formula is written for one [N, T] batch: map it over the vmapped axis.
        size = next(x.shape[a] for x, a in zip(inputs, axes) if a is not None)
        outs = [
            core(*(x if a is None else mx.take(x, i, axis=a) for x, a in zip(inputs, axes)))
            for i in range(size)
        ]
        return tuple(mx.stack(o) for o in zip(*outs)), (0, 0, 0)

    return core


@cache
def _metrics_fn(config: LossConfig) -> Any:
    """Compiled float64 metrics of ``config`` (fused like the loss)."""

    def metrics(logp, old_logp, advantages, mask):
        f64 = (a.astype(mx.float64) for a in (logp, old_logp, advantages))
        valid = mask if mask.dtype == mx.bool_ else mask != 0
        ones = mx.array(1.0, mx.float64)  # the counts do not enter the metrics
        return compute_metrics(evaluate(*f64, valid, config, Normalizer(ones, ones)), config)

    return mx.compile(metrics)


def policy_loss(
    logp: mx.array,
    old_logp: mx.array,
    advantages: mx.array,
    mask: mx.array,
    *,
    method: str = _DEFAULTS["method"],
    loss_agg: str = _DEFAULTS["loss_agg"],
    tau_pos: float | None = None,
    tau_neg: float | None = None,
    eps_low: float | None = None,
    eps_high: float | None = None,
    dual_clip: float | None = None,
    norm_length: float | None = None,
    count_empty_rows: bool | None = None,
    normalizer: Normalizer | None = None,
    metrics: bool = False,
) -> tuple[mx.array, dict[str, mx.array]]:
    r"""SAPO-family policy loss (paper eq. 5-8, 10; spec clauses 1-8) and its metrics in MLX.

    .. math::

        \mathcal{L} = -\frac{1}{D}\sum_{i,t} m_{it}\,\rho_{it}\,A_{it}\,f_{it}(x_{it}),\qquad
        f^\text{SAPO}(x) = \frac{4}{\tau_{it}}\sigma\big(\tau_{it}(x-1)\big)

    with :math:`x_{it}` the token ratio :math:`e^{\log\pi_\theta-\log\pi_\text{old}}` or the
    sequence ratio :math:`s_i`, :math:`f` the method's gate and :math:`\rho/D` the aggregation:
    :func:`sapo_ref.policy_loss`'s keywords, defaults, errors and formula. Differentiable through
    ``mx.grad`` with the closed-form gradient (w.r.t. ``logp`` and ``old_logp``, clause 8.9);
    works under ``mx.compile``, ``mx.vmap`` and ``mx.value_and_grad``.

    Computed in the promoted dtype of ``logp``, ``old_logp`` and ``advantages`` (bfloat16 and
    float16 in float32) and returned in it; ``mx.grad`` returns ``logp``'s dtype (clause 8.9). Eagerly (also under ``mx.grad``)
    the data are checked as the reference checks them, which reads one flag back from the device;
    under ``mx.compile``/``mx.vmap`` shape, dtype and option errors still raise and invalid data
    make the loss and the gradient NaN (clause 8.7).

    Args:
        metrics: also return the clause 7.1 metrics, lazily: computed (in float64, on the CPU
            stream) only if evaluated. Without it no metric is built.

    Returns:
        ``(loss, metrics)``: a 0-d array and a dict of 0-d float64 arrays keyed as
        ``sapo_ref.metric_keys(method)`` when ``metrics=True``, else ``{}``.

    Example:
        >>> import mlx.core as mx, numpy as np, sapo_ref, sapo_mlx
        >>> lp = np.log([[0.5, 0.25, 0.9], [0.3, 0.6, 0.1]])
        >>> old = np.log([[0.5, 0.20, 0.9], [0.3, 0.5, 0.2]])
        >>> adv, mask = np.array([1.0, -0.5]), np.array([[1, 1, 1], [1, 1, 0]])
        >>> f = lambda x: sapo_mlx.policy_loss(x, sapo_mlx.to_mx(old), mx.array(adv), mx.array(mask))[0]
        >>> loss, grad = mx.value_and_grad(f)(sapo_mlx.to_mx(lp))
        >>> ref = sapo_ref.policy_loss(lp, old, adv, mask)
        >>> abs(loss.item() - ref.loss) < 1e-15, np.allclose(np.array(grad), ref.grad, rtol=1e-14)
        (True, True)
        >>> m = sapo_mlx.policy_loss(sapo_mlx.to_mx(lp), sapo_mlx.to_mx(old), mx.array(adv),
        ...                          mx.array(mask), metrics=True)[1]
        >>> m["tokens"].item(), tuple(m) == sapo_ref.metric_keys("sapo")
        (5.0, True)
    """
    config = resolve_config(
        method,
        loss_agg,
        tau_pos=tau_pos,
        tau_neg=tau_neg,
        eps_low=eps_low,
        eps_high=eps_high,
        dual_clip=dual_clip,
        norm_length=norm_length,
        count_empty_rows=count_empty_rows,
        has_normalizer=normalizer is not None,
    )
    if not isinstance(metrics, bool):
        raise TypeError(f"metrics must be a bool; got {type(metrics).__name__}")
    args = _inputs(config, logp, old_logp, advantages, mask, normalizer)
    logp, old_logp, advantages, mask = args[:4]
    dtype = compute_dtype(logp.dtype, old_logp.dtype, advantages.dtype)
    # float64 exists on the CPU device only (Metal has none).
    cpu = mx.default_device() != mx.cpu
    with mx.stream(mx.cpu) if cpu and dtype == mx.float64 else nullcontext():
        loss, _, bad = _core(config, normalizer is not None)(*args)
    if concrete(bad):  # eager: raise the reference's error (only now computed, on this path)
        _raise(config, args)
    promoted = mx.result_type(logp, old_logp, advantages)
    if loss.dtype != promoted:  # bfloat16/float16: computed in float32, returned as given
        loss = loss.astype(promoted)
    out: dict[str, mx.array] = {}
    if metrics:
        with mx.stream(mx.cpu) if cpu else nullcontext():
            out = _metrics_fn(config)(*(mx.stop_gradient(a) for a in args[:3]), mask)
    return loss, out


def _raise(config: LossConfig, args: tuple[mx.array, ...]) -> None:
    raise_faults(_faults(config, args, check_normalizer=True))
