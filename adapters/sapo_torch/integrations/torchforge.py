r"""torchforge's ``SAPOLoss`` interface computed by the canonical core. UNTESTED against
torchforge: no release of torchforge with its loss modules is installable here (the PyPI
package ``torchforge`` 0.0.1 is an empty placeholder, and the source's
``forge.observability.metrics`` imports the Monarch actor runtime), so this module follows the
public source of meta-pytorch/torchforge at commit ``bd76a9b`` (``src/forge/rl/loss/sapo.py``,
``types.py``, ``primitives.py``) and its tests check only what needs no torchforge.

.. math::

    \log\pi_\theta = \big[\operatorname{log\,softmax}(\text{logits})\big]_{y},\qquad
    \mathcal{L} = \mathcal{L}\big(\log\pi_\theta, \log\pi_\text{gen}, A, m;\ \texttt{sapo},
    \ \text{aggregation}(\texttt{agg\_type}), \tau_\text{pos}, \tau_\text{neg}\big)

:class:`SapoRefLoss` has ``SAPOLoss``'s fields (``tau_pos``, ``tau_neg``, ``agg_type``) and call
signature ``(logits, target_ids, advantages, generator_logprobs, loss_mask, loss_scale=None)``
and returns torchforge's ``LossOutput(loss, metrics)``, ``metrics`` a list of
``forge.observability.metrics.Metric`` (key, value, ``Reduce.MEAN``): torchforge's own keys
(``loss/ratio/mean``, ``loss/kl_policy/mean``, ``loss/entropy/mean``,
``loss/soft_gate/gate/mean``, ``loss/aggregate/active_fraction``) and the spec's under
``loss/sapo_ref/``. ``agg_type`` keeps torchforge's meaning:

=================  ================================================================
``sequence_mean``  ``seq-mean-token-mean``, every row counted
``token_mean``     ``token-mean``; ``loss_scale`` = the token count it divides by
``fixed_horizon``  ``seq-mean-token-sum-norm``, ``norm_length`` = T, every row counted
=================  ================================================================

torchforge clamps the log-ratio to :math:`[-20, 20]` before ``exp`` (spec deviation
``log-ratio-clamp``); the canonical core does not, so the two agree where
:math:`|\log\pi_\theta - \log\pi_\text{gen}| \le 20`. Targets equal to ``ignore_index``
(-100) get log-probability 0, as torchforge's. :func:`sapo_loss_terms` is the computation
without torchforge's types (loss and ``(key, value)`` pairs): that is what the tests check.
"""

from __future__ import annotations

from typing import Any

import torch

import sapo_torch
from sapo_ref.gates import sapo_parts_signed

__all__ = ["AGG_TYPES", "SOURCE_COMMIT", "SapoRefLoss", "sapo_loss_terms"]

#: The torchforge source this module follows (no installable release has the loss modules).
SOURCE_COMMIT = "bd76a9b"
#: torchforge ``agg_type`` -> the spec aggregation (every row counted in the row averages).
AGG_TYPES: dict[str, str] = {
    "sequence_mean": "seq-mean-token-mean",
    "token_mean": "token-mean",
    "fixed_horizon": "seq-mean-token-sum-norm",
}
_IGNORE_INDEX = -100


def _forge_types() -> tuple[Any, Any, Any]:
    """torchforge's ``LossOutput``, ``Metric`` and ``Reduce``, or a clear error."""
    try:
        from forge.observability.metrics import Metric, Reduce
        from forge.rl.loss.types import LossOutput
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "sapo_torch.integrations.torchforge needs torchforge's loss modules "
            f"(forge.rl.loss, as in meta-pytorch/torchforge at {SOURCE_COMMIT}); they are not "
            f"importable here: {err}",
            name="forge",
        ) from err
    return LossOutput, Metric, Reduce


