"""The JAX policy loss: :func:`policy_loss`."""

from __future__ import annotations

from typing import Any

from sapo_ref import spec
from sapo_ref.aggregation import Normalizer
from sapo_ref.config import resolve_config
from sapo_ref.metrics import metric_keys

from .inputs import as_inputs, check_normalizer
from .vjp import loss_and_metrics

__all__ = ["policy_loss"]

_DEFAULTS = spec.DATA["defaults"]


def policy_loss(
    logp: Any,
    old_logp: Any,
    advantages: Any,
    mask: Any,
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
    weights: Any = None,
    ref_logp: Any = None,
    kl_coef: float | None = None,
    kl_estimator: str | None = None,
    metrics: bool = False,
) -> tuple[Any, dict[str, Any]]:
    r"""SAPO-family policy loss in JAX, differentiable in ``logp`` with the closed-form gradient.

    .. math::

        \mathcal{L} = -\frac{1}{D}\sum_{i,t} m_{it}\,\rho_{it}\,A_{it}\,f_{it}(x_{it}),\qquad
        f^\text{SAPO}(x) = \frac{4}{\tau_{it}}\sigma\big(\tau_{it}(x-1)\big),\qquad
        \frac{\partial\mathcal{L}}{\partial\log\pi_\theta} = \text{clause 2 in closed form}

    with :math:`x_{it} = r_{it}` or :math:`s_i`, the gate :math:`f` of the method (clause 2) and
    the aggregation :math:`\rho/D` (clause 3); the same numbers as :func:`sapo_ref.policy_loss`.

    A pure function: use it under ``jax.jit``, ``jax.grad``, ``jax.value_and_grad``,
    ``jax.jacrev``, ``jax.vmap`` (over a leading batch of problems) and ``shard_map``. The
    options are Python values resolved by :func:`sapo_ref.resolve_config` into a hashable,
    static configuration: the same options never retrace, the arrays are traced. Small eager
    calls (at most 16384 entries) are padded to a shape bucket with the method parameters
    traced, so they share one compiled program per method and aggregation.

    Args:
        logp: [N, T] log-probabilities under the current policy (the differentiable input).
        old_logp: [N, T] behaviour-policy log-probabilities. Its gradient is the true
            derivative (clause 8.9): minus the ``logp`` gradient, 0 for ``gspo-token``.
        advantages: [N] or [N, T]; a constant (zero gradient), like ``mask``.
        mask: [N, T] bool or 0/1; invalid positions may hold anything (NaN, inf).
        method, loss_agg, tau_pos, tau_neg, eps_low, eps_high, dual_clip, norm_length,
            count_empty_rows: as :func:`sapo_ref.policy_loss` (same defaults and errors).
        normalizer: global counts (clause 3.8), a :class:`sapo_ref.Normalizer` whose fields may
            be Python numbers or 0-d JAX arrays, traced ones included (e.g. from
            ``jax.lax.psum`` inside ``shard_map``).
        weights: [N] or [N, T] per-token weights :math:`w_{it} \ge 0` (clause 10.1), real
            floating, bool or integer, cast to the computation dtype: they scale each token's
            policy term, not the counts, and are constants (a zero cotangent).
        ref_logp: [N, T] reference-policy log-probabilities (clause 10.2); promotes with
            ``logp``; its gradient is minus the KL part of ``logp``'s (clause 10.3).
        kl_coef, kl_estimator: :math:`\beta` and the estimator (``"k1"``, ``"k2"``, ``"k3"``,
            ``"low-var-k3"``) of the KL penalty :math:`\beta\sum c_{it} m_{it} k(u_{it})`,
            :math:`u = \log\pi_\text{ref} - \log\pi_\theta`; as :func:`sapo_ref.policy_loss`.
        metrics: also return the clause 7.1 metrics, computed in the same program; without it
            they are not computed at all (eagerly or under ``jax.jit``).

    Returns:
        ``(loss, metrics)``: a 0-d array and a dict of 0-d arrays, keyed as
        ``sapo_ref.metric_keys(method, kl=..., weights=...)`` when ``metrics=True``, else ``{}``
        (metrics carry no gradient). The loss is computed in the promoted dtype of ``logp``,
        ``old_logp``, ``advantages`` (and ``ref_logp``) (bfloat16 and float16 in float32) and returned in the promoted dtype (clause 8.9); each gradient has its
        input's dtype. The metrics are float64 with ``jax_enable_x64`` (as in ``sapo_mlx``:
        a mean ratio that fits float32 stays finite when one ratio overflows it), else
        float32.

    Raises:
        ValueError, TypeError: the reference's errors, same type and text (clause 8.7):
            options, shapes and dtypes always, also while ``jax.jit``/``jax.vmap`` trace;
            data (mask values other than 0/1, NaN or inf at valid tokens, a bad normalizer,
            negative or non-finite weights, a NaN ``ref_logp``) when the inputs are concrete. Under tracing invalid data cannot raise: the loss
            and every gradient entry are NaN instead.

    Warns:
        Float64TruncationWarning: a float64 host (NumPy) array is truncated to float32
            because ``jax_enable_x64`` is off.

    Example:
        >>> import jax, jax.numpy as jnp, sapo_jax
        >>> f32 = jnp.float32
        >>> logp = jnp.log(jnp.array([[0.5, 0.25, 0.9], [0.3, 0.6, 0.1]], f32))
        >>> old = jnp.log(jnp.array([[0.5, 0.20, 0.9], [0.3, 0.5, 0.2]], f32))
        >>> adv, mask = jnp.array([1.0, -0.5], f32), jnp.array([[1, 1, 1], [1, 1, 0]], bool)
        >>> loss, metrics = sapo_jax.policy_loss(logp, old, adv, mask, metrics=True)
        >>> round(float(loss), 5), float(metrics["tokens"])
        (-0.54035, 5.0)
        >>> sapo_jax.policy_loss(logp, old, adv, mask)[1]  # metrics are opt-in
        {}
        >>> grad = jax.grad(lambda lp: sapo_jax.policy_loss(lp, old, adv, mask)[0])(logp)
        >>> [round(float(g), 4) for g in grad[1]]
        [0.125, 0.1484, 0.0]
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
    logp, old_logp, advantages, mask, weights, ref_logp = as_inputs(
        logp, old_logp, advantages, mask, weights=weights, ref_logp=ref_logp
    )
    norm = check_normalizer(normalizer)
    counts = None if norm is None else (norm.num_tokens, norm.num_rows)
    ref_dtype = None if ref_logp is None else ref_logp.dtype
    static = (config, logp.dtype, old_logp.dtype, metrics, ref_dtype)
    loss, values = loss_and_metrics(
        static, logp, old_logp, advantages, mask, counts, weights, ref_logp
    )
    if not metrics:
        return loss, {}
    # JAX returns dicts with sorted keys; give them back in the spec's order.
    keys = metric_keys(method, kl=ref_logp is not None, weights=weights is not None)
    return loss, {key: values[key] for key in keys}
