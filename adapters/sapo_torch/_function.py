r"""The autograd node: forward computes :math:`\mathcal{L}`, :math:`g = \partial\mathcal{L}/\partial\log\pi_\theta`
(and the metrics, on request) together and saves only what the requested gradients need:
:math:`g` for ``logp`` (backward :math:`\bar{\ell}\,g`); for ``old_logp`` minus the policy part of
:math:`g` (0 for ``gspo-token``, clause 8.9); for ``ref_logp`` minus its KL part (clause 10.3).
Without a KL term the policy part is :math:`g` itself; ``weights`` get no gradient (detached).

Written with ``setup_context`` and ``generate_vmap_rule = True`` so that ``torch.func.grad``,
``torch.func.vmap`` and ``torch.compile(fullgraph=True)`` trace through it. First-order only: the
saved gradient is a constant to autograd (second derivatives are not part of the spec).
"""

from __future__ import annotations

from typing import Any

import torch

from sapo_ref.aggregation import Normalizer
from sapo_ref.config import LossConfig

from ._kernels import _as, forward_pass

__all__ = ["PolicyLossFunction", "compute_dtype", "input_dtypes", "promoted_dtype"]


def promoted_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The promoted dtype of the inputs: the dtype of the loss (clause 8.9).

    >>> import torch
    >>> promoted_dtype(torch.float16, torch.bfloat16), promoted_dtype(torch.bfloat16)
    (torch.float32, torch.bfloat16)
    """
    out = dtypes[0]
    for dt in dtypes[1:]:
        out = torch.promote_types(out, dt)
    return out


def input_dtypes(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    ref_logp: torch.Tensor | None = None,
) -> tuple[torch.dtype, ...]:
    """The dtypes that promote (clause 8.9): ``logp``, ``old_logp``, ``advantages`` and
    ``ref_logp`` when given (the mask and the weights do not promote).

    >>> import torch
    >>> z = torch.zeros(1)
    >>> input_dtypes(z, z, z, z.double())
    (torch.float32, torch.float32, torch.float32, torch.float64)
    """
    given = (logp, old_logp, advantages) + (() if ref_logp is None else (ref_logp,))
    return tuple(x.dtype for x in given)


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The promoted dtype of the inputs, with float16/bfloat16 computed in float32 (clause 6.4, 8.9).

    >>> import torch
    >>> compute_dtype(torch.bfloat16), compute_dtype(torch.float32, torch.float64)
    (torch.float32, torch.float64)
    """
    return torch.float64 if promoted_dtype(*dtypes) == torch.float64 else torch.float32


class PolicyLossFunction(torch.autograd.Function):
    r"""``apply(logp, old_logp, advantages, valid, num_tokens, num_rows, config, metrics, weights,
    ref_logp) -> (loss, grad, policy_grad, kl_grad, metric_values)``.

    ``num_tokens``/``num_rows``: the global counts (floats or 0-d tensors) or both ``None``;
    ``weights``/``ref_logp``: the clause 10 terms or ``None``. ``grad`` is the whole
    :math:`\partial\mathcal{L}/\partial\log\pi_\theta`; ``policy_grad`` and ``kl_grad`` its two
    parts when there is a KL term (else empty); ``metric_values`` the metrics stacked in
    ``sapo_ref.metric_keys`` order (empty unless ``metrics``). All but ``loss`` are outputs only
    so that they can be saved: they are non-differentiable.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
        logp: torch.Tensor,
        old_logp: torch.Tensor,
        advantages: torch.Tensor,
        valid: torch.Tensor,
        num_tokens: Any,
        num_rows: Any,
        config: LossConfig,
        metrics: bool,
        weights: torch.Tensor | None = None,
        ref_logp: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        promoted = promoted_dtype(*input_dtypes(logp, old_logp, advantages, ref_logp))
        cdt = compute_dtype(promoted)
        norm = None if num_tokens is None else Normalizer(num_tokens, num_rows)
        out = forward_pass(
            logp, old_logp, advantages, valid, config, norm, cdt, metrics, weights, ref_logp
        )
        values = out.metrics
        stacked = torch.stack(list(values.values())) if values else out.loss.new_empty(0)
        if out.kl_grad is None:
            # Saved in logp's dtype, or unrounded when old_logp's derivative may need more digits.
            wide = old_logp.dtype != logp.dtype and config.method != "gspo-token"
            grad = out.grad if wide else _as(out.grad, logp.dtype)
            # two distinct empty tensors: an output returned twice breaks Dynamo's tracing
            return _as(out.loss, promoted), grad, grad.new_empty(0), grad.new_empty(0), stacked
        return (
            _as(out.loss, promoted),
            _as(out.grad, logp.dtype),
            out.policy_grad,
            out.kl_grad,
            stacked,
        )

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
        logp, old_logp, ref_logp = inputs[0], inputs[1], inputs[9]
        _, grad, policy, kl, values = output
        ctx.mark_non_differentiable(grad, policy, kl, values)
        ctx.set_materialize_grads(False)  # no [N, T] zeros for the unused outputs' gradients
        ctx.old_dtype = old_logp.dtype
        ctx.old_zero = inputs[6].method == "gspo-token"  # old_logp only inside sg[s_i]
        ctx.logp_dtype = logp.dtype
        ctx.ref_dtype = None if ref_logp is None else ref_logp.dtype
        need = ctx.needs_input_grad
        ctx.with_kl = ref_logp is not None
        # Only what the requested gradients use (the usual call: one [N, T] buffer, logp's).
        old = need[1] and not ctx.old_zero
        ctx.save_for_backward(
            # gspo-token: for the shape of old_logp's zero gradient
            grad if need[0] or (need[1] and (ctx.old_zero or not ctx.with_kl)) else None,
            policy if old and ctx.with_kl else None,
            kl if need[9] else None,
        )

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor | None, *_unused: Any) -> tuple[Any, ...]:
        grad, policy, kl = ctx.saved_tensors
        need = ctx.needs_input_grad
        d_logp = d_old = d_ref = None
        if grad_loss is not None:  # None: nothing flows into the loss (grads not materialised)
            # grad_loss is 0-d (per vmapped sample): each product keeps its buffer's dtype,
            # rounded once.
            if need[0]:
                d_logp = _as(grad * grad_loss, ctx.logp_dtype)
            if need[1]:
                if ctx.old_zero:
                    d_old = torch.zeros_like(grad, dtype=ctx.old_dtype)
                else:
                    part = policy if ctx.with_kl else grad
                    d_old = -(part * grad_loss).to(ctx.old_dtype)
            if need[9]:
                d_ref = -(kl * grad_loss).to(ctx.ref_dtype)
        return d_logp, d_old, None, None, None, None, None, None, None, d_ref
