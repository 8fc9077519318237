"""TRL 1.16: ``GRPOTrainer._compute_loss``, TRL's own loss code, on given log-probabilities.

TRL's loss is a method of the trainer, reading a few attributes of ``self`` and getting the
per-token log-probabilities from ``self._get_per_token_logps_and_entropies(model, ...)``. The
method is called unbound on a stand-in ``self`` that holds only what it reads: the loss options
(``loss_type``, ``importance_sampling_level``, ``epsilon_low/high``, ``args.delta``,
``args.sapo_temperature_pos/neg``, ``max_completion_length``), the extras switched off
(``beta=0``, no entropy mask, no off-policy mask, no vLLM), one accumulation step, a real
single-process ``accelerate.Accelerator`` for its metric reductions, and a log-prob provider
returning the given ``logp``. Everything from the log-ratio to the aggregated loss is TRL's.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from types import SimpleNamespace

import torch
from trl.trainer.grpo_trainer import GRPOTrainer

from . import config

__all__ = ["sapo", "grpo"]

# TRL's loss_type for each of our aggregations (clipped family); sapo aggregates like grpo.
_GRPO_LOSS_TYPE = {
    "seq-mean-token-mean": "grpo",
    "token-mean": "bnpo",
    "seq-mean-token-sum-norm": "dr_grpo",
    "seq-mean-token-sum": "luspo",
}


@functools.cache
def _accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def _trainer_self(logp, cfg, loss_type: str, level: str) -> SimpleNamespace:
    def logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, **kwargs):
        return logp, torch.zeros_like(logp), None

    args = SimpleNamespace(
        delta=cfg.dual_clip,
        sapo_temperature_pos=cfg.tau_pos,
        sapo_temperature_neg=cfg.tau_neg,
        use_bias_correction_kl=False,
    )
    return SimpleNamespace(
        _get_per_token_logps_and_entropies=logps_and_entropies,
        args=args,
        loss_type=loss_type,
        importance_sampling_level=level,
        epsilon_low=cfg.eps_low,
        epsilon_high=cfg.eps_high,
        max_completion_length=cfg.norm_length,
        beta=0.0,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        use_vllm=False,
        aux_loss_enabled=False,
        _entropy_bonus_enabled=False,
        current_gradient_accumulation_steps=1,
        model=SimpleNamespace(training=True),
        accelerator=_accelerator(),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
    )


def _call(logp, old_logp, advantages, mask, cfg, loss_type: str, level: str):
    n = logp.shape[0]
    empty = torch.zeros(n, 0, dtype=torch.long)
    inputs = {
        "prompt_ids": empty,
        "prompt_mask": empty,
        "completion_ids": torch.zeros(logp.shape, dtype=torch.long),
        "completion_mask": mask.int(),  # TRL builds it as int from the EOS position
        "advantages": advantages,
        "old_per_token_logps": old_logp,
    }
    return GRPOTrainer._compute_loss(_trainer_self(logp, cfg, loss_type, level), None, inputs)


def sapo(logp, old_logp, advantages, mask, **options):
    """TRL ``loss_type="sapo"``; ``importance_sampling_level="sequence"`` is ``sapo-seq``."""
    cfg = config(options, ("sapo", "sapo-seq"), "counted")
    level = "token" if cfg.method == "sapo" else "sequence"
    return _call(logp, old_logp, advantages, mask, cfg, "sapo", level)


def grpo(logp, old_logp, advantages, mask, **options):
    """TRL ``loss_type`` grpo / bnpo / dr_grpo / luspo; sequence level is GSPO; ``delta``."""
    cfg = config(options, ("grpo", "gspo"), "counted")
    level = "token" if cfg.method == "grpo" else "sequence"
    return _call(logp, old_logp, advantages, mask, cfg, _GRPO_LOSS_TYPE[cfg.loss_agg], level)


_COMMON = {"dtypes": ["float64", "float32"], "metrics": False, "count_empty_rows": "counted"}
sapo.sapo_capabilities = {
    **_COMMON,
    "methods": ["sapo", "sapo-seq"],
    "loss_aggs": ["seq-mean-token-mean"],
}
grpo.sapo_capabilities = {
    **_COMMON,
    "methods": ["grpo", "gspo"],
    "loss_aggs": list(_GRPO_LOSS_TYPE),
}
