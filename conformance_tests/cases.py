r"""Conformance cases: seeded, deterministic inputs tagged with the clauses they exercise.

A :class:`Case` holds float64 NumPy inputs and the options the call needs (only those: a
third-party function gets exactly ``fn(logp, old_logp, advantages, mask, **options)``).
:func:`generate_cases` draws ``per_clause`` cases for every clause of :data:`GENERATORS` from
``numpy.random.default_rng([seed, clause index, k])``, so a case does not change when the count
of other clauses' cases does. :func:`golden_cases` adds the spec's golden vectors.

:func:`materialize` turns a case into the inputs of one dtype: rounded to the dtype, with
clip-method ratios moved off the kinks (clause 2.5: never within 1e-3 relative), and the
float64 reference evaluated on the rounded inputs (clause C.1). A case does not apply to a
dtype whose range cannot hold its inputs or the reference's outputs.

>>> cases = generate_cases(seed=0, per_clause=1)
>>> cases[0].id, cases[0].clauses[0]
('1.5-00', '1.5')
>>> m = materialize(cases[0], "float32")
>>> m.logp.dtype.name, bool(np.isfinite(m.want_loss))
('float32', True)
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import sapo_ref
from sapo_ref import spec

__all__ = [
    "Case",
    "Materialized",
    "DTYPES",
    "GENERATORS",
    "generate_cases",
    "golden_cases",
    "materialize",
    "round_to",
    "KINK_DISTANCE",
    "KL_ESTIMATORS",
    "CONTRACT_OPTIONS",
    "resolve",
    "case_count",
    "VARIANTS",
    "ERROR_KINDS",
]

#: Dtype names the suite knows, highest precision first.
DTYPES: tuple[str, ...] = ("float64", "float32", "bfloat16", "float16")
#: Clip-method ratios stay at least this far (relative) from a kink (clause 2.5).
KINK_DISTANCE = 1e-3
#: Shapes of the advantages: "token" [N, T], "sequence" [N] (the capability's names).
ADVANTAGE_SHAPES: tuple[str, ...] = ("sequence", "token")
#: Options of the third-party contract (issue 3); count_empty_rows and normalizer are not in it.
CONTRACT_OPTIONS = (
    "method",
    "loss_agg",
    "tau_pos",
    "tau_neg",
    "eps_low",
    "eps_high",
    "dual_clip",
    "norm_length",
    "kl_coef",
    "kl_estimator",
)
#: The KL estimators of clause 10.2, the default (k3) first.
KL_ESTIMATORS: tuple[str, ...] = tuple(
    sorted(getattr(sapo_ref, "KL_ESTIMATOR_NAMES", ()), key=lambda k: k != "k3")
)
#: Whether this sapo_ref takes the terms of spec 0.2.0 (weights, ref_logp, kl_coef, ...).
_HAS_TERMS = "ref_logp" in inspect.signature(sapo_ref.policy_loss).parameters


def resolve(options: dict[str, Any], *, has_ref_logp: bool = False) -> sapo_ref.LossConfig:
    """The reference's configuration of a case's options (``count_empty_rows`` included).

    >>> resolve({"method": "grpo"}).eps_low
    0.2
    """
    opts = {k: v for k, v in options.items() if k in (*CONTRACT_OPTIONS, "count_empty_rows")}
    if has_ref_logp:
        return sapo_ref.resolve_config(**opts, has_ref_logp=True)
    return sapo_ref.resolve_config(**opts)


@dataclass(frozen=True)
class Case:
    """One case: id, clauses it exercises (the first is the one it was drawn for), inputs, options.

    ``fd`` says whether a float64 finite-difference check of the implementation's own gradient
    is meaningful (no infinities, no kinks within reach); ``dtypes`` where the case applies.
    ``weights`` ([N] or [N, T]; float, bool or int64) and ``ref_logp`` ([N, T]) are the
    keyword arrays of clause 10 (None: not passed). An error case (``error``, clause 10.4)
    names the exception the call must raise; ``poison`` says a NaN loss and gradient also
    conform (a data fault under tracing, clause 8.7).
    """

    id: str
    clauses: tuple[str, ...]
    logp: np.ndarray
    old_logp: np.ndarray
    advantages: np.ndarray
    mask: np.ndarray
    options: dict[str, Any] = field(default_factory=dict)
    fd: bool = True
    dtypes: tuple[str, ...] = DTYPES
    weights: np.ndarray | None = None
    ref_logp: np.ndarray | None = None
    error: str | None = None
    poison: bool = False

    @property
    def method(self) -> str:
        return self.options.get("method", spec.DATA["defaults"]["method"])

    @property
    def loss_agg(self) -> str:
        return self.options.get("loss_agg", spec.DATA["defaults"]["loss_agg"])

    @property
    def kl_estimator(self) -> str | None:
        """The estimator the case asks for (the spec's default with ref_logp alone), or None."""
        if self.ref_logp is None and not {"kl_coef", "kl_estimator"} & set(self.options):
            return None
        return self.options.get("kl_estimator", spec.DATA["defaults"].get("kl_estimator"))

    def keyword_arrays(self) -> dict[str, np.ndarray]:
        """The clause 10 arrays the call passes as keywords."""
        out = {"weights": self.weights, "ref_logp": self.ref_logp}
        return {k: v for k, v in out.items() if v is not None}


@dataclass(frozen=True)
class Materialized:
    """A case in one dtype: rounded inputs (NumPy; bfloat16 held as float32 values) and the
    float64 reference on them."""

    case: Case
    dtype: str
    logp: np.ndarray
    old_logp: np.ndarray
    advantages: np.ndarray
    mask: np.ndarray
    want_loss: float
    want_grad: np.ndarray
    want_metrics: dict[str, float]
    weights: np.ndarray | None = None
    ref_logp: np.ndarray | None = None
    #: dL/d ref_logp of the reference (clause 10.3), when the case passes ref_logp.
    want_ref_grad: np.ndarray | None = None

    def keyword_arrays(self) -> dict[str, np.ndarray]:
        """The rounded clause 10 arrays the call passes as keywords."""
        out = {"weights": self.weights, "ref_logp": self.ref_logp}
        return {k: v for k, v in out.items() if v is not None}


# ----------------------------------------------------------------------------- rounding


def _bf16(x: np.ndarray) -> np.ndarray:
    """Round float64 to the nearest bfloat16 (ties to even), returned as float32 values."""
    f = np.asarray(x, np.float64).astype(np.float32)
    bits = f.view(np.uint32).astype(np.uint64)
    finite = np.isfinite(f)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).astype(np.uint32)
    out = np.where(finite, rounded.view(np.float32), f)
    return out.astype(np.float32)


def round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """``x`` rounded to ``dtype``; bfloat16 comes back as float32 holding bfloat16 values.

    >>> round_to(np.array([1.0 + 2**-10]), "bfloat16").tolist()
    [1.0]
    """
    x = np.asarray(x, np.float64)
    if dtype == "bfloat16":
        return _bf16(x)
    with np.errstate(over="ignore"):
        return x.astype(dtype)


