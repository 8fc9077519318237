r"""The closed-form gradient against central finite differences of the loss, in float64.

Step and tolerance. The derivative is taken with respect to one ``logp[i, t]`` at a time with
step :math:`h = 2^{-17} \approx 7.6\cdot10^{-6}`; the divisor is the step actually taken,
``(x + h) - (x - h)`` in float64. The central difference has error

.. math:: \frac{h^2}{6}\max|\partial^3\mathcal L| + \frac{2\,\mathrm{err}(\mathcal L)}{2h}.

Samples keep :math:`|\delta| \le 1`, :math:`\tau \in [0.5, 2]`, :math:`|A| \lesssim 3` and aggregation
weights :math:`c \le 1`, so :math:`|\partial^3\mathcal L| \lesssim (\tau r)^2 r |A| \lesssim 250` and the truncation
term is below :math:`2.5\cdot10^{-9}`; the loss (:math:`|\mathcal L| \lesssim 10`) is evaluated to a few ulps,
:math:`\mathrm{err} \lesssim 10^{-14}`, so the rounding term is below :math:`1.5\cdot10^{-9}`. The tolerance,
:math:`10^{-8}\max(1, \max|g|)` absolute, is 2.5 times that bound (the errors seen are near
:math:`10^{-10}`) and far below any formula error worth catching (a wrong factor, temperature,
weight or row length changes the gradient by much more than :math:`10^{-6}` relative).
Clip methods sample every ratio that matters at least :math:`10^{-3}` (relative) from a kink; the
step moves a ratio by a factor :math:`e^{\pm h} = 1 \pm 7.6\cdot10^{-6}` (sequence ratios by
:math:`e^{\pm h/L_i}`), so no kink is crossed and the loss is smooth on the stencil.
"""

from __future__ import annotations

import mpmath_reference as M
import numpy as np
import pytest
from test_vs_mpmath import reference_grad_ref_logp

import sapo_ref
from sapo_ref import spec

H = 2.0**-17
ATOL = 1e-8
METHODS = tuple(spec.METHODS)
AGGS = tuple(spec.LOSS_AGGS)
SEED = 20251123


def fd_grad(loss, logp: np.ndarray) -> np.ndarray:
    """Central differences of ``loss(logp)`` at every position of ``logp``."""
    g = np.zeros_like(logp)
    for idx in np.ndindex(logp.shape):
        up, down = logp.copy(), logp.copy()
        up[idx] += H
        down[idx] -= H
        g[idx] = (loss(up) - loss(down)) / (up[idx] - down[idx])
    return g


def assert_fd_close(closed: np.ndarray, fd: np.ndarray, what: str) -> None:
    tol = ATOL * max(1.0, float(np.max(np.abs(closed))))
    err = np.abs(closed - fd)
    worst = np.unravel_index(int(np.argmax(err)), err.shape)
    assert err.max() <= tol, (
        f"{what}: |closed - fd| = {err.max():.3g} > {tol:.3g} at {worst}: "
        f"closed {closed[worst]!r}, fd {fd[worst]!r}"
    )


def _clear_of_kinks(method: str, logp, old, adv, mask, opts) -> bool:
    if spec.METHODS[method].gate != "clip":
        return True
    p = dict(spec.METHODS[method].defaults)
    p.update({k: opts[k] for k in ("eps_low", "eps_high", "dual_clip") if k in opts})
    delta = np.where(mask, logp - old, 0.0)
    if spec.METHODS[method].ratio != "token":
        mu = delta.sum(axis=1, keepdims=True) / np.maximum(mask.sum(axis=1, keepdims=True), 1)
        delta = np.broadcast_to(mu, delta.shape)
    a = adv if adv.ndim == 2 else np.broadcast_to(adv[:, None], mask.shape)
    return all(
        M.kink_distance(float(delta[i, t]), float(a[i, t]), p["eps_low"], p["eps_high"],
                        p["dual_clip"]) >= 1e-3
        for i, t in zip(*np.nonzero(mask))
    )  # fmt: skip


