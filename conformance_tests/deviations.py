r"""The catalogue of known deviations (``deviations.toml``) and their NumPy models.

A model takes a case in one dtype (the rounded inputs and options) and returns the loss and/or
gradient the deviant computation gives, built from ``sapo_ref`` pieces (the reference on
transformed inputs or options, or :func:`sapo_ref.evaluate` with a changed term). It returns
``None`` where the deviation cannot change any number of that case. :func:`identify` runs every
model against a failing outcome and names the entries that reproduce it within tolerance.

>>> [d.id for d in CATALOGUE][:3]
['log-ratio-clamp', 'token-mean-always', 'seq-mean-hard-coded']
"""

from __future__ import annotations

import tomllib
import warnings
from dataclasses import dataclass
from importlib import resources
from typing import Any, Callable

import numpy as np

import sapo_ref
from sapo_ref import spec

from .cases import Materialized
from .compare import compare
from .drivers import Outcome

__all__ = ["Deviation", "CATALOGUE", "MODELS", "identify"]

Model = Callable[[Materialized, dict, Outcome], "tuple[float | None, np.ndarray | None] | None"]


@dataclass(frozen=True)
class Deviation:
    """One catalogue entry: id, title, peers that do it, clause it violates, model name, fix."""

    id: str
    title: str
    peers: tuple[str, ...]
    clause: str
    model: str | None
    fix: str


def _load() -> tuple[Deviation, ...]:
    text = resources.files(__package__).joinpath("deviations.toml").read_text(encoding="utf-8")
    return tuple(
        Deviation(d["id"], d["title"], tuple(d.get("peers", ())), d["clause"], d.get("model"), d.get("fix", ""))
        for d in tomllib.loads(text)["deviation"]
    )


# ----------------------------------------------------------------------------- helpers


def _f64(m: Materialized) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    return (m.logp.astype(np.float64), m.old_logp.astype(np.float64), m.advantages.astype(np.float64), m.mask)


def _ref(lp, old, adv, mask, options, **extra) -> tuple[float, np.ndarray]:
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        res = sapo_ref.policy_loss(lp, old, adv, mask, **options, **extra)
    return res.loss, np.asarray(res.grad, np.float64)


def _config(options: dict) -> sapo_ref.LossConfig:
    return sapo_ref.resolve_config(**options)


def _recombined(m: Materialized, options: dict, change: Callable) -> tuple[float, np.ndarray]:
    """The reference with the per-token term and its log-derivative replaced:
    ``change(ev, config) -> (term_factor, dlog)`` (term = A * term_factor)."""
    lp, old, adv, mask = _f64(m)
    cfg = _config(options)
    norm = sapo_ref.normalizer(mask, count_empty_rows=cfg.count_empty_rows)
    with np.errstate(all="ignore"):
        ev = sapo_ref.evaluate(lp, old, adv, mask, cfg, norm)
        p = ev.prepared
        g, dlog = change(ev, cfg)
        c = ev.weights
        term = np.where(p.valid, p.adv * g, 0.0)
        loss = -float(np.sum(c * term))
        coef = np.where(p.valid, c * p.adv * dlog, 0.0)
        if cfg.spreads_gradient:
            row = coef.sum(axis=1) / np.maximum(p.lengths, 1.0)
            grad = np.where(p.valid, -row[:, None], 0.0)
        else:
            grad = np.where(p.valid, -coef, 0.0)
    return loss, grad


def _taus(ev: Any, cfg: sapo_ref.LossConfig) -> np.ndarray:
    return np.where(ev.prepared.adv > 0, cfg.tau_pos, cfg.tau_neg)


def _delta(m: Materialized) -> np.ndarray:
    lp, old, _, mask = _f64(m)
    with np.errstate(all="ignore"):
        return np.where(mask, lp - old, 0.0)


# ----------------------------------------------------------------------------- models


