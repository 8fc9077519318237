r"""ms-swift's GRPO trainer with its policy loss computed by the canonical core.

.. math::

    \mathcal{L}_\text{swift} = \mathcal{L}\big(\log\pi_\theta, \log\pi_\text{old}, A, m;
    \ \text{method}(\texttt{loss\_type}, \texttt{importance\_sampling\_level}),
    \ \text{aggregation}(\texttt{loss\_type}),\ w = \text{entropy mask}\cdot\text{rollout IS},
    \ \beta, \log\pi_\text{ref}\big)

ms-swift's ``GRPOTrainer`` (``swift.rlhf_trainers.grpo_trainer``) computes its loss in
``_compute_loss(model, model_inputs, grpo_batch, origin_data)``, which calls
``_compute_loss_and_metrics(model, model_inputs, grpo_batch) -> (loss, metrics_data)`` per
micro-batch (and per chunk when it splits a dynamic batch); :class:`SapoRefLossMixin`
replaces that method, so ms-swift's batching, chunking and metric logging
(``_update_metrics``) are unchanged. One-line switch:

.. code-block:: python

    from sapo_torch.integrations.swift import SapoRefGRPOTrainer as GRPOTrainer

The log-probabilities, entropies, masks and advantages are ms-swift's; the policy term, its
aggregation and the KL term are the canonical core's, with the options ms-swift's arguments
give:

====================================  =========================================================
``--loss_type sapo``                  ``sapo`` / ``sapo-seq`` (``importance_sampling_level``
                                      ``token`` / ``sequence``), ``seq-mean-token-mean``
``grpo``                              ``grpo`` / ``gspo`` / ``gspo-token`` (``sequence_token``),
                                      ``seq-mean-token-mean``
``bnpo``, ``dr_grpo``, ``dapo``       ``token-mean``; ``seq-mean-token-sum-norm`` with
                                      ``max_completion_length``; ``token-mean`` over
                                      ``num_items_in_batch`` per process
``--epsilon``, ``--epsilon_high``,    ``eps_low``, ``eps_high``, ``dual_clip``
``--delta``
``--beta`` (KL to the reference)      ``kl_coef``, ``ref_logp``, ``kl_estimator="low-var-k3"``
``--top_entropy_quantile < 1``        the entropy mask as ``weights``
rollout importance sampling           ms-swift's IS weights (its own ``_get_rollout_is_correction``)
                                      as ``weights``
``--overlong_filter``                 truncated rows masked out, as ms-swift
====================================  =========================================================

Empty rows are counted in the row averages, as ms-swift's ``.mean()`` does. Refused at
construction with a clear error (never a silent difference): ``cispo``, ``real``, ``fipo``,
SAPO at ``sequence_token`` level, the Liger loss path, the off-policy sequence mask,
an OPD-RL teacher, SDAR, CHORD, and rollout IS weights together with ``beta != 0`` (ms-swift
multiplies the KL term by them; the spec's weights scale the policy term only). Known
differences: ms-swift's KL clamps :math:`\log\pi_\text{ref} - \log\pi_\theta` to
:math:`[-20, 20]` before the clipped k3 (equal where that gap is within 20); its
float32 :math:`e^\delta` overflows past :math:`\delta\approx 88.7`. The clip fractions logged
are the spec's (clause 7.1, token-weighted), and the spec's metrics are added under
``sapo_ref/``. Supported ms-swift versions: :data:`SUPPORTED_SWIFT` (checked at import).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

import sapo_torch
from sapo_ref import Normalizer

from ._peer import import_framework

__all__ = ["LOSS_TYPES", "SUPPORTED_SWIFT", "SapoRefGRPOTrainer", "SapoRefLossMixin"]

#: The ms-swift versions whose GRPO trainer contract this module is written and tested against.
SUPPORTED_SWIFT = ">=4.6.0,<4.7"

_grpo = import_framework(
    "sapo_torch.integrations.swift",
    "swift.rlhf_trainers.grpo_trainer",
    "ms-swift",
    (4, 6, 0),
    (4, 7),
)
if tuple(inspect.signature(_grpo.GRPOTrainer._compute_loss_and_metrics).parameters) != (
    "self",
    "model",
    "model_inputs",
    "grpo_batch",
):
    raise ImportError(
        "sapo_torch.integrations.swift: GRPOTrainer._compute_loss_and_metrics changed its "
        "parameters; this ms-swift is not supported"
    )

#: ms-swift ``loss_type`` -> the spec aggregation.
LOSS_TYPES: dict[str, str] = {
    "sapo": "seq-mean-token-mean",
    "grpo": "seq-mean-token-mean",
    "bnpo": "token-mean",
    "dr_grpo": "seq-mean-token-sum-norm",
    "dapo": "token-mean",
}
_METHODS = {
    ("sapo", "token"): "sapo",
    ("sapo", "sequence"): "sapo-seq",
    ("clip", "token"): "grpo",
    ("clip", "sequence"): "gspo",
    ("clip", "sequence_token"): "gspo-token",
}


def _has_keyword(name: str) -> bool:
    return name in inspect.signature(sapo_torch.policy_loss).parameters


class SapoRefLossMixin:
    """Put before ms-swift's ``GRPOTrainer`` in the bases: its ``_compute_loss_and_metrics``
    with the canonical loss (see the module docstring)."""

    def _sapo_ref_check(self) -> str:
        """The spec method for this trainer's options, or a ValueError naming the option."""
        refused = {
            "use_liger_kernel (the Liger loss path)": getattr(self, "use_liger_loss", False),
            "off_policy_sequence_mask_delta": getattr(self, "off_policy_sequence_mask_delta", None)
            is not None,
            "an OPD-RL teacher": getattr(self, "_has_teacher", False),
            "sdar_loss_coef > 0": (getattr(self, "sdar_loss_coef", 0) or 0) > 0,
            "CHORD SFT mixing": getattr(self, "chord_sft_iterator", None) is not None,
        }
        bad = [k for k, v in refused.items() if v]
        if self.loss_type not in LOSS_TYPES:
            bad.append(f"loss_type={self.loss_type!r} (supported: {sorted(LOSS_TYPES)})")
        family = "sapo" if self.loss_type == "sapo" else "clip"
        method = _METHODS.get((family, self.importance_sampling_level))
        if method is None:
            bad.append(
                f"importance_sampling_level={self.importance_sampling_level!r} with "
                f"loss_type={self.loss_type!r}"
            )
        if bad:
            raise ValueError(f"sapo_torch.integrations.swift cannot reproduce: {', '.join(bad)}")
        return method  # type: ignore[return-value]

    def _compute_loss_and_metrics(
        self, model: Any, model_inputs: dict[str, Any], grpo_batch: Any
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """ms-swift's ``(loss, metrics_data)`` for one micro-batch, the loss canonical."""
        method = self._sapo_ref_check()
        mode = "train" if self.model.training else "eval"
        mask = grpo_batch.completion_mask.bool()
        logp, entropies = self._get_per_token_logps_and_entropies(
            model, model_inputs, grpo_batch, compute_entropy=self.compute_entropy
        )
        weights: torch.Tensor | None = None
        entropy_metrics: dict[str, Any] = {}
        if self.compute_entropy:
            entropy_metrics, weights = self._sapo_ref_entropy(entropies, mask)
        if self.overlong_filter and bool(grpo_batch.truncated_mask.any()):
            mask = mask & ~grpo_batch.truncated_mask.bool()[:, None]
        old = (
            logp.detach()
            if grpo_batch.old_per_token_logps is None
            else grpo_batch.old_per_token_logps
        )
        options: dict[str, Any] = {"method": method, "loss_agg": LOSS_TYPES[self.loss_type]}
        if method in ("sapo", "sapo-seq"):
            options.update(tau_pos=self.tau_pos, tau_neg=self.tau_neg)
        else:
            options.update(
                eps_low=self.epsilon_low, eps_high=self.epsilon_high, dual_clip=self.args.delta
            )
        if options["loss_agg"] != "token-mean":
            options["count_empty_rows"] = True
        if self.loss_type == "dr_grpo":
            options["norm_length"] = float(self.max_completion_length)
        if self.loss_type == "dapo":
            tokens = grpo_batch.num_items_in_batch / self.accelerator.num_processes
            options["normalizer"] = Normalizer(tokens, float(mask.shape[0]))
        rollout, rollout_metrics = self._sapo_ref_rollout(old, grpo_batch, mask)
        if rollout is not None:
            weights = rollout if weights is None else weights * rollout
        extra: dict[str, Any] = {}
        if weights is not None:
            extra["weights"] = weights.detach()
        if self.beta != 0.0 and not self.kl_in_reward:
            if rollout is not None:
                raise ValueError(
                    "sapo_torch.integrations.swift cannot reproduce rollout IS weights with "
                    "beta != 0 (ms-swift multiplies the KL term by them)"
                )
            extra.update(
                ref_logp=grpo_batch.ref_per_token_logps,
                kl_coef=float(self.beta),
                kl_estimator="low-var-k3",
            )
        missing = [k for k in ("weights", "ref_logp") if k in extra and not _has_keyword(k)]
        if missing:
            raise ValueError(
                f"this sapo_torch has no {missing} keyword (spec 0.2.0): the entropy mask, "
                "rollout IS weights or beta != 0 cannot be computed"
            )
        loss, spec = sapo_torch.policy_loss(
            logp,
            old.detach(),
            grpo_batch.advantages.detach(),
            mask,
            metrics=True,
            **options,
            **extra,
        )
        if self.loss_type == "dapo":
            loss = self._undo_gradient_accumulation_scaling(loss)
        metrics_data = self._sapo_ref_metrics(mode, mask, spec, entropy_metrics, method)
        if rollout_metrics:  # gathered as ms-swift does: one row per rank
            values = torch.stack(list(rollout_metrics.values())).detach().unsqueeze(0)
            gathered = self.accelerator.gather_for_metrics(values)
            out = dict(zip(rollout_metrics, gathered.nanmean(0).unbind()))
            for key, reduce in (("log_ppl_diff_max", torch.max), ("log_ppl_diff_min", torch.min)):
                if key in rollout_metrics:
                    out[key] = reduce(gathered[:, list(rollout_metrics).index(key)])
            metrics_data["rollout_correction"] = out
        return loss, metrics_data

    def _sapo_ref_entropy(
        self, entropies: torch.Tensor, mask: torch.Tensor
    ) -> tuple[dict[str, Any], torch.Tensor | None]:
        """ms-swift's entropy logs and, with ``top_entropy_quantile < 1``, its entropy mask
        (tokens at or above the batch's quantile), from the same entropies."""
        from accelerate.utils import gather

        entropies = entropies.masked_fill(~mask, float("nan"))
        out: dict[str, Any] = {}
        if self.args.log_entropy:
            per_row = gather(torch.nanmean(entropies, dim=1))
            out = {
                "entropy_logs": per_row.tolist(),
                "entropy_mean": per_row.nanmean().item(),
                "entropy_max": _grpo.nanmax(per_row).item(),
                "entropy_min": _grpo.nanmin(per_row).item(),
            }
        if self.top_entropy_quantile >= 1.0:
            return out, None
        threshold = torch.nanquantile(entropies.flatten().float(), 1 - self.top_entropy_quantile)
        out["entropy_threshold"] = threshold.item()
        return out, (entropies >= threshold).to(entropies.dtype)

    def _sapo_ref_rollout(
        self, old: torch.Tensor, grpo_batch: Any, mask: torch.Tensor
    ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """ms-swift's rollout IS weights (None where its options leave them off) and its
        rollout diagnostics, from its own methods, on the same condition as ms-swift."""
        wanted = (
            self.rollout_importance_sampling_mode is not None or self.log_rollout_offpolicy_metrics
        )
        local = grpo_batch.rollout_per_token_logps is not None
        if self.disable_rollout_importance_sampling or not wanted:
            return None, {}
        if not all(_grpo.gather_object([local])):
            return None, {}
        rollout = grpo_batch.rollout_per_token_logps
        metrics = self._compute_rollout_offpolicy_metrics(old, rollout, mask)
        log_ratio, weights = self._get_rollout_is_correction(old, rollout, mask)
        if log_ratio is not None:
            metrics.update(self._compute_is_correction_metrics(log_ratio, weights, mask))
        return (weights if self.rollout_importance_sampling_mode is not None else None), metrics

    def _sapo_ref_metrics(
        self,
        mode: str,
        mask: torch.Tensor,
        spec: dict[str, torch.Tensor],
        entropy_metrics: dict[str, Any],
        method: str,
    ) -> dict[str, Any]:
        """``metrics_data`` in ms-swift's layout (read by its ``_update_metrics``); the spec's
        metrics go straight to ``self._metrics[mode]`` under ``sapo_ref/``."""
        acc = self.accelerator
        data: dict[str, Any] = {
            "mode": mode,
            "entropy": entropy_metrics,
            "completion_mask": mask,
            "completion_token_count": mask.sum().clamp(min=1.0),
        }
        if "kl_ref/mean" in spec:
            data["kl"] = acc.gather_for_metrics(spec["kl_ref/mean"]).nanmean().item()
        if method not in ("sapo", "sapo-seq"):
            low, high, frac = (
                acc.gather_for_metrics(spec[k])
                for k in ("clip/low_frac", "clip/high_frac", "clip/frac")
            )
            data["clipping"] = {
                "low_clip_mean": low.nanmean().item(),
                "low_clip_min": _grpo.nanmin(low).item(),
                "high_clip_mean": high.nanmean().item(),
                "high_clip_max": _grpo.nanmax(high).item(),
                "region_clip_mean": frac.nanmean().item(),
            }
        for key, value in spec.items():
            self._metrics[mode][f"sapo_ref/{key}"].append(
                acc.gather_for_metrics(value.detach()).float().nanmean().item()
            )
        return data


class SapoRefGRPOTrainer(SapoRefLossMixin, _grpo.GRPOTrainer):
    """ms-swift's ``GRPOTrainer`` with the canonical policy loss; options are checked at
    construction."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sapo_ref_check()
