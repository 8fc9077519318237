r"""The canonical SAPO as a Trinity-RFT policy loss, registered in Trinity's registry.

.. math::

    \mathcal{L}_\text{Trinity} = \mathcal{L}\big(\log\pi_\theta, \log\pi_\text{old}, A, m;
    \ \text{method}=\texttt{sapo}\,|\,\texttt{sapo-seq},\ \text{aggregation}(\texttt{loss\_agg\_mode}),
    \ \tau_\text{pos}, \tau_\text{neg}\big)

Trinity's own ``SAPOPolicyLossFn`` detaches the gate and multiplies it by
:math:`\log\pi_\theta` (gradient :math:`-A f` instead of SAPO's :math:`-A w r`, no trust
region); :class:`SapoRefPolicyLossFn` computes SAPO itself. Importing this module registers it
as ``policy_loss_fn: sapo_ref`` in ``trinity.algorithm.POLICY_LOSS_FN``. In a Trinity config
that may be resolved in a process that never imported this module (a Ray worker), name the
class by its path instead, which Trinity's registry imports on demand:

.. code-block:: yaml

    algorithm:
      policy_loss_fn: sapo_torch.integrations.trinity.SapoRefPolicyLossFn
      policy_loss_fn_args: {tau_pos: 1.0, tau_neg: 1.05}

The class follows Trinity's ``PolicyLossFn`` contract: constructed as
``cls(backend=..., **policy_loss_fn_args)`` (``default_args()`` supplies the defaults, and
Trinity overrides ``loss_agg_mode`` with ``algorithm.loss_agg_mode``), called with the
backend's key names (mapped by Trinity's key mapper; ``select_keys`` lists them), returning
``(loss, metrics)`` with a dict of Python floats. ``loss_agg_mode`` keeps Trinity's meaning:
``token-mean``; ``seq-mean-token-mean`` / ``seq-mean-token-sum`` averaging over every row of
the micro-batch (empty rows counted); ``seq-mean-token-sum-norm``, Trinity's token sum divided
by the padded length :math:`T` only (spec clause 3.5 times the row count), computed as the
spec's mode times the row count. Trinity's KL and entropy terms stay Trinity's (its
loss wrapper adds them). The temperatures may be in any order (Trinity's own class asserts
:math:`\tau_\text{neg}\ge\tau_\text{pos}`). Supported versions: :data:`SUPPORTED_TRINITY`.

>>> import sapo_torch.integrations.trinity as st
>>> from trinity.algorithm import POLICY_LOSS_FN
>>> POLICY_LOSS_FN.get("sapo_ref") is st.SapoRefPolicyLossFn
True
"""

from __future__ import annotations

from typing import Any

import torch

import sapo_torch

from ._peer import import_framework

__all__ = ["LOSS_AGG_MODES", "SUPPORTED_TRINITY", "SapoRefPolicyLossFn"]

#: The Trinity-RFT versions whose policy-loss contract this module is written and tested against.
SUPPORTED_TRINITY = ">=0.6.0,<0.7"

_base = import_framework(
    "sapo_torch.integrations.trinity",
    "trinity.algorithm.policy_loss_fn.policy_loss_fn",
    "trinity-rft",
    (0, 6, 0),
    (0, 7),
)
from trinity.algorithm.policy_loss_fn import POLICY_LOSS_FN  # noqa: E402

#: Trinity ``loss_agg_mode`` -> (spec aggregation, empty rows counted).
LOSS_AGG_MODES: dict[str, str] = {
    "token-mean": "token-mean",
    "seq-mean-token-mean": "seq-mean-token-mean",
    "seq-mean-token-sum": "seq-mean-token-sum",
    "seq-mean-token-sum-norm": "seq-mean-token-sum-norm",
}
_LEVELS = {"token": "sapo", "sequence": "sapo-seq"}


