r"""The catalogue of known deviations (``deviations.toml``) and their composable NumPy models.

A deviation's model is a step that edits a :class:`Plan`: the recipe of the computation the
deviant code performs on one case, which starts as the reference itself (``sapo_ref.evaluate``
in float64 on the case's rounded inputs). Steps change what enters the reference (options,
advantages, log-ratios: a clamp, float32 rounding), the gate (a detached gate, a missing
factor) or what comes out (a sign, NaN where the code meets 0 * inf, NaN through the mask), so
several deviations compose: a real implementation usually has two or three at once. Steps
run in the order of their ``stage``; :func:`evaluate_plan` turns a plan into (loss, grad).

A step returns ``False`` when it cannot change any number of the case (the search in
:mod:`.verdict` then never tries it there). A model with a parameter (a clamp bound, a dual-clip
constant, which temperatures were rounded to float32) lists default candidates in the TOML file
and may propose more from a failing case (``fit``). Entries with ``composes = false`` transform
the whole output (a sign, a constant factor) and are only tried alone.

:func:`identify` keeps the single-deviation diagnosis per case; :func:`reproduces` judges one
composed set on one case.

>>> [d.id for d in CATALOGUE][:3]
['log-ratio-clamp', 'token-mean-always', 'row-length-epsilon']
>>> CATALOGUE_BY_ID["always-dual-clip"].params[0]
{'c': 3.0}
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import numpy as np

import sapo_ref
from sapo_ref import spec

from .cases import CONTRACT_OPTIONS, Materialized, resolve
from .compare import compare
from .drivers import Outcome

__all__ = [
    "Deviation",
    "Applied",
    "Plan",
    "Model",
    "CATALOGUE",
    "CATALOGUE_BY_ID",
    "MODELS",
    "identify",
    "reproduces",
    "evaluate_plan",
    "build_plan",
    "candidate_params",
    "format_applied",
]

#: Options of the third-party contract a plan may carry, plus the reference-only count_empty_rows.
_CONFIG_KEYS = (*CONTRACT_OPTIONS, "count_empty_rows")


@dataclass(frozen=True)
class Deviation:
    """One catalogue entry: id, title, peers that do it, clause it violates, model name, fix,
    whether it composes with others, its default parameter candidates, the precision its
    model is judged at (``"float32"`` for a computation that loses float64 digits) and whether
    it is ``partial``: a poison (NaN through padding, 0 * inf) that a code may keep away from
    some of the cases it could reach (a select by the sign of A elsewhere hides it), so a case
    where it does not show neither contradicts it nor needs it."""

    id: str
    title: str
    peers: tuple[str, ...]
    clause: str
    model: str | None
    fix: str
    composes: bool = True
    params: tuple[dict[str, Any], ...] = ()
    precision: str | None = None
    partial: bool = False


@dataclass(frozen=True)
class Applied:
    """A deviation with its (fitted) parameter, or ``param = {}`` when it has none."""

    deviation: Deviation
    param: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, tuple]:
        return self.deviation.id, tuple(sorted(self.param.items()))

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Applied) and self.key == other.key


def format_applied(a: Applied) -> str:
    """``id`` or ``id(name=value, ...)`` with numbers in short form.

    >>> format_applied(Applied(CATALOGUE_BY_ID["log-ratio-clamp"], {"low": -20.0, "high": 20.0}))
    'log-ratio-clamp(low=-20, high=20)'
    """
    if not a.param:
        return a.deviation.id
    parts = [f"{k}={v:.10g}" if isinstance(v, float) else f"{k}={v}" for k, v in a.param.items()]
    return f"{a.deviation.id}({', '.join(parts)})"


def _load() -> tuple[Deviation, ...]:
    text = resources.files(__package__).joinpath("deviations.toml").read_text(encoding="utf-8")
    return tuple(
        Deviation(
            d["id"],
            d["title"],
            tuple(d.get("peers", ())),
            d["clause"],
            d.get("model"),
            d.get("fix", ""),
            bool(d.get("composes", True)),
            tuple(dict(p) for p in d.get("params", ())),
            d.get("precision"),
            bool(d.get("partial", False)),
        )
        for d in tomllib.loads(text)["deviation"]
    )


# ----------------------------------------------------------------------------- plans


@dataclass
class Plan:
    """How the deviant code computes one case; starts as the reference.

    ``delta_maps`` edit the token log-ratios (each returns the new log-ratios and where the
    gradient still flows), ``log_x_bounds`` clamps a sequence method's row log-ratio,
    ``gate_maps`` edit (term factor, d term / d log x), ``value`` is ``"term"`` (the loss is
    -sum c A f) or ``"logp"`` (-sum c A sg(f) logp), ``posts`` edit the final (loss, grad).
    The clause 10 terms: ``weights`` (float64, or None) scale the policy term; the KL term is
    computed from the case's own logp and ``ref_logp`` (a log-ratio edit does not reach it),
    with ``kl_weighted`` (times the weights too), ``kl_dropped`` and ``counts_from_weights``
    (tokens of weight 0 leave the mask) as the deviations' switches.
    """

    m: Materialized
    options: dict[str, Any]
    adv: np.ndarray
    delta_maps: list[Callable] = field(default_factory=list)
    log_x_bounds: tuple[float | None, float | None] | None = None
    gate_maps: list[Callable] = field(default_factory=list)
    value: str = "term"
    micro: bool = False
    posts: list[Callable] = field(default_factory=list)
    precision: str | None = None
    #: Config fields set past resolve_config's domain checks (a float32-rounded 1e-6 is < 1e-6).
    overrides: dict[str, Any] = field(default_factory=dict)
    weights: np.ndarray | None = None
    kl_weighted: bool = False
    kl_dropped: bool = False
    counts_from_weights: bool = False
    _config: Any = None

    @property
    def config(self) -> sapo_ref.LossConfig:
        if self._config is None:
            cfg = resolve(self.options, has_ref_logp=self.m.ref_logp is not None)
            self._config = dataclasses.replace(cfg, **self.overrides) if self.overrides else cfg
        return self._config


#: A model edits a plan for one parameter; False when it cannot change any number of the case.
Model = Callable[[Plan, dict], bool]


def _f64(m: Materialized) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    return (
        m.logp.astype(np.float64),
        m.old_logp.astype(np.float64),
        m.advantages.astype(np.float64),
        m.mask,
    )


def _full(adv: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return np.broadcast_to(adv if adv.ndim == 2 else adv[:, None], mask.shape)


def _delta(m: Materialized) -> np.ndarray:
    lp, old, _, mask = _f64(m)
    with np.errstate(all="ignore"):
        return np.where(mask, lp - old, 0.0)


def _log_x(m: Materialized, cfg: sapo_ref.LossConfig) -> np.ndarray:
    """The log-ratio the gate sees: delta, or the row mean broadcast for sequence methods."""
    delta = _delta(m)
    if not cfg.sequence_value:
        return delta
    with np.errstate(all="ignore"):
        mu = delta.sum(axis=1) / np.maximum(m.mask.sum(axis=1), 1)
    return np.where(m.mask, mu[:, None], 0.0)


def _compute_log_max(m: Materialized) -> float:
    """log of the largest finite number of the compute dtype (float32 below float64, clause 6.4)."""
    return math.log(float(np.finfo(np.float64 if m.dtype == "float64" else np.float32).max))


def build_plan(m: Materialized, options: dict) -> Plan:
    """The reference's plan for a case (no deviation yet)."""
    w = None if m.weights is None else np.asarray(m.weights, np.float64)
    return Plan(m, dict(options), _f64(m)[2], weights=w)


