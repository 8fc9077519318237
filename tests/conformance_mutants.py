"""Implementations the conformance meta-tests run: correct variants and single-bug mutants.

:func:`careful_loss` is an independent, plain-autodiff SAPO-family loss written once against a
small ops shim (torch, JAX, MLX): masking by selection, the clip arranged in log space
(``A * exp(min(delta, log(1 + eps_high)))``) so no 0 * inf meets autodiff, SAPO saturated at
delta_sat (clause 6.3) and its sigmoid written with tanh. Defaults and validation come from
``sapo_ref.resolve_config`` only. Low precision is computed in float32 and the loss returned in
the input dtype. ``bug=`` switches on exactly one realistic mistake (see :data:`MUTANTS`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

import sapo_ref
from sapo_ref import spec

X_SAT = spec.X_SATURATION


# ----------------------------------------------------------------------------- ops shims


class TorchOps:
    def __init__(self):
        import torch

        self.t = torch

    def __getattr__(self, name):
        return getattr(self.t, name)

    def astype(self, x, dtype):
        return x.to(dtype)

    def sg(self, x):
        return x.detach()

    def sum(self, x, axis=None):
        return self.t.sum(x) if axis is None else self.t.sum(x, dim=axis)

    def expand(self, row, like):
        return row[:, None].expand_as(like)

    def full(self, like, v):
        return self.t.full_like(like, v)

    def compute_dtype(self, x):
        return self.t.float64 if x.dtype == self.t.float64 else self.t.float32

    def dtype_of(self, x):
        return x.dtype

    def boolean(self, mask):
        return mask.bool() if mask.dtype != self.t.bool else mask

    def check(self, bad, message):
        if bool(self.t.any(bad)):
            raise ValueError(message)


class JaxOps:
    def __init__(self):
        import jax
        import jax.numpy as jnp

        self.jax, self.np = jax, jnp

    def __getattr__(self, name):
        return getattr(self.np, name)

    def astype(self, x, dtype):
        return x.astype(dtype)

    def sg(self, x):
        return self.jax.lax.stop_gradient(x)

    def sum(self, x, axis=None):
        return self.np.sum(x, axis=axis)

    def expand(self, row, like):
        return self.np.broadcast_to(row[:, None], like.shape)

    def full(self, like, v):
        return self.np.full_like(like, v)

    def compute_dtype(self, x):
        return self.np.float64 if x.dtype == self.np.float64 else self.np.float32

    def dtype_of(self, x):
        return x.dtype

    def boolean(self, mask):
        return mask.astype(bool)

    def check(self, bad, message):
        pass  # values cannot be read under jax.vjp: the JAX variant does not declare the terms

    def clamp(self, x, min, max):
        return self.np.clip(x, min, max)


class MlxOps:
    def __init__(self):
        import mlx.core as mx

        self.mx = mx

    def __getattr__(self, name):
        return getattr(self.mx, name)

    def astype(self, x, dtype):
        return x.astype(dtype)

    def sg(self, x):
        return self.mx.stop_gradient(x)

    def sum(self, x, axis=None):
        return self.mx.sum(x) if axis is None else self.mx.sum(x, axis=axis)

    def expand(self, row, like):
        return self.mx.broadcast_to(self.mx.expand_dims(row, 1), like.shape)

    def full(self, like, v):
        return self.mx.full(like.shape, v, dtype=like.dtype)

    def compute_dtype(self, x):
        return self.mx.float64 if x.dtype == self.mx.float64 else self.mx.float32

    def dtype_of(self, x):
        return x.dtype

    def boolean(self, mask):
        return mask.astype(self.mx.bool_)

    def check(self, bad, message):
        if self.mx.any(bad).item():
            raise ValueError(message)

    def clamp(self, x, min, max):
        return self.mx.clip(x, min, max)


# ----------------------------------------------------------------------------- the formula


def careful_loss(
    ops,
    logp,
    old_logp,
    advantages,
    mask,
    *,
    method="sapo",
    loss_agg=None,
    bug=None,
    tau_ge=False,
    weights=None,
    ref_logp=None,
    kl_coef=None,
    kl_estimator=None,
    **params,
):
    """The SAPO-family loss by plain autodiff; ``bug`` names one deliberate mistake, or is a
    tuple of several (the composite mutants of real implementations). The clause 10 terms:
    ``weights`` scale the policy term, the KL penalty with k3 summed as its series below
    |u| = 1/2 (clause 10.5)."""
    cfg = sapo_ref.resolve_config(
        method,
        loss_agg or spec.DATA["defaults"]["loss_agg"],
        **params,
        kl_coef=kl_coef,
        kl_estimator=kl_estimator,
        has_ref_logp=ref_logp is not None,
    )
    bugs = frozenset((bug,) if isinstance(bug, str) else (bug or ()))
    in_dtype = ops.dtype_of(logp)
    cd = in_dtype if "no-upcast" in bugs else ops.compute_dtype(logp)
    lp, old, adv = (ops.astype(a, cd) for a in (logp, old_logp, advantages))
    valid = ops.boolean(mask)
    zero = ops.zeros_like(lp)
    one = ops.ones_like(lp)
    w, ref = _terms(ops, lp, valid, weights, ref_logp, cd)
    if w is not None and "weights-change-counts" in bugs:  # folded into the mask
        valid = valid & (w != 0)
    if w is not None and "weights-ignored" in bugs:
        w = None
    if adv.ndim == 1:
        adv = ops.expand(adv, lp)
    if "mask-multiply" in bugs:  # NaN * 0 = NaN
        m = ops.astype(valid, cd)
        delta = (lp - old) * m
        A = adv * m
    else:
        delta = ops.where(valid, lp, zero) - ops.where(valid, old, zero)
        A = ops.where(valid, adv, zero)
    if "ratio-float32" in bugs:  # float64 inputs, log-ratio cast to float32 (SkyRL)
        delta = ops.astype(ops.astype(delta, ops.float32), cd)
    clamp = [float(b[len("clamp") :]) for b in bugs if b.startswith("clamp")]  # "clamp20": +-20
    if clamp:
        delta = ops.clamp(delta, -clamp[0], clamp[0])
    lengths = ops.sum(ops.where(valid, one, zero), axis=1)
    if "divide-by-T" in bugs:
        lengths = ops.full(lengths, float(lp.shape[1]))
    lsafe = ops.where(lengths > 0, lengths, ops.ones_like(lengths))
    token_grad_only = (cfg.method == "gspo-token") != (
        "gspo-not-spread" in bugs
    ) and "gspo-token-spread" not in bugs
    if cfg.sequence_value:
        Aeff = A
        if "average-advantages" in bugs:
            Aeff = ops.where(valid, ops.expand(ops.sum(A, axis=1) / lsafe, lp), zero)
        A = Aeff
        mu = ops.sum(delta, axis=1) / lsafe
        logx = ops.where(valid, ops.expand(mu, lp), zero)
        if token_grad_only and cfg.method in ("gspo", "gspo-token"):
            dfin = ops.where(ops.isfinite(delta), delta, zero)
            logx = ops.sg(logx) + (dfin - ops.sg(dfin))
    else:
        logx = delta

    if cfg.is_soft:
        tp, tn = cfg.tau_pos, cfg.tau_neg
        if "swapped-tau" in bugs:
            tp, tn = tn, tp
        if "tau-float32" in bugs:  # torch.where(adv > 0, 1.0, 1.05) builds float32 constants
            tp, tn = float(np.float32(tp)), float(np.float32(tn))
        pos = (A >= 0) if tau_ge else (A > 0)
        tau = ops.where(pos, ops.full(lp, tp), ops.full(lp, tn))
        if "naive-exp" in bugs:
            x = tau * (ops.exp(logx) - 1.0)
        else:
            d = ops.minimum(logx, ops.log1p(X_SAT / tau))
            x = tau * ops.expm1(d)
        sig = 0.5 * (1.0 + ops.tanh(0.5 * x))
        f = sig if "no-4-over-tau" in bugs else (4.0 / tau) * sig
        if "detached-gate" in bugs:
            term = A * ops.sg(f) * ops.where(valid, lp, zero)
        else:
            term = A * f
    else:
        el, eh, c = cfg.eps_low, cfg.eps_high, cfg.dual_clip
        if "eps-swapped" in bugs:
            el, eh = eh, el
        always = [b for b in bugs if b.startswith("always-dual-clip")]  # "always-dual-clip=2.5"
        if always and cfg.method == "grpo" and c is None:
            c = float(always[0].partition("=")[2] or 3.0)  # verl's clip_ratio_c default: 3
        if "gspo-no-dual-clip" in bugs and cfg.method != "grpo":
            c = None
        pos, neg = A > 0, A < 0
        if "zero-adv-nan" in bugs:  # the term written as A * clip-side(r) with a naive r
            r = ops.exp(logx)
            low = ops.maximum(r, ops.full(r, 1 - el))
            if c is not None:
                low = ops.minimum(low, ops.full(r, c))
            side = ops.where(pos, ops.minimum(r, ops.full(r, 1 + eh)), low)
            term = A * side
        else:
            lpos = ops.minimum(ops.where(pos, logx, zero), ops.full(lp, math.log(1 + eh)))
            lneg = ops.where(neg, logx, zero)
            if el < 1:
                lneg = ops.maximum(lneg, ops.full(lp, math.log(1 - el)))
            if c is not None:
                lneg = ops.minimum(lneg, ops.full(lp, math.log(c)))
            term = ops.where(pos, A * ops.exp(lpos), ops.where(neg, A * ops.exp(lneg), zero))
            if c is not None and "dual-clip-both-signs" in bugs:
                term = ops.where(pos, ops.maximum(term, c * A), term)

    agg = cfg.loss_agg if "token-mean-always" not in bugs else "token-mean"
    n = ops.sum(lengths)
    rows = ops.sum(ops.where(lengths > 0, ops.ones_like(lengths), ops.zeros_like(lengths)))
    if "empty-rows-counted" in bugs:
        rows = ops.full(rows, float(lp.shape[0]))
    if agg == "token-mean":
        rho, den = ops.ones_like(lengths), n
    elif agg == "seq-mean-token-mean":
        rho, den = 1.0 / lsafe, rows
    elif agg == "seq-mean-token-sum":
        rho, den = ops.ones_like(lengths), rows
    else:
        rho, den = ops.ones_like(lengths), rows * cfg.norm_length
    if "sum-not-mean" in bugs:
        den = ops.ones_like(den)
    raw_den = den
    den = ops.where(den > 0, den, ops.ones_like(den))
    weights = ops.where(valid, ops.expand(rho / den, lp), zero)
    if w is not None:
        term = term * ops.where(valid, w, zero)
    if ref is not None and cfg.kl_coef != 0 and "kl-dropped" not in bugs:
        est = cfg.kl_estimator
        if est == "k3" and "kl-k3-clamped" in bugs:
            est = "low-var-k3"
        if est == "k3" and "kl-k1-for-k3" in bugs:
            est = "k1"
        u = ops.where(valid, ref, zero) - ops.where(valid, lp, zero)
        k = _kl(ops, u, est, naive="naive-k3" in bugs)
        if w is not None and "kl-on-weights" in bugs:
            k = k * ops.where(valid, w, zero)
        term = term - ops.where(valid, cfg.kl_coef * k, zero)  # loss = -sum c term
    if "empty-batch-nan" in bugs:  # numerator / count with no guard: 0 / 0 without valid tokens
        loss = -ops.sum(ops.where(valid, ops.expand(rho, lp) * term, zero)) / raw_den
    elif "mask-multiply" in bugs:
        loss = -ops.sum(weights * term * ops.astype(valid, cd))
    else:
        loss = -ops.sum(ops.where(valid, weights * term, zero))
    if "sign-flipped" in bugs:
        loss = -loss
    return ops.astype(loss, in_dtype)


def _terms(ops, lp, valid, weights, ref_logp, cd):
    """Clause 10.4's checks of the added inputs; the weights [N, T] and ref_logp in ``cd``."""
    w = ref = None
    if weights is not None:
        if tuple(weights.shape) not in (tuple(lp.shape[:1]), tuple(lp.shape)):
            raise ValueError(f"weights must be [N] or [N, T]; got {tuple(weights.shape)}")
        w = ops.astype(weights, cd)
        if w.ndim == 1:
            w = ops.expand(w, lp)
        ops.check(valid & ~(ops.isfinite(w) & (w >= 0)), "weights must be finite and >= 0")
    if ref_logp is not None:
        if tuple(ref_logp.shape) != tuple(lp.shape):
            raise ValueError(f"ref_logp must be [N, T]; got {tuple(ref_logp.shape)}")
        ref = ops.astype(ref_logp, cd)
        both_inf = ops.isinf(ref) & (ref == lp)
        ops.check(valid & (ops.isnan(ref) | both_inf), "ref_logp: NaN or inf - inf")
    return w, ref


