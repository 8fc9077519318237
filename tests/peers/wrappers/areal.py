"""AReaL 1.0.4: ``sapo_loss_fn`` and ``ppo_actor_loss_fn`` of ``areal.utils.functional``.

Both take [N, T] advantages and a boolean loss mask, select the valid terms with
``torch.where`` and divide by the number of valid tokens of the call (token-mean only). The
PPO loss is called without its decoupled objective (``proximal_logprobs = old_logprobs``) and
without rejection sampling. AReaL's stat dict (per-token tensors for its logger) is not the
spec's clause 7.1 metrics and is not returned.
"""

from __future__ import annotations

from areal.utils.functional import ppo_actor_loss_fn, sapo_loss_fn

from . import config, per_token

__all__ = ["sapo", "ppo"]

_LEVEL = {"sapo": "token", "sapo-seq": "sequence", "grpo": "token", "gspo": "sequence"}


def sapo(logp, old_logp, advantages, mask, **options):
    """AReaL ``sapo_loss_fn`` (``importance_sampling_level`` token or sequence)."""
    cfg = config(options, ("sapo", "sapo-seq"))
    loss, _stats = sapo_loss_fn(
        logp,
        old_logp,
        per_token(advantages, logp),
        tau_pos=cfg.tau_pos,
        tau_neg=cfg.tau_neg,
        loss_mask=mask,
        importance_sampling_level=_LEVEL[cfg.method],
    )
    return loss


def ppo(logp, old_logp, advantages, mask, **options):
    """AReaL ``ppo_actor_loss_fn`` (``c_clip`` is the dual clip; sequence level is GSPO)."""
    cfg = config(options, ("grpo", "gspo"))
    loss, _stats = ppo_actor_loss_fn(
        logp,
        old_logp,
        old_logp,
        per_token(advantages, logp),
        eps_clip=cfg.eps_low,
        loss_mask=mask,
        eps_clip_higher=cfg.eps_high,
        c_clip=cfg.dual_clip,
        importance_sampling_level=_LEVEL[cfg.method],
    )
    return loss


_COMMON = {"dtypes": ["float64", "float32"], "metrics": False, "loss_aggs": ["token-mean"]}
sapo.sapo_capabilities = {**_COMMON, "methods": ["sapo", "sapo-seq"]}
ppo.sapo_capabilities = {**_COMMON, "methods": ["grpo", "gspo"]}
