"""Metrics of clause 7.1 in MLX, lazily: nothing is computed unless the caller evaluates them.

The twin of :func:`sapo_ref.compute_metrics`; keys and definitions are the spec's
(:func:`sapo_ref.metric_keys`). A mean over an empty set is 0; the counts say it was empty.
"""

from __future__ import annotations

import math

import mlx.core as mx

from sapo_ref.config import LossConfig
from sapo_ref.metrics import metric_keys

from .evaluate import Prepared, gate_parts
from .numerics import accurate_sum, exp

__all__ = ["compute_metrics"]


def _mean(x: mx.array, sel: mx.array) -> mx.array:
    n = mx.sum(sel.astype(x.dtype))  # counts: exact
    return accurate_sum(mx.where(sel, x, 0.0).reshape(-1)) / mx.where(n > 0, n, 1.0)


def _extreme(x: mx.array, sel: mx.array, largest: bool) -> mx.array:
    picked = mx.where(sel, x, -math.inf if largest else math.inf)
    value = mx.max(picked) if largest else mx.min(picked)
    return mx.where(mx.any(sel), value, 0.0)


def _k1(delta: mx.array, valid: mx.array) -> mx.array:
    # KL(old || new) is +inf once new gives 0 mass to a sampled token (delta = -inf), as k3
    # says; the plain mean would meet inf - inf when delta = +inf occurs too.
    minus_inf = valid & (delta == -math.inf)
    mean = _mean(-mx.where(minus_inf, 0.0, delta), valid)
    return mx.where(mx.any(minus_inf), math.inf, mean)


def compute_metrics(p: Prepared, config: LossConfig) -> dict[str, mx.array]:
    """Every metric key of ``config.method`` as a 0-d ``mx.array`` (no gradient flows).

    >>> import mlx.core as mx, sapo_ref
    >>> from sapo_mlx.evaluate import prepare
    >>> p = prepare(mx.zeros((1, 2)), mx.zeros((1, 2)), mx.array([1.0]), mx.array([[1, 0]]), mx.float32)
    >>> m = compute_metrics(p, sapo_ref.resolve_config("sapo"))
    >>> m["tokens"].item(), m["gate/mean"].item()
    (1.0, 1.0)
    """
    valid = p.valid
    delta, adv, lengths = (mx.stop_gradient(a) for a in (p.delta, p.adv, p.lengths))
    dt = delta.dtype
    pos = valid & (adv > 0)
    neg = valid & (adv < 0)
    r = exp(delta)
    big = r == math.inf
    d_fin = mx.where(big, 0.0, delta)
    # k3 = (r - 1) - delta >= 0, with expm1 near r = 1 and +inf past overflow.
    k3 = mx.where(big, math.inf, mx.expm1(d_fin) - d_fin)
    out: dict[str, mx.array] = {
        "tokens": mx.sum(valid.astype(dt)),
        "rows": mx.sum((lengths > 0).astype(dt)),
        "tokens_pos": mx.sum(pos.astype(dt)),
        "tokens_neg": mx.sum(neg.astype(dt)),
        "ratio/mean": _mean(r, valid),
        "ratio/min": _extreme(r, valid, largest=False),
        "ratio/max": _extreme(r, valid, largest=True),
        "kl/k1": _k1(delta, valid),
        "kl/k3": _mean(k3, valid),
    }
    log_x = delta
    if config.sequence_value:
        rows = lengths > 0
        mu = accurate_sum(delta) / mx.where(rows, lengths, 1.0)
        s = exp(mu)
        out["seq_ratio/mean"] = _mean(s, rows)
        out["seq_ratio/min"] = _extreme(s, rows, largest=False)
        out["seq_ratio/max"] = _extreme(s, rows, largest=True)
        log_x = mx.expand_dims(mu, -1)
    gate = gate_parts(log_x, adv, config)
    if config.is_soft:
        out["gate/mean"] = _mean(gate.w, valid)
        out["gate/mean_pos"] = _mean(gate.w, pos)
        out["gate/mean_neg"] = _mean(gate.w, neg)
    else:
        low = _mean(gate.low.astype(dt), valid)
        high = _mean(gate.high.astype(dt), valid)
        dual = _mean(gate.dual.astype(dt), valid)
        out["clip/low_frac"] = low
        out["clip/high_frac"] = high
        out["clip/dual_frac"] = dual
        out["clip/frac"] = low + high + dual
    keys = metric_keys(config.method)
    assert set(out) == set(keys), sorted(set(out) ^ set(keys))  # spec and code agree
    return {k: out[k] for k in keys}
