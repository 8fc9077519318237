r"""The loss as a ``jax.custom_vjp`` over the one formula, :func:`sapo_ref.evaluate.evaluate`.

The forward evaluates the loss, its closed-form gradient :math:`G = \partial\mathcal{L}/\partial
\log\pi_\theta` and, when asked, the metrics with the reference's own array-API code on
``jax.numpy``, and keeps ``G`` as the one residual. The backward scales it by the cotangent (clause 8.9):

.. math::

    \bar{\log\pi_\theta} = \bar{\mathcal{L}}\,G,\qquad
    \bar{\log\pi_\text{old}} = -\bar{\mathcal{L}}\,G\ \ (\text{0 for gspo-token}),\qquad
    \bar A = \bar m = 0,

so ``jax.grad`` never differentiates through ``exp``/``sigmoid`` (no :math:`0\cdot\infty`, no NaN
from masked garbage).

Invalid data (clause 8.7): with concrete inputs the reference's ``ValueError`` is raised; under
tracing (``jax.jit``, ``jax.vmap``) the loss and every gradient entry are NaN.

Small eager inputs (the conformance suite's, a notebook's) are padded to a shape bucket, with
the method parameters traced: one compiled program then serves every shape, parameter value and
advantage layout of a method and aggregation. Masked padding changes no bit (clause 6.1); the
unpadded counts are passed as the normaliser, so ``count_empty_rows`` stays right.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sapo_ref import aggregation
from sapo_ref.aggregation import Normalizer, row_lengths
from sapo_ref.config import PARAM_NAMES, LossConfig
from sapo_ref.evaluate import Evaluation, evaluate, prepare
from sapo_ref.metrics import compute_metrics
from sapo_ref.validation import any_fault, faults, raise_faults

from .inputs import compute_dtype

__all__ = ["loss_and_metrics"]

#: Eager inputs with at most this many entries are padded to a bucket (see the module doc).
SMALL = 1 << 14
#: The smallest bucket: every shape up to [8, 64] shares one program.
MIN_BUCKET = (8, 64)
# kl_coef is traced too when non-zero (beta = 0 is its own program: the KL term is then absent).
_TRACED_PARAMS = (*PARAM_NAMES, "norm_length", "kl_coef")


def _kernel_impl(
    config: LossConfig,
    want_metrics: bool,
    logp,
    old_logp,
    advantages,
    mask,
    norm,
    local,
    params,
    weights=None,
    ref_logp=None,
):
    """Loss, metrics (``{}`` unless ``want_metrics``), the gradient's parts (compute dtype) and
    the fault flag; loss and gradient poisoned where it holds. The parts are ``(G, P, K)``:
    the whole gradient, its policy part and its KL part (``P``, ``K`` ``None`` without
    ``ref_logp``)."""
    extra = () if ref_logp is None else (ref_logp.dtype,)
    dtype = compute_dtype(logp.dtype, old_logp.dtype, advantages.dtype, *extra)
    lp, olp, adv = (x.astype(dtype) for x in (logp, old_logp, advantages))
    w, ref = (None if x is None else x.astype(dtype) for x in (weights, ref_logp))
    valid = mask if mask.dtype == jnp.bool_ else mask != 0
    if local is None:
        # The row lengths evaluate computes too (XLA merges the two): exact below 2**24 tokens
        # in float32, like the lengths the formula divides by.
        lengths = row_lengths(valid, dtype)
        rows = lengths.shape[0] if config.count_empty_rows else jnp.sum(lengths > 0)
        local = (jnp.sum(lengths), jnp.asarray(rows, dtype))
    local = Normalizer(local[0], local[1])
    norm = None if norm is None else Normalizer(norm[0], norm[1])
    if params is not None:
        config = dataclasses.replace(config, **params)
    found = faults(
        lp,
        olp,
        adv,
        mask,
        valid,
        sequence=config.sequence_value,
        normalizer=norm,
        local=local,
        weights=w,
        ref_logp=ref,
    )
    bad = any_fault(found, jnp)  # one reduction per shape of the checks
    ev = evaluate(
        lp, olp, adv, valid, config, local if norm is None else norm, weights=w, ref_logp=ref
    )
    nan = jnp.asarray(math.nan, dtype)
    loss = jnp.where(bad, nan, ev.loss)
    parts = tuple(None if g is None else jnp.where(bad, nan, g) for g in gradient_parts(ev))
    # Not built unless asked: an eager call (bucketed or not) would otherwise pay for them.
    metrics = (
        compute_metrics(_widened(ev, config, lp, olp, adv, valid), config) if want_metrics else {}
    )
    return loss, metrics, parts, bad


def _widened(ev: Evaluation, config: LossConfig, lp, olp, adv, valid) -> Evaluation:
    """``ev`` for the metrics in float64 when JAX has it (``jax_enable_x64``; MLX does the
    same): a mean ratio of 1e38 fits float32 even where one ratio overflows it."""
    wide = jnp.result_type(float)
    if ev.loss.dtype == wide:
        return ev
    gate = {f.name: getattr(ev.gate, f.name) for f in dataclasses.fields(ev.gate)}
    gate = {
        k: v.astype(wide) if jnp.issubdtype(v.dtype, jnp.floating) else v for k, v in gate.items()
    }
    p = prepare(lp.astype(wide), olp.astype(wide), adv.astype(wide), valid, config)
    return dataclasses.replace(ev, prepared=p, gate=type(ev.gate)(**gate))


_kernel = jax.jit(_kernel_impl, static_argnums=(0, 1))


def _is_concrete(*args: Any) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(args))


def _bucket(n: int, t: int) -> tuple[int, int] | None:
    if n * t > SMALL:
        return None
    return max(MIN_BUCKET[0], 1 << (n - 1).bit_length()), max(
        MIN_BUCKET[1], 1 << (t - 1).bit_length()
    )


def gradient_parts(ev: Evaluation) -> tuple[Any, Any, Any]:
    """``(G, P, K)``: the whole gradient w.r.t. ``logp``, its policy part (minus the gradient
    w.r.t. ``old_logp``, clause 8.9) and its KL part (minus the gradient w.r.t. ``ref_logp``,
    clause 10.3); ``P`` and ``K`` are ``None`` without a KL term (``P`` is then ``G``)."""
    if ev.kl_grad is None:
        return ev.grad, None, None
    return ev.grad, ev.policy_grad, ev.kl_grad


def _host_arrays(config: LossConfig, logp, old_logp, advantages, mask, weights, ref_logp):
    """NumPy copies in the compute dtype (``weights``/``ref_logp`` too, when given), the valid
    mask and the local counts."""
    extra = () if ref_logp is None else (ref_logp.dtype,)
    dtype = np.dtype(compute_dtype(logp.dtype, old_logp.dtype, advantages.dtype, *extra))
    lp, olp, adv = (np.asarray(x).astype(dtype) for x in (logp, old_logp, advantages))
    w, ref = (None if x is None else np.asarray(x).astype(dtype) for x in (weights, ref_logp))
    m = np.asarray(mask)
    valid = m if m.dtype == np.bool_ else m != 0
    local = aggregation.normalizer(valid, count_empty_rows=config.count_empty_rows)
    return lp, olp, adv, m, valid, local, w, ref


def _raise_data_errors(
    config: LossConfig, logp, old_logp, advantages, mask, norm, weights, ref_logp
) -> None:
    """The reference's ``ValueError`` for concrete inputs that the kernel flagged (clause 8.7)."""
    lp, olp, adv, m, valid, local, w, ref = _host_arrays(
        config, logp, old_logp, advantages, mask, weights, ref_logp
    )
    if norm is not None:
        norm = Normalizer(*(float(np.asarray(c)) for c in norm))
    with np.errstate(over="ignore", invalid="ignore"):
        found = faults(
            lp,
            olp,
            adv,
            m,
            valid,
            sequence=config.sequence_value,
            normalizer=norm,
            local=local,
            weights=w,
            ref_logp=ref,
        )
    raise_faults(found)