def clamp_log_ratio(m, options, got):
    delta = _delta(m)
    if not np.any(np.abs(delta) > 20.0):
        return None
    lp, old, adv, mask = _f64(m)
    inside = np.abs(delta) <= 20.0
    lp_c = np.where(mask, old + np.clip(delta, -20.0, 20.0), lp)
    with np.errstate(all="ignore"):
        lp_c = np.where(mask & np.isinf(old), np.where(delta > 0, 20.0, -20.0), lp_c)
        old_c = np.where(mask & np.isinf(old), 0.0, old)
    loss, grad = _ref(lp_c, old_c, adv, mask, options)
    return loss, np.where(inside, grad, 0.0)  # a clamp passes no gradient outside its range


def token_mean_always(m, options, got):
    if _config(options).loss_agg == "token-mean":
        return None
    opts = {k: v for k, v in options.items() if k != "norm_length"}
    return _ref(*_f64(m), {**opts, "loss_agg": "token-mean"})


def seq_mean_always(m, options, got):
    if _config(options).loss_agg == "seq-mean-token-mean":
        return None
    opts = {k: v for k, v in options.items() if k != "norm_length"}
    return _ref(*_f64(m), {**opts, "loss_agg": "seq-mean-token-mean"})


def empty_rows_counted(m, options, got):
    if m.mask.any(axis=1).all() or _config(options).loss_agg == "token-mean":
        return None
    return _ref(*_f64(m), options, count_empty_rows=True)


def detached_gate(m, options, got):
    cfg = _config(options)
    if cfg.method != "sapo":
        return None
    _, grad = _recombined(m, options, lambda ev, c: (ev.gate.f, ev.gate.f))
    return None, grad  # the value depends on how the peer reports it: only the gradient is modelled


def swapped_temperatures(m, options, got):
    cfg = _config(options)
    if not cfg.is_soft or cfg.tau_pos == cfg.tau_neg:
        return None
    return _ref(*_f64(m), {**options, "tau_pos": cfg.tau_neg, "tau_neg": cfg.tau_pos})


def missing_four_over_tau(m, options, got):
    cfg = _config(options)
    if not cfg.is_soft:
        return None
    return _recombined(m, options, lambda ev, c: (ev.gate.f * _taus(ev, c) / 4, ev.gate.dlog * _taus(ev, c) / 4))


def nan_through_mask(m, options, got):
    lp, old, adv, mask = _f64(m)
    adv2 = adv if adv.ndim == 2 else np.broadcast_to(adv[:, None], mask.shape)
    garbage = ~mask & (~np.isfinite(lp) | ~np.isfinite(old) | ~np.isfinite(adv2))
    if not garbage.any():
        return None
    return float("nan"), None


def exp_overflow_grad(m, options, got):
    cfg = _config(options)
    delta = _delta(m)
    _, _, adv, mask = _f64(m)
    adv = adv if adv.ndim == 2 else np.broadcast_to(adv[:, None], mask.shape)
    limit = np.log(np.finfo(np.float64 if m.dtype == "float64" else np.float32).max)
    x = delta
    if cfg.sequence_value:
        x = np.broadcast_to((delta.sum(axis=1) / np.maximum(mask.sum(axis=1), 1))[:, None], delta.shape)
    over = mask & (x > limit)
    if cfg.is_soft:
        nan = over & (adv != 0)
    else:  # the clip's zero derivative meets dr/d delta = inf
        nan = over & ((adv > 0) | ((adv < 0) & (cfg.dual_clip is not None)))
    if not nan.any():
        return None
    loss, grad = _ref(*_f64(m), options)
    if cfg.spreads_gradient:
        nan = np.broadcast_to(nan.any(axis=1, keepdims=True), nan.shape) & mask
    return loss, np.where(nan, np.nan, grad)


def gspo_as_token(m, options, got):
    if _config(options).method != "gspo":
        return None
    return _ref(*_f64(m), {**options, "method": "gspo-token"})


