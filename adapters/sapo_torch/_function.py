r"""The fused autograd node: forward computes :math:`\mathcal{L}` and :math:`g = \partial\mathcal{L}/\partial\log\pi_\theta`
together and saves only :math:`g` (one [N, T] buffer in the input dtype); backward is
:math:`\bar{\ell}\, g` for the upstream cotangent :math:`\bar{\ell}`.

Written with ``setup_context`` and ``generate_vmap_rule = True`` so that ``torch.func.grad``,
``torch.func.vmap`` and ``torch.compile(fullgraph=True)`` trace through it. First-order only: the
saved gradient is a constant to autograd, so a second derivative through this node is not
available (the losses' Hessians are not part of the spec).
"""

from __future__ import annotations

from typing import Any

import torch

from sapo_ref.aggregation import Normalizer
from sapo_ref.config import LossConfig

from ._kernels import loss_and_grad

__all__ = ["FusedPolicyLoss", "compute_dtype"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype is computed in float32 (clause 6.4).

    >>> import torch
    >>> compute_dtype(torch.bfloat16), compute_dtype(torch.float64)
    (torch.float32, torch.float64)
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


class FusedPolicyLoss(torch.autograd.Function):
    """``apply(logp, old_logp, advantages, valid, num_tokens, num_rows, config) -> (loss, grad)``.

    ``num_tokens``/``num_rows`` are the global counts (floats or 0-d tensors) or both ``None``;
    ``grad`` is returned only so that it can be saved: it is marked non-differentiable.
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
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cdt = compute_dtype(logp.dtype)
        norm = None
        if num_tokens is not None:
            device = logp.device
            norm = Normalizer(
                torch.as_tensor(num_tokens, dtype=cdt, device=device),
                torch.as_tensor(num_rows, dtype=cdt, device=device),
            )
        loss, grad = loss_and_grad(logp, old_logp, advantages, valid, config, norm, cdt)
        return loss, grad.to(logp.dtype)

    @staticmethod
    def setup_context(
        ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]
    ) -> None:
        _, grad = output
        ctx.mark_non_differentiable(grad)
        ctx.set_materialize_grads(False)  # no [N, T] zeros for the unused output's gradient
        ctx.save_for_backward(grad)

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, _unused: Any) -> tuple[Any, ...]:
        (grad,) = ctx.saved_tensors
        if grad_loss is None:  # grads are not materialised: nothing flows into the loss
            return None, None, None, None, None, None, None
        # grad_loss is 0-d (per vmapped sample): the product keeps grad's dtype, rounded once.
        return grad * grad_loss, None, None, None, None, None, None
