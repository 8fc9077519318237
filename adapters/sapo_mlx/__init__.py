r"""sapo_mlx: the SAPO-family policy losses of :mod:`sapo_ref` in MLX (Apple silicon; Linux CPU).

.. math::

    \mathcal{L} = -\frac{1}{D}\sum_{i,t} m_{it}\,\rho_{it}\,A_{it}\,f_{it}(x_{it}),\qquad
    f^\text{SAPO}(r) = \frac{4}{\tau}\,\sigma\big(\tau (r-1)\big)

:func:`policy_loss` evaluates the reference's own formula (:func:`sapo_ref.evaluate.evaluate`,
:func:`sapo_ref.metrics.compute_metrics`) on ``mx.array`` s, through ``mlx.core`` with an
accurate ``exp`` and ``sum`` (:mod:`sapo_mlx.namespace`), inside an ``mx.custom_function``
whose VJP is the closed-form gradient; it works under ``mx.grad``, ``mx.compile`` and
``mx.vmap``. :func:`to_mx` and :func:`to_numpy` convert without precision loss;
:mod:`sapo_mlx.distributed` gives the counts for micro-batches and ``mx.distributed``. The
clause 10 terms take the reference's keywords: per-token ``weights`` (constants) and a KL
penalty against ``ref_logp`` (``kl_coef``, ``kl_estimator``).

>>> import mlx.core as mx, sapo_mlx
>>> loss, _ = sapo_mlx.policy_loss(mx.zeros((2, 3)), mx.zeros((2, 3)),
...                                mx.array([1.0, -1.0]), mx.ones((2, 3), mx.bool_))
>>> abs(loss.item() - -(2 / 1.0 - 2 / 1.05) / 2) < 1e-6   # on-policy: -(2/tau_pos - 2/tau_neg)/2
True

Importing this package imports MLX, NumPy and :mod:`sapo_ref`, and no other framework.
"""

from __future__ import annotations

from .capabilities import CAPABILITIES
from .convert import compute_dtype, to_mx, to_numpy
from .distributed import global_normalizer, local_counts
from .loss import policy_loss
from .namespace import MLX

__version__ = "0.2.0"

__all__ = [
    "CAPABILITIES",
    "MLX",
    "__version__",
    "compute_dtype",
    "global_normalizer",
    "local_counts",
    "policy_loss",
    "to_mx",
    "to_numpy",
]
