r"""The autograd node: forward computes :math:`\mathcal{L}`, :math:`g = \partial\mathcal{L}/\partial\log\pi_\theta`
(and the metrics, on request) together and saves only :math:`g`; backward is :math:`\bar{\ell}\,g` for
``logp`` and :math:`-\bar{\ell}\,g` for ``old_logp`` (0 for ``gspo-token``, clause 8.9), the latter
only when it is requested.

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

__all__ = ["PolicyLossFunction", "compute_dtype", "promoted_dtype"]


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


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The promoted dtype of the inputs, with float16/bfloat16 computed in float32 (clause 6.4, 8.9).

    >>> import torch
    >>> compute_dtype(torch.bfloat16), compute_dtype(torch.float32, torch.float64)
    (torch.float32, torch.float64)
    """
    return torch.float64 if promoted_dtype(*dtypes) == torch.float64 else torch.float32


class PolicyLossFunction(torch.autograd.Function):
    """``apply(logp, old_logp, advantages, valid, num_tokens, num_rows, config, metrics)
        -> (loss, grad, metric_values)``.

        ``num_tokens``/``num_rows``: the global counts (floats or 0-d tensors) or both ``None``.
    ``grad`` and ``metric_values`` (the metrics stacked in
        ``sapo_ref.metric_keys`` order, empty unless ``metrics``) are outputs only so that they can be
        saved and returned: they are non-differentiable.
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
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        promoted = promoted_dtype(logp.dtype, old_logp.dtype, advantages.dtype)
        cdt = compute_dtype(promoted)
        norm = None if num_tokens is None else Normalizer(num_tokens, num_rows)
        loss, grad, values = forward_pass(
            logp, old_logp, advantages, valid, config, norm, cdt, metrics
        )
        stacked = torch.stack(list(values.values())) if values else loss.new_empty(0)
        # Saved in logp's dtype, or unrounded when old_logp's derivative may need more digits.
        wide = old_logp.dtype != logp.dtype and config.method != "gspo-token"
        return _as(loss, promoted), grad if wide else _as(grad, logp.dtype), stacked

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
        logp, old_logp = inputs[0], inputs[1]
        _, grad, values = output
        ctx.mark_non_differentiable(grad, values)
        ctx.set_materialize_grads(False)  # no [N, T] zeros for the unused outputs' gradients
        ctx.old_dtype = old_logp.dtype
        ctx.old_zero = inputs[6].method == "gspo-token"  # old_logp only inside sg[s_i]
        ctx.logp_dtype = logp.dtype
        ctx.save_for_backward(grad)

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor | None, *_unused: Any) -> tuple[Any, ...]:
        (grad,) = ctx.saved_tensors
        d_logp = d_old = None
        if grad_loss is not None:  # None: nothing flows into the loss (grads not materialised)
            # grad_loss is 0-d (per vmapped sample): the product keeps grad's dtype, rounded once.
            g = grad * grad_loss
            if ctx.needs_input_grad[0]:
                d_logp = _as(g, ctx.logp_dtype)
            if ctx.needs_input_grad[1]:
                d_old = (
                    torch.zeros_like(g, dtype=ctx.old_dtype)
                    if ctx.old_zero
                    else -g.to(ctx.old_dtype)
                )
        return d_logp, d_old, None, None, None, None, None, None