def _token_weights(plan: Plan, rows: slice, mask: np.ndarray) -> np.ndarray:
    """The plan's weights [N, T] on ``rows`` (1 where absent)."""
    if plan.weights is None:
        return np.ones(mask.shape)
    return _full(plan.weights[rows], mask)


def _kl_part(
    plan: Plan, rows: slice, mask: np.ndarray, c: np.ndarray
) -> tuple[float, np.ndarray] | None:
    """The KL term of clause 10.2 (loss, d/d logp) with aggregation weights ``c``, from the
    case's own logp and ref_logp; None when the plan has none (or beta = 0)."""
    cfg = plan.config
    if plan.m.ref_logp is None or plan.kl_dropped or not cfg.has_kl:
        return None
    lp, ref = _f64(plan.m)[0][rows], np.asarray(plan.m.ref_logp, np.float64)[rows]
    u = np.where(mask, ref, 0.0) - np.where(mask, lp, 0.0)
    k, dk = sapo_ref.kl_penalty(u, cfg.kl_estimator)
    bc = cfg.kl_coef * c * (_token_weights(plan, rows, mask) if plan.kl_weighted else 1.0)
    loss = float(np.sum(np.where(mask, bc * k, 0.0)))
    return loss, np.where(mask, bc * dk, 0.0)


def _evaluate(
    plan: Plan,
    lp: np.ndarray,
    old: np.ndarray,
    adv: np.ndarray,
    mask: np.ndarray,
    logp_value: np.ndarray,
    rows: slice = slice(None),
) -> tuple[float, np.ndarray, np.ndarray]:
    """(loss, the policy term's gradient, the KL term's gradient) of the plan on ``rows``."""
    cfg = dataclasses.replace(plan.config, kl_coef=None, kl_estimator=None)  # policy term only
    w = None if plan.weights is None else plan.weights[rows]
    if plan.counts_from_weights and w is not None:
        mask = mask & (_full(w, mask) != 0)
    norm = sapo_ref.normalizer(mask, count_empty_rows=cfg.count_empty_rows)
    ev = sapo_ref.evaluate(lp, old, adv, mask, cfg, norm, weights=w)
    kl = _kl_part(plan, rows, mask, np.asarray(ev.weights, np.float64))
    if not plan.gate_maps and plan.value == "term":
        loss, grad = float(ev.loss), np.asarray(ev.grad, np.float64)
    else:
        # The reference's own per-token pieces with the term factor and its log-derivative
        # replaced.
        p = ev.prepared
        g, dlog = (ev.gate.f, ev.gate.dlog) if cfg.is_soft else (ev.gate.g, ev.gate.dlog)
        for change in plan.gate_maps:
            g, dlog = change(ev, cfg, g, dlog)
        scale = _token_weights(plan, rows, mask)
        term = np.where(p.valid, p.adv * g, 0.0)
        if plan.value == "logp":
            term = np.where(p.valid, term * np.where(p.valid, logp_value, 0.0), 0.0)
        loss = -float(np.sum(np.where(p.valid, ev.weights * scale * term, 0.0)))
        coef = np.where(p.valid, ev.weights * scale * p.adv * dlog, 0.0)
        if cfg.spreads_gradient and plan.value != "logp":  # d(sg(f) logp_t)/d logp_t: own token
            row = coef.sum(axis=1) / np.maximum(p.lengths, 1.0)
            grad = np.where(p.valid, -row[:, None], 0.0)
        else:
            grad = np.where(p.valid, -coef, 0.0)
    if kl is None:
        return loss, grad, np.zeros(grad.shape)
    return loss + kl[0], grad, kl[1]


