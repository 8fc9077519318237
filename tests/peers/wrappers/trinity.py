"""Trinity-RFT 0.6.0: ``SAPOPolicyLossFn`` of ``trinity.algorithm.policy_loss_fn``.

Called as Trinity's verl backend calls it (keyword names mapped by its key mapper), with [N, T]
advantages and an integer action mask. Its constructor asserts ``tau_neg >= tau_pos``; its
``seq-mean-token-sum-norm`` divides the token sum by the length only (not by the rows), which
is not clause 3.5, so that aggregation is not declared. Trinity's metric dict (``sapo_loss``,
``avg_soft_gate``...) is not the spec's clause 7.1 metrics and is not returned.
"""

from __future__ import annotations

from trinity.algorithm.policy_loss_fn.sapo_policy_loss import SAPOPolicyLossFn

from . import config, per_token

__all__ = ["sapo"]


def sapo(logp, old_logp, advantages, mask, **options):
    """Trinity ``SAPOPolicyLossFn(tau_pos, tau_neg, loss_agg_mode)``."""
    cfg = config(options, ("sapo",), "counted")
    fn = SAPOPolicyLossFn(
        backend="verl", tau_pos=cfg.tau_pos, tau_neg=cfg.tau_neg, loss_agg_mode=cfg.loss_agg
    )
    loss, _metrics = fn(
        logp,
        old_log_probs=old_logp,
        response_mask=mask.long(),
        advantages=per_token(advantages, logp),
    )
    return loss


sapo.sapo_capabilities = {
    "methods": ["sapo"],
    "loss_aggs": ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"],
    "dtypes": ["float64", "float32"],
    "metrics": False,
    "count_empty_rows": "counted",  # the seq-mean modes take .mean() over every row
    "temperatures": "tau_neg>=tau_pos",  # asserted by the constructor
}
