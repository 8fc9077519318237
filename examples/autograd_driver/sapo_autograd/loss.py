r"""SAPO-family policy losses written with HIPS autograd: a worked framework port.

The loss is written once in ``autograd.numpy`` and differentiated by autograd itself; the
conformance suite checks that gradient (``sapo-conformance --impl sapo_autograd.loss:policy_loss
--framework autograd``). Clause numbers are those of the sapo-ref specification.

.. math::

    \mathcal{L} = -\frac{1}{D}\sum_{i,t} m_{it}\,\rho_{it}\,A_{it}\,f_{it}(x_{it})

Every ``where`` below that guards an exponential selects its *input*, not only its output:
autodiff pulls a zero cotangent through the branch ``where`` does not select, and
``0 * inf = NaN`` if that branch overflowed (the trap behind NaN gradients from padding,
clause 6.1, and from ``exp`` past 88.7 in float32, clause 6.3).

>>> import numpy as np
>>> from autograd import grad
>>> lp, old = np.zeros((1, 2)), np.zeros((1, 2))
>>> adv, mask = np.ones(1), np.ones((1, 2), bool)
>>> float(policy_loss(lp, old, adv, mask))  # -(2/tau) A at r = 1 (clause 2.1)
-2.0
>>> grad(policy_loss)(lp, old, adv, mask).tolist()  # -c A on-policy (clause 5.2)
[[-0.5, -0.5]]
"""

from __future__ import annotations

import math
from typing import Any

import autograd.numpy as anp
import numpy as np
from autograd.extend import defvjp, primitive

__all__ = ["policy_loss", "METHODS", "LOSS_AGGS"]

#: Clause 4.1: each method's parameters and their defaults.
METHODS: dict[str, dict[str, float | None]] = {
    "sapo": {"tau_pos": 1.0, "tau_neg": 1.05},
    "sapo-seq": {"tau_pos": 1.0, "tau_neg": 1.05},
    "grpo": {"eps_low": 0.2, "eps_high": 0.2, "dual_clip": None},
    "gspo": {"eps_low": 3e-4, "eps_high": 4e-4, "dual_clip": None},
    "gspo-token": {"eps_low": 3e-4, "eps_high": 4e-4, "dual_clip": None},
}
LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
#: Clause 6.3: tau * (r - 1) past which every SAPO output is at its limit.
X_SAT = 1e30


@primitive
def _value_of_first(value: Any, carrier: Any) -> Any:
    """``value``'s value with ``carrier``'s gradient: sg[s_i] * r_it / sg[r_it] of clause 2.8
    in log space, without forming ``x - sg(x)`` (which is NaN at an infinite log-ratio)."""
    return value


# No gradient to ``value`` (zeros, not 0 * g: g may be infinite, clause 5.4); all of it to ``carrier``.
defvjp(
    _value_of_first,
    lambda ans, value, carrier: lambda g: anp.zeros(anp.shape(g)),
    lambda ans, value, carrier: lambda g: g,
)


def _logistic(z: Any) -> Any:
    """sigma(z), with each branch's exponential fed only arguments where it cannot overflow."""
    pos = z >= 0
    z_pos = anp.where(pos, z, 0.0)
    z_neg = anp.where(pos, 0.0, z)
    return anp.where(pos, 1.0 / (1.0 + anp.exp(-z_pos)), anp.exp(z_neg) / (1.0 + anp.exp(z_neg)))


def _sapo_gate(x: Any, tau: np.ndarray) -> Any:
    """Clause 2.1 with the saturation of clause 6.3: f = (4/tau) sigma(tau expm1(min(x, x_sat)))."""
    x_sat = np.log1p(X_SAT / tau).astype(tau.dtype)
    return (4.0 / tau) * _logistic(tau * anp.expm1(anp.minimum(x, x_sat)))


def _clip_term(
    x: Any, adv: np.ndarray, c: np.ndarray, eps_low: float, eps_high: float, dual_clip: float | None
) -> Any:
    """c * A * g(r) of clauses 2.4-2.6 with r = e^x; r = +inf past the largest finite exponent
    and the unbounded c*A*r (A < 0, no dual clip) as -exp(x + log|cA|) there (5.4, 6.3)."""
    dtype = c.dtype
    big = x > math.log(float(np.finfo(dtype).max))
    r = anp.where(big, np.inf, anp.exp(anp.where(big, 0.0, x)))
    hi, lo = dtype.type(1.0 + eps_high), dtype.type(1.0 - eps_low)
    g_pos = anp.minimum(r, hi)
    g_neg = anp.maximum(r, lo)
    if dual_clip is not None:
        g_neg = anp.minimum(g_neg, dtype.type(dual_clip))
    g = anp.where(adv > 0, g_pos, anp.where(adv < 0, g_neg, 0.0))  # A = 0: 0, never 0 * inf (5.1)
    ca = c * adv
    band = big & (adv < 0) & (dual_clip is None)
    log_ca = np.log(np.where(band, -ca, 1.0))
    tail = -anp.exp(anp.where(band, x, 0.0) + log_ca)
    return anp.where(band, tail, ca * anp.where(band, 0.0, g))