def evaluate_plan(plan: Plan, got: Outcome | None = None) -> tuple[float | None, np.ndarray | None]:
    """(loss, grad) the planned computation gives on its case; ``got`` (the implementation's
    outcome) fills the entries a model leaves unconstrained."""
    m = plan.m
    lp, old, _, mask = _f64(m)
    adv = plan.adv
    cfg = plan.config
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        delta = np.where(mask, lp - old, 0.0)
        keep = np.ones(mask.shape, bool)
        for change in plan.delta_maps:
            delta, k = change(delta, mask)
            keep &= k
        if plan.log_x_bounds is not None and cfg.sequence_value:
            delta, k = _clamp_rows(delta, mask, plan.log_x_bounds)
            keep &= k
        # The reference depends on logp - old_logp only: feed the edited log-ratios as logp.
        lp_e, old_e = np.where(mask, delta, lp), np.where(mask, 0.0, old)
        if plan.micro:
            half = (mask.shape[0] + 1) // 2
            parts = [
                _evaluate(plan, lp_e[s], old_e[s], adv[s], mask[s], lp[s], s)
                for s in (slice(0, half), slice(half, None))
            ]
            loss = float(np.mean([p[0] for p in parts]))
            grad, grad_kl = (np.concatenate([p[i] for p in parts]) / 2.0 for i in (1, 2))
        else:
            loss, grad, grad_kl = _evaluate(plan, lp_e, old_e, adv, mask, lp)
        # A log-ratio edit (a clamp) stops the policy term's gradient only: the KL term sees
        # logp itself.
        grad = np.where(keep, grad, 0.0) + grad_kl
        out: tuple[float | None, np.ndarray | None] = (loss, grad)
        for post in plan.posts:
            out = post(plan, out[0], out[1], got)
    return out


def _clamp_rows(delta, mask, bounds):
    """Shift each row so its mean log-ratio is clamped to ``bounds``; no gradient where clamped
    (the whole row for a sequence ratio, the row's tokens alike for gspo-token)."""
    lo, hi = bounds
    n = np.maximum(mask.sum(axis=1), 1)
    mu = np.where(mask, delta, 0.0).sum(axis=1) / n
    clamped = np.clip(mu, -np.inf if lo is None else lo, np.inf if hi is None else hi)
    moved = (clamped != mu) & mask.any(axis=1)
    shift = np.where(moved & np.isfinite(mu), clamped - mu, 0.0)
    new = np.where(mask, delta + shift[:, None], delta)
    new = np.where(mask & (moved & ~np.isfinite(mu))[:, None], clamped[:, None], new)
    return new, ~(moved[:, None] & mask)


# ----------------------------------------------------------------------------- models


def clamp_log_ratio(plan: Plan, param: dict) -> bool:
    """Clamp delta (``on = "delta"``) or the sequence log-ratio (``"log_x"``) to [low, high]."""
    lo, hi, on = param.get("low"), param.get("high"), param.get("on", "delta")
    cfg = plan.config
    x = _log_x(plan.m, cfg) if on == "log_x" else _delta(plan.m)
    below = (x < lo) if lo is not None else np.zeros(x.shape, bool)
    above = (x > hi) if hi is not None else np.zeros(x.shape, bool)
    if not np.any(plan.m.mask & (below | above)):
        return False
    if on == "log_x" and cfg.sequence_value:
        plan.log_x_bounds = (lo, hi)
        return True

    def change(delta, mask):
        out = np.clip(delta, -np.inf if lo is None else lo, np.inf if hi is None else hi)
        return out, ~(mask & (out != delta))  # a clamp passes no gradient outside its range

    plan.delta_maps.append(change)
    return True


def _set_option(plan: Plan, **new) -> bool:
    before = plan.config
    opts = {**plan.options, **new}
    opts = {k: v for k, v in opts.items() if v is not None}
    if "loss_agg" in new and "norm_length" in opts and new["loss_agg"] != "seq-mean-token-sum-norm":
        opts.pop("norm_length")
    try:
        after = resolve(opts, has_ref_logp=plan.m.ref_logp is not None)
    except (ValueError, TypeError):
        return False
    if plan.overrides:
        after = dataclasses.replace(after, **plan.overrides)
    if after == before:
        return False
    plan.options, plan._config = opts, after
    return True


def token_mean_always(plan: Plan, param: dict) -> bool:
    return _set_option(plan, loss_agg="token-mean")


def seq_mean_always(plan: Plan, param: dict) -> bool:
    return _set_option(plan, loss_agg="seq-mean-token-mean")


def empty_rows_counted(plan: Plan, param: dict) -> bool:
    if plan.m.mask.any(axis=1).all() or not plan.m.mask.any():
        return False
    return _set_option(plan, count_empty_rows=True) and plan.config.loss_agg != "token-mean"


def detached_gate(plan: Plan, param: dict) -> bool:
    """Trinity's -A sg(f) logp: value ``logp`` (that loss) or ``f`` (the right value); the
    gradient A f reaches each token's own logp (sequence SAPO included)."""
    if not plan.config.is_soft:
        return False
    plan.gate_maps.append(lambda ev, cfg, g, dlog: (g, g))
    plan.value = "logp" if param.get("value", "logp") == "logp" else "term"
    return True