class SapoRefPolicyLossFn(_base.PolicyLossFn):
    r"""SAPO (token or sequence level) with Trinity's ``PolicyLossFn`` contract.

    Args:
        backend: Trinity's backend name (``"verl"``, ``"tinker"``): selects its key mapper.
        tau_pos, tau_neg: the temperatures (any positive values).
        loss_agg_mode: one of :data:`LOSS_AGG_MODES` (Trinity's meaning, see the module).
        importance_sampling_level: ``"token"`` (``sapo``) or ``"sequence"`` (``sapo-seq``).

    >>> fn = SapoRefPolicyLossFn(backend="verl")
    >>> loss, metrics = fn(logprob=torch.zeros(2, 3), old_log_probs=torch.zeros(2, 3),
    ...                    response_mask=torch.ones(2, 3), advantages=torch.tensor([[1.0] * 3, [-1.0] * 3]))
    >>> round(loss.item(), 6), metrics["sapo_ref/gate/mean"]  # -(2 - 2/1.05) / 2; w(1) = 1
    (-0.047619, 1.0)
    """

    def __init__(
        self,
        backend: str = "verl",
        tau_pos: float = 1.0,
        tau_neg: float = 1.05,
        loss_agg_mode: str = "token-mean",
        importance_sampling_level: str = "token",
    ) -> None:
        super().__init__(backend=backend)
        if loss_agg_mode not in LOSS_AGG_MODES:
            raise ValueError(
                f"loss_agg_mode must be one of {sorted(LOSS_AGG_MODES)}, got {loss_agg_mode!r}"
            )
        if importance_sampling_level not in _LEVELS:
            raise ValueError(
                "importance_sampling_level must be 'token' or 'sequence', got "
                f"{importance_sampling_level!r}"
            )
        self.tau_pos, self.tau_neg = tau_pos, tau_neg
        self.loss_agg_mode = loss_agg_mode
        self.importance_sampling_level = importance_sampling_level

    def __call__(  # type: ignore[override]
        self,
        logprob: torch.Tensor,
        old_logprob: torch.Tensor,
        action_mask: torch.Tensor,
        advantages: torch.Tensor,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """``(loss, metrics)``: the canonical loss and the spec's metrics (clause 7.1) as floats
        under ``sapo_ref/``, plus Trinity's ``ppo_kl`` (mean of the k1 estimate)."""
        mask = action_mask.bool()
        agg = LOSS_AGG_MODES[self.loss_agg_mode]
        options: dict[str, Any] = {"loss_agg": agg}
        if agg != "token-mean":
            options.update(count_empty_rows=True)  # Trinity's .mean() over every row
        if agg == "seq-mean-token-sum-norm":
            options.update(norm_length=float(mask.shape[-1]))
        loss, metrics = sapo_torch.policy_loss(
            logprob,
            old_logprob.detach(),
            advantages.detach(),
            mask,
            method=_LEVELS[self.importance_sampling_level],
            tau_pos=self.tau_pos,
            tau_neg=self.tau_neg,
            metrics=True,
            **options,
        )
        if agg == "seq-mean-token-sum-norm":
            loss = loss * mask.shape[0]  # Trinity divides the token sum by T alone, not by R T
        out = {f"sapo_ref/{k}": float(v) for k, v in metrics.items()}
        out["ppo_kl"] = out["sapo_ref/kl/k1"]
        out["sapo_loss"] = float(loss.detach())
        return loss, out

    @classmethod
    def default_args(cls) -> dict[str, Any]:
        """The constructor's defaults: the paper's temperatures, token mean, token level."""
        return {
            "tau_pos": 1.0,
            "tau_neg": 1.05,
            "loss_agg_mode": "token-mean",
            "importance_sampling_level": "token",
        }


if POLICY_LOSS_FN.modules.get("sapo_ref") is not SapoRefPolicyLossFn:
    POLICY_LOSS_FN.register_module("sapo_ref", SapoRefPolicyLossFn, force=True)
