"""The reference policy loss: :func:`policy_loss` (float64, closed-form gradient)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from . import spec
from ._xp import is_numpy, namespace
from .aggregation import Normalizer
from .aggregation import normalizer as make_normalizer
from .config import LossConfig, resolve_config
from .evaluate import evaluate
from .metrics import compute_metrics
from .validation import check_arrays, check_normalizer_type, faults, raise_faults

__all__ = ["PolicyLossResult", "policy_loss"]

_DEFAULTS = spec.DATA["defaults"]


@dataclass(frozen=True)
class PolicyLossResult:
    """What :func:`policy_loss` returns.

    Attributes:
        loss: :math:`\\mathcal{L} = -J`, a float (what an optimiser minimises).
        grad: :math:`\\partial\\mathcal{L}/\\partial\\log\\pi_\\theta`, shaped like ``logp``, float64,
            0 at invalid tokens; an array of the input's namespace (NumPy for NumPy input).
        metrics: clause 7.1 keys to floats.
        config: the resolved configuration (defaults filled in).
        grad_ref_logp: :math:`\\partial\\mathcal{L}/\\partial\\log\\pi_\\text{ref}` (clause 10.3), shaped
            like ``logp``, when ``ref_logp`` was given; ``None`` otherwise.
    """

    loss: float
    grad: Any
    metrics: dict[str, float]
    config: LossConfig
    grad_ref_logp: Any = None


def _as_arrays(*arrays: Any) -> tuple[Any, ...]:
    try:
        namespace(*arrays)
        return arrays
    except TypeError:
        return tuple(np.asarray(a) for a in arrays)


def policy_loss(
    logp: Any,
    old_logp: Any,
    advantages: Any,
    mask: Any,
    *,
    method: str = _DEFAULTS["method"],
    loss_agg: str = _DEFAULTS["loss_agg"],
    tau_pos: float | None = None,
    tau_neg: float | None = None,
    eps_low: float | None = None,
    eps_high: float | None = None,
    dual_clip: float | None = None,
    norm_length: float | None = None,
    count_empty_rows: bool | None = None,
    normalizer: Normalizer | None = None,
    weights: Any = None,
    ref_logp: Any = None,
    kl_coef: float | None = None,
    kl_estimator: str | None = None,
) -> PolicyLossResult:
    r"""SAPO-family policy loss and its closed-form gradient (paper eq. 5-8, 10; spec clauses 1-10).

    .. math::

        \mathcal{L} = -\frac{1}{D}\sum_{i,t} m_{it}\,\rho_{it}\,w_{it}\,A_{it}\,f_{it}(x_{it})
            + \frac{\beta}{D}\sum_{i,t} m_{it}\,\rho_{it}\,k(u_{it}),\qquad
        f^\text{SAPO}(x) = \frac{4}{\tau_{it}}\sigma\big(\tau_{it}(x-1)\big),\quad
        \tau_{it} = \begin{cases}\tau_\text{pos} & A_{it} > 0\\ \tau_\text{neg} & \text{else}\end{cases}

    where :math:`x_{it}` is the token ratio :math:`r_{it} = e^{\log\pi_\theta - \log\pi_\text{old}}`
    (``sapo``, ``grpo``) or the sequence ratio :math:`s_i` (``sapo-seq``, ``gspo``, ``gspo-token``),
    :math:`f` is the method's gate (clause 2) and :math:`\rho/D` the aggregation (clause 3). The optional per-token weights :math:`w` (clause 10.1,
    1 when absent) and KL penalty (clause 10.2, :math:`u = \log\pi_\text{ref} - \log\pi_\theta`,
    absent unless ``ref_logp`` is given) are the terms trainers add.

    Args:
        logp: [N, T] log-probabilities under the current policy (the differentiable input).
        old_logp: [N, T] log-probabilities under the behaviour policy.
        advantages: [N] per-sequence or [N, T] per-token advantages.
        mask: [N, T] bool or 0/1; invalid positions may hold anything (NaN, inf).
        method: ``"sapo"``, ``"sapo-seq"``, ``"grpo"``, ``"gspo"`` or ``"gspo-token"``.
        loss_agg: ``"token-mean"``, ``"seq-mean-token-mean"``, ``"seq-mean-token-sum"`` or
            ``"seq-mean-token-sum-norm"``.
        tau_pos, tau_neg: SAPO temperatures (default 1.0, 1.05).
        eps_low, eps_high: clip widths (GRPO 0.2/0.2, GSPO 3e-4/4e-4).
        dual_clip: dual-clip constant c > 1 for A < 0 (default: disabled).
        norm_length: the constant of ``seq-mean-token-sum-norm``.
        count_empty_rows: count rows without valid tokens in the row count (default False).
        normalizer: global counts for a shard of a larger batch (clause 3.8); the shard's loss
            and gradient are then its exact share of the global ones.
        weights: [N] or [N, T] detached per-token weights, finite and >= 0 at valid tokens
            (truncated importance-sampling ratios, entropy or off-policy masks): they scale each
            token's policy term, not the counts (clause 10.1).
        ref_logp: [N, T] log-probabilities under the reference policy: adds the KL penalty
            :math:`\beta\,k(u)` per token before aggregation (clause 10.2); needs ``kl_coef``.
        kl_coef: :math:`\beta \ge 0`, the KL penalty's coefficient.
        kl_estimator: ``"k1"``, ``"k2"``, ``"k3"`` (default) or ``"low-var-k3"`` (clause 10.2).

    Returns:
        :class:`PolicyLossResult` with ``loss``, ``grad``, ``metrics`` and ``config``.

    Raises:
        ValueError, TypeError: clause 8, naming the argument and what was expected.

    Example:
        >>> import numpy as np, sapo_ref
        >>> logp = np.log(np.array([[0.5, 0.25, 0.9], [0.3, 0.6, 0.1]]))
        >>> old = np.log(np.array([[0.5, 0.20, 0.9], [0.3, 0.5, 0.2]]))
        >>> res = sapo_ref.policy_loss(logp, old, np.array([1.0, -0.5]),
        ...                            np.array([[1, 1, 1], [1, 1, 0]]))
        >>> round(res.loss, 6)
        -0.540352
        >>> res.grad.round(4)
        array([[-0.1667, -0.2051, -0.1667],
               [ 0.125 ,  0.1484,  0.    ]])

        A KL penalty against a reference policy (k3, beta = 0.1) and a weight of 0 on the second
        row: its policy term goes, its place in the mean over rows stays (clause 10):

        >>> ref = np.log(np.array([[0.5, 0.25, 0.8], [0.3, 0.6, 0.1]]))
        >>> mask = np.array([[1, 1, 1], [1, 1, 0]])
        >>> res = sapo_ref.policy_loss(logp, old, np.array([1.0, -0.5]), mask,
        ...                            weights=np.array([1.0, 0.0]), ref_logp=ref, kl_coef=0.1)
        >>> first = sapo_ref.policy_loss(logp[:1], old[:1], np.array([1.0]), mask[:1]).loss
        >>> u = ref - logp; k3 = np.exp(u) - 1 - u  # the row-2 token with k3 != 0 is masked
        >>> bool(np.isclose(res.loss, first / 2 + 0.1 * k3[0].mean() / 2, rtol=1e-14))
        True

    References:
        Gao et al., Soft Adaptive Policy Optimization, arXiv:2511.20347, eq. 5-8 and 10.
    """
    config = resolve_config(
        method,
        loss_agg,
        tau_pos=tau_pos,
        tau_neg=tau_neg,
        eps_low=eps_low,
        eps_high=eps_high,
        dual_clip=dual_clip,
        norm_length=norm_length,
        count_empty_rows=count_empty_rows,
        has_normalizer=normalizer is not None,
        kl_coef=kl_coef,
        kl_estimator=kl_estimator,
        has_ref_logp=ref_logp is not None,
    )
    extra = [x for x in (weights, ref_logp) if x is not None]
    logp, old_logp, advantages, mask, *extra = _as_arrays(logp, old_logp, advantages, mask, *extra)
    if weights is not None:
        weights = extra.pop(0)
    if ref_logp is not None:
        ref_logp = extra.pop(0)
    check_arrays(logp, old_logp, advantages, mask, weights=weights, ref_logp=ref_logp)
    xp = namespace(logp, old_logp, advantages, mask)
    f64 = xp.float64
    lp, olp, adv = (
        xp.astype(a, f64) for a in (logp, old_logp, advantages)
    )  # copies: inputs untouched
    w = None if weights is None else xp.astype(weights, f64)
    ref = None if ref_logp is None else xp.astype(ref_logp, f64)
    valid = mask if mask.dtype == xp.bool else mask != 0
    local = make_normalizer(valid, count_empty_rows=config.count_empty_rows)
    if normalizer is not None:
        check_normalizer_type(normalizer)
        # The reference is eager: counts of any kind (NumPy scalars, 0-d arrays of another
        # library) become Python floats, so the checks compare numbers of one namespace.
        normalizer = _as_floats(normalizer)
        local = _as_floats(local)
    with np.errstate(over="ignore"):  # finite log-probs whose difference overflows: clause 5.5
        found = faults(
            lp,
            olp,
            adv,
            mask,
            valid,
            sequence=config.sequence_value,
            normalizer=normalizer,
            local=local,
            weights=w,
            ref_logp=ref,
        )
    raise_faults(found)
    norm = local if normalizer is None else normalizer
    # A sum of finite terms may exceed the largest float (clause 5.4): +-inf is then the correctly
    # rounded answer, not an error, so NumPy's overflow warning is silenced for this call only.
    with np.errstate(over="ignore"):
        ev = evaluate(lp, olp, adv, valid, config, norm, weights=w, ref_logp=ref)
        metrics = {k: float(v) for k, v in compute_metrics(ev, config).items()}
    grad = ev.grad
    grad_ref = None
    if ref is not None:  # minus the KL part; 0 everywhere when kl_coef = 0 (no KL term)
        grad_ref = xp.zeros_like(grad) if ev.kl_grad is None else -ev.kl_grad
    if is_numpy(xp):
        grad = np.asarray(grad)
        grad_ref = None if grad_ref is None else np.asarray(grad_ref)
    return PolicyLossResult(
        loss=float(ev.loss), grad=grad, metrics=metrics, config=config, grad_ref_logp=grad_ref
    )


def _as_floats(norm: Normalizer) -> Normalizer:
    return Normalizer(float(norm.num_tokens), float(norm.num_rows))
