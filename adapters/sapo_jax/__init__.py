r"""sapo_jax: the SAPO-family policy losses in JAX (``jax.custom_vjp`` with the closed-form
gradient), numerically the reference :mod:`sapo_ref`.

.. math::

    \mathcal{L} = -\frac{1}{D}\sum_{i,t} m_{it}\,\rho_{it}\,A_{it}\,f_{it}(x_{it}),\qquad
    \nabla_{\log\pi_\theta}\mathcal{L}\ \text{in closed form (one saved [N, T] residual)}

>>> import jax, jax.numpy as jnp, sapo_jax
>>> z = jnp.zeros((2, 3), jnp.float32)
>>> loss, _ = sapo_jax.policy_loss(z, z, jnp.array([1.0, -1.0], jnp.float32), z == 0)
>>> round(float(loss), 6)  # on-policy: -(2/tau_pos - 2/tau_neg) / 2
-0.047619

The clause 10 terms take the reference's keywords: per-token ``weights`` (a zero cotangent) and
a KL penalty against ``ref_logp`` (``kl_coef``, ``kl_estimator``).

Importing this package imports JAX and :mod:`sapo_ref` only, and never changes JAX's global
configuration: float64 needs ``jax.config.update("jax_enable_x64", True)`` by the caller.
"""

from __future__ import annotations

from . import distributed
from .capabilities import CAPABILITIES
from .distributed import local_counts
from .inputs import Float64TruncationWarning
from .loss import policy_loss

#: The batch's own counts, as :func:`sapo_jax.distributed.local_counts` (the name it had first).
normalizer = local_counts

__all__ = [
    "CAPABILITIES",
    "Float64TruncationWarning",
    "distributed",
    "local_counts",
    "normalizer",
    "policy_loss",
]