def _bucketed(
    config: LossConfig,
    want_metrics: bool,
    shape,
    logp,
    old_logp,
    advantages,
    mask,
    norm,
    weights,
    ref_logp,
):
    """The kernel on inputs padded to ``shape`` with the method parameters traced."""
    lp, olp, adv, m, _, local, w, ref = _host_arrays(
        config, logp, old_logp, advantages, mask, weights, ref_logp
    )
    n, t = lp.shape
    # One layout, one program: [N] advantages and weights broadcast along the rows.
    if adv.ndim == 1:
        adv = np.broadcast_to(adv[:, None], (n, t))
    if w is not None and w.ndim == 1:
        w = np.broadcast_to(w[:, None], (n, t))
    dtype = lp.dtype
    # Fewer programs for the many small eager calls (the conformance suite, tests): absent
    # weights are ones (clause 10.1: the same numbers), an absent normalizer is the shard's own
    # counts (the same numbers), and the metrics are always built (dropped when not asked).
    weighted = w is not None
    if not weighted:
        w = np.ones((n, t), dtype)
    pad = ((0, shape[0] - n), (0, shape[1] - t))
    arrays = [np.pad(x, pad) for x in (lp, olp, adv, m.astype(dtype))]
    terms = [None if x is None else np.pad(x, pad) for x in (w, ref)]
    as_counts = lambda c: (np.asarray(c[0], dtype), np.asarray(c[1], dtype))
    counts = as_counts((local.num_tokens, local.num_rows))
    used = counts if norm is None else as_counts(norm)
    params = {
        k: getattr(config, k)
        for k in _TRACED_PARAMS
        if getattr(config, k) is not None and not (k == "kl_coef" and config.kl_coef == 0.0)
    }
    if not config.is_soft:
        params["dual_clip"] = math.inf if config.dual_clip is None else config.dual_clip
    static = dataclasses.replace(
        config, count_empty_rows=False, **dict.fromkeys(params, 1.0)
    )  # one program per method and aggregation: the values are traced
    loss, metrics, parts, bad = _kernel(static, True, *arrays, used, counts, params, *terms)
    if not want_metrics:
        metrics = {}
    elif not weighted:
        metrics = {k: v for k, v in metrics.items() if k != "weights/mean"}
    parts = tuple(None if g is None else jnp.asarray(np.asarray(g)[:n, :t]) for g in parts)
    return loss, metrics, parts, bad


