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

With a KL term (clause 10.2) the forward also returns the two parts of :math:`G`, policy
:math:`P` and KL :math:`K`: :math:`\overline{\log\pi_\text{old}}` takes :math:`-\bar{\mathcal{L}}\,P`
and :math:`\overline{\log\pi_\text{ref}} = -\bar{\mathcal{L}}\,K` (clause 10.3); weights are
constants.
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
    config: LossConfig,
    logp,
    old_logp,
    advantages,
    mask,
    norm: Normalizer | None,
    weights=None,
    ref_logp=None,
) -> tuple[mx.array, ...]:
    """The four arrays, the counts ``(n, R)`` and the shard's own counts (in the compute dtype),
    then ``weights`` and ``ref_logp`` when given, all as ``mx.array`` s."""
    names = ("logp", "old_logp", "advantages", "mask", "weights", "ref_logp")
    given = dict(zip(names, (logp, old_logp, advantages, mask, weights, ref_logp)))
    given = {k: v for k, v in given.items() if v is not None or k in names[:4]}
    if not all(
        _is_array(a) or isinstance(a, (bool, int, float, complex)) or a is None
        for a in given.values()
    ):
        # as the reference (array-api-compat): lists, strings, generators become NumPy arrays,
        # while Python scalars and None stay and are rejected as "not an array" below
        given = {k: a if _is_array(a) else np.asarray(a) for k, a in given.items()}
    # the reference's shape/dtype errors, on stand-ins: no data read, also while tracing
    stand = {k: stand_in(a) if _is_array(a) else a for k, a in given.items()}
    arrays4 = [stand.pop(k) for k in names[:4]]
    check_arrays(*arrays4, **stand)
    arrays = {k: to_mx(a) for k, a in given.items()}
    logp, old_logp, advantages, mask = (arrays[k] for k in names[:4])
    if norm is not None:
        check_normalizer_type(norm)
    valid = mask if mask.dtype == mx.bool_ else mask != 0
    local = valid_counts(valid, config.count_empty_rows)
    given_counts = local if norm is None else norm
    dtype = compute_dtype(*_dtypes(logp, old_logp, advantages, arrays.get("ref_logp")))
    with mx.stream(mx.cpu):  # float64 counts exist on the CPU device only (Metal has none)
        counts = [
            (c if isinstance(c, mx.array) else mx.array(float(c), mx.float64)).astype(dtype)
            for c in (
                given_counts.num_tokens,
                given_counts.num_rows,
                local.num_tokens,
                local.num_rows,
            )
        ]
    terms = [arrays[k] for k in names[4:] if k in arrays]
    return logp, old_logp, advantages, mask, *counts, *terms


def _dtypes(logp, old_logp, advantages, ref_logp=None) -> tuple[mx.Dtype, ...]:
    """The dtypes that promote (clause 8.9): the weights and the mask do not."""
    return tuple(a.dtype for a in (logp, old_logp, advantages, ref_logp) if a is not None)


def _is_array(a: Any) -> bool:
    return hasattr(a, "shape") and hasattr(a, "dtype")


class _Layout:
    """Where the optional terms sit in the argument tuple: ``weights`` at 8 when given, then
    ``ref_logp`` (when the configuration has a KL term)."""

    def __init__(self, config: LossConfig, has_weights: bool) -> None:
        self.has_weights = has_weights
        self.has_ref = config.kl_coef is not None

    def terms(self, args: tuple[mx.array, ...]) -> tuple[Any, Any]:
        rest = list(args[8:])
        weights = rest.pop(0) if self.has_weights else None
        ref_logp = rest.pop(0) if self.has_ref else None
        return weights, ref_logp


def _forward(
    *args: mx.array, config: LossConfig, check_normalizer: bool, layout: _Layout
) -> tuple[mx.array, ...]:
    """Loss, gradient w.r.t. ``logp`` (compute dtype; with a KL term also its policy and KL
    parts) and the clause 8.7 fault flag of ``args = (logp, old_logp, advantages, mask, n, R,
    n_local, R_local[, weights][, ref_logp])``; loss and gradients are NaN where the flag
    holds."""
    lp, olp, adv, _, valid, w, ref = _in_compute_dtype(args, layout)
    ev = evaluate(
        lp, olp, adv, valid, config, Normalizer(args[4], args[5]), weights=w, ref_logp=ref
    )
    bad = any_fault(_faults(config, args, check_normalizer, layout), MLX)
    if ref is None:
        grads = (ev.grad,)
    elif ev.kl_grad is None:  # kl_coef = 0: the KL term adds exactly nothing
        grads = (ev.grad, ev.grad, mx.zeros_like(ev.grad))
    else:
        grads = (ev.grad, ev.policy_grad, ev.kl_grad)
    return mx.where(bad, math.nan, ev.loss), *(mx.where(bad, math.nan, g) for g in grads), bad


