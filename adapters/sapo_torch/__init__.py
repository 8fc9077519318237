r"""sapo_torch: the SAPO-family policy losses of :mod:`sapo_ref` as one PyTorch autograd node.

.. math::

    \mathcal{L} = -\frac{1}{D}\sum_{i,t} m_{it}\,\rho_{it}\,A_{it}\,f_{it}(x_{it}),\qquad
    f^\text{SAPO}(r) = \frac{4}{\tau}\,\sigma\big(\tau (r-1)\big)

:func:`policy_loss` has the reference's keywords, defaults, validation messages and numerics
(selection masking, exact saturation, no clamp): token SAPO through one fused pass, every other
method through the reference's own array-API code on tensors. The forward computes the loss,
the closed-form gradient (and the metrics, on request) together and saves only the gradient
(one [N, T] buffer) for backward; it runs eagerly, under ``torch.compile(fullgraph=True)`` and
under ``torch.func`` transforms, on any device. bfloat16/float16 are computed in float32. The
clause 10 terms take the reference's keywords: per-token ``weights`` (detached) and a KL penalty
against ``ref_logp`` (``kl_coef``, ``kl_estimator``), whose gradient is minus the KL part.

>>> import torch, sapo_torch
>>> logp = torch.zeros(2, 3, requires_grad=True)
>>> loss, _ = sapo_torch.policy_loss(logp, torch.zeros(2, 3), torch.tensor([1.0, -1.0]),
...                                  torch.ones(2, 3, dtype=torch.bool))
>>> round(loss.item(), 6)   # on-policy: -(2/tau_pos - 2/tau_neg) / 2
-0.047619
>>> loss.backward(); round(logp.grad[0, 0].item(), 6)   # w = 1 at r = 1: -A / (R L)
-0.166667

Importing this package imports PyTorch, NumPy and :mod:`sapo_ref`, and no other framework.
"""

from __future__ import annotations

from ._function import PolicyLossFunction, compute_dtype
from .capabilities import CAPABILITIES
from .loss import check_inputs, policy_loss

__version__ = "0.2.0"

__all__ = [
    "CAPABILITIES",
    "PolicyLossFunction",
    "__version__",
    "check_inputs",
    "compute_dtype",
    "policy_loss",
]