def swapped_temperatures(plan: Plan, param: dict) -> bool:
    cfg = plan.config
    if not cfg.is_soft or cfg.tau_pos == cfg.tau_neg:
        return False
    return _set_option(plan, tau_pos=cfg.tau_neg, tau_neg=cfg.tau_pos)


def float32_temperatures(plan: Plan, param: dict) -> bool:
    """Temperatures held as float32 constants (``which``: pos, neg or both) in a float64 run."""
    cfg = plan.config
    if not cfg.is_soft or plan.m.dtype != "float64":
        return False
    which = param.get("which", "both")
    new = {}
    if which in ("pos", "both"):
        new["tau_pos"] = float(np.float32(cfg.tau_pos))
    if which in ("neg", "both"):
        new["tau_neg"] = float(np.float32(cfg.tau_neg))
    after = dataclasses.replace(cfg, **new)
    if after == cfg:
        return False
    plan.overrides.update(new)
    plan._config = after
    return True


def missing_four_over_tau(plan: Plan, param: dict) -> bool:
    if not plan.config.is_soft:
        return False

    def change(ev, cfg, g, dlog):
        tau = np.where(ev.prepared.adv > 0, cfg.tau_pos, cfg.tau_neg)
        return g * tau / 4, dlog * tau / 4

    plan.gate_maps.append(change)
    return True


def _garbage(m: Materialized) -> np.ndarray:
    """Padding positions holding NaN/inf in any input (clause 10's weights and ref_logp too)."""
    lp, old, adv, mask = _f64(m)
    bad = ~np.isfinite(lp) | ~np.isfinite(old) | ~np.isfinite(_full(adv, mask))
    for a in m.keyword_arrays().values():
        if a.dtype.kind == "f" and a.shape in (mask.shape, mask.shape[:1]):
            bad |= ~np.isfinite(_full(np.asarray(a, np.float64), mask))
    return ~mask & bad


def nan_through_mask(plan: Plan, param: dict) -> bool:
    """Masking by multiplication. With NaN/inf in the padding: NaN loss; the gradient at padding
    (and, for a sequence ratio, in rows with garbage) is whatever the code gives, elsewhere the
    model's. With clean padding it still shows where a sequence ratio's row gradient is
    infinite: inf * 0 = NaN at that row's padding (and in the value when the term is too)."""
    garbage = _garbage(plan.m)
    seq = plan.config.sequence_value
    if garbage.any():

        def post(plan, loss, grad, got):
            if grad is None:
                return math.nan, None
            free = ~plan.m.mask
            if seq:
                free |= garbage.any(axis=1, keepdims=True)
            other = got.grad if got is not None and np.shape(got.grad) == grad.shape else grad
            return math.nan, np.where(free, other, grad)

        plan.posts.append(post)
        return True
    mask = plan.m.mask
    if not plan.config.spreads_gradient or mask.all():
        return False
    # Rows whose gradient can be non-finite: the reference's own, or a ratio that overflows
    # (a naive exp elsewhere in the code turns it into NaN).
    hot = ~np.isfinite(plan.m.want_grad) | _overflowing(plan)
    rows = hot.any(axis=1, keepdims=True) & ~mask.all(axis=1, keepdims=True)
    if not rows.any():
        return False

    def spread_post(plan, loss, grad, got):
        if grad is None:
            return loss, grad
        bad = ~np.isfinite(grad).all(axis=1, keepdims=True) & ~plan.m.mask
        # An infinite row term broadcast onto the row's padding gives inf * 0 = NaN in the value
        # when the code multiplies the advantage in before the mask (both arrangements seen).
        if loss is not None and not np.isfinite(loss) and bad.any():
            if got is not None and math.isnan(got.loss):
                loss = math.nan
        return loss, np.where(bad, np.nan, grad)

    plan.posts.append(spread_post)
    return True


def _overflowing(plan: Plan) -> np.ndarray:
    cfg = plan.config
    return plan.m.mask & (_log_x(plan.m, cfg) > _compute_log_max(plan.m))


def _spread_rows(nan: np.ndarray, plan: Plan) -> np.ndarray:
    if plan.config.spreads_gradient:
        return np.broadcast_to(nan.any(axis=1, keepdims=True), nan.shape) & plan.m.mask
    return nan


def exp_overflow_grad(plan: Plan, param: dict) -> bool:
    """Naive exp(delta): inf ratio times a zero derivative (saturated sigmoid, clip) is NaN; a
    sequence ratio spreads it over its row (onto its padding too when the row mean is taken by
    multiplying with the mask: nan-through-mask)."""
    cfg = plan.config
    over = _overflowing(plan)
    adv = _full(plan.adv, plan.m.mask)
    if cfg.is_soft:
        nan = over & (adv != 0)
    else:
        nan = over & ((adv > 0) | ((adv < 0) & (cfg.dual_clip is not None)))
    if not nan.any():
        return False
    nan = _spread_rows(nan, plan)
    plan.posts.append(
        lambda plan, loss, grad, got: (loss, None if grad is None else np.where(nan, np.nan, grad))
    )
    return True