def _kl(ops, u, estimator, naive=False):
    """k(u) of clause 10.2; k3 by its Taylor series below |u| = 1/2 (no cancellation), or as
    written, e^u - 1 - u (``naive``: every digit lost to cancellation near u = 0)."""
    if estimator == "k1":
        return -u
    if estimator == "k2":
        return 0.5 * u * u
    if naive and estimator == "k3":
        return ops.exp(u) - 1.0 - u
    clip = spec.DATA["numerics"]["kl_clip"]
    if estimator == "low-var-k3":  # k3 > 10 beyond +-20 either way: no infinity enters the clip
        u = ops.clamp(u, -20.0, 20.0)
    zero, one = ops.zeros_like(u), ops.ones_like(u)
    small, pinf = ops.abs(u) < 0.5, u == math.inf
    us = ops.where(small, u, zero)
    series = zero
    for n in range(17, 1, -1):  # Horner: sum_{n >= 2} u^n / n!
        series = (series + 1.0 / math.factorial(n)) * us
    series = series * us
    ul = ops.where(small | pinf, one, u)
    # u = +inf: e^u itself, so that the value is +inf and the derivative too (never inf - inf)
    k3 = ops.where(
        small, series, ops.where(pinf, ops.exp(ops.where(pinf, u, zero)), ops.expm1(ul) - ul)
    )
    if estimator == "low-var-k3":
        return ops.minimum(k3, ops.full(k3, clip))
    return k3


