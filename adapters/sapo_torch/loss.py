r"""``sapo_torch.policy_loss``: the reference's loss as one fused autograd node."""

from __future__ import annotations

from typing import Any

import torch

from sapo_ref import spec
from sapo_ref.aggregation import Normalizer
from sapo_ref.config import LossConfig, resolve_config
from sapo_ref.evaluate import evaluate
from sapo_ref.loss import _check_normalizer
from sapo_ref.metrics import compute_metrics
from sapo_ref.validation import check_arrays

from ._function import FusedPolicyLoss, compute_dtype
from ._kernels import local_counts

__all__ = ["check_inputs", "policy_loss", "policy_metrics"]

_DEFAULTS = spec.DATA["defaults"]


def _tracing() -> bool:
    """True under torch.compile/torch.jit tracing, where no check may read tensor data."""
    return bool(torch.compiler.is_compiling()) or bool(torch.jit.is_tracing())


def check_inputs(logp: Any, old_logp: Any, advantages: Any, mask: Any) -> None:
    """Shapes and dtypes of clause 8.1-8.2 with the reference's messages (``sapo_ref.check_arrays``).

    Besides shapes and dtypes, a mask that is not boolean has its values checked (0/1, clause 8.2):
    that reads data, one host sync on an accelerator, so pass a ``bool`` mask on the hot path.
    :func:`policy_loss` skips this call under ``torch.compile`` (a traced graph cannot raise on
    data, and tracing the array-API plumbing of the checks only slows compilation): call it
    once eagerly, or run the step eagerly once, to validate a compiled training step's inputs.

    >>> import torch
    >>> check_inputs(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3), torch.ones(2, 3, dtype=torch.bool))
    Traceback (most recent call last):
    ...
    ValueError: advantages must have shape [N] = (2,) or [N, T] = (2, 3); got (3,)
    """
    for name, x in (
        ("logp", logp),
        ("old_logp", old_logp),
        ("advantages", advantages),
        ("mask", mask),
    ):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
    check_arrays(logp, old_logp, advantages, mask)


