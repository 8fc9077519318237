"""What ``sapo_torch`` supports, as data: the conformance suite reads :data:`CAPABILITIES`."""

from __future__ import annotations

from typing import Any

from sapo_ref import KL_ESTIMATOR_NAMES
from sapo_ref.config import LOSS_AGG_NAMES, METHOD_NAMES

__all__ = ["CAPABILITIES"]

#: A plain dict (the conformance suite checks ``isinstance(caps, dict)``); treat it as read-only.
CAPABILITIES: dict[str, Any] = {
    "package": "sapo_torch",
    "framework": "torch",
    "dtypes": ("float64", "float32", "bfloat16", "float16"),
    "methods": METHOD_NAMES,
    "loss_aggs": LOSS_AGG_NAMES,
    # Metrics are opt-in (policy_loss(..., metrics=True)); a default call returns {}, so the
    # suite must not compare them unless it passes the option below.
    "metrics": False,
    "metrics_option": {"metrics": True},
    "normalizer": True,
    # Clause 10: per-token weights= and the KL penalty (ref_logp=, kl_coef=, kl_estimator=)
    # with every estimator of the spec.
    "weights": True,
    "kl_estimators": KL_ESTIMATOR_NAMES,
    # dtype -> {"value"/"grad": {"rtol", "atol"}, "reason": str} where this backend needs a
    # tolerance other than the spec's [tolerances.<dtype>]. Empty: none is needed.
    "tolerance_deviations": {},
    "notes": (
        (
            "bfloat16/float16 are computed in float32; the loss is returned in the promoted "
            "dtype of the inputs and the gradient in the dtype of logp (clause 8.9)."
        ),
        (
            "Metrics are opt-in (policy_loss(..., metrics=True)) and computed in the same pass: "
            "the fused token-SAPO pass folds their reductions in; other methods run "
            "sapo_ref.compute_metrics on the same evaluation."
        ),
        (
            "Eager calls raise the reference's data errors; under torch.compile and torch.func "
            "transforms shape/dtype/option checks raise at trace time and invalid data makes "
            "the loss and every gradient entry NaN (clause 8.7)."
        ),
        (
            "First-order only: the node saves the closed-form gradient, so second "
            "derivatives through it are not available."
        ),
        (
            "Clause 10 terms: the fused token-SAPO pass folds weights into its per-token "
            "coefficient and adds the KL part from sapo_ref.kl_penalty; other methods run "
            "sapo_ref.evaluate with the terms. ref_logp gets minus the KL part of the gradient "
            "(old_logp minus the policy part), weights none; only the buffers the requested "
            "gradients need are saved."
        ),
    ),
}