def _in_compute_dtype(args: tuple[mx.array, ...], layout: _Layout) -> tuple[Any, ...]:
    """``(logp, old_logp, advantages)`` in the compute dtype, the mask, ``mask != 0``, and
    ``weights``/``ref_logp`` in the compute dtype (or ``None``)."""
    logp, old_logp, advantages, mask = args[:4]
    weights, ref_logp = layout.terms(args)
    dtype = compute_dtype(*_dtypes(logp, old_logp, advantages, ref_logp))
    lp, olp, adv = (a.astype(dtype) for a in (logp, old_logp, advantages))
    w, ref = (None if a is None else a.astype(dtype) for a in (weights, ref_logp))
    return lp, olp, adv, mask, mask if mask.dtype == mx.bool_ else mask != 0, w, ref


def _faults(
    config: LossConfig, args: tuple[mx.array, ...], check_normalizer: bool, layout: _Layout
) -> tuple:
    """sapo_ref's data checks of the call (clauses 5.5, 8.2, 8.5, 8.6, 8.8, 10.4)."""
    n, rows, local_n, local_rows = args[4:8]
    lp, olp, adv, mask, valid, w, ref = _in_compute_dtype(args, layout)
    return faults(
        lp,
        olp,
        adv,
        mask,
        valid,
        sequence=config.sequence_value,
        normalizer=Normalizer(n, rows) if check_normalizer else None,
        local=Normalizer(local_n, local_rows) if check_normalizer else None,
        weights=w,
        ref_logp=ref,
    )


@cache
def _core(config: LossConfig, check_normalizer: bool, has_weights: bool = False) -> Any:
    """The ``mx.custom_function`` of ``config``: ``(logp, old_logp, advantages, mask, n, R,
    n_local, R_local[, weights][, ref_logp]) -> (loss, G[, P, K], bad)``, built once per
    configuration."""
    layout = _Layout(config, has_weights)
    # Compiled once so that eager callers get MLX's fused kernels too (one pass instead of a few
    # dozen [N, T] operations); a new shape retraces in milliseconds.
    fused = mx.compile(
        partial(_forward, config=config, check_normalizer=check_normalizer, layout=layout)
    )
    old_has_derivative = config.method_spec.ratio != "sequence-token"  # gspo-token: sg[s_i] only

    @mx.custom_function
    def core(*args):
        return fused(*detached(args))

    @core.vjp
    def core_vjp(primals, cotangents, outputs):
        logp, old_logp = primals[0], primals[1]
        grad, bad = outputs[1], outputs[-1]
        c = cotangents[0]
        g = c * grad
        policy = g if not layout.has_ref else c * outputs[2]
        d_old = -policy if old_has_derivative else mx.where(bad, math.nan, mx.zeros_like(g))
        # advantages, mask, counts and weights are constants; ref_logp: minus the KL part
        rest = [mx.zeros_like(a) for a in primals[2:]]
        if layout.has_ref:
            rest[-1] = (-(c * outputs[3])).astype(primals[-1].dtype)
        return (g.astype(logp.dtype), d_old.astype(old_logp.dtype), *rest)

    @core.vmap
    def core_vmap(inputs, axes):
        # sapo_ref's formula is written for one [N, T] batch: map it over the vmapped axis.
        size = next(x.shape[a] for x, a in zip(inputs, axes) if a is not None)
        outs = [
            core(*(x if a is None else mx.take(x, i, axis=a) for x, a in zip(inputs, axes)))
            for i in range(size)
        ]
        stacked = tuple(mx.stack(o) for o in zip(*outs))
        return stacked, (0,) * len(stacked)

    return core