def make(framework: str, **fixed):
    """``fn(logp, old_logp, advantages, mask, **options)`` for a framework, with fixed keywords."""
    ops = {"torch": TorchOps, "jax": JaxOps, "mlx": MlxOps}[framework]()

    def fn(logp, old_logp, advantages, mask, **options):
        return careful_loss(ops, logp, old_logp, advantages, mask, **fixed, **options)

    bug = fixed.get("bug")
    if framework == "torch":  # eager values: the clause 10.4 checks raise
        fn.sapo_capabilities = {"weights": True, "kl_estimators": list(sapo_ref.KL_ESTIMATOR_NAMES)}
    fn.__name__ = f"careful_{framework}" + (f"_{bug}" if isinstance(bug, str) else "")
    if bug and not isinstance(bug, str):
        fn.__name__ += "_" + "+".join(bug)
    return fn


# ----------------------------------------------------------------------------- correct variants


def torch_custom_backward(logp, old_logp, advantages, mask, **options):
    """A torch.autograd.Function: forward runs sapo_ref.evaluate on torch tensors (through
    array-api-compat) in float32/float64 and saves the closed-form gradient for backward;
    returns ``(loss, metrics)``."""
    import torch

    from sapo_ref.metrics import compute_metrics

    cfg = sapo_ref.resolve_config(**options)
    cd = torch.float64 if logp.dtype == torch.float64 else torch.float32
    store: dict[str, Any] = {}

    class _Loss(torch.autograd.Function):
        @staticmethod
        def forward(ctx, lp):
            args = [a.detach().to(cd) for a in (lp, old_logp, advantages)]
            valid = mask.bool()
            norm = sapo_ref.normalizer(valid, count_empty_rows=cfg.count_empty_rows)
            ev = sapo_ref.evaluate(*args, valid, cfg, norm)
            ctx.save_for_backward(ev.grad)
            store.update(compute_metrics(ev, cfg))
            return ev.loss.to(lp.dtype)

        @staticmethod
        def backward(ctx, g):
            (grad,) = ctx.saved_tensors
            return (grad * g.to(grad.dtype)).to(logp.dtype)

    loss = _Loss.apply(logp)
    return loss, dict(store)


