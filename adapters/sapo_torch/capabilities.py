"""What ``sapo_torch`` supports, as data: the conformance suite reads :data:`CAPABILITIES`."""

from __future__ import annotations

from typing import Any

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
    # dtype -> {"value"/"grad": {"rtol", "atol"}, "reason": str} where this backend needs a
    # tolerance other than the spec's [tolerances.<dtype>]. Empty: none is needed.
    "tolerance_deviations": {},
    "notes": (
        (
            "bfloat16/float16 are computed in float32; the gradient is returned in the input "
            "dtype and the loss is float32 (float64 for float64 inputs)."
        ),
        (
            "Metrics are opt-in (policy_loss(..., metrics=True)) so that the default call is "
            "one lean pass; they are computed by sapo_ref's own code on the detached inputs."
        ),
        (
            "Data checks (clauses 5.5, 8.5, 8.6, a normalizer smaller than the shard's own "
            "counts) are the reference's only; a non-bool mask's 0/1 check runs eagerly (one "
            "host sync), not under torch.compile."
        ),
        (
            "First-order only: the fused node saves the closed-form gradient, so second "
            "derivatives through it are not available."
        ),
    ),
}
