"""TRL 1.16: ``GRPOTrainer._compute_loss``, TRL's own loss code, on given log-probabilities.

TRL's loss is a method of the trainer, reading a few attributes of ``self`` and getting the
per-token log-probabilities from ``self._get_per_token_logps_and_entropies(model, ...)``. The
method is called unbound on a stand-in ``self`` that holds only what it reads: the loss options
(``loss_type``, ``importance_sampling_level``, ``epsilon_low/high``, ``args.delta``,
``args.sapo_temperature_pos/neg``, ``max_completion_length``), the extras switched off
(``beta=0``, no entropy mask, no off-policy mask, no vLLM), one accumulation step, a real
single-process ``accelerate.Accelerator`` for its metric reductions, and a log-prob provider
returning the given ``logp``. Everything from the log-ratio to the aggregated loss is TRL's.

The terms of spec 0.2.0 map onto TRL's own: ``weights`` are the vLLM importance-sampling
correction (``use_vllm`` with ``vllm_importance_sampling_correction``, the ratio in
``inputs["importance_sampling_ratio"]``, [N] as [N, 1]), which scales the policy term only;
``ref_logp`` and ``kl_coef`` are ``inputs["ref_per_token_logps"]`` and ``beta`` (TRL's KL is
k3, unclipped, added per token before aggregation).
"""

from __future__ import annotations

import functools
from collections import defaultdict
from types import SimpleNamespace

import torch
from trl.trainer.grpo_trainer import GRPOTrainer

from . import config, require

__all__ = ["sapo", "grpo", "sapo_terms", "grpo_terms"]

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


def _trainer_self(
    logp, cfg, loss_type: str, level: str, corrected: bool = False
) -> SimpleNamespace:
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
        beta=float(cfg.kl_coef or 0.0),
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        use_vllm=corrected,
        vllm_importance_sampling_correction=corrected,
        aux_loss_enabled=False,
        _entropy_bonus_enabled=False,
        current_gradient_accumulation_steps=1,
        model=SimpleNamespace(training=True),
        accelerator=_accelerator(),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
    )


def _call(logp, old_logp, advantages, mask, cfg, loss_type: str, level: str, terms: dict):
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
    w, ref = terms.get("weights"), terms.get("ref_logp")
    if w is not None:
        w = w.to(logp.dtype)
        inputs["importance_sampling_ratio"] = w[:, None] if w.ndim == 1 else w
    if ref is not None:
        require(cfg.kl_estimator == "k3", f"kl_estimator={cfg.kl_estimator!r} (TRL's KL is k3)")
        inputs["ref_per_token_logps"] = ref
    me = _trainer_self(logp, cfg, loss_type, level, corrected=w is not None)
    return GRPOTrainer._compute_loss(me, None, inputs)


def sapo(logp, old_logp, advantages, mask, weights=None, ref_logp=None, **options):
    """TRL ``loss_type="sapo"``; ``importance_sampling_level="sequence"`` is ``sapo-seq``."""
    cfg = config(options, ("sapo", "sapo-seq"), "counted", has_ref_logp=ref_logp is not None)
    level = "token" if cfg.method == "sapo" else "sequence"
    terms = {"weights": weights, "ref_logp": ref_logp}
    return _call(logp, old_logp, advantages, mask, cfg, "sapo", level, terms)


def grpo(logp, old_logp, advantages, mask, weights=None, ref_logp=None, **options):
    """TRL ``loss_type`` grpo / bnpo / dr_grpo / luspo; sequence level is GSPO; ``delta``."""
    cfg = config(options, ("grpo", "gspo"), "counted", has_ref_logp=ref_logp is not None)
    level = "token" if cfg.method == "grpo" else "sequence"
    terms = {"weights": weights, "ref_logp": ref_logp}
    loss_type = _GRPO_LOSS_TYPE[cfg.loss_agg]
    return _call(logp, old_logp, advantages, mask, cfg, loss_type, level, terms)


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


def sapo_terms(logp, old_logp, advantages, mask, **options):
    """:func:`sapo` declaring the terms of spec 0.2.0 (clause 10) too."""
    return sapo(logp, old_logp, advantages, mask, **options)


def grpo_terms(logp, old_logp, advantages, mask, **options):
    """:func:`grpo` declaring the terms of spec 0.2.0 (clause 10) too."""
    return grpo(logp, old_logp, advantages, mask, **options)


# Weights as TRL's vLLM importance-sampling correction; TRL's KL penalty is k3 (beta). Apart
# from sapo/grpo so that their verdicts (tests/peers/test_peers.py) keep spec 0.1.0's inputs.
_TERMS = {"weights": True, "kl_estimators": ["k3"]}
sapo_terms.sapo_capabilities = {**sapo.sapo_capabilities, **_TERMS}
grpo_terms.sapo_capabilities = {**grpo.sapo_capabilities, **_TERMS}
