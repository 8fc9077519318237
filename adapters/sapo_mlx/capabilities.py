"""What ``sapo_mlx`` supports, as data: the conformance suite reads :data:`CAPABILITIES`."""

from __future__ import annotations

from typing import Any

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
    "metrics": True,
    "normalizer": True,
    # dtype -> {"value"/"grad": {"rtol", "atol"}, "reason": str} where this backend needs a
    # tolerance other than the spec's [tolerances.<dtype>]. Empty: none is needed, float64
    # included (its exponential is rebuilt from expm1, see sapo_mlx.numerics).
    "tolerance_deviations": {},
    "notes": (
        "float64 exists on the MLX CPU device only; float64 losses run on the CPU stream.",
        (
            "mx.exp/mx.sigmoid are float32-accurate in float64 (ml-explore/mlx#3047): the "
            "adapter builds e^x from expm1 and arithmetic, which are float64-accurate."
        ),
        (
            "MLX's float32 sum accumulates sequentially (~n ulps): the adapter sums in blocks."
        ),
        "Metrics are computed in float64 on the CPU stream, from the inputs as given.",
        (
            "Data checks of clauses 5.5, 8.5, 8.6 and the mask's 0/1 values need a host sync: "
            "they are in sapo_mlx.check_inputs, not in the lazy policy_loss."
        ),
    ),
}
