"""sapo-ref: the canonical NumPy reference of SAPO (arXiv 2511.20347) and the policy losses it
unifies (GRPO, GSPO, GSPO-token), with closed-form gradients, in float64.

>>> import numpy as np, sapo_ref
>>> res = sapo_ref.policy_loss(np.zeros((2, 3)), np.zeros((2, 3)), np.array([1.0, -1.0]),
...                            np.ones((2, 3), bool))
>>> res.loss   # on-policy: -(2/tau_pos - 2/tau_neg) / 2
-0.04761904761904767
>>> float(res.grad[0, 0])  # w = 1 at r = 1: the unclipped gradient, -A / (R L)
-0.16666666666666666

Importing this package imports NumPy and array-api-compat, and no framework.
"""

from __future__ import annotations

from . import spec
from .advantages import group_advantages
from .aggregation import Normalizer, denominator, normalizer, token_weights
from .config import LOSS_AGG_NAMES, METHOD_NAMES, LossConfig, resolve_config
from .diagnostics import SequenceGateDiagnostics, sequence_gate_diagnostics
from .evaluate import Evaluation, evaluate
from .gates import (
    ClipParts,
    SapoParts,
    clip_parts,
    logistic_and_weight,
    safe_exp,
    sapo_gate,
    sapo_parts,
    sapo_parts_signed,
    sapo_weight,
    saturation_log_ratio,
)
from .loss import PolicyLossResult, policy_loss
from .metrics import compute_metrics, metric_keys
from .penalties import KL_ESTIMATOR_NAMES, kl_penalty
from .ratios import sequence_log_ratio, sequence_ratio, token_log_ratio, token_ratio

__version__ = "0.2.0"
SPEC_VERSION: str = spec.VERSION

__all__ = [
    "policy_loss",
    "PolicyLossResult",
    "LossConfig",
    "resolve_config",
    "Normalizer",
    "normalizer",
    "denominator",
    "token_weights",
    "evaluate",
    "Evaluation",
    "compute_metrics",
    "metric_keys",
    "kl_penalty",
    "KL_ESTIMATOR_NAMES",
    "sapo_gate",
    "sapo_weight",
    "sapo_parts",
    "sapo_parts_signed",
    "SapoParts",
    "clip_parts",
    "ClipParts",
    "logistic_and_weight",
    "safe_exp",
    "saturation_log_ratio",
    "token_log_ratio",
    "token_ratio",
    "sequence_log_ratio",
    "sequence_ratio",
    "group_advantages",
    "sequence_gate_diagnostics",
    "SequenceGateDiagnostics",
    "METHOD_NAMES",
    "LOSS_AGG_NAMES",
    "SPEC_VERSION",
    "spec",
    "__version__",
]
