"""Liger-Kernel 0.8.5: the loss math of its chunked fused-linear GRPO loss, in eager torch.

``LigerFusedLinearGRPOFunction.ppo_loss_fn`` is the per-chunk loss the fused kernel applies to
the log-probabilities it computes from hidden states and the LM head; it is called here on the
given log-probabilities (one chunk = the whole batch, ``full_attention_mask`` = the mask, as
the fused path passes it; no KL term, ``beta=0``). The fused hidden-state path itself (custom
backward through the LM head) is not exercised: it cannot produce arbitrary log-probabilities
(they must be <= 0 and come from a softmax). Liger takes advantages per sequence only
([N]: it unsqueezes them), and refuses sequence-level SAPO.
"""

from __future__ import annotations

from liger_kernel.chunked_loss.grpo_loss import LigerFusedLinearGRPOFunction

from . import config, require

__all__ = ["sapo", "grpo"]

# Liger's loss_type for each of our aggregations (clipped family).
_GRPO_LOSS_TYPE = {
    "seq-mean-token-mean": "grpo",
    "token-mean": "bnpo",
    "seq-mean-token-sum-norm": "dr_grpo",
}


def _call(logp, old_logp, advantages, mask, cfg, loss_type: str, level: str):
    require(advantages.ndim == 1, "advantages per token (Liger takes one per sequence)")
    m = mask.int()  # the completion mask dtype TRL hands to Liger
    loss, _metrics = LigerFusedLinearGRPOFunction.ppo_loss_fn(
        logp,
        m,
        advantages,
        m,
        old_per_token_logps=old_logp,
        beta=0.0,
        epsilon_low=cfg.eps_low,
        epsilon_high=cfg.eps_high,
        loss_type=loss_type,
        max_completion_length=cfg.norm_length,
        importance_sampling_level=level,
        sapo_temperature_pos=cfg.tau_pos,
        sapo_temperature_neg=cfg.tau_neg,
        delta=cfg.dual_clip,
    )
    return loss


def sapo(logp, old_logp, advantages, mask, **options):
    """Liger ``loss_type="sapo"`` (token level only)."""
    cfg = config(options, ("sapo",), "counted")
    return _call(logp, old_logp, advantages, mask, cfg, "sapo", "token")


def grpo(logp, old_logp, advantages, mask, **options):
    """Liger ``loss_type`` grpo / bnpo / dr_grpo; sequence level is GSPO; ``delta`` the dual clip."""
    cfg = config(options, ("grpo", "gspo"), "counted")
    level = "token" if cfg.method == "grpo" else "sequence"
    return _call(logp, old_logp, advantages, mask, cfg, _GRPO_LOSS_TYPE[cfg.loss_agg], level)


_COMMON = {
    "dtypes": ["float64", "float32"],
    "metrics": False,
    "advantages": ["sequence"],
    "count_empty_rows": "counted",
}
sapo.sapo_capabilities = {**_COMMON, "methods": ["sapo"], "loss_aggs": ["seq-mean-token-mean"]}
grpo.sapo_capabilities = {
    **_COMMON,
    "methods": ["grpo", "gspo"],
    "loss_aggs": list(_GRPO_LOSS_TYPE),
}