def exp_overflow_value(plan: Plan, param: dict) -> bool:
    """A clipped method's term -A * exp(x) computed as written: where exp(x) overflows the
    compute dtype at an A < 0 token without dual clip, the term is +inf (the spec's value is
    the correctly rounded finite c A r of clause 5.4), and so is its gradient (the whole row's
    for a sequence ratio)."""
    cfg = plan.config
    if cfg.is_soft or cfg.dual_clip is not None:
        return False
    over = _overflowing(plan) & (_full(plan.adv, plan.m.mask) < 0)
    if not over.any():
        return False
    inf = _spread_rows(over, plan)

    def post(plan, loss, grad, got):
        loss = None if loss is None else (math.nan if loss == -math.inf else math.inf)
        return loss, None if grad is None else np.where(inf, np.inf, grad)

    plan.posts.append(post)
    return True


def nan_grad_through_where(plan: Plan, param: dict) -> bool:
    """The value selected with where(mask, x, 0), so it is right, but its backward sends
    0 * (local derivative) to padding, NaN where that derivative is NaN or inf: the gradient at
    padding positions holding garbage (NaN, inf, |x| >= 1e20) is whatever the code gives (which
    of them turn NaN depends on how the peer writes its gate), everywhere else the model's."""
    lp, old, adv, mask = _f64(plan.m)
    with np.errstate(all="ignore"):
        bad = ~(np.abs(lp) < 1e20) | ~(np.abs(old) < 1e20) | ~(np.abs(_full(adv, mask)) < 1e20)
    free = ~mask & bad
    if not free.any():
        return False

    def post(plan, loss, grad, got):
        if grad is None or got is None or np.shape(got.grad) != grad.shape:
            return loss, grad
        return loss, np.where(free, got.grad, grad)

    plan.posts.append(post)
    return True


def stop_gradient_difference_nan(plan: Plan, param: dict) -> bool:
    """GSPO-token written as logp - sg(logp) + sg(log s): at a valid token with an infinite logp,
    inf - inf = NaN in the value, and in that token's gradient (``grad = "nan"``) unless a
    clamp of the result passes none there (``grad = "kept"``: the model's gradient)."""
    if plan.config.method != "gspo-token":
        return False
    nan = plan.m.mask & np.isinf(_f64(plan.m)[0])
    if not nan.any():
        return False
    if param.get("grad", "nan") != "nan":
        nan = np.zeros_like(nan)
    plan.posts.append(
        lambda plan, loss, grad, got: (
            math.nan,
            None if grad is None else np.where(nan, np.nan, grad),
        )
    )
    return True


def zero_adv_nan(plan: Plan, param: dict) -> bool:
    """A = 0 with a ratio that overflows: 0 * inf = NaN in the gradient (and in the loss of the
    clipped methods, whose term is A * r)."""
    cfg = plan.config
    nan = _overflowing(plan) & (_full(plan.adv, plan.m.mask) == 0)
    if not nan.any():
        return False
    nan = _spread_rows(nan, plan)
    value_nan = not cfg.is_soft

    def post(plan, loss, grad, got):
        return (math.nan if value_nan else loss), (
            None if grad is None else np.where(nan, np.nan, grad)
        )

    plan.posts.append(post)
    return True


def empty_batch_nan(plan: Plan, param: dict) -> bool:
    """No valid token: 0 / 0 = NaN loss; gradient NaN everywhere (``grad = "nan"``) or 0."""
    if plan.m.mask.any():
        return False
    nan_grad = param.get("grad", "nan") == "nan"

    def post(plan, loss, grad, got):
        if grad is None or not nan_grad:
            return math.nan, grad
        return math.nan, np.full(grad.shape, np.nan)

    plan.posts.append(post)
    return True


def gspo_as_token(plan: Plan, param: dict) -> bool:
    return plan.config.method == "gspo" and _set_option(plan, method="gspo-token")


def token_as_gspo(plan: Plan, param: dict) -> bool:
    return plan.config.method == "gspo-token" and _set_option(plan, method="gspo")


def eps_swapped(plan: Plan, param: dict) -> bool:
    cfg = plan.config
    if cfg.is_soft or cfg.eps_low == cfg.eps_high:
        return False
    return _set_option(plan, eps_low=cfg.eps_high, eps_high=cfg.eps_low)


def always_dual_clip(plan: Plan, param: dict) -> bool:
    """grpo without dual_clip computed with dual clip ``c`` (verl's clip_ratio_c = 3)."""
    cfg = plan.config
    c = float(param.get("c", 3.0))
    if cfg.method != "grpo" or cfg.dual_clip is not None:
        return False
    neg = plan.m.mask & (_full(plan.adv, plan.m.mask) < 0) & (_log_x(plan.m, cfg) > math.log(c))
    return bool(neg.any()) and _set_option(plan, dual_clip=c)


def gspo_no_dual_clip(plan: Plan, param: dict) -> bool:
    cfg = plan.config
    if cfg.method not in ("gspo", "gspo-token") or cfg.dual_clip is None:
        return False
    return _set_option(plan, dual_clip=None)


def ratio_float32(plan: Plan, param: dict) -> bool:
    """Float64 inputs, log-ratio and ratio computed in float32 (judged at float32 precision:
    the gradient comes back through the float32 cast too, so on-policy cases show it)."""
    if plan.m.dtype != "float64" or not plan.m.mask.any():
        return False

    def change(delta, mask):
        with np.errstate(over="ignore"):
            return delta.astype(np.float32).astype(np.float64), np.ones(mask.shape, bool)

    plan.delta_maps.insert(0, change)  # before any clamp: the cast comes first
    plan.precision = "float32"
    top = float(np.finfo(np.float32).max)

    def post(plan, loss, grad, got):  # the gradient flows back through the float32 cast
        if grad is None:
            return loss, grad
        return loss, np.where(np.abs(grad) > top, np.copysign(np.inf, grad), grad)

    plan.posts.append(post)
    return True