def sapo_loss_terms(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    advantages: torch.Tensor,
    generator_logprobs: torch.Tensor,
    loss_mask: torch.Tensor,
    loss_scale: torch.Tensor | None = None,
    *,
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
    agg_type: str = "sequence_mean",
) -> tuple[torch.Tensor, list[tuple[str, torch.Tensor]]]:
    r"""The loss and the metric ``(key, value)`` pairs of :class:`SapoRefLoss`, without
    torchforge's types.

    Args:
        logits: [B, S, V] model outputs (log-probabilities are taken in float32, as torchforge).
        target_ids: [B, S] sampled tokens (``-100`` = ignored: log-probability 0).
        advantages: [B, S] (or [B]) advantages; generator_logprobs: [B, S] behaviour log-probs.
        loss_mask: [B, S] 0/1 or bool; loss_scale: ``token_mean``'s token count, or None.
        tau_pos, tau_neg, agg_type: as ``SAPOLoss``.

    >>> logits = torch.zeros(1, 2, 4)   # uniform: log(1/4) at every token
    >>> loss, metrics = sapo_loss_terms(logits, torch.tensor([[1, 2]]), torch.ones(1, 2),
    ...                                 torch.full((1, 2), -1.3862943611198906), torch.ones(1, 2))
    >>> round(loss.item(), 5), dict(metrics)["loss/ratio/mean"].item()   # on-policy: -2/tau_pos
    (-2.0, 1.0)
    """
    if agg_type not in AGG_TYPES:
        raise ValueError(f"agg_type must be one of {sorted(AGG_TYPES)}, got {agg_type!r}")
    logits32 = logits.float()
    ignored = target_ids == _IGNORE_INDEX
    picked = torch.where(ignored, torch.zeros_like(target_ids), target_ids).long()
    log_z = torch.logsumexp(logits32, dim=-1)
    logp = logits32.gather(-1, picked[..., None])[..., 0] - log_z
    logp = torch.where(ignored, torch.zeros_like(logp), logp)
    mask = loss_mask.bool()
    agg = AGG_TYPES[agg_type]
    options: dict[str, Any] = {"loss_agg": agg}
    if agg != "token-mean":
        options["count_empty_rows"] = True
    if agg_type == "fixed_horizon":
        options["norm_length"] = float(mask.shape[-1])
    loss, spec = sapo_torch.policy_loss(
        logp,
        generator_logprobs.detach(),
        advantages.detach(),
        mask,
        method="sapo",
        tau_pos=tau_pos,
        tau_neg=tau_neg,
        metrics=True,
        **options,
    )
    if agg_type == "token_mean" and loss_scale is not None:
        # torchforge divides the token sum by loss_scale (global tokens / ranks averaging
        # gradients), which may be below this rank's own count: rescale the local token mean.
        loss = loss * (mask.sum() / torch.as_tensor(loss_scale).clamp(min=1.0)).to(loss.dtype)
    with torch.no_grad():
        probs = torch.softmax(logits32, dim=-1)
        entropy = log_z - (probs * logits32).sum(-1)
        n = mask.sum().clamp(min=1)
        metrics = [
            ("loss/ratio/mean", spec["ratio/mean"]),
            ("loss/kl_policy/mean", spec["kl/k1"]),
            ("loss/entropy/mean", torch.where(mask, entropy, 0.0).sum() / n),
            (
                "loss/soft_gate/gate/mean",
                _mean_gate(logp, generator_logprobs, advantages, mask, tau_pos, tau_neg),
            ),
            ("loss/aggregate/active_fraction", loss_mask.float().mean()),
        ]
    metrics += [(f"loss/sapo_ref/{k}", v) for k, v in spec.items()]
    return loss, metrics


def _mean_gate(
    logp: torch.Tensor,
    old: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    tau_pos: float,
    tau_neg: float,
) -> torch.Tensor:
    """torchforge's gate metric: the mean over valid tokens of :math:`f = \\frac4\\tau\\sigma`."""
    adv2 = adv[:, None].expand_as(logp) if adv.ndim == 1 else adv
    zero = torch.zeros_like(logp)
    delta = torch.where(mask, logp, zero) - torch.where(mask, old.to(logp.dtype), zero)
    f = sapo_parts_signed(delta, adv2 > 0, tau_pos, tau_neg).f
    return torch.where(mask, f, zero).sum() / mask.sum().clamp(min=1)


class SapoRefLoss:
    """torchforge's ``SAPOLoss`` interface (fields and ``__call__``) with the canonical loss.

    Constructing it needs no torchforge; calling it returns torchforge's ``LossOutput`` and
    raises ``ModuleNotFoundError`` where torchforge's loss modules do not import.
    """

    def __init__(
        self, tau_pos: float = 1.0, tau_neg: float = 1.05, agg_type: str = "sequence_mean"
    ) -> None:
        if not (tau_pos > 0 and tau_neg > 0):
            raise ValueError(f"tau_pos and tau_neg must be > 0, got {tau_pos}, {tau_neg}")
        if agg_type not in AGG_TYPES:
            raise ValueError(f"agg_type must be one of {sorted(AGG_TYPES)}, got {agg_type!r}")
        self.tau_pos, self.tau_neg, self.agg_type = tau_pos, tau_neg, agg_type

    def __call__(
        self,
        logits: torch.Tensor,
        target_ids: torch.Tensor,
        advantages: torch.Tensor,
        generator_logprobs: torch.Tensor,
        loss_mask: torch.Tensor,
        loss_scale: torch.Tensor | None = None,
    ) -> Any:
        """``LossOutput(loss, [Metric(key, value, Reduce.MEAN), ...])``."""
        loss_output, metric, reduce = _forge_types()
        loss, pairs = sapo_loss_terms(
            logits,
            target_ids,
            advantages,
            generator_logprobs,
            loss_mask,
            loss_scale,
            tau_pos=self.tau_pos,
            tau_neg=self.tau_neg,
            agg_type=self.agg_type,
        )
        return loss_output(loss, [metric(key=k, value=v, reduction=reduce.MEAN) for k, v in pairs])
