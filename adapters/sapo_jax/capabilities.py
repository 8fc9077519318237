"""What ``sapo_jax`` supports, as data for the conformance suite (``sapo_jax.CAPABILITIES``)."""

from __future__ import annotations

from typing import Any

from sapo_ref import KL_ESTIMATOR_NAMES
from sapo_ref.config import LOSS_AGG_NAMES, METHOD_NAMES

__all__ = ["CAPABILITIES"]

#: A plain dict, the form ``sapo_conformance`` reads (its keys ``methods``, ``loss_aggs``,
#: ``dtypes``, ``metrics``, ``metrics_option``, ``tolerance_deviations``; the others document
#: the adapter).
CAPABILITIES: dict[str, Any] = {
    "package": "sapo_jax",
    "framework": "jax",
    "api": (
        "sapo_jax.policy_loss(logp, old_logp, advantages, mask, **options, weights=None, "
        "ref_logp=None, kl_coef=None, kl_estimator=None, metrics=False) "
        "-> (loss, metrics)"
    ),
    "methods": METHOD_NAMES,
    "loss_aggs": LOSS_AGG_NAMES,
    # Every dtype is checked at its own [tolerances.<dtype>] row of the spec.
    "dtypes": ("float64", "float32", "bfloat16", "float16"),
    # float64 needs jax_enable_x64, which sapo_jax never turns on itself: without it JAX
    # truncates float64 to float32 (sapo_jax warns with Float64TruncationWarning).
    "requires": {"float64": "jax_enable_x64"},
    "compute_dtype": {
        "float64": "float64",
        "float32": "float32",
        "bfloat16": "float32",
        "float16": "float32",
    },
    # Clause 8.9: each gradient in its input's dtype; the loss in the promoted input dtype,
    # the metrics in float64 when jax_enable_x64 is on (else the computation dtype).
    "grad_dtype": "input",
    # Metrics are opt-in (policy_loss(..., metrics=True)); a default call returns {}, so the
    # suite must not compare them unless it passes the option below.
    "metrics": False,
    "metrics_option": {"metrics": True},
    "normalizer": True,
    # Clause 10: per-token weights= and the KL penalty (ref_logp=, kl_coef=, kl_estimator=)
    # with every estimator of the spec.
    "weights": True,
    "kl_estimators": KL_ESTIMATOR_NAMES,
    # Clause 8.7: concrete inputs raise the reference's errors; under jit/vmap tracing invalid
    # data makes the loss and every gradient entry NaN.
    "data_checks": "eager: raise; traced: NaN",
    # Clause 8.9: d/d old_logp is the true derivative; clause 10.3: d/d ref_logp is minus the
    # KL part of d/d logp; advantages, mask and weights get zeros.
    "differentiable": ("logp", "old_logp", "ref_logp"),
    "transforms": ("jit", "grad", "value_and_grad", "vjp", "vmap", "shard_map"),
    # Declared tolerance deviations from spec [tolerances], by dtype, with the reason: none.
    "tolerance_deviations": {},
}