def row_length_epsilon(plan: Plan, param: dict) -> bool:
    """seq-mean-token-mean rows divided by L + eps instead of L (verl: eps = 1e-8)."""
    cfg = plan.config
    if cfg.loss_agg != "seq-mean-token-mean" or not plan.m.mask.any():
        return False
    eps = float(param.get("eps", 1e-8))
    lengths = plan.m.mask.sum(axis=1).astype(np.float64)
    scale = np.where(lengths > 0, lengths / (lengths + eps), 1.0)
    plan.adv = _full(plan.adv, plan.m.mask) * scale[:, None]  # a positive factor per row
    return True


def averaged_advantages(plan: Plan, param: dict) -> bool:
    mask = plan.m.mask
    if not plan.config.sequence_value or plan.adv.ndim != 2:
        return False
    with np.errstate(all="ignore"):
        mean = np.where(mask, plan.adv, 0.0).sum(axis=1) / np.maximum(mask.sum(axis=1), 1)
    plan.adv = mean
    return True


def per_micro_batch_mean(plan: Plan, param: dict) -> bool:
    if plan.m.mask.shape[0] < 2:
        return False
    plan.micro = True
    return True


def sum_instead_of_mean(plan: Plan, param: dict) -> bool:
    cfg = plan.config
    norm = sapo_ref.normalizer(plan.m.mask, count_empty_rows=cfg.count_empty_rows)
    d = float(sapo_ref.denominator(norm, cfg.loss_agg, cfg.norm_length))
    if d in (0.0, 1.0):
        return False
    plan.posts.append(
        lambda plan, loss, grad, got: (
            None if loss is None else loss * d,
            None if grad is None else grad * d,
        )
    )
    return True


def sign_flipped(plan: Plan, param: dict) -> bool:
    plan.posts.append(
        lambda plan, loss, grad, got: (
            None if loss is None else -loss,
            None if grad is None else -grad,
        )
    )
    return True


def constant_factor(plan: Plan, param: dict) -> bool:
    """Loss and gradient k times the model's; k fitted from the implementation's gradient."""

    def post(plan, loss, grad, got):
        if got is None or grad is None or loss is None or not np.isfinite(loss):
            return loss, grad
        if np.shape(got.grad) != grad.shape:
            return loss, grad
        fin = np.isfinite(grad) & np.isfinite(got.grad)
        den = float(np.sum(grad[fin] ** 2))
        if den == 0.0:
            return loss, grad
        k = float(np.sum(got.grad[fin] * grad[fin])) / den
        if not np.isfinite(k) or abs(k) < 1e-12:
            return loss, grad
        return loss * k, grad * k

    plan.posts.append(post)
    return True


def _valid_weights(plan: Plan) -> np.ndarray | None:
    if plan.weights is None:
        return None
    return np.where(plan.m.mask, _full(plan.weights, plan.m.mask), 1.0)


def weights_ignored(plan: Plan, param: dict) -> bool:
    """The weights not applied (w = 1): a shim that drops them."""
    w = _valid_weights(plan)
    if w is None or np.all(w == 1.0):
        return False
    plan.weights = None
    return True


def weights_change_counts(plan: Plan, param: dict) -> bool:
    """Weights folded into the mask: tokens of weight 0 leave the counts (and the KL term)."""
    w = _valid_weights(plan)
    if w is None or not np.any(plan.m.mask & (w == 0)):
        return False
    plan.counts_from_weights = True
    return True


def _kl_values(plan: Plan, estimator: str) -> np.ndarray | None:
    if plan.m.ref_logp is None or not plan.config.has_kl:
        return None
    lp, ref, mask = _f64(plan.m)[0], np.asarray(plan.m.ref_logp, np.float64), plan.m.mask
    with np.errstate(all="ignore"):
        u = np.where(mask, ref, 0.0) - np.where(mask, lp, 0.0)
        return np.where(mask, np.asarray(sapo_ref.kl_penalty(u, estimator)[0]), 0.0)


def kl_on_weights(plan: Plan, param: dict) -> bool:
    """The KL term multiplied by the per-token weights too."""
    w = _valid_weights(plan)
    k = _kl_values(plan, plan.config.kl_estimator or "k3")
    if w is None or k is None or np.all((w == 1.0) | (k == 0.0)):
        return False
    plan.kl_weighted = True
    return True


def kl_dropped(plan: Plan, param: dict) -> bool:
    """The KL term left out of the loss (ref_logp and kl_coef ignored)."""
    k = _kl_values(plan, plan.config.kl_estimator or "k3")
    if k is None or not np.any(k != 0.0):
        return False
    plan.kl_dropped = True
    return True


def kl_other_estimator(plan: Plan, param: dict) -> bool:
    """Another estimator than the one asked (``estimator``), e.g. k1 where k3 was asked."""
    cfg = plan.config
    est = param.get("estimator", "k1")
    if cfg.kl_estimator in (None, est) or _kl_values(plan, est) is None:
        return False
    plan.overrides["kl_estimator"] = est
    plan._config = dataclasses.replace(cfg, kl_estimator=est)
    return True


def kl_k3_clamped(plan: Plan, param: dict) -> bool:
    """k3 asked, the low-variance (clipped at 10) k3 computed: differs where k3 > 10."""
    if plan.config.kl_estimator != "k3":
        return False
    k = _kl_values(plan, "k3")
    if k is None or not np.any(k > spec.DATA["numerics"]["kl_clip"]):
        return False
    return kl_other_estimator(plan, {"estimator": "low-var-k3"})


