"""Metrics of clause 7.1, on valid tokens only, generic over array namespaces.

Keys and definitions are the spec's (``sapo_ref.spec.METRICS``). A mean over an empty set is 0;
the companion counts say when a set was empty.
"""

from __future__ import annotations

import math
from typing import Any

from . import spec
from ._xp import namespace
from .config import LossConfig
from .evaluate import Evaluation
from .gates import safe_exp

__all__ = ["compute_metrics", "metric_keys"]


def metric_keys(method: str, *, kl: bool = False, weights: bool = False) -> tuple[str, ...]:
    """The metric keys ``method`` reports (clause 7.1), with a KL penalty / per-token weights."""
    return spec.method_metrics(method, kl=kl, weights=weights)


def _mean(xp: Any, x: Any, sel: Any) -> Any:
    zero = xp.zeros_like(x)
    n = xp.sum(xp.astype(sel, x.dtype))
    total = xp.sum(xp.where(sel, x, zero))
    return total / xp.where(n > 0, n, xp.ones_like(n))


def _extreme(xp: Any, x: Any, sel: Any, largest: bool) -> Any:
    fill = xp.full_like(x, -math.inf if largest else math.inf)
    picked = xp.where(sel, x, fill)
    value = xp.max(picked) if largest else xp.min(picked)
    return xp.where(xp.any(sel), value, xp.zeros_like(value))


def _k1(xp: Any, delta: Any, valid: Any) -> Any:
    # KL(old || new) is +inf as soon as new gives 0 mass to a sampled token (delta = -inf), as
    # k3 says; the plain mean would meet inf - inf when delta = +inf occurs too.
    minus_inf = valid & (delta == -math.inf)
    mean = _mean(xp, -xp.where(minus_inf, xp.zeros_like(delta), delta), valid)
    return xp.where(xp.any(minus_inf), xp.full_like(mean, math.inf), mean)


def compute_metrics(ev: Evaluation, config: LossConfig) -> dict[str, Any]:
    """Every metric key of ``config.method`` as a 0-d array (clause 7.1)."""
    p = ev.prepared
    xp = namespace(p.delta)
    valid, delta, adv = p.valid, p.delta, p.adv
    dt = delta.dtype
    pos = valid & (adv > 0)
    neg = valid & (adv < 0)
    r = safe_exp(delta)
    big = r == math.inf
    d_fin = xp.where(big, xp.zeros_like(delta), delta)
    # k3 = (r - 1) - delta >= 0, with expm1 for accuracy near r = 1 and +inf past overflow.
    k3 = xp.where(big, xp.full_like(delta, math.inf), xp.expm1(d_fin) - d_fin)
    out: dict[str, Any] = {
        "tokens": xp.sum(xp.astype(valid, dt)),
        "rows": xp.sum(xp.astype(p.lengths > 0, dt)),
        "tokens_pos": xp.sum(xp.astype(pos, dt)),
        "tokens_neg": xp.sum(xp.astype(neg, dt)),
        "ratio/mean": _mean(xp, r, valid),
        "ratio/min": _extreme(xp, r, valid, largest=False),
        "ratio/max": _extreme(xp, r, valid, largest=True),
        "kl/k1": _k1(xp, delta, valid),
        "kl/k3": _mean(xp, k3, valid),
    }
    if config.sequence_value:
        one = xp.ones_like(p.lengths)
        mu = xp.sum(delta, axis=1) / xp.where(p.lengths > 0, p.lengths, one)
        s = safe_exp(mu)
        rows = p.lengths > 0
        out["seq_ratio/mean"] = _mean(xp, s, rows)
        out["seq_ratio/min"] = _extreme(xp, s, rows, largest=False)
        out["seq_ratio/max"] = _extreme(xp, s, rows, largest=True)
    if config.is_soft:
        w = ev.gate.w
        out["gate/mean"] = _mean(xp, w, valid)
        out["gate/mean_pos"] = _mean(xp, w, pos)
        out["gate/mean_neg"] = _mean(xp, w, neg)
    else:
        g = ev.gate
        low = _mean(xp, xp.astype(g.low, dt), valid)
        high = _mean(xp, xp.astype(g.high, dt), valid)
        dual = _mean(xp, xp.astype(g.dual, dt), valid)
        out["clip/low_frac"] = low
        out["clip/high_frac"] = high
        out["clip/dual_frac"] = dual
        out["clip/frac"] = low + high + dual
    if ev.kl is not None:
        out["kl_ref/mean"] = _mean(xp, ev.kl, valid)
    if ev.token_scale is not None:
        out["weights/mean"] = _mean(xp, ev.token_scale, valid)
    keys = metric_keys(config.method, kl=ev.kl is not None, weights=ev.token_scale is not None)
    assert set(out) == set(keys), sorted(set(out) ^ set(keys))  # spec and code agree
    return {k: out[k] for k in keys}