def _options(method: str, loss_agg: str, given: dict[str, Any]) -> dict[str, Any]:
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    if loss_agg not in LOSS_AGGS:
        raise ValueError(f"loss_agg must be one of {', '.join(LOSS_AGGS)}; got {loss_agg!r}")
    params = dict(METHODS[method])
    for key, value in given.items():
        if key == "norm_length":
            continue
        if key not in params:
            raise ValueError(f"{key} is not a parameter of method {method!r} (clause 8.4)")
        params[key] = value
    norm_length = given.get("norm_length")
    if (loss_agg == "seq-mean-token-sum-norm") != (norm_length is not None):
        raise ValueError(
            "norm_length is required by seq-mean-token-sum-norm and refused by the others (3.5)"
        )
    params["norm_length"] = norm_length
    return params


def policy_loss(
    logp: Any,
    old_logp: Any,
    advantages: Any,
    mask: Any,
    *,
    method: str = "sapo",
    loss_agg: str = "seq-mean-token-mean",
    **options: Any,
) -> Any:
    """The loss (0-d) of clause 1.7 for ``method`` and ``loss_agg``; autograd gives d/d logp.

    ``logp`` may be an autograd box; the other inputs are constants. float16 computes in float32
    (clause 6.4) and the gradient comes back in float16.
    """
    p = _options(method, loss_agg, options)
    dtype = np.result_type(getattr(logp, "dtype", np.float64))
    compute = np.float64 if dtype == np.float64 else np.float32
    valid = np.asarray(mask) != 0
    # Clause 6.1: select before any arithmetic, so padding (NaN, inf) reaches neither value nor grad.
    lp = anp.where(valid, logp.astype(compute) if dtype != compute else logp, 0.0)
    old = np.where(valid, np.asarray(old_logp, compute), 0.0)
    adv = np.asarray(advantages, compute)
    adv = np.where(valid, np.broadcast_to(adv[:, None] if adv.ndim == 1 else adv, valid.shape), 0.0)
    delta = lp - old  # clause 1.3; no clamp (clause 6.2)

    # Clauses 1.2, 3.1-3.7: c_it = rho_it / D from the row lengths and the two batch counts.
    lengths = valid.sum(axis=1).astype(compute)
    rows = float(np.count_nonzero(lengths))
    den = {
        "token-mean": float(valid.sum()),
        "seq-mean-token-mean": rows,
        "seq-mean-token-sum": rows,
        "seq-mean-token-sum-norm": rows * (p["norm_length"] or 0.0),
    }[loss_agg]
    if den == 0:  # clause 3.7: 0/0 is 0, loss and gradient
        return anp.sum(lp * 0.0)
    safe_len = np.maximum(lengths, 1.0)[:, None]
    rho = 1.0 / safe_len if loss_agg == "seq-mean-token-mean" else np.ones_like(safe_len)
    c = np.where(valid, (rho / compute(den)).astype(compute), 0.0).astype(compute)

    x = delta
    if method in ("sapo-seq", "gspo", "gspo-token"):  # clause 1.4: the row's mean log-ratio
        mu = anp.sum(delta, axis=1, keepdims=True) / safe_len
        x = anp.where(valid, mu, 0.0)
        if method == "gspo-token":  # clause 2.8: value s_i, gradient through the token's own delta
            x = _value_of_first(x, delta)
    if method in ("sapo", "sapo-seq"):
        tau = np.where(adv > 0, p["tau_pos"], p["tau_neg"]).astype(compute)  # clause 1.6
        weighted = c * adv * _sapo_gate(x, tau)
    else:
        weighted = _clip_term(x, adv, c, p["eps_low"], p["eps_high"], p["dual_clip"])
    return 0.0 - anp.sum(anp.where(valid, weighted, 0.0))


policy_loss.sapo_capabilities = {"metrics": False}