def _forward(config: LossConfig, want_metrics: bool, arrays: tuple[Any, ...]):
    """``arrays = (logp, old_logp, advantages, mask, norm, weights, ref_logp)``."""
    logp, old_logp, advantages, _, _, weights, ref_logp = arrays
    concrete = _is_concrete(*arrays)
    shape = _bucket(*logp.shape) if concrete else None
    if shape is not None:
        loss, metrics, parts, bad = _bucketed(config, want_metrics, shape, *arrays)
    else:
        loss, metrics, parts, bad = _kernel(
            config, want_metrics, *arrays[:5], None, None, weights, ref_logp
        )
    if concrete and bool(bad):
        _raise_data_errors(config, *arrays)
    # Clause 8.9: the loss in the promoted dtype (bfloat16 in, bfloat16 out; computed in float32).
    given = (logp, old_logp, advantages) + (() if ref_logp is None else (ref_logp,))
    loss = loss.astype(jnp.result_type(*(x.dtype for x in given)))
    return loss, metrics, parts


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def loss_and_metrics(static, logp, old_logp, advantages, mask, norm, weights=None, ref_logp=None):
    """Loss (0-d) and clause-7 metrics; ``static`` is ``(config, logp dtype, old_logp dtype,
    want_metrics, ref_logp dtype or None)`` and ``norm`` ``None`` or the counts
    ``(num_tokens, num_rows)``. The metrics are ``{}`` unless ``want_metrics``.

    Metrics carry no gradient (they are diagnostics).
    """
    arrays = (logp, old_logp, advantages, mask, norm, weights, ref_logp)
    loss, metrics, _ = _forward(static[0], static[3], arrays)
    return loss, metrics


def _fwd(static, logp, old_logp, advantages, mask, norm, weights=None, ref_logp=None):
    arrays = (logp, old_logp, advantages, mask, norm, weights, ref_logp)
    loss, metrics, parts = _forward(static[0], static[3], arrays)
    return (loss, metrics), parts


def _bwd(static, parts, cotangents):
    config, logp_dtype, old_dtype, _, ref_dtype = static
    grad, policy, kl = parts
    c = cotangents[0].astype(grad.dtype)  # metric cotangents are ignored
    g = c * grad
    # old_logp enters through logp - old_logp, except in gspo-token (only inside sg[s_i]);
    # ref_logp through the KL term only (clause 10.3); weights are constants.
    old_enters = config.spreads_gradient or not config.sequence_value
    d_old = None
    if old_enters:
        d_old = (-g if policy is None else -(c * policy)).astype(old_dtype)
    d_ref = None if kl is None else (-(c * kl)).astype(ref_dtype)
    return g.astype(logp_dtype), d_old, None, None, None, None, d_ref


loss_and_metrics.defvjp(_fwd, _bwd)