def numpy_log_sigmoid(logp, old_logp, advantages, mask, *, method="sapo", loss_agg=None, **params):
    """SAPO / sequence SAPO in NumPy, arranged in log space: sigma(x) = exp(-logaddexp(0, -x)),
    w r = exp(log 4 - logaddexp(0, x) - logaddexp(0, -x) + delta); returns (loss, grad)."""
    cfg = sapo_ref.resolve_config(method, loss_agg or spec.DATA["defaults"]["loss_agg"], **params)
    valid = np.asarray(mask).astype(bool)
    lp, old, adv = (np.asarray(a, np.float64) for a in (logp, old_logp, advantages))
    with np.errstate(all="ignore"):
        delta = np.where(valid, np.where(valid, lp, 0.0) - np.where(valid, old, 0.0), 0.0)
    adv = np.where(valid, np.broadcast_to(adv if adv.ndim == 2 else adv[:, None], valid.shape), 0.0)
    L = valid.sum(axis=1).astype(np.float64)
    Ls = np.maximum(L, 1.0)
    if cfg.sequence_value:
        with np.errstate(invalid="ignore"):
            logx = np.where(valid, (delta.sum(axis=1) / Ls)[:, None], 0.0)
    else:
        logx = delta
    tau = np.where(adv > 0, cfg.tau_pos, cfg.tau_neg)
    d = np.minimum(logx, np.log1p(X_SAT / tau))
    x = tau * np.expm1(d)
    f = (4.0 / tau) * np.exp(-np.logaddexp(0.0, -x))
    dlog = np.exp(math.log(4.0) - np.logaddexp(0.0, x) - np.logaddexp(0.0, -x) + d)
    rows = float((L > 0).sum())
    rho = 1.0 / Ls if cfg.per_row_mean else np.ones_like(L)
    den = {
        "token-mean": L.sum(),
        "seq-mean-token-mean": rows,
        "seq-mean-token-sum": rows,
        "seq-mean-token-sum-norm": rows * (cfg.norm_length or 1.0),
    }[cfg.loss_agg]
    c = np.where(valid, (rho / (den if den > 0 else 1.0))[:, None], 0.0)
    loss = -float(np.sum(np.where(valid, c * adv * f, 0.0)))
    coef = np.where(valid, c * adv * dlog, 0.0)
    if cfg.spreads_gradient:
        grad = np.where(valid, -(coef.sum(axis=1) / Ls)[:, None], 0.0)
    else:
        grad = -coef
    return loss, grad.astype(
        lp.dtype if np.asarray(logp).dtype == np.float64 else np.asarray(logp).dtype
    )


