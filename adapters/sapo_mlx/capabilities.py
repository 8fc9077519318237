"""What ``sapo_mlx`` supports, as data: the conformance suite reads :data:`CAPABILITIES`."""

from __future__ import annotations

from typing import Any

from sapo_ref import KL_ESTIMATOR_NAMES
from sapo_ref.config import LOSS_AGG_NAMES, METHOD_NAMES

from .convert import FLOAT_DTYPES

__all__ = ["CAPABILITIES"]

#: A plain dict (the conformance suite checks ``isinstance(caps, dict)``); treat it as read-only.
CAPABILITIES: dict[str, Any] = {
    "package": "sapo_mlx",
    "framework": "mlx",
    "dtypes": tuple(FLOAT_DTYPES),  # float64: CPU device only (MLX has no Metal float64)
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
    # tolerance other than the spec's [tolerances.<dtype>]. Empty: none is needed, float64
    # included (the namespace's exp is rebuilt from expm1, see sapo_mlx.namespace).
    "tolerance_deviations": {},
    "notes": (
        "float64 exists on the MLX CPU device only; float64 losses run on the CPU stream.",
        (
            "Clause 10 terms: weights and ref_logp enter sapo_ref.evaluate; the VJP gives "
            "ref_logp minus the KL part of the gradient and the weights zeros."
        ),
        (
            "The loss, gradient and metrics are sapo_ref's own formula run on mx.arrays; the "
            "namespace replaces mx.exp (float32-accurate, ml-explore/mlx#3047) and mx.sum "
            "(sequential) with accurate versions."
        ),
        (
            "Metrics are opt-in (policy_loss(..., metrics=True)) and lazy: computed in float64 "
            "on the CPU stream, from the inputs as given, only when evaluated."
        ),
        (
            "Eagerly (mx.grad included) data errors raise as in the reference, reading one "
            "flag back; under mx.compile/mx.vmap they make the loss and gradients NaN."
        ),
    ),
}