def _max_finite(dtype: str) -> float:
    if dtype == "bfloat16":
        return 3.3895313892515355e38
    return float(np.finfo(dtype).max)


# ----------------------------------------------------------------------------- generation


#: One shape (N != T): a jitting backend compiles once per shape and dtype, and repros stay
#: short; raggedness comes from the masks.
_SHAPES = ((4, 6),)


def _shape(rng: np.random.Generator) -> tuple[int, int]:
    return _SHAPES[int(rng.integers(len(_SHAPES)))]


def _mask(rng: np.random.Generator, n: int, t: int, empty: bool = False) -> np.ndarray:
    """Ragged mask: right padding, or scattered holes; every row non-empty unless ``empty``."""
    lengths = rng.integers(0 if empty else 1, t + 1, size=n)
    if empty:
        lengths[rng.integers(n)] = 0  # at least one empty row
        lengths[rng.integers(n)] = max(1, lengths.max())  # and one non-empty
    m = np.arange(t)[None, :] < lengths[:, None]
    if rng.random() < 0.3:  # holes: a permutation keeps each row's length
        m = np.stack([row[rng.permutation(t)] for row in m])
    return m


def _old(rng: np.random.Generator, n: int, t: int) -> np.ndarray:
    return -rng.exponential(1.5, size=(n, t)) - 0.05


def _adv(rng: np.random.Generator, n: int, t: int, per_token: bool | None = None) -> np.ndarray:
    """Advantages [N, T] or [N]; a preferred shape the subset does not allow gives the other."""
    shapes = _SUBSET["advantages"]
    if per_token is not None and ("token" if per_token else "sequence") not in shapes:
        per_token = not per_token
    elif per_token is None and len(shapes) == 1:
        per_token = shapes[0] == "token"
    if per_token is None:
        per_token = bool(rng.random() < 0.5)
    shape = (n, t) if per_token else (n,)
    return rng.normal(0.0, 1.0, size=shape)


def _garbage(
    rng: np.random.Generator, x: np.ndarray, mask: np.ndarray, nonfinite: bool
) -> np.ndarray:
    """Fill invalid positions: random finite values, or NaN/inf/1e30 (clause 6.1)."""
    x = x.copy()
    if x.shape != mask.shape:
        return x
    pool = np.array([np.nan, np.inf, -np.inf, 1e30, -1e30]) if nonfinite else None
    bad = ~mask
    if nonfinite:
        x[bad] = rng.choice(pool, size=int(bad.sum()))
    else:
        x[bad] = rng.normal(-3.0, 3.0, size=int(bad.sum()))
    return x