numpy_log_sigmoid.sapo_capabilities = {"methods": ["sapo", "sapo-seq"]}


#: Single-bug mutants of the torch careful formula: bug -> (clause it must fail, catalogue id or None).
MUTANTS: dict[str, tuple[str, str | None]] = {
    "clamp20": ("6.2", "log-ratio-clamp"),
    "token-mean-always": ("3.3", "token-mean-always"),
    "empty-rows-counted": ("3.6", "empty-rows-counted"),
    "detached-gate": ("2.2", "detached-gate"),
    "swapped-tau": ("1.6", "swapped-temperatures"),
    "no-4-over-tau": ("2.1", "missing-4-over-tau"),
    "mask-multiply": ("6.1", "nan-through-mask"),
    "naive-exp": ("6.3", "exp-overflow-grad"),
    "gspo-not-spread": ("2.7", "gspo-gradient-not-spread"),
    "gspo-token-spread": ("2.8", "gspo-token-spread"),
    "average-advantages": ("1.5", "averaged-advantages"),
    "eps-swapped": ("2.4", "eps-swapped"),
    "sum-not-mean": ("3.2", "sum-instead-of-mean"),
    "sign-flipped": ("2.1", "sign-flipped"),
    "dual-clip-both-signs": ("2.6", None),
    "zero-adv-nan": ("5.1", "zero-adv-nan"),
    "divide-by-T": ("3.3", None),
    "tau-float32": ("4.1", "float32-temperatures"),
    "always-dual-clip": ("5.4", "always-dual-clip"),
    "gspo-no-dual-clip": ("2.6", "gspo-ignores-dual-clip"),
    "ratio-float32": ("2.1", "ratio-float32"),
    "empty-batch-nan": ("3.7", "empty-batch-nan"),
    "weights-ignored": ("10.1", "weights-ignored"),
    "weights-change-counts": ("10.1", "weights-change-counts"),
    "kl-on-weights": ("10.2", "kl-on-weights"),
    "kl-dropped": ("10.2", "kl-dropped"),
    "kl-k3-clamped": ("10.5", "kl-k3-clamped"),
    "kl-k1-for-k3": ("10.2", "kl-estimator-k1-vs-k3"),
    "naive-k3": ("10.5", None),
}

#: Composite mutants, as real implementations have them: bugs -> the verdict's deviation set.
COMPOSITES: dict[str, tuple[tuple[str, ...], frozenset[str]]] = {
    "trl-like": (
        ("empty-rows-counted", "mask-multiply", "tau-float32"),
        frozenset({"empty-rows-counted", "nan-through-mask", "float32-temperatures"}),
    ),
    "verl-like": (
        ("clamp20", "always-dual-clip"),
        frozenset({"log-ratio-clamp", "always-dual-clip"}),
    ),
    "trinity-like": (
        ("detached-gate", "token-mean-always"),
        frozenset({"detached-gate", "token-mean-always"}),
    ),
    "verl-empty-batch": (
        ("clamp20", "empty-batch-nan"),
        frozenset({"log-ratio-clamp", "empty-batch-nan"}),
    ),
    "skyrl-like": (("ratio-float32", "clamp20"), frozenset({"ratio-float32", "log-ratio-clamp"})),
    "verl-vanilla-like": (
        ("clamp20", "always-dual-clip", "mask-multiply", "empty-batch-nan"),
        frozenset({"log-ratio-clamp", "always-dual-clip", "nan-through-mask", "empty-batch-nan"}),
    ),
}
