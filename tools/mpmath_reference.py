r"""An independent high-precision implementation of the whole spec (spec/clauses.toml), in mpmath.

Written from the clause text, not from ``sapo_ref``: plain Python loops over rows and tokens,
every quantity an ``mpmath.mpf`` at :data:`DPS` significant digits, inputs taken exactly (a
float64 is a dyadic rational, so ``mpf(x)`` is exact). The only thing read from the project is
the spec data itself (method defaults, ratio/gate kinds, aggregation row weights and
denominators, metric keys), with ``tomllib`` straight from ``spec/clauses.toml``.

Limits are handled from the math, explicitly (clauses 5.1, 5.3, 5.4):

* SAPO at :math:`\delta = +\infty`: :math:`f = 4/\tau`, :math:`w = 0`, :math:`w r = 0`; at
  :math:`\delta = -\infty`: :math:`r = 0`, :math:`f = \frac4\tau\sigma(-\tau)`,
  :math:`w = \operatorname{sech}^2(\tau/2)`, :math:`w r = 0`.
* Clip methods at :math:`x = +\infty`: :math:`A > 0` clipped (value :math:`A(1+\epsilon_h)`, no
  gradient); :math:`A < 0` without dual clip: term :math:`-\infty`, loss and gradient
  :math:`+\infty`; with dual clip: term :math:`cA`, no gradient.
* :math:`A = 0`: term 0 and gradient 0 whatever the ratio.

One place where the spec text leaves a choice, and what is done here (``kl/k1`` with both
:math:`\delta = \pm\infty`, once a second one, is now fixed by its ``[metrics]`` definition: :math:`+\infty`):

* Clause 6.3 lets clipped methods take :math:`r = +\infty` once :math:`e^\delta` overflows float64
  (:math:`\delta > 709.78`). This oracle computes exact values, so the two differ when
  :math:`e^\delta` overflows but :math:`c|A|e^\delta` does not (e.g. :math:`\delta = 710`, :math:`A = -0.5`,
  :math:`c = 1/3`: exact loss :math:`3.7\cdot10^{307}`, clause 6.3 :math:`+\infty`). The golden vectors stay out
  of that band.

Spec 0.2.0 (clause 10) adds, per valid token, detached weights :math:`w_{it}` on the policy term
and a KL penalty against reference log-probs, :math:`u = \log\pi_{ref} - \log\pi_\theta`:

.. math:: \mathcal L = -\sum_{it} c_{it} m_{it} w_{it} A_{it} f_{it}
          + \beta \sum_{it} c_{it} m_{it} k(u_{it})

with :func:`kl_estimate`'s k1, k2, k3, low-var-k3. A zero factor (:math:`w = 0`, :math:`\beta = 0`,
:math:`c = 0`) removes its term, infinite or not (never :math:`0\cdot\infty`).

Results are mpf; :func:`to_float64` rounds one correctly (to nearest, ties to even, subnormals
included), which is how the golden vectors are written.

>>> res = policy_loss([[0.0, 0.0]], [[0.0, 0.0]], [1.0], [[True, True]])
>>> to_float64(res.loss), [to_float64(g) for g in res.grad[0]]   # -2/tau_pos; -A/(R L)
(-2.0, [-0.5, -0.5])
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import mpmath
from mpmath import mp, mpf

__all__ = [
    "DPS",
    "SPEC",
    "Result",
    "policy_loss",
    "group_advantages",
    "sequence_gate_diagnostics",
    "kink_distance",
    "kl_estimate",
    "KL_ESTIMATORS",
    "LOW_VAR_CLIP",
    "to_float64",
]

#: Significant decimal digits of every computation here.
DPS = 60
SPEC: dict[str, Any] = tomllib.loads(
    (Path(__file__).resolve().parents[1] / "spec" / "clauses.toml").read_text(encoding="utf-8")
)

INF = mpf("inf")

#: The KL estimators of clause 10.2, as written in the contract (not read from the spec file).
KL_ESTIMATORS = ("k1", "k2", "k3", "low-var-k3")
#: The clip of low-var-k3 (verl's low_var_kl): min(k3, 10).
LOW_VAR_CLIP = 10


# ------------------------------------------------------------------------------------------
# Rounding to float64
# ------------------------------------------------------------------------------------------
def to_float64(x: Any) -> float:
    """``x`` (an mpf) correctly rounded to the nearest float64 (ties to even).

    ``float(mpf)`` truncates in mpmath 1.3; this goes through an exact ``Fraction`` instead,
    whose ``float()`` is correctly rounded, subnormals and overflow to infinity included.

    >>> to_float64(mpf(1) / 3) == 1 / 3, to_float64(mpmath.exp(-mpmath.exp(800)))
    (True, 0.0)
    """
    x = mpf(x)
    if mpmath.isnan(x):
        return math.nan
    if mpmath.isinf(x):
        return math.inf if x > 0 else -math.inf
    if x == 0:
        return 0.0
    sign, man, exp, bc = x._mpf_
    top = exp + bc  # |x| in [2**(top-1), 2**top)
    if top > 1025:
        return -math.inf if sign else math.inf
    if top < -1076:  # below half the smallest subnormal 2**-1074
        return -0.0 if sign else 0.0
    q = Fraction(man) * (Fraction(2) ** exp)
    try:
        v = float(q)
    except OverflowError:
        v = math.inf
    return -v if sign else v


# ------------------------------------------------------------------------------------------
# Spec data
# ------------------------------------------------------------------------------------------
def _defaults(method: str) -> dict[str, Any]:
    d = dict(SPEC["methods"][method]["defaults"])
    return {k: (None if v == "none" else v) for k, v in d.items()}


def _metric_keys(method: str, present: dict[str, bool]) -> list[str]:
    """Clause 7.1 keys of ``method`` in spec order; a key that ``requires`` an input
    (``ref_logp``, ``weights``) only when ``present`` says that input was given."""
    return [
        k
        for k, m in SPEC["metrics"].items()
        if (m["methods"] == "all" or method in m["methods"])
        and present.get(m.get("requires", ""), True)
    ]


@dataclass(frozen=True)
class Result:
    """Loss :math:`\\mathcal L`, gradient :math:`\\partial\\mathcal L/\\partial\\log\\pi_\\theta`
    (list of rows of mpf) and the clause 7.1 metrics (key -> mpf), all exact to ~DPS digits;
    with ``ref_logp``, ``ref_grad`` is :math:`\\partial\\mathcal L/\\partial\\log\\pi_{ref}` (clause 10.3:
    minus the KL part of ``grad``), else None."""

    loss: Any
    grad: list[list[Any]]
    metrics: dict[str, Any]
    ref_grad: list[list[Any]] | None = None


def _matrix(x: Any, n: int, t: int, name: str) -> list[list[Any]]:
    rows = [list(r) for r in x]
    if len(rows) != n or any(len(r) != t for r in rows):
        raise ValueError(f"{name} must be [{n}, {t}]")
    return rows


# ------------------------------------------------------------------------------------------
# Gates (clause 2)
# ------------------------------------------------------------------------------------------
def _sigmoid_and_weight(x: Any) -> tuple[Any, Any]:
    """sigma(x) and w = 4 sigma (1 - sigma) = sech^2(x/2), for x in [-inf, inf].

    w is written with e^{-|x|} because 1 - sigma(x) cancels to nothing at 60 digits for x > 140.
    """
    if mpmath.isinf(x):
        return (mpf(1) if x > 0 else mpf(0)), mpf(0)
    e = mpmath.exp(-abs(x))
    sig = 1 / (1 + e) if x >= 0 else e / (1 + e)
    return sig, 4 * e / (1 + e) ** 2


def _sapo(log_x: Any, tau: Any) -> tuple[Any, Any, Any]:
    """Clause 2.1/2.2 at x = exp(log_x): (f, w, w * x) with the clause 5.3 limits."""
    if log_x == INF:  # r -> inf: f -> 4/tau, w -> 0 faster than r grows, so w r -> 0
        return 4 / tau, mpf(0), mpf(0)
    x = mpmath.exp(log_x)  # exp(-inf) = 0 exactly: the r -> 0 limits follow directly
    sig, w = _sigmoid_and_weight(tau * mpmath.expm1(log_x))
    return 4 / tau * sig, w, w * x


def _clip(log_x: Any, a: Any, eps_low: Any, eps_high: Any, dual: Any | None) -> dict[str, Any]:
    """Clause 2.4-2.6 at x = exp(log_x): term l, the eq. 24 indicator, the clip flags.

    The gradient of l with respect to log x is ``active * x * A`` (0 when not active, also
    at x = inf).
    """
    x = INF if log_x == INF else mpmath.exp(log_x)
    hi, lo = 1 + eps_high, 1 - eps_low
    out = {"low": False, "high": False, "dual": False}
    if a > 0:
        term = a * min(x, hi)
        out["high"] = x > hi
        active = x <= hi
    elif a < 0:
        g = max(x, lo)
        if dual is not None:
            g = min(g, dual)
            out["dual"] = x > dual
        term = a * g  # a * inf = -inf: the true limit without dual clip (clause 5.4)
        out["low"] = x < lo
        active = x >= lo and (dual is None or x <= dual)
    else:
        term, active = mpf(0), False  # clause 5.1, r = inf included
    out.update(term=term, active=active, dlog=(x * a if active else mpf(0)), x=x)
    return out


# ------------------------------------------------------------------------------------------
# KL estimators (clause 10.2, 10.5)
# ------------------------------------------------------------------------------------------
def _k3(u: Any) -> Any:
    """e^u - 1 - u at DPS digits for every u: the cancellation of expm1(u) - u costs about
    log10(1/|u|) digits when |u| < 1, so that many more are carried."""
    if mpmath.isinf(u):
        return INF
    if u == 0:
        return mpf(0)
    extra = max(0, int(-mpmath.log10(abs(u)))) + 10
    with mp.workdps(DPS + extra):
        v = mpmath.expm1(u) - u
    return +v  # rounded back to DPS digits


def kl_estimate(u: Any, estimator: str) -> tuple[Any, Any]:
    r"""Clause 10.2 at one token: :math:`(k(u),\ \partial k/\partial\log\pi_\theta)` for
    :math:`u = \log\pi_{ref} - \log\pi_\theta \in [-\infty, \infty]` (so :math:`\partial u/\partial\log\pi_\theta = -1`).

    ====================  =======================  ===================================
    estimator             k(u)                     dk / d logp
    ====================  =======================  ===================================
    k1                    -u                       1
    k2                    u^2 / 2                  -u
    k3                    e^u - 1 - u              -(e^u - 1)
    low-var-k3            min(k3, 10)              k3' where k3 <= 10, else 0
    ====================  =======================  ===================================

    >>> [to_float64(v) for v in kl_estimate(mpf(2) ** -30, "k3")]  # u^2/2 (1 + u/3), -u - u^2/2
    [4.33680869128834e-19, -9.313225750491594e-10]
    >>> [to_float64(v) for v in kl_estimate(-INF, "k3")], kl_estimate(-INF, "low-var-k3")
    ([inf, 1.0], (mpf('10.0'), mpf('0.0')))
    """
    with mp.workdps(DPS):
        u = mpf(u)
        if mpmath.isnan(u):
            raise ValueError("u is NaN")
        if estimator == "k1":
            return -u, mpf(1)
        if estimator == "k2":
            return u * u / 2, -u
        if estimator not in ("k3", "low-var-k3"):
            raise ValueError(f"kl_estimator must be one of {', '.join(KL_ESTIMATORS)}")
        k3 = _k3(u)
        dk3 = -INF if u == INF else -mpmath.expm1(u)
        if estimator == "low-var-k3" and k3 > LOW_VAR_CLIP:
            return mpf(LOW_VAR_CLIP), mpf(0)
        return k3, dk3


def kink_distance(log_x: Any, a: float, eps_low: float, eps_high: float, dual: float | None) -> Any:
    """Relative distance min |x/k - 1| of x = exp(log_x) to the clip kinks k that matter for
    the sign of ``a`` (1+eps_high for A > 0; 1-eps_low (when > 0) and dual for A < 0);
    inf when none does."""
    with mp.workdps(DPS):
        log_x = mpf(log_x)
        if mpmath.isinf(log_x):
            return INF
        x = mpmath.exp(log_x)
        kinks = []
        if a > 0:
            kinks.append(1 + mpf(eps_high))
        elif a < 0:
            if 1 - mpf(eps_low) > 0:
                kinks.append(1 - mpf(eps_low))
            if dual is not None:
                kinks.append(mpf(dual))
        return min((abs(x / k - 1) for k in kinks), default=INF)


# ------------------------------------------------------------------------------------------
# The loss (clauses 1-3, 5, 7)
# ------------------------------------------------------------------------------------------
def policy_loss(
    logp: Sequence[Sequence[float]],
    old_logp: Sequence[Sequence[float]],
    advantages: Sequence[Any],
    mask: Sequence[Sequence[Any]],
    *,
    method: str = SPEC["defaults"]["method"],
    loss_agg: str = SPEC["defaults"]["loss_agg"],
    tau_pos: float | None = None,
    tau_neg: float | None = None,
    eps_low: float | None = None,
    eps_high: float | None = None,
    dual_clip: float | None = None,
    norm_length: float | None = None,
    count_empty_rows: bool | None = None,
    normalizer: Any = None,
    weights: Sequence[Any] | None = None,
    ref_logp: Sequence[Sequence[float]] | None = None,
    kl_coef: float | None = None,
    kl_estimator: str | None = None,
) -> Result:
    """Loss, closed-form gradient and metrics of the spec, at DPS digits.

    ``normalizer`` is anything with ``num_tokens`` and ``num_rows`` (clause 3.8) or a pair.
    ``weights`` ([N] or [N, T]), ``ref_logp`` ([N, T]), ``kl_coef`` and ``kl_estimator`` are the
    clause 10 terms. Raises ``ValueError`` for the data errors of clauses 5.5, 8.5, 8.6 and
    10.4; option validation (clause 8.4) is not repeated here beyond the pairing of the KL
    keywords.

    >>> r = policy_loss([[-1.0]], [[-1.0]], [0.0], [[True]], ref_logp=[[-1.5]], kl_coef=2.0,
    ...                 kl_estimator="k2")
    >>> to_float64(r.loss), to_float64(r.grad[0][0]), to_float64(r.ref_grad[0][0])
    (0.25, 1.0, -1.0)
    """
    with mp.workdps(DPS):
        return _policy_loss(
            logp, old_logp, advantages, mask, method, loss_agg,
            dict(tau_pos=tau_pos, tau_neg=tau_neg, eps_low=eps_low, eps_high=eps_high,
                 dual_clip=dual_clip),
            norm_length, count_empty_rows, normalizer,
            dict(weights=weights, ref_logp=ref_logp, kl_coef=kl_coef, kl_estimator=kl_estimator),
        )  # fmt: skip


def _terms(terms: dict[str, Any], m: list[list[bool]]) -> tuple[Any, Any, Any, str | None]:
    """Clause 10 inputs as (w [N][T] or None, ref [N][T] or None, beta, estimator), checked
    at valid tokens (clause 10.4)."""
    n_rows, n_tok = len(m), len(m[0])
    if terms["ref_logp"] is None:
        if terms["kl_coef"] is not None or terms["kl_estimator"] is not None:
            raise ValueError("kl_coef and kl_estimator need ref_logp")
        ref, beta, est = None, None, None
    else:
        if terms["kl_coef"] is None:
            raise ValueError("ref_logp needs kl_coef")
        ref = _matrix(terms["ref_logp"], n_rows, n_tok, "ref_logp")
        beta = mpf(terms["kl_coef"])
        est = terms["kl_estimator"] or SPEC["defaults"]["kl_estimator"]
        if est not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {', '.join(KL_ESTIMATORS)}")
    w = None
    if terms["weights"] is not None:
        rows = list(terms["weights"])
        if len(rows) != n_rows:
            raise ValueError(f"weights must be [{n_rows}] or [{n_rows}, {n_tok}]")
        w = [list(r) if hasattr(r, "__len__") else [r] * n_tok for r in rows]
        if any(len(r) != n_tok for r in w):
            raise ValueError(f"weights must be [{n_rows}] or [{n_rows}, {n_tok}]")
    for i in range(n_rows):
        for t in range(n_tok):
            if not m[i][t]:
                continue
            if w is not None:
                w[i][t] = mpf(w[i][t])
                if not mpmath.isfinite(w[i][t]) or w[i][t] < 0:
                    raise ValueError(f"weights must be finite and >= 0 at valid tokens; {(i, t)}")
            if ref is not None and mpmath.isnan(mpf(ref[i][t])):
                raise ValueError(f"ref_logp is NaN at valid token {(i, t)}")
    return w, ref, beta, est


def _policy_loss(logp, old_logp, advantages, mask, method, loss_agg, given, norm_length,
                 count_empty_rows, normalizer, terms):  # fmt: skip
    mspec = SPEC["methods"][method]
    aspec = SPEC["loss_aggs"][loss_agg]
    params = _defaults(method)
    for k, v in given.items():
        if v is not None:
            if k not in mspec["params"]:
                raise ValueError(f"{k} does not apply to {method}")
            params[k] = v
    if count_empty_rows is None:
        count_empty_rows = SPEC["defaults"]["count_empty_rows"]
    soft = mspec["gate"] == "soft"
    ratio_kind = mspec["ratio"]  # token | sequence | sequence-token

    lp_rows = [list(r) for r in logp]
    n_rows, n_tok = len(lp_rows), len(lp_rows[0])
    old_rows = _matrix(old_logp, n_rows, n_tok, "old_logp")
    m = [[bool(v) for v in r] for r in _matrix(mask, n_rows, n_tok, "mask")]
    adv_in = list(advantages)
    per_token = hasattr(adv_in[0], "__len__")  # [N, T] rows, else [N] scalars

    # Clause 1.2-1.5 at valid tokens only; invalid positions are never read (clause 1.2).
    delta = [[None] * n_tok for _ in range(n_rows)]
    adv = [[None] * n_tok for _ in range(n_rows)]
    for i in range(n_rows):
        for t in range(n_tok):
            if not m[i][t]:
                continue
            a = mpf(adv_in[i][t]) if per_token else mpf(adv_in[i])
            if not mpmath.isfinite(a):
                raise ValueError(f"advantage at valid token {(i, t)} is not finite")
            d = mpf(lp_rows[i][t]) - mpf(old_rows[i][t])
            if mpmath.isnan(d):
                raise ValueError(f"log-ratio undefined at valid token {(i, t)}")
            delta[i][t], adv[i][t] = d, a
    lengths = [sum(1 for t in range(n_tok) if m[i][t]) for i in range(n_rows)]
    wts, ref, beta, estimator = _terms(terms, m)
    kl_val = {}  # (i, t) -> k(u), valid tokens, with ref_logp
    kl_d = {}  # (i, t) -> dk/dlogp
    if ref is not None:
        for i in range(n_rows):
            for t in range(n_tok):
                if m[i][t]:
                    u = mpf(ref[i][t]) - mpf(lp_rows[i][t])
                    if mpmath.isnan(u):
                        raise ValueError(f"logp - ref_logp is inf - inf at valid token {(i, t)}")
                    kl_val[i, t], kl_d[i, t] = kl_estimate(u, estimator)

    mu: list[Any] = [None] * n_rows  # log s_i (clause 1.4)
    for i in range(n_rows):
        if lengths[i]:
            ds = [delta[i][t] for t in range(n_tok) if m[i][t]]
            if INF in ds and -INF in ds:
                if ratio_kind != "token":
                    raise ValueError(f"row {i}: sequence ratio undefined (clause 5.5)")
                continue
            mu[i] = mpmath.fsum(ds) / lengths[i]

    # Clause 3: c_it = rho_it / D.
    n_valid = sum(lengths)
    r_count = n_rows if count_empty_rows else sum(1 for L in lengths if L)
    if normalizer is not None:
        if isinstance(normalizer, (tuple, list)):
            n_valid, r_count = normalizer
        else:
            n_valid, r_count = normalizer.num_tokens, normalizer.num_rows
    n_valid, r_count = mpf(n_valid), mpf(r_count)
    den = {
        "num_tokens": n_valid,
        "num_rows": r_count,
        "num_rows * norm_length": r_count * (mpf(norm_length) if norm_length is not None else 0),
    }[aspec["denominator"]]

    def weight(i: int) -> Any:
        if den == 0 or lengths[i] == 0:  # clause 3.7: 0/0 = 0; an empty row adds nothing
            return mpf(0)
        rho = 1 / mpf(lengths[i]) if aspec["row_weight"] == "1/L_i" else mpf(1)
        return rho / den

    # Per-token terms and d term / d log x.
    tau_pos, tau_neg = params.get("tau_pos"), params.get("tau_neg")
    eps_low, eps_high, dual = (
        params.get("eps_low"), params.get("eps_high"), params.get("dual_clip"),
    )  # fmt: skip
    if eps_low is not None:
        eps_low, eps_high = mpf(eps_low), mpf(eps_high)
        dual = None if dual is None else mpf(dual)
    total = mpf(0)
    grad = [[mpf(0)] * n_tok for _ in range(n_rows)]
    gate_w = {}  # (i, t) -> w, SAPO methods
    flags = {}  # (i, t) -> clip flags, clip methods
    for i in range(n_rows):
        c = weight(i)
        row_coef = mpf(0)  # sum_t c A dterm/dmu, for gradients that spread (clause 2.3, 2.7)
        for t in range(n_tok):
            if not m[i][t]:
                continue
            a = adv[i][t]
            log_x = delta[i][t] if ratio_kind == "token" else mu[i]
            if soft:
                tau = mpf(tau_pos) if a > 0 else mpf(tau_neg)  # clause 1.6
                f, w, wx = _sapo(log_x, tau)
                gate_w[i, t] = w
                term, dterm = f * a, wx * a
            else:
                cl = _clip(log_x, a, eps_low, eps_high, dual)
                flags[i, t] = cl
                term, dterm = cl["term"], cl["dlog"]
            if a == 0:
                term, dterm = mpf(0), mpf(0)  # clause 5.1
            w_it = mpf(1) if wts is None else wts[i][t]
            if c != 0 and w_it != 0:  # a zero factor removes the term, infinite or not (10.1)
                total += c * w_it * term
                coef = c * w_it * dterm
            else:
                coef = mpf(0)
            if ratio_kind == "sequence":
                row_coef += coef
            else:  # token ratio, and gspo-token: only through the token's own logp
                grad[i][t] = -coef
        if ratio_kind == "sequence" and lengths[i]:
            for t in range(n_tok):
                if m[i][t]:
                    grad[i][t] = -row_coef / lengths[i]
    loss = -total
    ref_grad = None
    if ref is not None:  # clauses 10.2, 10.3: beta c k(u) per valid token, beta = 0 exactly off
        ref_grad = [[mpf(0)] * n_tok for _ in range(n_rows)]
        kl_total = mpf(0)
        for i in range(n_rows):
            c = weight(i)
            if c == 0 or beta == 0:
                continue
            for t in range(n_tok):
                if m[i][t]:
                    kl_total += c * kl_val[i, t]
                    g = beta * c * kl_d[i, t]
                    grad[i][t] += g
                    ref_grad[i][t] = -g
        if beta != 0:
            loss += beta * kl_total
    metrics = _metrics(method, m, delta, adv, mu, lengths, gate_w, flags, soft, ratio_kind)
    if ref is not None:
        metrics["kl_ref/mean"] = _mean(list(kl_val.values()))
    if wts is not None:
        metrics["weights/mean"] = _mean([wts[i][t] for i, t in _cells(m)])
    keys = _metric_keys(method, {"ref_logp": ref is not None, "weights": wts is not None})
    assert set(metrics) == set(keys), sorted(set(metrics) ^ set(keys))
    return Result(loss=loss, grad=grad, metrics={k: metrics[k] for k in keys}, ref_grad=ref_grad)


def _cells(m: list[list[bool]]) -> list[tuple[int, int]]:
    return [(i, t) for i in range(len(m)) for t in range(len(m[0])) if m[i][t]]


def _mean(values: list[Any]) -> Any:
    return mpmath.fsum(values) / len(values) if values else mpf(0)


def _k1(deltas: list[Any]) -> Any:
    """Mean of -delta; +inf when some delta = -inf, even if another is +inf (the [metrics]
    definition: KL(old || new) is infinite once the new policy gives a sampled token zero mass)."""
    if -INF in deltas:
        return INF
    return _mean([-d for d in deltas])


def _metrics(method, m, delta, adv, mu, lengths, gate_w, flags, soft, ratio_kind):
    """Clause 7.1 from the [metrics.*] definitions, valid tokens only."""
    cells = _cells(m)
    ratio = {k: (INF if delta[k[0]][k[1]] == INF else mpmath.exp(delta[k[0]][k[1]])) for k in cells}
    rs = [ratio[k] for k in cells]
    pos = [k for k in cells if adv[k[0]][k[1]] > 0]
    neg = [k for k in cells if adv[k[0]][k[1]] < 0]

    def k3(d: Any) -> Any:  # (r - 1) - delta; both limits are +inf
        return INF if mpmath.isinf(d) else mpmath.expm1(d) - d

    out = {
        "tokens": mpf(len(cells)),
        "rows": mpf(sum(1 for L in lengths if L)),
        "ratio/mean": _mean(rs),
        "ratio/min": min(rs) if rs else mpf(0),
        "ratio/max": max(rs) if rs else mpf(0),
        "kl/k1": _k1([delta[i][t] for i, t in cells]),
        "kl/k3": _mean([k3(delta[i][t]) for i, t in cells]),
        "tokens_pos": mpf(len(pos)),
        "tokens_neg": mpf(len(neg)),
    }
    if ratio_kind != "token":
        ss = [INF if mu[i] == INF else mpmath.exp(mu[i]) for i in range(len(m)) if lengths[i]]
        out["seq_ratio/mean"] = _mean(ss)
        out["seq_ratio/min"] = min(ss) if ss else mpf(0)
        out["seq_ratio/max"] = max(ss) if ss else mpf(0)
    if soft:
        out["gate/mean"] = _mean([gate_w[k] for k in cells])
        out["gate/mean_pos"] = _mean([gate_w[k] for k in pos])
        out["gate/mean_neg"] = _mean([gate_w[k] for k in neg])
    else:
        n = len(cells)
        for name in ("low", "high", "dual"):
            count = sum(1 for k in cells if flags[k][name])
            out[f"clip/{name}_frac"] = mpf(count) / n if n else mpf(0)
        out["clip/frac"] = out["clip/low_frac"] + out["clip/high_frac"] + out["clip/dual_frac"]
    return out


# ------------------------------------------------------------------------------------------
# Tools (clause 9)
# ------------------------------------------------------------------------------------------
def group_advantages(
    rewards: Sequence[float], group_size: int, *, scale: str = "std", ddof: int = 1,
    eps: float = 1e-6,
) -> list[Any]:  # fmt: skip
    """Clause 9.1: A_i = (R_i - mean_g) / (std_g + eps), or centred only; flat groups give 0.

    >>> [to_float64(a) for a in group_advantages([1.0, 0.0], 2, eps=0.0)]
    [0.7071067811865476, -0.7071067811865476]
    """
    with mp.workdps(DPS):
        out = []
        for g0 in range(0, len(rewards), group_size):
            grp = [mpf(r) for r in rewards[g0 : g0 + group_size]]
            if len(grp) == 1 or all(r == grp[0] for r in grp):
                out += [mpf(0)] * len(grp)
                continue
            mean = mpmath.fsum(grp) / len(grp)
            if scale == "none":
                out += [r - mean for r in grp]
                continue
            var = mpmath.fsum((r - mean) ** 2 for r in grp) / (len(grp) - ddof)
            den = mpmath.sqrt(var) + mpf(eps)
            out += [(r - mean) / den for r in grp]
        return out


def sequence_gate_diagnostics(
    logp: Sequence[Sequence[float]],
    old_logp: Sequence[Sequence[float]],
    mask: Sequence[Sequence[Any]],
    tau: float | Sequence[float] = 1.0,
) -> dict[str, list[Any]]:
    """Clause 9.2 per row: var, gap D_i, bound tau^2/4 Var_i, mean_log_ratio mu_i (0 if empty).

    >>> d = sequence_gate_diagnostics([[0.5, -0.5]], [[0.0, 0.0]], [[1, 1]])
    >>> to_float64(d["var"][0]), d["gap"][0] <= d["bound"][0]
    (0.25, True)
    """
    with mp.workdps(DPS):
        out: dict[str, list[Any]] = {"var": [], "gap": [], "bound": [], "mean_log_ratio": []}
        for i, (lp, olp, mk) in enumerate(zip(logp, old_logp, mask)):
            z = [mpf(a) - mpf(b) for a, b, k in zip(lp, olp, mk) if k]
            if not z:
                for key in out:
                    out[key].append(mpf(0))
                continue
            tau_i = mpf(tau if isinstance(tau, (int, float)) else tau[i])
            mu = mpmath.fsum(z) / len(z)
            var = mpmath.fsum((v - mu) ** 2 for v in z) / len(z)

            def g(v: Any) -> Any:  # sech^2(tau v / 2)
                return mpmath.sech(tau_i * v / 2) ** 2

            gap = abs(mpmath.fsum(g(v) for v in z) / len(z) - g(mu))
            out["var"].append(var)
            out["gap"].append(gap)
            out["bound"].append(tau_i**2 / 4 * var)
            out["mean_log_ratio"].append(mu)
        return out