MODELS: dict[str, Model] = {
    f.__name__: f
    for f in (
        clamp_log_ratio,
        token_mean_always,
        seq_mean_always,
        empty_rows_counted,
        detached_gate,
        swapped_temperatures,
        float32_temperatures,
        missing_four_over_tau,
        nan_through_mask,
        exp_overflow_grad,
        exp_overflow_value,
        nan_grad_through_where,
        stop_gradient_difference_nan,
        zero_adv_nan,
        empty_batch_nan,
        gspo_as_token,
        token_as_gspo,
        eps_swapped,
        always_dual_clip,
        gspo_no_dual_clip,
        ratio_float32,
        row_length_epsilon,
        averaged_advantages,
        per_micro_batch_mean,
        sum_instead_of_mean,
        sign_flipped,
        constant_factor,
        weights_ignored,
        weights_change_counts,
        kl_on_weights,
        kl_dropped,
        kl_other_estimator,
        kl_k3_clamped,
    )
}

#: Order in which steps are applied: options and inputs, log-ratios, gate, output, NaN last.
STAGE: dict[str, int] = {
    "token_mean_always": 0,
    "seq_mean_always": 0,
    "empty_rows_counted": 0,
    "swapped_temperatures": 0,
    "float32_temperatures": 1,
    "gspo_as_token": 0,
    "token_as_gspo": 0,
    "eps_swapped": 0,
    "always_dual_clip": 1,
    "gspo_no_dual_clip": 1,
    "averaged_advantages": 0,
    "row_length_epsilon": 1,
    "ratio_float32": 2,
    "clamp_log_ratio": 2,
    "detached_gate": 3,
    "missing_four_over_tau": 3,
    "per_micro_batch_mean": 4,
    "sum_instead_of_mean": 5,
    "sign_flipped": 5,
    "constant_factor": 6,
    "exp_overflow_grad": 7,
    "exp_overflow_value": 7,
    "stop_gradient_difference_nan": 7,
    "nan_grad_through_where": 9,
    "zero_adv_nan": 7,
    "empty_batch_nan": 8,
    "nan_through_mask": 9,
    "weights_ignored": 0,
    "weights_change_counts": 0,
    "kl_on_weights": 0,
    "kl_dropped": 0,
    "kl_other_estimator": 1,
    "kl_k3_clamped": 1,
}


def _dual_clip_fit(m: Materialized, options: dict, got: Outcome) -> list[dict]:
    """The dual-clip constant from one grpo case: between the ratios of A < 0 tokens whose
    gradient the implementation kept and those it zeroed, then solved from the loss (the loss
    is affine in c while the set of dual-clipped tokens does not change)."""
    cfg = resolve(options, has_ref_logp=m.ref_logp is not None)
    if cfg.method != "grpo" or cfg.dual_clip is not None or not np.isfinite(got.loss):
        return []
    mask, adv, delta = m.mask, _full(_f64(m)[2], m.mask), _delta(m)
    cand = mask & (adv < 0) & (delta > math.log1p(-cfg.eps_low)) & np.isfinite(delta)
    kept = cand & (got.grad != 0)
    cut = cand & (got.grad == 0)
    if not cut.any():
        return []
    lo = max(float(delta[kept].max()) if kept.any() else 0.0, 0.0)
    hi = float(delta[cut].min())
    if not lo < hi:
        return []
    c1, c2 = math.exp(lo + (hi - lo) / 3), math.exp(lo + 2 * (hi - lo) / 3)
    loss = []
    for c in (c1, c2):
        plan = build_plan(m, options)
        if not always_dual_clip(plan, {"c": c}):
            return []
        loss.append(evaluate_plan(plan)[0])
    if loss[0] is None or loss[1] == loss[0]:
        return []
    c = c1 + (got.loss - loss[0]) * (c2 - c1) / (loss[1] - loss[0])
    return [{"c": float(f"{c:.6g}")}] if np.isfinite(c) and c > 1 else []


def _clamp_fit(m: Materialized, options: dict, got: Outcome) -> list[dict]:
    """A symmetric clamp bound from one token-ratio case: the smallest |delta| whose gradient the
    implementation zeroed bounds it from above, the largest kept one from below; the bound is
    then found by bisection on the loss."""
    cfg = resolve(options, has_ref_logp=m.ref_logp is not None)
    if cfg.sequence_value or not np.isfinite(got.loss):
        return []
    mask, delta = m.mask, _delta(m)
    ref_grad = m.want_grad
    zeroed = mask & (got.grad == 0) & (ref_grad != 0) & np.isfinite(delta)
    if not zeroed.any():
        return []
    hi = float(np.abs(delta[zeroed]).min())
    kept = mask & (got.grad != 0)
    lo = float(np.abs(delta[kept]).max()) if kept.any() else 0.0
    if not lo < hi:
        return []

    def f(b):
        plan = build_plan(m, options)
        clamp_log_ratio(plan, {"low": -b, "high": b})
        return evaluate_plan(plan)[0] - got.loss

    a, b = lo, hi
    fa, fb = f(a), f(b)
    if not (np.isfinite(fa) and np.isfinite(fb)) or fa * fb > 0:
        return [{"low": -float(f"{hi:.6g}"), "high": float(f"{hi:.6g}")}]
    for _ in range(60):
        mid = 0.5 * (a + b)
        fm = f(mid)
        if fa * fm <= 0:
            b, fb = mid, fm
        else:
            a, fa = mid, fm
    bound = float(f"{0.5 * (a + b):.6g}")
    return [{"low": -bound, "high": bound}]