@cache
def _metrics_fn(config: LossConfig, has_weights: bool = False) -> Any:
    """Compiled float64 metrics of ``config`` (fused like the loss)."""
    layout = _Layout(config, has_weights)

    def metrics(logp, old_logp, advantages, mask, *terms):
        f64 = (a.astype(mx.float64) for a in (logp, old_logp, advantages))
        weights, ref_logp = layout.terms((None,) * 8 + terms)
        w, ref = (None if a is None else a.astype(mx.float64) for a in (weights, ref_logp))
        valid = mask if mask.dtype == mx.bool_ else mask != 0
        ones = mx.array(1.0, mx.float64)  # the counts do not enter the metrics
        ev = evaluate(*f64, valid, config, Normalizer(ones, ones), weights=w, ref_logp=ref)
        return compute_metrics(ev, config)

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
    weights: mx.array | None = None,
    ref_logp: mx.array | None = None,
    kl_coef: float | None = None,
    kl_estimator: str | None = None,
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

    Computed in the promoted dtype of ``logp``, ``old_logp``, ``advantages`` (and ``ref_logp``)
    (bfloat16 and float16 in float32) and returned in it; ``mx.grad`` returns each input's
    dtype (clause 8.9). Eagerly (also under ``mx.grad``) the data are checked as the reference checks them, which reads one flag back from the device;
    under ``mx.compile``/``mx.vmap`` shape, dtype and option errors still raise and invalid data
    make the loss and the gradient NaN (clause 8.7).

    Args:
        weights: [N] or [N, T] per-token weights :math:`w_{it} \ge 0` (clause 10.1), real
            floating, bool or integer, cast to the computation dtype: they scale each token's
            policy term, not the counts, and are constants (a zero gradient).
        ref_logp: [N, T] reference-policy log-probabilities (clause 10.2); promotes with
            ``logp``; its gradient is minus the KL part of ``logp``'s (clause 10.3).
        kl_coef, kl_estimator: :math:`\beta` and the estimator (``"k1"``, ``"k2"``, ``"k3"``,
            ``"low-var-k3"``) of the KL penalty :math:`\beta\sum c_{it} m_{it} k(u_{it})`,
            :math:`u = \log\pi_\text{ref} - \log\pi_\theta`; as :func:`sapo_ref.policy_loss`.
        metrics: also return the clause 7.1 metrics, lazily: computed (in float64, on the CPU
            stream) only if evaluated. Without it no metric is built.

    Returns:
        ``(loss, metrics)``: a 0-d array and a dict of 0-d float64 arrays keyed as
        ``sapo_ref.metric_keys(method, kl=..., weights=...)`` when ``metrics=True``, else ``{}``.

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
        kl_coef=kl_coef,
        kl_estimator=kl_estimator,
        has_ref_logp=ref_logp is not None,
    )
    if not isinstance(metrics, bool):
        raise TypeError(f"metrics must be a bool; got {type(metrics).__name__}")
    args = _inputs(config, logp, old_logp, advantages, mask, normalizer, weights, ref_logp)
    layout = _Layout(config, weights is not None)
    logp, old_logp, advantages, mask = args[:4]
    _, ref = layout.terms(args)
    dtype = compute_dtype(*_dtypes(logp, old_logp, advantages, ref))
    # float64 exists on the CPU device only (Metal has none).
    cpu = mx.default_device() != mx.cpu
    with mx.stream(mx.cpu) if cpu and dtype == mx.float64 else nullcontext():
        out = _core(config, normalizer is not None, layout.has_weights)(*args)
    loss, bad = out[0], out[-1]
    if concrete(bad):  # eager: raise the reference's error (only now computed, on this path)
        _raise(config, args, layout)
    promoted = mx.result_type(*(a for a in (logp, old_logp, advantages, ref) if a is not None))
    if loss.dtype != promoted:  # bfloat16/float16: computed in float32, returned as given
        loss = loss.astype(promoted)
    found: dict[str, mx.array] = {}
    if metrics:
        with mx.stream(mx.cpu) if cpu else nullcontext():
            arrays = (*args[:3], *args[8:])
            found = _metrics_fn(config, layout.has_weights)(
                *(mx.stop_gradient(a) for a in arrays[:3]),
                mask,
                *(mx.stop_gradient(a) for a in arrays[3:]),
            )
    return loss, found


def _raise(config: LossConfig, args: tuple[mx.array, ...], layout: _Layout) -> None:
    raise_faults(_faults(config, args, True, layout))