def sample(rng: np.random.Generator, method: str, agg: str, *, per_token: bool,
           empty_row: bool = False):  # fmt: skip
    """A kink-free random case (logp, old_logp, adv, mask, options); invalid slots finite."""
    for _ in range(500):
        n, t = 3, 5
        mask = np.arange(t)[None, :] < rng.integers(1, t + 1, (n, 1))
        mask[:, 1:] &= rng.random((n, t - 1)) > 0.2
        if empty_row:
            mask[rng.integers(0, n)] = False
        logp = -rng.uniform(0.05, 3.0, (n, t))
        old = logp - np.clip(rng.normal(0.0, 0.4, (n, t)), -1.0, 1.0)
        shape = (n, t) if per_token else (n,)
        adv = rng.normal(0.0, 1.0, shape).clip(-3, 3)
        if per_token:
            adv[0] = np.abs(adv[0]) * np.where(np.arange(t) % 2 == 0, 1.0, -1.0)  # sign changes
        opts: dict = {"method": method, "loss_agg": agg}
        if agg == "seq-mean-token-sum-norm":
            opts["norm_length"] = 6.0
        if spec.METHODS[method].gate == "soft":
            opts["tau_pos"], opts["tau_neg"] = rng.uniform(0.5, 2.0, 2).tolist()
        elif rng.random() < 0.5:
            opts.update(eps_low=0.2, eps_high=0.28, dual_clip=1.6)
        if empty_row:
            opts["count_empty_rows"] = True
        if _clear_of_kinks(method, logp, old, adv, mask, opts):
            return logp, old, adv, mask, opts
    raise RuntimeError("no kink-free sample")


def _loss_fn(old, adv, mask, opts):
    return lambda lp: sapo_ref.policy_loss(lp, old, adv, mask, **opts).loss


@pytest.mark.clause("2.2", "2.5", "2.6", "2.3", "2.7")
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("method", METHODS)
def test_closed_form_gradient_matches_central_differences(method: str, agg: str) -> None:
    rng = np.random.default_rng([SEED, METHODS.index(method), AGGS.index(agg)])
    # GSPO-token's gradient is not the derivative of its value when advantages vary within a
    # row (stop-gradient, clause 2.8); that case is checked by the test below.
    variants = [(False, False), (False, True)]
    if method != "gspo-token":
        variants.append((True, False))
    for per_token, empty_row in variants:
        logp, old, adv, mask, opts = sample(
            rng, method, agg, per_token=per_token, empty_row=empty_row
        )
        closed = sapo_ref.policy_loss(logp, old, adv, mask, **opts).grad
        fd = fd_grad(_loss_fn(old, adv, mask, opts), logp)
        assert np.all(fd[~mask] == 0.0), "an invalid position changed the loss (clause 6.1)"
        assert_fd_close(closed, fd, f"{opts}, per_token={per_token}")


@pytest.mark.clause("1.4", "2.3", "2.7")
@pytest.mark.parametrize("method", ["gspo", "sapo-seq"])
def test_sequence_gradient_spreads_to_every_token_of_the_row(method: str) -> None:
    """Clauses 2.3, 2.7: d loss / d logp_it' = -(m_it'/L_i) sum_t c_it m_it ..., the same at every
    valid token of the row, checked by differencing every token, per-token advantages with
    sign changes included."""
    rng = np.random.default_rng([SEED, 99, METHODS.index(method)])
    for agg in AGGS:
        logp, old, adv, mask, opts = sample(rng, method, agg, per_token=True)
        closed = sapo_ref.policy_loss(logp, old, adv, mask, **opts).grad
        fd = fd_grad(_loss_fn(old, adv, mask, opts), logp)
        assert_fd_close(closed, fd, f"{opts}")
        for i in range(mask.shape[0]):
            if mask[i].sum() > 1:
                row_fd = fd[i, mask[i]]
                assert np.ptp(row_fd) <= ATOL * max(1.0, np.abs(row_fd).max()), (i, row_fd)
                assert np.all(closed[i, mask[i]] == closed[i, mask[i]][0])
        assert np.count_nonzero(fd[mask]) > mask.sum() // 2  # the spread is really exercised


