r"""sapo_mlx: the SAPO-family policy losses of :mod:`sapo_ref` in MLX (Apple silicon; Linux CPU).

.. math::

    \mathcal{L} = -\frac{1}{D}\sum_{i,t} m_{it}\,\rho_{it}\,A_{it}\,f_{it}(x_{it}),\qquad
    f^\text{SAPO}(r) = \frac{4}{\tau}\,\sigma\big(\tau (r-1)\big)

:func:`policy_loss` has the reference's keywords, defaults, validation messages and numerics
(selection masking, exact saturation, no clamp), returns lazy ``(loss, metrics)`` and is
differentiable with a closed-form VJP under ``mx.grad``, ``mx.compile`` and ``mx.vmap``.
float64 reaches float64 accuracy although MLX's own ``exp`` does not (see
:mod:`sapo_mlx.numerics`); :func:`to_mx` and :func:`to_numpy` convert without precision loss.

>>> import mlx.core as mx, sapo_mlx
>>> loss, metrics = sapo_mlx.policy_loss(mx.zeros((2, 3)), mx.zeros((2, 3)),
...                                      mx.array([1.0, -1.0]), mx.ones((2, 3), mx.bool_))
>>> abs(loss.item() - -(2 / 1.0 - 2 / 1.05) / 2) < 1e-7   # on-policy: -(2/tau_pos - 2/tau_neg)/2
True

Importing this package imports MLX, NumPy and :mod:`sapo_ref`, and no other framework.
"""

from __future__ import annotations

from .capabilities import CAPABILITIES
from .convert import compute_dtype, to_mx, to_numpy
from .distributed import global_normalizer
from .gates import clip_parts, sapo_parts
from .loss import check_inputs, normalizer, policy_loss
from .metrics import compute_metrics
from .numerics import exp, logistic_and_weight

__version__ = "0.1.0"

__all__ = [
    "CAPABILITIES",
    "__version__",
    "check_inputs",
    "clip_parts",
    "compute_dtype",
    "compute_metrics",
    "exp",
    "global_normalizer",
    "logistic_and_weight",
    "normalizer",
    "policy_loss",
    "sapo_parts",
    "to_mx",
    "to_numpy",
]
