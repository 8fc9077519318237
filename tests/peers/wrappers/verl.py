"""verl 0.9.1: the policy losses of ``verl.trainer.ppo.core_algos``, looked up in its registry.

verl takes [N, T] advantages and an integer response mask (the tokenizer's attention mask);
its options come from an ``ActorConfig``, and ``config.global_batch_info`` is passed on to
``agg_loss`` (so ``norm_length`` is verl's ``loss_scale_factor``). verl's own metric dict
(``actor/pg_clipfrac``...) is not the spec's clause 7.1 metrics and is not returned.
"""

from __future__ import annotations

from typing import Any

from verl.trainer.ppo.core_algos import get_policy_loss_fn
from verl.workers.config import ActorConfig

from . import config, per_token

__all__ = ["sapo", "vanilla", "gspo"]

_AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


def _actor_config(**fields: Any) -> ActorConfig:
    # The batch-size fields are required by ActorConfig's validation and unused by the losses.
    return ActorConfig(
        strategy="fsdp",
        ppo_mini_batch_size=1,
        ppo_micro_batch_size_per_gpu=1,
        rollout_n=1,
        **fields,
    )


def _call(mode: str, logp, old_logp, advantages, mask, loss_agg: str, actor: ActorConfig):
    loss, _verl_metrics = get_policy_loss_fn(mode)(
        old_log_prob=old_logp,
        log_prob=logp,
        advantages=per_token(advantages, logp),
        response_mask=mask.long(),
        loss_agg_mode=loss_agg,
        config=actor,
    )
    return loss


def _batch_info(cfg) -> dict[str, Any]:
    return {"loss_scale_factor": cfg.norm_length} if cfg.norm_length is not None else {}


def sapo(logp, old_logp, advantages, mask, **options):
    """verl ``loss_mode="sapo"`` (``compute_policy_loss_sapo``)."""
    cfg = config(options, ("sapo",), "excluded")
    actor = _actor_config(tau_pos=cfg.tau_pos, tau_neg=cfg.tau_neg)
    return _call("sapo", logp, old_logp, advantages, mask, cfg.loss_agg, actor)


def vanilla(logp, old_logp, advantages, mask, **options):
    """verl ``loss_mode="vanilla"`` (PPO/GRPO clip; ``clip_ratio_c`` is verl's dual clip)."""
    cfg = config(options, ("grpo",), "excluded")
    fields: dict[str, Any] = dict(
        clip_ratio_low=cfg.eps_low, clip_ratio_high=cfg.eps_high, global_batch_info=_batch_info(cfg)
    )
    if cfg.dual_clip is not None:  # otherwise verl's own default (3.0) stays: it is always on
        fields["clip_ratio_c"] = cfg.dual_clip
    return _call("vanilla", logp, old_logp, advantages, mask, cfg.loss_agg, _actor_config(**fields))


def gspo(logp, old_logp, advantages, mask, **options):
    """verl ``loss_mode="gspo"`` (written in the GSPO-token form; has no dual clip option)."""
    cfg = config(options, ("gspo-token",), "excluded")
    actor = _actor_config(
        clip_ratio_low=cfg.eps_low, clip_ratio_high=cfg.eps_high, global_batch_info=_batch_info(cfg)
    )
    return _call("gspo", logp, old_logp, advantages, mask, cfg.loss_agg, actor)


_COMMON = {"dtypes": ["float64", "float32"], "metrics": False}
# SAPO's aggregation is hard-coded to seq-mean-token-mean (loss_agg_mode is ignored).
sapo.sapo_capabilities = {**_COMMON, "methods": ["sapo"], "loss_aggs": ["seq-mean-token-mean"]}
vanilla.sapo_capabilities = {**_COMMON, "methods": ["grpo"], "loss_aggs": _AGGS}
gspo.sapo_capabilities = {**_COMMON, "methods": ["gspo-token"], "loss_aggs": _AGGS}