def _normalizer_args(normalizer: Normalizer | None) -> tuple[Any, Any]:
    if normalizer is None:
        return None, None
    fields = (getattr(normalizer, "num_tokens", None), getattr(normalizer, "num_rows", None))
    if not isinstance(normalizer, Normalizer) or all(isinstance(v, (int, float)) for v in fields):
        # Type and, for Python numbers, finite and >= 0: the reference's check and messages.
        # Tensor counts stay on device unchecked (no sync); no shard-vs-global comparison either.
        normalizer = _check_normalizer(normalizer, Normalizer(0.0, 0.0))
    return normalizer.num_tokens, normalizer.num_rows


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
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
    metrics: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""SAPO-family policy loss (paper eq. 5-8, 10; spec clauses 1-8) as one fused autograd node.

    .. math::

        \mathcal{L} = -\frac{1}{D}\sum_{i,t} m_{it}\,\rho_{it}\,A_{it}\,f_{it}(x_{it}),\qquad
        f^\text{SAPO}(x) = \frac{4}{\tau_{it}}\,\sigma\big(\tau_{it}(x-1)\big),\qquad
        \frac{\partial\mathcal{L}}{\partial\log\pi_\theta(y_{it})}\ \text{in closed form (clause 2)}

    with :math:`x_{it}` the token ratio :math:`r_{it} = e^{\log\pi_\theta-\log\pi_\text{old}}` (``sapo``,
    ``grpo``) or the sequence ratio :math:`s_i` (``sapo-seq``, ``gspo``, ``gspo-token``), :math:`f` the
    method's gate and :math:`\rho/D` the aggregation, exactly as :func:`sapo_ref.policy_loss`: same
    keywords, defaults (from the spec) and validation messages; selection masking, exact
    saturation, no clamp.

    The forward pass computes the loss and the gradient together and saves only the gradient
    ([N, T], in the dtype of ``logp``); backward multiplies it by the upstream cotangent. Works
    eagerly, under ``torch.compile(fullgraph=True)``, ``torch.func.grad``/``vmap``, on any device.

    Args:
        logp: [N, T] log-probabilities under the current policy, float64/float32/bfloat16/float16;
            the only input the loss is differentiated against.
        old_logp: [N, T] behaviour-policy log-probabilities (treated as a constant).
        advantages: [N] per-sequence or [N, T] per-token advantages (a constant).
        mask: [N, T] ``bool`` (recommended: no data check) or 0/1 integers/floats. Invalid
            positions may hold anything, NaN and inf included.
        method, loss_agg, tau_pos, tau_neg, eps_low, eps_high, dual_clip, norm_length,
            count_empty_rows: as :func:`sapo_ref.policy_loss`.
        normalizer: global counts (``sapo_ref.Normalizer`` of Python numbers or 0-d tensors, e.g.
            from ``sapo_torch.distributed.global_normalizer``) for a micro-batch or a rank's shard
            (clause 3.8): the shard's loss and gradient are then its exact share of the global ones.
            Python-number counts are checked as the reference does (finite, >= 0); tensor counts
            stay on the device unchecked, and no count is compared with the shard's own (both
            would need a host sync).
        metrics: also compute the clause 7.1 metrics (opt-in, so the default call stays one lean
            pass). They come from :func:`policy_metrics`, a second pass of the reference's own
            array-API code: several times the cost of the loss in eager mode (log them every k
            steps), fused by ``torch.compile`` when the step is compiled.

    Returns:
        ``(loss, metrics)``: ``loss`` a 0-d tensor (float64 for float64 inputs, float32 otherwise:
        low precision is computed in float32, clause 6.4) whose gradient w.r.t. ``logp`` has
        ``logp``'s dtype; ``metrics`` a dict of detached 0-d tensors keyed as
        ``sapo_ref.metric_keys(method)`` when ``metrics=True``, else ``{}``. No host sync.

    Raises:
        ValueError, TypeError: clause 8 (options, shapes, dtypes), with the reference's messages.
        Data checks (NaN at valid tokens, clause 5.5/8.5/8.6) are the reference's only.

    Example:
        >>> import torch, sapo_torch
        >>> logp = torch.log(torch.tensor([[0.5, 0.25, 0.9], [0.3, 0.6, 0.1]], dtype=torch.float64))
        >>> old = torch.log(torch.tensor([[0.5, 0.20, 0.9], [0.3, 0.5, 0.2]], dtype=torch.float64))
        >>> logp.requires_grad_()
        tensor(...)
        >>> loss, _ = sapo_torch.policy_loss(logp, old, torch.tensor([1.0, -0.5], dtype=torch.float64),
        ...                                  torch.tensor([[1, 1, 1], [1, 1, 0]]).bool())
        >>> round(loss.item(), 6)  # the reference's -0.540352
        -0.540352
        >>> loss.backward(); logp.grad.round(decimals=4)
        tensor([[-0.1667, -0.2051, -0.1667],
                [ 0.1250,  0.1484,  0.0000]], dtype=torch.float64)

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
    )
    if not _tracing():
        check_inputs(logp, old_logp, advantages, mask)
    num_tokens, num_rows = _normalizer_args(normalizer)
    valid = mask if mask.dtype == torch.bool else mask != 0
    loss, _ = FusedPolicyLoss.apply(logp, old_logp, advantages, valid, num_tokens, num_rows, config)
    if not metrics:
        return loss, {}
    return loss, policy_metrics(logp, old_logp, advantages, valid, config)


def policy_metrics(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    config: LossConfig,
) -> dict[str, torch.Tensor]:
    r"""The clause 7.1 metrics as detached 0-d tensors in the compute dtype, no host sync.

    Computed by the reference's own code (:func:`sapo_ref.evaluate` and
    :func:`sapo_ref.compute_metrics`, array-API generic) on the detached inputs, so every
    definition is the spec's; a separate pass, which is why ``policy_loss`` makes it opt-in.

    >>> import torch, sapo_ref
    >>> m = policy_metrics(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1),
    ...                    torch.ones(1, 2, dtype=torch.bool), sapo_ref.resolve_config("sapo"))
    >>> float(m["gate/mean"]), float(m["tokens"])   # on-policy: w = 1
    (1.0, 2.0)
    """
    with torch.no_grad():
        cdt = compute_dtype(logp.dtype)
        lp, olp, adv = (x.detach().to(cdt) for x in (logp, old_logp, advantages))
        valid = mask if mask.dtype == torch.bool else mask != 0
        # Metrics do not depend on the denominator: this batch's counts suffice.
        norm = local_counts(valid, valid.sum(-1), config.count_empty_rows, cdt)
        ev = evaluate(lp, olp, adv, valid, config, norm)
        return dict(compute_metrics(ev, config))
