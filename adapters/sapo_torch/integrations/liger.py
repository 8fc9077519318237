r"""A drop-in for Liger-Kernel's ``LigerFusedLinearGRPOLoss`` whose policy term is the canonical
core, with Liger's memory-efficient, gradient-carrying log-probabilities.

.. math::

    \log\pi_\theta(y_{it}) = \big[\operatorname{log\,softmax}(h_{it} W^\top\!/T + b)\big]_{y_{it}},
    \qquad \mathcal{L} = \mathcal{L}\big(\log\pi_\theta, \log\pi_\text{old}, A, m;\ \text{options of }
    \texttt{loss\_type}\big)

:class:`SapoFusedLinearLoss` takes ``LigerFusedLinearGRPOLoss``'s constructor options and
``forward`` arguments (hidden states ``[B, T, H]``, the LM head weight ``[V, H]``, the
selected token ids, the attention mask, per-sequence advantages ``[B]``, ...) and returns what
it returns: ``(loss, metrics)``, ``metrics`` a tuple ``(clip_ratio,)``, with the mean KL first
when ``beta != 0``. The log-probabilities come from Liger's
``LigerFusedLinearPPOBase.chunk_forward``, a custom autograd function that streams the
vocabulary in chunks and recomputes logits in its backward: the ``[B, T, V]`` logits are never
stored, and the gradient reaches the hidden states, the head weight and bias. (Liger's
``fused_selective_log_softmax``, the helper of its Triton path, runs under ``torch.no_grad``:
a loss built on it trains nothing.) Liger's own fused path has the same memory profile and an
analytic backward of the whole loss; here autograd differentiates the canonical loss and hands
:math:`\partial\mathcal{L}/\partial\log\pi` to ``chunk_forward``'s backward.

``loss_type`` maps to the spec as Liger (and TRL) define it, empty rows counted:

==========  ==============================================================================
``sapo``    ``method="sapo"``, ``seq-mean-token-mean``
``grpo``    ``method="grpo"`` (``"gspo"`` at sequence level), ``seq-mean-token-mean``
``bnpo``    ``token-mean`` over the batch
``dr_grpo`` ``seq-mean-token-sum-norm`` with ``norm_length=max_completion_length``
``dapo``    ``token-mean`` over ``num_items_in_batch`` tokens (per process) when given
==========  ==============================================================================

``delta`` is the dual clip, ``epsilon_low/high`` the clip widths, ``vllm_is_ratio`` the
per-token ``weights``, ``beta`` with reference log-probabilities the k3 KL term. Refused with
a clear error: ``cispo``, ``luspo``, ``vespo``, sequence-level SAPO (as Liger), the bias-corrected
KL, a reference model given as hidden states (``ref_input``: pass ``ref_per_token_logps``).
Supported Liger-Kernel versions: :data:`SUPPORTED_LIGER` (checked at import).

>>> import torch
>>> from sapo_torch.integrations.liger import SapoFusedLinearLoss
>>> h = torch.randn(2, 3, 4, requires_grad=True); w = torch.randn(5, 4, requires_grad=True)
>>> loss, (clip_ratio,) = SapoFusedLinearLoss(beta=0.0, use_ref_model=False)(
...     h, w, torch.randint(0, 5, (2, 3)), torch.ones(2, 3), torch.tensor([1.0, -1.0]))
>>> loss.backward(); h.grad.shape, w.grad.shape
(torch.Size([2, 3, 4]), torch.Size([5, 4]))
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

import sapo_torch
from sapo_ref import Normalizer

from ._peer import import_framework

__all__ = ["LOSS_TYPES", "SUPPORTED_LIGER", "SapoFusedLinearLoss", "selected_logprobs"]

#: The Liger-Kernel versions whose chunked log-prob function and loss contract this module is
#: written and tested against.
SUPPORTED_LIGER = ">=0.8.5,<0.9"

_ppo = import_framework(
    "sapo_torch.integrations.liger",
    "liger_kernel.chunked_loss.fused_linear_ppo",
    "liger-kernel",
    (0, 8, 5),
    (0, 9),
)
_CHUNK_FORWARD = _ppo.LigerFusedLinearPPOBase.chunk_forward
if tuple(inspect.signature(_CHUNK_FORWARD).parameters) != (
    "input_chunk",
    "weight",
    "selected_token_ids",
    "bias",
    "temperature",
):
    raise ImportError(
        "sapo_torch.integrations.liger: LigerFusedLinearPPOBase.chunk_forward changed its "
        "parameters; this Liger-Kernel is not supported"
    )

#: Liger ``loss_type`` -> the spec aggregation (all count empty rows, as Liger does).
LOSS_TYPES: dict[str, str] = {
    "sapo": "seq-mean-token-mean",
    "grpo": "seq-mean-token-mean",
    "bnpo": "token-mean",
    "dr_grpo": "seq-mean-token-sum-norm",
    "dapo": "token-mean",
}


def selected_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    token_ids: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    r""":math:`\log\operatorname{softmax}(hW^\top/T + b)` at ``token_ids``, ``[B, T]`` float32,
    differentiable in ``hidden``, ``weight`` and ``bias`` without storing the logits (Liger's
    chunked function).

    >>> h = torch.zeros(1, 2, 3); w = torch.zeros(4, 3)   # uniform over 4 tokens
    >>> selected_logprobs(h, w, torch.tensor([[0, 3]])).exp().tolist()
    [[0.25, 0.25]]
    """
    return _CHUNK_FORWARD(hidden, weight, token_ids, bias=bias, temperature=temperature)


def _dapo_normalizer(mask: torch.Tensor, num_items_in_batch: Any) -> Normalizer:
    """Liger's DAPO denominator: ``num_items_in_batch`` (or the valid tokens summed over the
    processes) divided by the number of processes, as the token count of a token mean."""
    dist = torch.distributed
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if num_items_in_batch is not None:
        tokens = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=mask.device)
    else:
        tokens = mask.sum().to(torch.float32)
        if world > 1:
            dist.all_reduce(tokens)
    return Normalizer((tokens / world).clamp(min=1.0), float(mask.shape[0]))


class SapoFusedLinearLoss(torch.nn.Module):
    """``LigerFusedLinearGRPOLoss``'s interface with the canonical policy loss.

    Constructor options as Liger's (``compiled`` and ``chunk_size`` are accepted and unused:
    nothing is compiled, and the log-prob function chunks by itself; the default ``loss_type``
    here is ``"sapo"``).
    """

    def __init__(
        self,
        beta: float = 0.04,
        compiled: bool = True,
        use_ref_model: bool = True,
        chunk_size: int = 1,
        epsilon_low: float = 0.2,
        epsilon_high: float = 0.2,
        loss_type: str = "sapo",
        max_completion_length: int | None = None,
        importance_sampling_level: str = "token",
        sapo_temperature_pos: float = 1.0,
        sapo_temperature_neg: float = 1.05,
        temperature: float = 1.0,
        delta: float | None = None,
        use_bias_correction_kl: bool = False,
        **unsupported: Any,
    ) -> None:
        super().__init__()
        if loss_type not in LOSS_TYPES:
            raise ValueError(
                f"loss_type {loss_type!r} is not supported by the canonical core; "
                f"use one of {sorted(LOSS_TYPES)}"
            )
        if importance_sampling_level not in ("token", "sequence"):
            raise ValueError(
                "importance_sampling_level must be 'token' or 'sequence', got "
                f"{importance_sampling_level!r}"
            )
        if loss_type == "sapo" and importance_sampling_level == "sequence":
            raise ValueError(
                "sequence-level importance sampling is not supported for 'sapo' (as Liger)"
            )
        if loss_type == "dr_grpo" and max_completion_length is None:
            raise ValueError("max_completion_length must be provided for loss_type 'dr_grpo'")
        if use_bias_correction_kl:
            raise ValueError("use_bias_correction_kl=True (the IS-corrected KL) is not supported")
        unknown = [k for k in unsupported if not k.startswith("vespo_")]  # VESPO's: unused
        if unknown:
            raise TypeError(f"unexpected options {unknown}")
        self.beta, self.use_ref_model = beta, use_ref_model
        self.loss_type, self.level = loss_type, importance_sampling_level
        self.temperature = temperature
        self.options: dict[str, Any] = {"loss_agg": LOSS_TYPES[loss_type]}
        if loss_type == "sapo":
            self.options.update(
                method="sapo", tau_pos=sapo_temperature_pos, tau_neg=sapo_temperature_neg
            )
        else:
            self.options.update(
                method="grpo" if importance_sampling_level == "token" else "gspo",
                eps_low=epsilon_low,
                eps_high=epsilon_high,
                dual_clip=delta,
            )
        if loss_type == "dr_grpo":
            self.options["norm_length"] = float(max_completion_length)  # type: ignore[arg-type]

    def forward(
        self,
        _input: torch.Tensor,
        lin_weight: torch.Tensor,
        selected_token_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        advantages: torch.Tensor,
        bias: torch.Tensor | None = None,
        ref_per_token_logps: torch.Tensor | None = None,
        old_per_token_logps: torch.Tensor | None = None,
        ref_input: torch.Tensor | None = None,
        ref_weight: torch.Tensor | None = None,
        ref_bias: torch.Tensor | None = None,
        vllm_is_ratio: torch.Tensor | None = None,
        num_items_in_batch: Any = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """``(loss, metrics)`` as ``LigerFusedLinearGRPOLoss.forward``: metrics are
        ``(mean_kl, clip_ratio)`` with ``beta != 0``, else ``(clip_ratio,)``."""
        logp = selected_logprobs(_input, lin_weight, selected_token_ids, bias, self.temperature)
        old = logp.detach() if old_per_token_logps is None else old_per_token_logps
        mask = attention_mask.bool()
        options = dict(self.options)
        if self.options["loss_agg"] != "token-mean":
            options["count_empty_rows"] = True
        if self.loss_type == "dapo":
            options["normalizer"] = _dapo_normalizer(mask, num_items_in_batch)
        kl_terms: dict[str, Any] = {}
        if self.beta != 0.0:
            if ref_per_token_logps is None:
                raise ValueError(
                    "beta != 0 needs ref_per_token_logps (a reference model given as ref_input "
                    "hidden states is not supported)"
                )
            kl_terms = {
                "ref_logp": ref_per_token_logps.detach(),
                "kl_coef": self.beta,
                "kl_estimator": "k3",
            }
        if vllm_is_ratio is not None:
            w = vllm_is_ratio.detach()
            kl_terms["weights"] = w if w.ndim == 1 or w.shape[-1] != 1 else w[:, 0]
        loss, metrics = sapo_torch.policy_loss(
            logp, old.detach(), advantages.detach(), mask, metrics=True, **options, **kl_terms
        )
        out: list[torch.Tensor] = []
        if self.beta != 0.0:
            out.append(metrics["kl_ref/mean"])
        out.append(metrics.get("clip/frac", torch.zeros((), dtype=loss.dtype)))
        return loss, tuple(out)