def _clean(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Zeros at invalid positions: a case about extreme valid values carries no padding cause."""
    return np.where(mask, x, 0.0) if x.shape == mask.shape else x


def _tau(rng: np.random.Generator) -> dict[str, float]:
    """Temperatures around the paper's, tau_pos != tau_neg both ways, or the defaults."""
    k = rng.integers(4)
    if k == 0:
        return {}
    a, b = (float(v) for v in rng.choice([0.5, 0.95, 1.0, 1.05, 2.0, 4.0], size=2, replace=False))
    return {"tau_pos": a, "tau_neg": b} if k < 3 else {"tau_pos": b}


def _eps(rng: np.random.Generator, method: str) -> dict[str, float]:
    k = rng.integers(3)
    if k == 0:
        return {}
    if method == "grpo" or k == 1:  # clip-higher (DAPO) or symmetric
        lo = float(rng.choice([0.1, 0.2, 0.3]))
        return {
            "eps_low": lo,
            "eps_high": lo if rng.random() < 0.4 else float(rng.choice([0.28, 0.4])),
        }
    return {"eps_low": 3e-4, "eps_high": 4e-4}


def _agg(rng: np.random.Generator, t: int, agg: str | None = None) -> dict[str, Any]:
    if agg is not None:
        _allowed("loss_aggs", (agg,))
    agg = agg or str(rng.choice(_allowed("loss_aggs", sapo_ref.LOSS_AGG_NAMES)))
    out: dict[str, Any] = {"loss_agg": agg}
    if "norm_length" in spec.LOSS_AGGS[agg].requires:
        out["norm_length"] = float(rng.choice([t, 2 * t, 512.0]))
    return out


def _opts(rng: np.random.Generator, method: str, t: int, agg: str | None = None) -> dict[str, Any]:
    opts: dict[str, Any] = {"method": method, **_agg(rng, t, agg)}
    if spec.METHODS[method].gate == "soft":
        opts.update(_tau(rng))
    else:
        opts.update(_eps(rng, method))
    return opts


def _batch(
    rng: np.random.Generator,
    sigma: float = 0.3,
    empty: bool = False,
    per_token: bool | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    n, t = _shape(rng)
    mask = _mask(rng, n, t, empty)
    old = _old(rng, n, t)
    logp = old + rng.normal(0.0, sigma, size=(n, t))
    adv = _adv(rng, n, t, per_token)
    return (_garbage(rng, logp, mask, False), _garbage(rng, old, mask, False), adv, mask)


Gen = Callable[[np.random.Generator], dict[str, Any]]


class _NotApplicable(Exception):
    """The clause's generator cannot draw a case inside the requested subset."""


#: Methods and aggregations the current draw may use (set by generate_cases for a subset).
_SUBSET: dict[str, tuple[str, ...]] = {
    "methods": sapo_ref.METHOD_NAMES,
    "loss_aggs": sapo_ref.LOSS_AGG_NAMES,
    "advantages": ADVANTAGE_SHAPES,
}


def _allowed(kind: str, names: tuple[str, ...]) -> tuple[str, ...]:
    keep = tuple(n for n in names if n in _SUBSET[kind])
    if not keep:
        raise _NotApplicable(kind)
    return keep


def _pick(rng: np.random.Generator, names: tuple[str, ...]) -> str:
    """A method from ``names`` (repeats weight it) restricted to the subset being drawn."""
    return str(rng.choice(_allowed("methods", names)))


def _g_adv_per_token(rng):  # 1.5: per-token advantages, sequence methods pair s_i with A_it
    _allowed("advantages", ("token",))
    lp, old, adv, m = _batch(rng, per_token=True)
    method = _pick(rng, ("sapo-seq", "gspo", "gspo-token", "sapo", "grpo"))
    opts = _opts(rng, method, m.shape[1])
    if method in ("gspo", "gspo-token"):
        opts.update({"eps_low": 0.2, "eps_high": 0.28})
    return dict(inputs=(lp, old, adv, m), options=opts, extra=(spec.METHODS[method].clause,))


def _g_tau_select(rng):  # 1.6: signs mixed, A = 0 present, tau_pos != tau_neg both ways
    lp, old, adv, m = _batch(rng, sigma=0.6, per_token=True)
    adv[rng.random(adv.shape) < 0.2] = 0.0
    a, b = (float(v) for v in rng.choice([0.5, 1.0, 1.05, 2.0, 4.0], size=2, replace=False))
    method = _pick(rng, ("sapo", "sapo-seq"))
    opts = {"method": method, "tau_pos": a, "tau_neg": b, **_agg(rng, m.shape[1])}
    return dict(inputs=(lp, old, adv, m), options=opts, extra=(spec.METHODS[method].clause,))


def _method_gen(method: str, sigma: float) -> Gen:
    def gen(rng):
        _allowed("methods", (method,))
        lp, old, adv, m = _batch(rng, sigma=sigma)
        opts = _opts(rng, method, m.shape[1])
        return dict(
            inputs=(lp, old, adv, m), options=opts, extra=(spec.LOSS_AGGS[opts["loss_agg"]].clause,)
        )

    return gen


def _g_dual(rng):  # 2.6: dual clip, A < 0 with ratios beyond c
    lp, old, adv, m = _batch(rng, sigma=0.8)
    adv = -np.abs(adv) if rng.random() < 0.5 else adv
    method = _pick(rng, ("grpo", "gspo", "gspo-token"))
    c = float(rng.choice([1.5, 2.0, 3.0]))
    opts = {"method": method, **_agg(rng, m.shape[1]), "dual_clip": c}
    if method != "grpo":
        opts.update({"eps_low": 0.2, "eps_high": 0.2})
        rows = rng.random(m.shape[0]) < 0.5  # some rows with s_i far above c
        lp = np.where(rows[:, None], old + math.log(c) + 0.7, lp)
    return dict(inputs=(lp, old, adv, m), options=opts, extra=(spec.METHODS[method].clause,))


def _agg_gen(agg: str) -> Gen:
    def gen(rng):
        lp, old, adv, m = _batch(rng, sigma=0.4)
        method = _pick(rng, sapo_ref.METHOD_NAMES)
        opts = _opts(rng, method, m.shape[1], agg)
        return dict(inputs=(lp, old, adv, m), options=opts, extra=(spec.METHODS[method].clause,))

    return gen


def _g_empty(rng):  # 3.6: empty rows excluded from R by default
    lp, old, adv, m = _batch(rng, empty=True)
    method = _pick(rng, sapo_ref.METHOD_NAMES)
    agg = str(
        rng.choice(
            _allowed(
                "loss_aggs",
                ("seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"),
            )
        )
    )
    opts = _opts(rng, method, m.shape[1], agg)
    return dict(inputs=(lp, old, adv, m), options=opts, extra=(spec.LOSS_AGGS[agg].clause,))


def _g_no_token(rng):  # 3.7: no valid token: loss 0, gradient 0 (clean padding: one cause)
    lp, old, adv, m = _batch(rng)
    m[:] = False
    lp, old, adv = _clean(lp, m), _clean(old, m), _clean(adv, m)
    method = _pick(rng, sapo_ref.METHOD_NAMES)
    return dict(inputs=(lp, old, adv, m), options=_opts(rng, method, m.shape[1]), fd=False)


def _g_method_defaults(rng):  # 4.1: method parameters left to their defaults
    lp, old, adv, m = _batch(rng, sigma=0.5)
    method = _pick(rng, sapo_ref.METHOD_NAMES)
    if spec.METHODS[method].is_sequence and spec.METHODS[method].gate == "clip":
        # GSPO's default band is 3e-4 wide: make rows either on-policy or well outside it.
        rows = rng.random(m.shape[0]) < 0.5
        lp = np.where(rows[:, None], old, lp)
    opts = {"method": method, **_agg(rng, m.shape[1])}
    return dict(inputs=(lp, old, adv, m), options=opts, extra=(spec.METHODS[method].clause,))


def _g_agg_defaults(rng):  # 4.2: no loss_agg given (seq-mean-token-mean, empty rows excluded)
    _allowed("loss_aggs", (spec.DATA["defaults"]["loss_agg"],))
    lp, old, adv, m = _batch(rng, empty=bool(rng.random() < 0.5))
    method = _pick(rng, ("sapo", "grpo", "sapo-seq"))
    return dict(inputs=(lp, old, adv, m), options={"method": method}, extra=("3.3", "3.6"))


def _g_zero_adv(rng):  # 5.1: A = 0 with any ratio, r = inf included
    lp, old, adv, m = _batch(rng, sigma=1.0, per_token=True)
    zero = rng.random(adv.shape) < 0.5
    adv[zero] = 0.0
    method = _pick(rng, ("sapo", "grpo"))
    zero = np.broadcast_to(zero if zero.ndim == 2 else zero[:, None], m.shape)
    huge = zero & m & (rng.random(m.shape) < 0.5)
    lp = np.where(huge, old + rng.choice([30.0, 200.0, np.inf], size=lp.shape), lp)
    return dict(
        inputs=(_clean(lp, m), _clean(old, m), _clean(adv, m), m),
        options=_opts(rng, method, m.shape[1]),
        fd=False,
    )


def _g_on_policy(rng):  # 5.2: delta = 0
    lp, old, adv, m = _batch(rng)
    lp = np.where(m, old, lp)
    method = _pick(rng, sapo_ref.METHOD_NAMES)
    return dict(
        inputs=(lp, old, adv, m),
        options=_opts(rng, method, m.shape[1]),
        extra=(spec.METHODS[method].clause,),
    )


# 710.5: past float64 exp overflow (709.78) where c A r is still finite (the clause 5.4 band).
_EXTREME = np.array([25.0, 60.0, 90.0, 100.0, 700.0, 710.5, 800.0, 1e4, 1e6, np.inf])


def _extreme_deltas(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    mag = rng.choice(_EXTREME, size=shape)
    return mag * rng.choice([-1.0, 1.0], size=shape)


def _g_sapo_extreme(rng):  # 5.3 / 6.3: SAPO at extreme valid log-ratios, exact limits
    lp, old, adv, m = _batch(rng)
    d = _extreme_deltas(rng, lp.shape)
    pick = m & (rng.random(lp.shape) < 0.6)
    if rng.random() < 0.5:  # put the extreme value on logp or on old_logp
        lp = np.where(pick, np.where(np.isinf(d), d, old + d), lp)
    else:
        old = np.where(pick, np.where(np.isinf(d), -d, lp - d), old)
    method = _pick(rng, ("sapo", "sapo", "sapo-seq"))
    if method == "sapo-seq":  # a row may not hold both +inf and -inf (clause 5.5)
        delta = lp - old
        for i in range(m.shape[0]):
            row = delta[i][m[i]]
            if np.any(row == np.inf) and np.any(row == -np.inf):
                lp[i] = np.where(m[i] & (delta[i] == -np.inf), old[i], lp[i])
    return dict(
        inputs=(_clean(lp, m), _clean(old, m), _clean(adv, m), m),
        options=_opts(rng, method, m.shape[1]),
        fd=False,
        extra=("2.1" if method == "sapo" else "2.3",),
    )


def _g_clip_extreme(rng):  # 5.4: clipped methods at extreme ratios, +inf loss where A < 0
    lp, old, adv, m = _batch(rng)
    d = _extreme_deltas(rng, lp.shape)
    method = _pick(rng, ("grpo", "grpo", "gspo", "gspo-token"))
    pick = m & (rng.random(lp.shape) < 0.5)
    if method != "grpo":  # one sign per row keeps s_i defined (clause 5.5)
        d = np.abs(d) * rng.choice([-1.0, 1.0], size=(lp.shape[0], 1))
    lp = np.where(pick, np.where(np.isinf(d), d, old + d), lp)
    opts = _opts(rng, method, m.shape[1])
    if method != "grpo":
        opts.update({"eps_low": 0.2, "eps_high": 0.2})
    if rng.random() < 0.4:
        opts["dual_clip"] = 3.0
    return dict(
        inputs=(_clean(lp, m), _clean(old, m), _clean(adv, m), m),
        options=opts,
        fd=False,
        extra=(spec.METHODS[method].clause,),
    )


def _g_masking(rng):  # 6.1: NaN/inf/1e30 at invalid positions change nothing
    lp, old, adv, m = _batch(rng, per_token=True)
    lp = _garbage(rng, lp, m, True)
    old = _garbage(rng, old, m, True)
    adv = _garbage(rng, adv, m, True)
    method = _pick(rng, sapo_ref.METHOD_NAMES)
    opts = _opts(rng, method, m.shape[1])
    if method in ("gspo", "gspo-token"):
        opts.update({"eps_low": 0.2, "eps_high": 0.2})
    return dict(
        inputs=(lp, old, adv, m), options=opts, fd=False, extra=(spec.METHODS[method].clause,)
    )


CLAMP = 20.0  # the +-20 log-ratio clamp of verl, SkyRL and torchforge (clause 6.2)


def _clamp_changes(lp, old, adv, mask, options) -> bool:
    """Whether clamping the valid log-ratios to +-CLAMP (no gradient outside, as a clamp does)
    changes the float64 reference's loss or gradient beyond the float64 tolerance."""
    from .compare import compare

    with np.errstate(all="ignore"):
        delta = np.where(mask, lp - old, 0.0)
        clamped = np.clip(delta, -CLAMP, CLAMP)
    try:
        want = _reference(lp, old, adv, mask, options)
        got = _reference(np.where(mask, clamped, lp), np.where(mask, 0.0, old), adv, mask, options)
    except ValueError:
        return False
    grad = np.where(clamped != delta, 0.0, got.grad)
    tol = spec.TOLERANCES["float64"]
    return not (
        compare("loss", got.loss, want.loss, tol["value"]).ok
        and compare("grad", grad, want.grad, tol["grad"]).ok
    )


def _g_no_clamp(rng):  # 6.2: valid |delta| past 20 where a +-20 clamp changes the float64 result
    method = _pick(rng, sapo_ref.METHOD_NAMES)
    for _attempt in range(30):  # resample (same stream: deterministic) until the clamp shows
        lp, old, adv, m = _batch(rng)
        t = m.shape[1]
        pick = m & (rng.random(lp.shape) < 0.4)
        if method == "sapo":
            # Past +20 SAPO is saturated either way; below -20 the clamp keeps r = e^-20 and a
            # gradient w r that the spec's r (and its gradient) have lost: visible in float64
            # just past the bound.
            d = -rng.uniform(20.5, 23.0, size=lp.shape)
        else:
            d = rng.uniform(21.0, 60.0, size=lp.shape) * rng.choice([-1.0, 1.0], size=lp.shape)
        lp = np.where(pick, old + d, lp)
        if method == "grpo":
            adv = -np.abs(adv) - 0.1  # A < 0, no dual clip: the term is r A, unbounded
        opts = _opts(rng, method, t)
        opts.pop("dual_clip", None)
        if spec.METHODS[method].gate == "soft":
            opts.pop("tau_pos", None), opts.pop("tau_neg", None)  # w(0) = sech^2(tau/2) near 1
        if method in ("gspo", "gspo-token"):
            opts.update({"eps_low": 0.2, "eps_high": 0.2})
        lp, old, adv = _clean(lp, m), _clean(old, m), _clean(adv, m)
        if _clamp_changes(lp, old, adv, m, opts):
            break
    return dict(
        inputs=(lp, old, adv, m), options=opts, fd=False, extra=(spec.METHODS[method].clause,)
    )


# ----------------------------------------------------------------------------- clause 10 terms


def _weights(
    rng: np.random.Generator, mask: np.ndarray, layout: str | None = None, kind: str | None = None
) -> np.ndarray:
    """Per-token weights (clause 10.1): [N] ("row") or [N, T] ("token"); float (zeros at some
    valid tokens, values from 1e-6 to 1e4, NaN/inf/negative padding sometimes), bool or int64."""
    n, t = mask.shape
    layout = layout or ("token" if rng.random() < 0.6 else "row")
    shape = (n, t) if layout == "token" else (n,)
    kind = kind or str(rng.choice(["float", "float", "float", "bool", "int"]))
    if kind == "bool":
        return rng.random(shape) < 0.7
    if kind == "int":
        return rng.integers(0, 4, size=shape).astype(np.int64)
    w = rng.uniform(0.1, 2.0, size=shape)
    w = np.where(rng.random(shape) < 0.15, w * 1e4, w)
    w = np.where(rng.random(shape) < 0.15, w * 1e-6, w)
    w[rng.random(shape) < 0.2] = 0.0
    if layout == "token" and rng.random() < 0.3:  # only valid tokens are checked (clause 10.4)
        bad = ~mask
        w[bad] = rng.choice([np.nan, np.inf, -np.inf, -1.0, 1e30], size=int(bad.sum()))
    return w


def _ref_logp(
    rng: np.random.Generator, lp: np.ndarray, mask: np.ndarray, sigma: float
) -> np.ndarray:
    """Reference log-probs ``logp + u`` (u ~ N(0, sigma)); garbage padding sometimes (6.1)."""
    ref = lp + rng.normal(0.0, sigma, size=lp.shape)
    return _garbage(rng, ref, mask, bool(rng.random() < 0.3))


def _kl(rng: np.random.Generator, estimator: str | None = None) -> dict[str, Any]:
    """kl_coef and (for k3, the default, only sometimes) kl_estimator."""
    est = estimator or str(rng.choice(KL_ESTIMATORS))
    # Two coefficients: each value is a configuration a compiling backend builds anew.
    opts: dict[str, Any] = {"kl_coef": float(rng.choice([0.04, 1.0]))}
    if est != KL_ESTIMATORS[0] or rng.random() < 0.5:
        opts["kl_estimator"] = est
    return opts


def _term_opts(rng: np.random.Generator, method: str, t: int) -> dict[str, Any]:
    """The method's parameters at their defaults (clauses 1-6 vary them; here every value
    would be one more configuration for a compiling backend), GSPO's band widened."""
    opts: dict[str, Any] = {"method": method, **_agg(rng, t)}
    if method in ("gspo", "gspo-token"):  # a band wide enough that gradients flow
        opts.update({"eps_low": 0.2, "eps_high": 0.28})
    return opts


def _g_weights(rng):  # 10.1: per-token weights, [N] and [N, T], float/bool/int, zeros, large/small
    lp, old, adv, m = _batch(rng, sigma=0.4)
    method = _pick(rng, sapo_ref.METHOD_NAMES)
    opts = _term_opts(rng, method, m.shape[1])
    return dict(
        inputs=(lp, old, adv, m),
        options=opts,
        weights=_weights(rng, m),
        extra=(spec.METHODS[method].clause, spec.LOSS_AGGS[opts["loss_agg"]].clause),
    )


def _g_kl(rng, estimator):  # 10.2: the KL penalty with each estimator, with or without weights
    lp, old, adv, m = _batch(rng, sigma=0.4)
    method = _pick(rng, sapo_ref.METHOD_NAMES)
    opts = {**_term_opts(rng, method, m.shape[1]), **_kl(rng, estimator)}
    ref = _ref_logp(rng, lp, m, float(rng.choice([0.05, 0.3, 1.0])))
    w = _weights(rng, m) if rng.random() < 0.4 else None
    return dict(
        inputs=(lp, old, adv, m),
        options=opts,
        weights=w,
        ref_logp=ref,
        extra=("10.3", spec.METHODS[method].clause),
    )


def _g_terms_grad(rng):  # 10.3: weights and KL together; sequence methods spread the gradient
    lp, old, adv, m = _batch(rng, sigma=0.3)
    method = _pick(rng, ("gspo", "gspo", "sapo-seq", "gspo-token", "sapo", "grpo"))
    opts = {**_term_opts(rng, method, m.shape[1]), **_kl(rng)}
    return dict(
        inputs=(lp, old, adv, m),
        options=opts,
        weights=_weights(rng, m, kind="float"),
        ref_logp=_ref_logp(rng, lp, m, 0.3),
        extra=("10.1", "10.2", spec.METHODS[method].clause),
    )


#: The errors of clause 10.4, one case each: (raised type, whether a NaN result also conforms
#: because it is a data fault a traced call poisons instead, clause 8.7).
ERROR_KINDS: dict[str, tuple[str, bool]] = {
    "weights-shape": ("ValueError", False),
    "weights-nan": ("ValueError", True),
    "weights-inf": ("ValueError", True),
    "weights-negative": ("ValueError", True),
    "ref-logp-shape": ("ValueError", False),
    "ref-logp-nan": ("ValueError", True),
    "ref-logp-inf-minus-inf": ("ValueError", True),
    "ref-logp-without-kl-coef": ("ValueError", False),
    "kl-coef-without-ref-logp": ("ValueError", False),
    "kl-estimator-without-ref-logp": ("ValueError", False),
    "kl-estimator-unknown": ("ValueError", False),
    "kl-coef-negative": ("ValueError", False),
    "kl-coef-nan": ("ValueError", False),
    "kl-coef-too-large": ("ValueError", False),
}


def _g_errors(rng, kind):  # 10.4: every error of the added inputs
    lp, old, adv, m = _batch(rng, sigma=0.3)
    # One method and aggregation (the first the subset allows): the error is the inputs', and
    # the data faults then share one configuration in a compiling backend.
    method = _allowed("methods", sapo_ref.METHOD_NAMES)[0]
    agg = _allowed("loss_aggs", (spec.DATA["defaults"]["loss_agg"], *sapo_ref.LOSS_AGG_NAMES))[0]
    opts = {"method": method, **_agg(rng, m.shape[1], agg)}
    n, t = m.shape
    valid = np.argwhere(m)
    at = tuple(valid[rng.integers(len(valid))])
    w = ref = None
    beta = {"kl_coef": 0.1}
    if kind.startswith("weights-"):
        w = np.ones((n, t + 1)) if kind == "weights-shape" else rng.uniform(0.5, 1.5, size=(n, t))
        if kind != "weights-shape":
            w[at] = {"weights-nan": np.nan, "weights-inf": np.inf, "weights-negative": -0.5}[kind]
    elif kind.startswith("ref-logp-"):
        ref = lp + rng.normal(0.0, 0.3, size=lp.shape)
        if kind == "ref-logp-shape":
            ref = ref[:, :-1]
        elif kind == "ref-logp-nan":
            ref[at] = np.nan
        elif kind == "ref-logp-inf-minus-inf":
            lp[at] = ref[at] = -np.inf
        if kind != "ref-logp-without-kl-coef":
            opts.update(beta)
    elif kind == "kl-coef-without-ref-logp":
        opts.update(beta)
    elif kind == "kl-estimator-without-ref-logp":
        opts["kl_estimator"] = "k1"
    else:
        ref = lp + rng.normal(0.0, 0.3, size=lp.shape)
        bad = {"kl-coef-negative": -0.1, "kl-coef-nan": np.nan, "kl-coef-too-large": 2e6}
        if kind == "kl-estimator-unknown":
            opts.update({**beta, "kl_estimator": "k4"})
        else:
            opts["kl_coef"] = bad[kind]
    error, poison = ERROR_KINDS[kind]
    return dict(
        inputs=(lp, old, adv, m),
        options=opts,
        weights=w,
        ref_logp=ref,
        error=error,
        poison=poison,
        fd=False,
        dtypes=("float64", "float32"),
    )


#: Kinds of clause 10.5 cases: k3 and its clipped form at tiny |u| (the series) and at large |u|
#: (overflow, the clip at 10), infinite u with any estimator, and beta = 0 beside infinite k.
NUMERICS_KINDS = (
    "k3-small-u",
    "low-var-k3-small-u",
    "k3-large-u",
    "low-var-k3-large-u",
    "infinite-u",
    "beta-0",
)
#: Tiny |u| only, the KL term alone (A = 0) and beta large: e^u - 1 - u as written loses every
#: digit there (a float32 k3 off by 1e-7 * beta per token), which a larger |u| elsewhere in
#: the case would hide inside the tolerance's scale.
_SMALL_U = np.array([1e-7, 1e-6, 1e-5, 1e-4, 1e-3])
_LARGE_U = np.array([30.0, 90.0, 200.0, 700.0, 710.5, 800.0, 1e4])


def _g_kl_numerics(rng, kind):  # 10.5: k3 near u = 0, overflow, low-var clip, infinities
    lp, old, adv, m = _batch(rng, sigma=0.3)
    method = _pick(rng, ("sapo", "grpo", "sapo-seq", "gspo"))
    opts = _term_opts(rng, method, m.shape[1])
    shape = lp.shape
    sign = rng.choice([-1.0, 1.0], size=shape)
    u = rng.normal(0.0, 0.3, size=shape)
    pick = m & (rng.random(shape) < 0.5)
    fd = False
    if kind.endswith("-small-u"):
        est = kind.removesuffix("-small-u")
        u = sign * rng.choice(_SMALL_U, size=shape)
        opts["kl_coef"] = 1e6
        adv = np.zeros_like(adv)
        fd = True
    else:
        est = kind.removesuffix("-large-u") if kind.endswith("-large-u") else ""
        est = est or str(rng.choice(KL_ESTIMATORS))
        opts["kl_coef"] = float(rng.choice([0.04, 1.0]))
        if kind.endswith("-large-u"):
            u = np.where(pick, sign * rng.choice(_LARGE_U, size=shape), u)
    ref = lp + u
    if kind in ("infinite-u", "beta-0"):
        if rng.random() < 0.5:  # u = -inf: the reference policy gives the token no mass
            ref = np.where(pick, -np.inf, ref)
        else:  # u = +inf: the current policy does
            lp = np.where(pick, -np.inf, lp)
        if kind == "beta-0":
            opts["kl_coef"] = 0.0
    opts["kl_estimator"] = est
    return dict(
        inputs=(_clean(lp, m), _clean(old, m), _clean(adv, m), m),
        options=opts,
        ref_logp=_clean(ref, m),
        fd=fd,
        extra=("10.2",),
        # bfloat16 and float16 compute in float32 (clause 6.4), where these numerics are
        # checked; rounded to them, a tiny u is 0 and a large one out of range
        dtypes=("float64", "float32"),
    )


GENERATORS: dict[str, Gen] = {
    "1.5": _g_adv_per_token,
    "1.6": _g_tau_select,
    "2.1": _method_gen("sapo", 0.3),
    "2.2": _method_gen("sapo", 1.0),
    "2.3": _method_gen("sapo-seq", 0.4),
    "2.4": _method_gen("grpo", 0.15),
    "2.5": _method_gen("grpo", 0.6),
    "2.6": _g_dual,
    "2.7": _method_gen("gspo", 0.3),
    "2.8": _method_gen("gspo-token", 0.3),
    "3.2": _agg_gen("token-mean"),
    "3.3": _agg_gen("seq-mean-token-mean"),
    "3.4": _agg_gen("seq-mean-token-sum"),
    "3.5": _agg_gen("seq-mean-token-sum-norm"),
    "3.6": _g_empty,
    "3.7": _g_no_token,
    "4.1": _g_method_defaults,
    "4.2": _g_agg_defaults,
    "5.1": _g_zero_adv,
    "5.2": _g_on_policy,
    "5.3": _g_sapo_extreme,
    "5.4": _g_clip_extreme,
    "6.1": _g_masking,
    "6.2": _g_no_clamp,
    "6.3": _g_sapo_extreme,
}
#: Clauses whose generator takes a second argument, one of these variants: each draws half its
#: ``per_clause`` cases (at least one) per variant, 10.4 one case per error whatever
#: ``per_clause`` (every variant is a configuration a compiling backend builds anew).
VARIANTS: dict[str, tuple[str, ...]] = {}
if _HAS_TERMS:  # the terms of spec 0.2.0 (a sapo_ref without them has no reference for them)
    GENERATORS.update(
        {
            "10.1": _g_weights,
            "10.2": _g_kl,
            "10.3": _g_terms_grad,
            "10.4": _g_errors,
            "10.5": _g_kl_numerics,
        }
    )
    VARIANTS.update({"10.2": KL_ESTIMATORS, "10.4": tuple(ERROR_KINDS), "10.5": NUMERICS_KINDS})


def generate_cases(
    seed: int = 0,
    per_clause: int = 6,
    clauses: tuple[str, ...] | None = None,
    methods: Iterable[str] | None = None,
    loss_aggs: Iterable[str] | None = None,
    advantages: Iterable[str] | None = None,
) -> list[Case]:
    """``per_clause`` seeded cases for every clause with a generator (deterministic in
    ``(seed, clause, k)``), drawn inside a subset of ``methods`` and ``loss_aggs`` when given:
    every clause that can apply to the subset gets the same ``per_clause`` cases as a full run;
    one that cannot (GSPO's clause for a SAPO-only subset) gets none. ``advantages`` (a subset
    of ``("sequence", "token")``) restricts the advantages' shape the same way (clause 1.5's
    per-token cases need "token").

    >>> [c.id for c in generate_cases(seed=3, per_clause=2, clauses=("2.1",))]
    ['2.1-00', '2.1-01']
    >>> generate_cases(3, 1)[5].options == generate_cases(3, 4)[20].options  # stable ids
    True
    >>> sub = generate_cases(0, 2, loss_aggs=["token-mean"])
    >>> {c.loss_agg for c in sub}, sum(c.id.startswith("6.2-") for c in sub)
    ({'token-mean'}, 2)
    """
    subset = {
        "methods": tuple(sapo_ref.METHOD_NAMES if methods is None else methods),
        "loss_aggs": tuple(sapo_ref.LOSS_AGG_NAMES if loss_aggs is None else loss_aggs),
        "advantages": tuple(ADVANTAGE_SHAPES if advantages is None else advantages),
    }
    known = {
        "methods": sapo_ref.METHOD_NAMES,
        "loss_aggs": sapo_ref.LOSS_AGG_NAMES,
        "advantages": ADVANTAGE_SHAPES,
    }
    for kind, names in known.items():
        unknown = [v for v in subset[kind] if v not in names]
        if unknown:
            raise ValueError(f"{kind}: unknown {unknown}; expected a subset of {list(names)}")
    out: list[Case] = []
    saved = dict(_SUBSET)
    _SUBSET.update(subset)
    try:
        for index, (cid, gen) in enumerate(GENERATORS.items()):
            if clauses is not None and cid not in clauses:
                continue
            variants = VARIANTS.get(cid)
            if variants is None:
                for k in range(per_clause):
                    rng = np.random.default_rng([seed, index, k])
                    try:
                        d = gen(rng)
                    except _NotApplicable:
                        break  # the clause cannot apply to this subset: no case for any k
                    out.append(_case(f"{cid}-{k:02d}", cid, d))
                continue
            count = case_count(cid, per_clause) // len(variants)
            for j, variant in enumerate(variants):
                for k in range(count):
                    rng = np.random.default_rng([seed, index, k, j])
                    try:
                        d = gen(rng, variant)
                    except _NotApplicable:
                        break
                    out.append(_case(f"{cid}-{variant}-{k:02d}", cid, d))
    finally:
        _SUBSET.clear()
        _SUBSET.update(saved)
    return out


def case_count(clause: str, per_clause: int) -> int:
    """How many cases :func:`generate_cases` draws for ``clause`` (when it applies at all).

    >>> case_count("2.1", 2), case_count("10.2", 2), case_count("10.2", 6), case_count("10.4", 6)
    (2, 4, 12, 14)
    >>> case_count("10.5", 2)
    6
    """
    variants = VARIANTS.get(clause)
    if variants is None or per_clause <= 0:
        return per_clause if variants is None else 0
    each = 1 if clause == "10.4" else max(1, per_clause // 2)
    return len(variants) * each


def _case(case_id: str, clause: str, d: dict[str, Any]) -> Case:
    lp, old, adv, m = (np.asarray(a) for a in d["inputs"])
    w, ref = d.get("weights"), d.get("ref_logp")
    return Case(
        id=case_id,
        clauses=tuple(dict.fromkeys((clause, *d.get("extra", ())))),
        logp=lp.astype(np.float64),
        old_logp=old.astype(np.float64),
        advantages=adv.astype(np.float64),
        mask=m.astype(bool),
        options=dict(d["options"]),
        fd=d.get("fd", True),
        dtypes=tuple(d.get("dtypes", DTYPES)),
        # bool and integer weights keep their dtype: the call passes them as they are (10.1)
        weights=None
        if w is None
        else np.asarray(w)
        if np.asarray(w).dtype.kind in "biu"
        else np.asarray(w, np.float64),
        ref_logp=None if ref is None else np.asarray(ref, np.float64),
        error=d.get("error"),
        poison=bool(d.get("poison", False)),
    )


# ----------------------------------------------------------------------------- golden vectors


def _num(x: Any) -> Any:
    if isinstance(x, str):
        return float(x)  # "nan", "inf", "-inf"
    if isinstance(x, list):
        return [_num(v) for v in x]
    return x


def _golden_array(x: Any) -> np.ndarray:
    """A vector's weights (bool, integer or float as written) or ref_logp."""
    a = np.asarray(_num(x))
    return a if a.dtype.kind in "biu" else a.astype(np.float64)


def golden_cases() -> list[Case]:
    """The spec's golden vectors (``spec/vectors/<version>/*.json``) as cases; [] if absent.

    Vectors whose options fall outside the third-party contract (``count_empty_rows``,
    ``normalizer``) are left out: the contract cannot pass them. They are float64 goldens and
    apply in float64 only (the random cases cover low precision). A vector whose padding holds
    NaN/inf and that also tests extremes or an empty batch is followed by its clean-padding
    twin (:func:`_clean_twin`).

    >>> all(c.id.startswith("golden:") and c.dtypes == ("float64",) for c in golden_cases())
    True
    """
    import json

    folder = spec.vectors_dir()
    if not folder.is_dir():
        return []
    out: list[Case] = []
    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        for c in data.get("cases", []):
            opts = dict(c.get("options", {}))
            if any(k not in CONTRACT_OPTIONS for k in opts):
                continue
            inp = c["inputs"]
            try:
                lp, old, adv = (
                    np.asarray(_num(inp[k]), np.float64) for k in ("logp", "old_logp", "advantages")
                )
                mask = np.asarray(_num(inp["mask"])).astype(bool)
                terms = {k: _golden_array(inp[k]) for k in ("weights", "ref_logp") if k in inp}
                # error vectors are not for us (clause 10.4's error cases are generated)
                _reference(lp, old, adv, mask, opts, **terms)
            except Exception:
                continue
            case = Case(
                id=f"golden:{c['id']}",
                clauses=tuple(c.get("clauses", ("C.1",))),
                logp=lp,
                old_logp=old,
                advantages=adv,
                mask=mask,
                options=opts,
                # float64 goldens; extreme temperatures a finite difference cannot resolve
                fd=False,
                dtypes=("float64",),
                **terms,
            )
            out.append(case)
            twin = _clean_twin(case)
            if twin is not None:
                out.append(twin)
    return out


def _clean_twin(case: Case) -> Case | None:
    """A golden vector with NaN/inf padding that also tests something else (extreme valid
    log-ratios, an empty batch, or any clause but masking) as a second case with zeros at
    every invalid position, id ``<id>/clean-padding``: one cause per case. The released
    vector files are not modified; the twin's expected numbers are the reference's on it."""
    full_adv = np.broadcast_to(
        case.advantages if case.advantages.ndim == 2 else case.advantages[:, None], case.mask.shape
    )
    garbage = ~case.mask & (
        ~np.isfinite(case.logp) | ~np.isfinite(case.old_logp) | ~np.isfinite(full_adv)
    )
    for a in case.keyword_arrays().values():
        if a.dtype.kind == "f" and a.shape == case.mask.shape:
            garbage |= ~case.mask & ~np.isfinite(a)
    if not garbage.any():
        return None
    with np.errstate(all="ignore"):
        extreme = bool(np.any(case.mask & ~(np.abs(case.logp - case.old_logp) <= CLAMP)))
    special = {"5.1", "5.3", "5.4", "6.2", "6.3", "3.7"}
    if "6.1" in case.clauses and not extreme and not special & set(case.clauses):
        return None  # a masking vector: garbage padding is its one cause
    adv = _clean(case.advantages, case.mask)
    return Case(
        id=f"{case.id}/clean-padding",
        clauses=tuple(c for c in case.clauses if c != "6.1"),
        logp=_clean(case.logp, case.mask),
        old_logp=_clean(case.old_logp, case.mask),
        advantages=adv,
        mask=case.mask,
        options=dict(case.options),
        fd=False,
        dtypes=case.dtypes,
        **{k: _clean(v, case.mask) for k, v in case.keyword_arrays().items()},
    )


# ----------------------------------------------------------------------------- materialize


def _kink_free(
    case: Case, lp: np.ndarray, old: np.ndarray, adv: np.ndarray, mask: np.ndarray
) -> np.ndarray:
    """``lp`` with every clip-method ratio within KINK_DISTANCE of a kink set on-policy."""
    cfg = resolve(case.options, has_ref_logp=case.ref_logp is not None)
    if cfg.is_soft:
        return lp
    kinks = [1.0 + cfg.eps_high]
    if cfg.eps_low < 1.0:
        kinks.append(1.0 - cfg.eps_low)
    if cfg.dual_clip is not None:
        kinks.append(cfg.dual_clip)
    with np.errstate(all="ignore"):
        delta = np.where(mask, lp.astype(np.float64) - old.astype(np.float64), 0.0)
        if cfg.sequence_value:
            length = mask.sum(axis=1)
            mu = delta.sum(axis=1) / np.maximum(length, 1)
            x = np.broadcast_to(mu[:, None], delta.shape)
        else:
            x = delta
        near = np.zeros(delta.shape, bool)
        for k in kinks:
            near |= np.abs(np.exp(x) / k - 1.0) < KINK_DISTANCE
    near &= mask
    if cfg.sequence_value:
        near = np.broadcast_to(near.any(axis=1, keepdims=True), near.shape) & mask
    return np.where(near, old, lp)


def _ratio_beyond_float32(case: Case, lp, old, adv, mask) -> bool:
    """Whether a clip-method term r*A has a finite r that float32 cannot hold (clause 6.3 makes
    it +inf in float32, a finite number in the float64 reference): low precision skips it."""
    cfg = resolve(case.options, has_ref_logp=case.ref_logp is not None)
    if cfg.is_soft:
        return False
    with np.errstate(all="ignore"):
        delta = np.where(mask, lp.astype(np.float64) - old.astype(np.float64), 0.0)
        x = delta
        if cfg.sequence_value:
            x = np.broadcast_to(
                (delta.sum(axis=1) / np.maximum(mask.sum(axis=1), 1))[:, None], delta.shape
            )
    a = np.broadcast_to(adv if adv.ndim == 2 else adv[:, None], mask.shape)
    big = np.isfinite(x) & (x > math.log(float(np.finfo(np.float32).max)) - 2.0)
    return bool(np.any(mask & big & (a < 0)))


def _reference(
    lp: np.ndarray,
    old: np.ndarray,
    adv: np.ndarray,
    mask: np.ndarray,
    options: dict,
    **arrays: np.ndarray,
) -> Any:
    import warnings

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return sapo_ref.policy_loss(lp, old, adv, mask, **options, **arrays)


def _ref_grad(lp, old, adv, mask, options, arrays) -> np.ndarray:
    """dL/d ref_logp = -(the KL part of dL/d logp) (clause 10.3), from the reference's pieces."""
    cfg = resolve(options, has_ref_logp=True)
    norm = sapo_ref.normalizer(mask, count_empty_rows=cfg.count_empty_rows)
    lp, old, adv = (np.asarray(a, np.float64) for a in (lp, old, adv))  # evaluate is in float64
    arrays = {k: np.asarray(v, np.float64) for k, v in arrays.items()}
    with np.errstate(all="ignore"):
        ev = sapo_ref.evaluate(lp, old, adv, mask, cfg, norm, **arrays)
    if ev.kl_grad is None:  # beta = 0: the term adds nothing, its gradient included
        return np.zeros(mask.shape)
    return -np.asarray(ev.kl_grad, np.float64)


def _kl_beyond_float32(case: Case, lp: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> bool:
    """Whether a finite KL value k(u) at a valid token is beyond float32's range (clause 10.5
    makes it +inf in a float32 computation, a finite number in the float64 reference)."""
    with np.errstate(all="ignore"):
        u = np.where(mask, ref.astype(np.float64) - lp.astype(np.float64), 0.0)
        k, _ = sapo_ref.kl_penalty(u, case.kl_estimator)
    k = np.asarray(k, np.float64)
    return bool(np.any(mask & np.isfinite(k) & (np.abs(k) > float(np.finfo(np.float32).max) / 4)))


def _per_token(a: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``a`` ([N] or [N, T]) broadcast to the mask's [N, T]."""
    return np.broadcast_to(a if a.ndim == 2 else a[:, None], mask.shape)


def _round_weights(w: np.ndarray, dtype: str) -> np.ndarray:
    return w if w.dtype.kind in "biu" else round_to(w, dtype)


def _expect_error(case: Case, lp, old, adv, mask, arrays) -> str | None:
    """An error case: None when the reference raises the case's error, else why not (a suite
    fault: the case is then not run, and the suite's own tests fail on it)."""
    try:
        _reference(lp, old, adv, mask, case.options, **arrays)
    except Exception as err:  # the type is checked by name: the clause names it
        if case.error in [c.__name__ for c in type(err).__mro__]:
            return None
        return f"the reference raises {type(err).__name__}, not {case.error}: {err}"
    return f"the reference does not raise {case.error}"


def materialize(case: Case, dtype: str) -> Materialized | str:
    """The case in ``dtype`` with the reference on the rounded inputs, or why it does not apply.

    >>> one = np.ones((1, 2))
    >>> case = Case("x", ("5.3",), 1e6 * one, 0 * one, one[0, :1], one > 0)
    >>> materialize(case, "float16")
    'logp is out of the range of float16'
    >>> materialize(case, "float32").want_loss  # f -> 4/tau_pos at delta = 1e6 (clause 5.3)
    -4.0
    """
    if dtype not in case.dtypes:
        return f"the case is checked in {', '.join(case.dtypes)} only"
    lp, old, adv = (round_to(a, dtype) for a in (case.logp, case.old_logp, case.advantages))
    arrays: dict[str, np.ndarray] = {}
    if case.weights is not None:
        arrays["weights"] = _round_weights(case.weights, dtype)
    if case.ref_logp is not None:
        arrays["ref_logp"] = round_to(case.ref_logp, dtype)
    mask = case.mask
    if case.error is not None:
        why = _expect_error(case, lp, old, adv, mask, arrays)
        if why:
            raise RuntimeError(f"case {case.id}: {why}")
        return Materialized(
            case, dtype, lp, old, adv, mask, math.nan, np.zeros(mask.shape), {}, **arrays
        )
    originals = {"logp": case.logp, "old_logp": case.old_logp, **case.keyword_arrays()}
    rounded = {"logp": lp, "old_logp": old, **arrays}
    for name, orig in originals.items():
        if orig.dtype.kind in "biu":  # bool and integer weights are passed exactly
            continue
        full, got = (_per_token(a, mask) for a in (orig, rounded[name]))
        if np.any(mask & np.isfinite(full) & ~np.isfinite(got)):
            return f"{name} is out of the range of {dtype}"
    adv_full = np.broadcast_to(adv if adv.ndim == 2 else adv[:, None], mask.shape)
    if np.any(mask & ~np.isfinite(adv_full)):
        return f"advantages are out of the range of {dtype}"
    lp = _kink_free(case, lp, old, adv, mask)
    if dtype != "float64" and _ratio_beyond_float32(case, lp, old, adv, mask):
        return f"a finite ratio beyond float32's range (the compute dtype of {dtype}) enters the result"
    if dtype != "float64" and "ref_logp" in arrays:
        if _kl_beyond_float32(case, lp, arrays["ref_logp"], mask):
            return f"a finite KL value beyond float32's range (the compute dtype of {dtype}) enters the result"
    try:
        res = _reference(lp, old, adv, mask, case.options, **arrays)
    except ValueError as err:  # rounding made a row undefined (clause 5.5)
        return f"undefined in {dtype}: {err}"
    ref_grad = None
    if "ref_logp" in arrays:
        ref_grad = _ref_grad(lp, old, adv, mask, case.options, arrays)
    top = _max_finite(dtype)
    outs = np.concatenate(
        [[res.loss], np.ravel(res.grad)] + ([] if ref_grad is None else [ref_grad.ravel()])
    )
    if np.any(np.isfinite(outs) & (np.abs(outs) > top)):
        return f"the reference's outputs exceed the range of {dtype}"
    return Materialized(
        case,
        dtype,
        lp,
        old,
        adv,
        mask,
        float(res.loss),
        np.asarray(res.grad, np.float64),
        dict(res.metrics),
        want_ref_grad=ref_grad,
        **arrays,
    )