@pytest.mark.clause("2.8")
@pytest.mark.parametrize("agg", AGGS)
def test_gspo_token_gradient_is_the_stop_gradient_one(agg: str) -> None:
    """Clause 2.8: s_it = sg[s_i] pi(y_it) / sg[pi(y_it)]. Differencing the surrogate in which token
    t sees the ratio s_i e^{logp_it - sg[logp_it]} is differencing a token-ratio clip loss (grpo,
    same clip options and weights) at log-ratios mu_i: its derivative is gspo-token's gradient."""
    rng = np.random.default_rng([SEED, 7, AGGS.index(agg)])
    for per_token in (True, False):
        logp, old, adv, mask, opts = sample(rng, "gspo-token", agg, per_token=per_token)
        closed = sapo_ref.policy_loss(logp, old, adv, mask, **opts).grad
        delta = np.where(mask, logp - old, 0.0)
        mu = delta.sum(axis=1, keepdims=True) / np.maximum(mask.sum(axis=1, keepdims=True), 1)
        at_s = old + mu  # logp whose token ratio is s_i at every valid token
        token_opts = {**opts, "method": "grpo"}
        token_opts.setdefault("eps_low", spec.METHODS["gspo-token"].defaults["eps_low"])
        token_opts.setdefault("eps_high", spec.METHODS["gspo-token"].defaults["eps_high"])
        fd = fd_grad(_loss_fn(old, adv, mask, token_opts), at_s)
        assert_fd_close(closed, fd, f"{opts}, per_token={per_token}")


# --------------------------------------------------------------------------- spec 0.2.0 terms
def with_terms(rng: np.random.Generator, case, estimator: str, *, row_weights: bool):
    """``case`` plus weights in [0, 2] ([N] or [N, T], some 0) and ref_logp with
    u = ref_logp - logp in [-1, 1] at most tokens and in [3, 3.5] at some (k3 from 16 to 30:
    low-var-k3 clipped, k3 and k2 large). No k3 value is within 5 of the clip at 10, so the
    stencil (u moves by 7.6e-6) never crosses it. The KL term's third derivative is at most
    beta c e^u <= 2 e^3.5 = 67, so its truncation error h^2/6 * 67 = 6.4e-10 keeps the
    module's tolerance bound."""
    logp, old, adv, mask, opts = case
    n, t = logp.shape
    shape = (n,) if row_weights else (n, t)
    weights = np.where(rng.random(shape) < 0.2, 0.0, rng.uniform(0.0, 2.0, shape))
    u = np.clip(rng.normal(0.0, 0.5, (n, t)), -1.0, 1.0)
    u = np.where(rng.random((n, t)) < 0.2, rng.uniform(3.0, 3.5, (n, t)), u)
    kl = {"kl_coef": float(rng.choice([0.05, 0.5, 2.0])), "kl_estimator": estimator}
    return logp, old, adv, mask, weights, logp + u, {**opts, **kl}


@pytest.mark.clause("10.1", "10.2", "10.3")
@pytest.mark.parametrize("estimator", M.KL_ESTIMATORS)
@pytest.mark.parametrize("method", METHODS)
def test_terms_gradients_match_central_differences(method: str, estimator: str) -> None:
    """Weights and the KL penalty: the closed-form gradient w.r.t. logp and w.r.t. ref_logp
    against central differences of the loss in each (clause 10.3), every aggregation in turn."""
    rng = np.random.default_rng([SEED, 10, METHODS.index(method), M.KL_ESTIMATORS.index(estimator)])
    for k, agg in enumerate(AGGS):
        # gspo-token: per-row advantages and weights, where its gradient is the derivative.
        row_only = method == "gspo-token"
        case = sample(rng, method, agg, per_token=not row_only and k % 2 == 0)
        logp, old, adv, mask, w, ref, opts = with_terms(
            rng, case, estimator, row_weights=row_only or k % 2 == 1
        )
        res = sapo_ref.policy_loss(logp, old, adv, mask, weights=w, ref_logp=ref, **opts)
        fd = fd_grad(lambda lp: sapo_ref.policy_loss(lp, old, adv, mask, weights=w,
                                                     ref_logp=ref, **opts).loss, logp)  # fmt: skip
        assert_fd_close(res.grad, fd, f"d/dlogp {opts}")
        fd_ref = fd_grad(lambda r: sapo_ref.policy_loss(logp, old, adv, mask, weights=w,
                                                        ref_logp=r, **opts).loss, ref)  # fmt: skip
        assert np.all(fd_ref[~mask] == 0.0), "an invalid ref_logp changed the loss (clause 6.1)"
        closed_ref = reference_grad_ref_logp(logp, old, adv, mask, weights=w, ref_logp=ref, **opts)
        assert_fd_close(closed_ref, fd_ref, f"d/dref_logp {opts}")