def token_as_gspo(m, options, got):
    if _config(options).method != "gspo-token":
        return None
    return _ref(*_f64(m), {**options, "method": "gspo"})


def eps_swapped(m, options, got):
    cfg = _config(options)
    if cfg.is_soft or cfg.eps_low == cfg.eps_high:
        return None
    return _ref(*_f64(m), {**options, "eps_low": cfg.eps_high, "eps_high": cfg.eps_low})


def averaged_advantages(m, options, got):
    lp, old, adv, mask = _f64(m)
    if not _config(options).sequence_value or adv.ndim != 2:
        return None
    with np.errstate(all="ignore"):
        mean = np.where(mask, adv, 0.0).sum(axis=1) / np.maximum(mask.sum(axis=1), 1)
    return _ref(lp, old, mean, mask, options)


def per_micro_batch_mean(m, options, got):
    lp, old, adv, mask = _f64(m)
    n = mask.shape[0]
    half = (n + 1) // 2
    losses, grads = [], []
    for rows in (slice(0, half), slice(half, n)):
        loss, grad = _ref(lp[rows], old[rows], adv[rows], mask[rows], options)
        losses.append(loss)
        grads.append(grad / 2.0)
    return float(np.mean(losses)), np.concatenate(grads)


def sum_instead_of_mean(m, options, got):
    cfg = _config(options)
    norm = sapo_ref.normalizer(m.mask, count_empty_rows=cfg.count_empty_rows)
    d = float(sapo_ref.denominator(norm, cfg.loss_agg, cfg.norm_length))
    if d in (0.0, 1.0):
        return None
    loss, grad = _ref(*_f64(m), options)
    return loss * d, grad * d


def sign_flipped(m, options, got):
    loss, grad = _ref(*_f64(m), options)
    return -loss, -grad


def constant_factor(m, options, got):
    loss, grad = _ref(*_f64(m), options)
    fin = np.isfinite(grad) & np.isfinite(got.grad)
    den = float(np.sum(grad[fin] ** 2))
    if den == 0.0 or not np.isfinite(loss):
        return None
    k = float(np.sum(got.grad[fin] * grad[fin])) / den
    if not np.isfinite(k) or abs(k - 1.0) < 1e-6 or abs(k) < 1e-12:
        return None
    return loss * k, grad * k


MODELS: dict[str, Model] = {
    f.__name__: f
    for f in (
        clamp_log_ratio, token_mean_always, seq_mean_always, empty_rows_counted, detached_gate,
        swapped_temperatures, missing_four_over_tau, nan_through_mask, exp_overflow_grad,
        gspo_as_token, token_as_gspo, eps_swapped, averaged_advantages, per_micro_batch_mean,
        sum_instead_of_mean, sign_flipped, constant_factor,
    )
}

CATALOGUE: tuple[Deviation, ...] = _load()
assert all(d.model is None or d.model in MODELS for d in CATALOGUE), "deviations.toml names an unknown model"


def identify(m: Materialized, options: dict, got: Outcome, value_tol: spec.Tolerance,
             grad_tol: spec.Tolerance) -> list[Deviation]:
    """Catalogue entries whose model reproduces ``got`` on this case within the tolerances."""
    found = []
    for dev in CATALOGUE:
        if dev.model is None:
            continue
        try:
            with np.errstate(all="ignore"):
                out = MODELS[dev.model](m, options, got)
        except Exception:  # a model that cannot run on this case does not match it
            continue
        if out is None:
            continue
        loss, grad = out
        ok, same_as_reference = True, True
        if loss is not None:
            ok &= compare("loss", got.loss, loss, value_tol).ok
            same_as_reference &= compare("loss", loss, m.want_loss, value_tol).ok
        if grad is not None:
            ok &= compare("grad", got.grad, grad, grad_tol).ok
            same_as_reference &= compare("grad", grad, m.want_grad, grad_tol).ok
        # A deviation that changes no number of this case cannot explain its failure.
        if ok and not same_as_reference:
            found.append(dev)
    return found