#: Parameter proposals from one failing case, for the models that have a continuous parameter.
FITS: dict[str, Callable[[Materialized, dict, Outcome], list[dict]]] = {
    "always_dual_clip": _dual_clip_fit,
    "clamp_log_ratio": _clamp_fit,
}

CATALOGUE: tuple[Deviation, ...] = _load()
CATALOGUE_BY_ID: dict[str, Deviation] = {d.id: d for d in CATALOGUE}
assert all(d.model is None or d.model in MODELS for d in CATALOGUE), (
    "deviations.toml names an unknown model"
)
assert all(d.model is None or d.model in STAGE for d in CATALOGUE), "a model without a stage"


def candidate_params(
    dev: Deviation,
    m: Materialized | None = None,
    options: dict | None = None,
    got: Outcome | None = None,
    value_tol: spec.Tolerance | None = None,
    grad_tol: spec.Tolerance | None = None,
) -> list[dict[str, Any]]:
    """The TOML defaults of ``dev`` plus what its fit proposes from one failing case. With
    tolerances, a proposal is kept only if it reproduces the case alone: a case whose failure
    has several causes (a clamp and a dual clip) proposes nothing rather than a wrong value."""
    out = [dict(p) for p in dev.params] or [{}]
    fit = FITS.get(dev.model or "")
    if fit is not None and m is not None and got is not None:
        try:
            with np.errstate(all="ignore"):
                proposals = fit(m, options or {}, got)
        except Exception:  # a fit that cannot run on this case proposes nothing
            proposals = []
        for p in proposals:
            if p in out:
                continue
            if value_tol is not None and grad_tol is not None:
                if not reproduces(m, options or {}, (Applied(dev, p),), got, value_tol, grad_tol):
                    continue
            out.append(p)
    return out


def compose(m: Materialized, options: dict, applied: tuple[Applied, ...]) -> Plan | None:
    """The plan of ``applied`` on a case (stage order), or None if one of them changes nothing
    (or the case is an error case: no numbers to model)."""
    if m.case.error is not None:
        return None
    plan = build_plan(m, options)
    order = {d.id: i for i, d in enumerate(CATALOGUE)}
    for a in sorted(applied, key=lambda a: (STAGE[a.deviation.model], order[a.deviation.id])):
        try:
            if not MODELS[a.deviation.model](plan, a.param):
                return None
        except (ValueError, TypeError):
            return None
    return plan


def applies(m: Materialized, options: dict, a: Applied) -> bool:
    """Whether ``a`` alone can change a number of this case (cheap: no evaluation)."""
    return compose(m, options, (a,)) is not None


def _tolerances(
    m: Materialized, value_tol: spec.Tolerance, grad_tol: spec.Tolerance, precision: str | None
) -> tuple[spec.Tolerance, spec.Tolerance]:
    if precision is None:
        return value_tol, grad_tol
    row = spec.TOLERANCES[precision]
    wider = lambda a, b: spec.Tolerance(rtol=max(a.rtol, b.rtol), atol=max(a.atol, b.atol))
    return wider(value_tol, row["value"]), wider(grad_tol, row["grad"])


def reproduces(
    m: Materialized,
    options: dict,
    applied: tuple[Applied, ...],
    got: Outcome,
    value_tol: spec.Tolerance,
    grad_tol: spec.Tolerance,
    *,
    must_differ: bool = True,
) -> bool:
    """Whether the composed model of ``applied`` gives ``got``'s loss and gradient within the
    tolerances (widened to float32's row when a member computes in float32) and, with
    ``must_differ``, differs from the reference (a model that changes nothing explains nothing)."""
    plan = compose(m, options, applied)
    if plan is None:
        return False
    try:
        loss, grad = evaluate_plan(plan, got)
    except Exception:  # a model that cannot run on this case does not match it
        return False
    vt, gt = _tolerances(m, value_tol, grad_tol, plan.precision)
    if loss is not None and not compare("loss", got.loss, loss, vt).ok:
        return False
    if grad is not None and not compare("grad", got.grad, grad, gt).ok:
        return False
    if not must_differ:
        return True
    if plan.precision is not None:
        # A model of a lower-precision computation cannot say which digits it changes: that the
        # implementation's own numbers differ from the reference is all it can be held to.
        loss, grad = got.loss, got.grad
    # A deviation that changes no number of this case cannot explain its failure.
    return (loss is not None and not compare("loss", loss, m.want_loss, value_tol).ok) or (
        grad is not None and not compare("grad", grad, m.want_grad, grad_tol).ok
    )


def identify(
    m: Materialized,
    options: dict,
    got: Outcome,
    value_tol: spec.Tolerance,
    grad_tol: spec.Tolerance,
) -> list[Deviation]:
    """Catalogue entries that alone reproduce ``got`` on this case within the tolerances (their
    parameters from the TOML defaults and the case's fit). A lower-precision model (judged at
    float32's tolerance) is named only when no exact model reproduces the case. The verdict
    (:mod:`.verdict`) composes them per target."""
    found, loose = [], []
    for dev in CATALOGUE:
        if dev.model is None:
            continue
        for param in candidate_params(dev, m, options, got, value_tol, grad_tol):
            if reproduces(m, options, (Applied(dev, param),), got, value_tol, grad_tol):
                (loose if dev.precision else found).append(dev)
                break
    return found or loose
