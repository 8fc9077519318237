r"""The loss as a ``jax.custom_vjp`` whose backward is the closed-form gradient.

The forward evaluates the loss with :func:`sapo_jax.kernel.evaluate_jax` (the reference's
formulas, arranged for XLA: selection masking, exact saturation, no clamp) and keeps ONE
residual, the gradient :math:`G = \partial\mathcal{L}/\partial\log\pi_\theta` [N, T]. The backward is

.. math::

    \bar{\log\pi_\theta} = \bar{\mathcal{L}}\; G ,

so ``jax.grad`` never differentiates through ``exp``/``sigmoid`` (no :math:`0\cdot\infty`, no NaN
from masked garbage) and costs one fused multiply.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from sapo_ref.aggregation import Normalizer
from sapo_ref.config import LossConfig
from sapo_ref.evaluate import Evaluation
from sapo_ref.metrics import compute_metrics

from .inputs import compute_dtype
from .kernel import evaluate_jax

__all__ = ["loss_and_metrics", "run"]

# Inputs the loss is not differentiable in; differentiating it in them is an error, not a
# silent zero (a policy loss treats them as constants: wrap them in jax.lax.stop_gradient).
_CONSTANT_INPUTS = ("old_logp", "advantages")


def _evaluation(
    config: LossConfig, logp, old_logp, advantages, valid, num_tokens, num_rows
) -> Evaluation:
    norm = None if num_tokens is None else Normalizer(num_tokens, num_rows)
    return evaluate_jax(logp, old_logp, advantages, valid, config, norm)


def _value(primal):
    return None if primal is None else primal.value


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def loss_and_metrics(
    config: LossConfig, logp, old_logp, advantages, valid, num_tokens, num_rows
) -> tuple[Any, dict[str, Any]]:
    """Loss (0-d) and clause-7 metrics of arrays already in the compute dtype; the counts are
    0-d arrays, or both ``None`` for this batch's own.

    Differentiable in ``logp`` only; metrics carry no gradient (they are diagnostics).
    """
    ev = _evaluation(config, logp, old_logp, advantages, valid, num_tokens, num_rows)
    return ev.loss, compute_metrics(ev, config)


def _fwd(config: LossConfig, logp, old_logp, advantages, valid, num_tokens, num_rows):
    for name, arg in zip(_CONSTANT_INPUTS, (old_logp, advantages)):
        if arg.perturbed:
            raise TypeError(
                f"sapo_jax.policy_loss is differentiable with respect to logp only; {name} is "
                f"being differentiated. It is a constant of the policy loss: pass "
                f"jax.lax.stop_gradient({name})"
            )
    ev = _evaluation(
        config,
        logp.value,
        old_logp.value,
        advantages.value,
        valid.value,
        _value(num_tokens),
        _value(num_rows),
    )
    return (ev.loss, compute_metrics(ev, config)), ev.grad


def _bwd(config: LossConfig, grad, cotangents):
    ct_loss = cotangents[0]  # metric cotangents are ignored: metrics are detached
    if isinstance(ct_loss, SymbolicZero):
        return (None,) * 6
    return (ct_loss * grad, None, None, None, None, None)


loss_and_metrics.defvjp(_fwd, _bwd, symbolic_zeros=True)


@partial(jax.jit, static_argnames=("config",))
def run(logp, old_logp, advantages, mask, counts, *, config: LossConfig):
    """Cast to the compute dtype, count, and call :func:`loss_and_metrics` (jitted once per
    configuration and input signature: eager calls do not dispatch op by op, and an outer
    ``jax.jit`` simply inlines it).

    ``counts`` is ``None`` (this batch's own counts) or the pair ``(num_tokens, num_rows)``.
    The cast back of the gradient to ``logp.dtype`` is the transpose of the cast here.
    """
    dtype = compute_dtype(logp.dtype, old_logp.dtype)
    valid = mask if mask.dtype == jnp.bool_ else mask != 0
    if counts is None:
        num_tokens = num_rows = None
    else:
        num_tokens, num_rows = (jax.lax.stop_gradient(c).astype(dtype) for c in counts)
    return loss_and_metrics(
        config,
        logp.astype(dtype),
        old_logp.astype(dtype),
        advantages.astype(dtype),
        valid,
        num_tokens,
        num_rows,
    )
