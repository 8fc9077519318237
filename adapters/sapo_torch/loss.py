r"""``sapo_torch.policy_loss``: the reference's loss as one autograd node, checked as the spec says."""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import torch

from sapo_ref import spec
from sapo_ref.aggregation import Normalizer
from sapo_ref.config import LossConfig, resolve_config
from sapo_ref.metrics import metric_keys
from sapo_ref.validation import (
    any_fault,
    check_arrays,
    check_normalizer_type,
    faults,
    normalizer_faults,
    raise_faults,
)

from ._function import PolicyLossFunction, compute_dtype, input_dtypes
from ._namespace import TORCH
from .distributed import binary, local_counts
from .distributed import traced as is_traced

__all__ = ["check_inputs", "policy_loss"]

_DEFAULTS = spec.DATA["defaults"]
_EAGER_APPLY = super(torch.autograd.Function, PolicyLossFunction).apply


@functools.lru_cache(maxsize=256, typed=True)
def _cached_config(*args: Any, **kwargs: Any) -> LossConfig:
    return resolve_config(*args, **kwargs)


def _resolve_config(*args: Any, **kwargs: Any) -> LossConfig:
    """:func:`sapo_ref.resolve_config`, memoised (it costs ~10 us, a small batch's budget is
    ~0.3 ms); typed, so that 1 and True stay distinct. Unhashable options go uncached."""
    if torch.compiler.is_compiling():  # traced once: no cache (Dynamo warns about lru_cache)
        return resolve_config(*args, **kwargs)
    try:
        return _cached_config(*args, **kwargs)
    except TypeError as err:
        if "unhashable" not in str(err):
            raise
        return resolve_config(*args, **kwargs)


def check_inputs(
    logp: Any,
    old_logp: Any,
    advantages: Any,
    mask: Any,
    *,
    weights: Any = None,
    ref_logp: Any = None,
) -> None:
    """Types, shapes and dtypes (clauses 8.1, 8.2, 10.4) with the reference's messages; reads no
    values, so :func:`policy_loss` runs it under ``torch.compile`` too (at trace time).
    ``weights`` and ``ref_logp`` are checked when given.

    >>> import torch
    >>> check_inputs(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3), torch.ones(2, 3, dtype=torch.bool))
    Traceback (most recent call last):
    ...
    ValueError: advantages must have shape [N] = (2,) or [N, T] = (2, 3); got (3,)
    """
    given = {"logp": logp, "old_logp": old_logp, "advantages": advantages, "mask": mask}
    if weights is not None:
        given["weights"] = weights
    if ref_logp is not None:
        given["ref_logp"] = ref_logp
    tensors = not torch.compiler.is_compiling() and all(
        type(x) is torch.Tensor for x in given.values()
    )
    if tensors:  # shapes and dtypes seen before passed: the check reads nothing else
        key = tuple((name, x.shape, x.dtype) for name, x in given.items())
        if key in _CHECKED:
            return
    for name, x in given.items():
        if isinstance(x, torch.Tensor) or x is None or isinstance(x, (bool, int, float, complex)):
            continue  # tensors, and what check_arrays names as not an array
        # Other objects as the reference sees them (it converts what array-api-compat does not
        # know): so that a string, or a string array, gets the reference's dtype message.
        a = x if hasattr(x, "dtype") else np.asarray(x)
        if _real_dtype(a.dtype, bool_ok=True):  # numeric, but not a tensor
            raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
        given[name] = a
    arrays = [given.pop(name) for name in ("logp", "old_logp", "advantages", "mask")]
    check_arrays(*arrays, **given)
    if tensors:
        if len(_CHECKED) > 1024:  # bounded: shapes vary between batches
            _CHECKED.clear()
        _CHECKED.add(key)


#: (name, shape, dtype) of the inputs of calls whose check_arrays passed (clause 8.1, 8.2, 10.4).
_CHECKED: set[tuple[Any, ...]] = set()


def _real_dtype(dtype: Any, bool_ok: bool = False) -> bool:
    """Whether ``dtype`` (torch's or NumPy's) is real: floating or integral (or bool)."""
    if dtype is None:
        return False
    if isinstance(dtype, torch.dtype):
        return (bool_ok or dtype != torch.bool) and not dtype.is_complex
    try:
        return np.dtype(dtype).kind in ("fiub" if bool_ok else "fiu")
    except TypeError:
        return False


def _counts(normalizer: Any) -> tuple[Any, Any]:
    """The normalizer's counts as floats or 0-d tensors (clause 8.8 types); values are checked
    against the shard's own counts later, with the data."""
    if normalizer is None:
        return None, None
    check_normalizer_type(normalizer)
    out = []
    for name in ("num_tokens", "num_rows"):
        v = getattr(normalizer, name)
        dtype = getattr(v, "dtype", None)
        if dtype is not None and not _real_dtype(dtype):
            raise TypeError(
                f"normalizer {name} must be a real number or a 0-d real array; got dtype {dtype}"
            )
        out.append(v if isinstance(v, torch.Tensor) else float(v))
    return out[0], out[1]


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
    weights: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float | None = None,
    kl_estimator: str | None = None,
    metrics: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""SAPO-family policy loss (paper eq. 5-8, 10; spec clauses 1-8) as one autograd node.

    .. math::

        \mathcal{L} = -\frac{1}{D}\sum_{i,t} m_{it}\,\rho_{it}\,A_{it}\,f_{it}(x_{it}),\qquad
        f^\text{SAPO}(x) = \frac{4}{\tau_{it}}\,\sigma\big(\tau_{it}(x-1)\big),\qquad
        \frac{\partial\mathcal{L}}{\partial\log\pi_\theta(y_{it})}\ \text{in closed form (clause 2)}

    with :math:`x_{it}` the token ratio :math:`r_{it} = e^{\log\pi_\theta-\log\pi_\text{old}}` (``sapo``,
    ``grpo``) or the sequence ratio :math:`s_i` (``sapo-seq``, ``gspo``, ``gspo-token``), :math:`f` the
    method's gate and :math:`\rho/D` the aggregation, exactly as :func:`sapo_ref.policy_loss`: same
    keywords, defaults (from the spec), validation and messages; selection masking, exact
    saturation, no clamp. Token SAPO runs a fused pass; every other method runs the reference's
    own array-API code on the tensors.

    The forward pass computes the loss, the gradient (and the metrics, when asked) together and
    saves only the gradient ([N, T], in the dtype of ``logp``); backward multiplies it by the
    upstream cotangent. Works eagerly, under ``torch.compile(fullgraph=True)``,
    ``torch.func.grad``/``vmap``, on any device.

    Args:
        logp: [N, T] log-probabilities under the current policy, float64/float32/bfloat16/float16.
        old_logp: [N, T] behaviour-policy log-probabilities; its gradient, when it requires one,
            is the true derivative (clause 8.9): minus that of ``logp``, 0 for ``gspo-token``.
        advantages: [N] per-sequence or [N, T] per-token advantages (a constant).
        mask: [N, T] ``bool`` (fastest) or 0/1 integers/floats. Invalid positions may hold
            anything, NaN and inf included.
        method, loss_agg, tau_pos, tau_neg, eps_low, eps_high, dual_clip, norm_length,
            count_empty_rows: as :func:`sapo_ref.policy_loss`.
        normalizer: global counts (``sapo_ref.Normalizer`` of numbers or 0-d tensors, e.g. from
            :func:`sapo_torch.distributed.global_normalizer`) for a micro-batch or a rank's shard
            (clause 3.8): the shard's loss and gradient are then its exact share of the global ones.
        weights: [N] or [N, T] per-token weights :math:`w_{it} \ge 0` (clause 10.1), real
            floating, bool or integer, cast to the computation dtype; they scale each token's
            policy term, not the counts, and get no gradient (detached).
        ref_logp: [N, T] reference-policy log-probabilities (clause 10.2); promotes with
            ``logp``; its gradient is minus the KL part of ``logp``'s (clause 10.3).
        kl_coef, kl_estimator: :math:`\beta` and the estimator (``"k1"``, ``"k2"``, ``"k3"``,
            ``"low-var-k3"``) of the KL penalty :math:`\beta\sum c_{it} m_{it} k(u_{it})`,
            :math:`u = \log\pi_\text{ref} - \log\pi_\theta`; as :func:`sapo_ref.policy_loss`.
        metrics: also return the clause 7.1 metrics, computed in the same pass.

    Returns:
        ``(loss, metrics)``: ``loss`` a 0-d tensor in the promoted dtype of ``logp``,
        ``old_logp``, ``advantages`` (and ``ref_logp``) (computed in float32 when that is
        bfloat16/float16, clause 6.4, 8.9) whose gradient w.r.t. each input has that input's
        dtype; ``metrics`` a dict of detached 0-d tensors in the computation dtype keyed as
        ``sapo_ref.metric_keys(method, kl=..., weights=...)`` when ``metrics=True``, else ``{}``.

    Raises:
        ValueError, TypeError: clauses 8 and 10.4 (options, shapes, dtypes, data, normalizer,
        weights, KL options), with the reference's messages. Eager data checks read values (one host sync on an accelerator).
        Under ``torch.compile`` or ``torch.func`` transforms the shape, dtype and option checks
        still raise; invalid data makes the loss and every gradient entry NaN (clause 8.7).

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
    config = _resolve_config(
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
    if not isinstance(metrics, bool):
        raise TypeError(f"metrics must be a bool; got {type(metrics).__name__}")
    check_inputs(logp, old_logp, advantages, mask, weights=weights, ref_logp=ref_logp)
    num_tokens, num_rows = _counts(normalizer)
    if normalizer is not None:  # counts as floats or tensors: what the checks can compare
        normalizer = Normalizer(num_tokens, num_rows)
    valid = mask if mask.dtype == torch.bool else mask != 0
    traced = is_traced()
    # Token SAPO checks its data after the pass: every data fault but a mask value, a bad
    # normalizer or a negative weight makes the fused pass's loss non-finite (a NaN or infinite
    # advantage or weight times p > 0, a NaN log-ratio, a NaN u = ref_logp - logp times beta > 0),
    # so the other checks run only when it is. Other methods, and a KL term with kl_coef = 0 (a
    # NaN ref_logp then leaves the loss finite): before.
    terms = (weights, ref_logp)
    after = (
        config.method == "sapo"
        and (ref_logp is None or config.has_kl)
        and (not traced or torch.compiler.is_compiling())
    )
    poison = None
    if traced:
        found = _data_faults(logp, old_logp, advantages, mask, valid, config, normalizer, *terms)
        first = [f for f in found if not after or f.argument in _EARLY]
        poison = any_fault(tuple(first), TORCH)  # unused checks are dead code to Inductor
    elif not after:
        raise_faults(
            _data_faults(logp, old_logp, advantages, mask, valid, config, normalizer, *terms)
        )
    elif (mask.dtype != torch.bool and not binary(mask, valid)) or (
        weights is not None and _negative_weight(weights, valid)
    ):  # the full checks: the reference reports the first fault in its order
        raise_faults(_data_faults(logp, old_logp, advantages, mask, valid, config, None, *terms))
    elif normalizer is not None and bool(
        any_fault(normalizer_faults(normalizer, _local(valid, config), TORCH), TORCH)
    ):  # the full checks, so that bad data is reported before the normalizer, as the reference does
        raise_faults(
            _data_faults(logp, old_logp, advantages, mask, valid, config, normalizer, *terms)
        )
    # Eagerly, the base class's apply: Function.apply binds the arguments with
    # inspect.signature on every call (about 0.1 ms), and every argument here is positional.
    apply = PolicyLossFunction.apply if traced else _EAGER_APPLY
    loss, _, _, _, values = apply(
        logp, old_logp, advantages, valid, num_tokens, num_rows, config, metrics, weights, ref_logp
    )
    if after and traced:
        given = tuple(x.detach() for x in terms if x is not None)
        operands = (logp.detach(), old_logp.detach(), advantages.detach(), mask, valid, *given)
        branch = _traced_faults(config, weights is not None, ref_logp is not None)
        late = torch.cond(~torch.isfinite(loss.detach()), branch, _no_fault, operands)
        poison = poison | late
    elif after and not math.isfinite(loss.item()):  # eager; +-inf from valid data is returned
        raise_faults(_data_faults(logp, old_logp, advantages, mask, valid, config, None, *terms))
    if poison is not None:
        # Clause 8.7: NaN loss, and NaN times the saved gradient in backward: every entry NaN.
        loss = loss * torch.where(poison, torch.nan, 1.0).to(loss.dtype)
    if not metrics:
        return loss, {}
    keys = metric_keys(config.method, kl=ref_logp is not None, weights=weights is not None)
    return loss, dict(zip(keys, values.unbind()))


def _no_fault(*operands: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=torch.bool, device=operands[0].device)


#: The checks a finite fused loss does not imply (see policy_loss): run before the pass.
_EARLY = ("mask", "normalizer", "weights")


def _negative_weight(weights: torch.Tensor, valid: torch.Tensor) -> bool:
    """Whether a weight at a valid token (an [N] weight: of a row with one) is negative."""
    if weights.dtype == torch.bool or bool(weights.amin() >= 0):  # one reduction, usually
        return False
    where = valid if weights.dim() == 2 else valid.any(-1)
    return bool(((weights < 0) & where).any())


def _traced_faults(config: LossConfig, has_weights: bool, has_ref: bool) -> Any:
    """The data checks as a torch.cond branch (compiled: run only when the loss is not finite);
    its operands are the four inputs, the valid mask and the terms that are given."""

    def branch(logp, old_logp, advantages, mask, valid, *terms):
        rest = list(terms)
        weights = rest.pop(0) if has_weights else None
        ref_logp = rest.pop(0) if has_ref else None
        found = _data_faults(
            logp, old_logp, advantages, mask, valid, config, None, weights, ref_logp
        )
        return any_fault(found, TORCH)

    return branch


def _local(valid: torch.Tensor, config: LossConfig) -> Normalizer:
    return local_counts(valid, count_empty_rows=config.count_empty_rows)


def _data_faults(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    valid: torch.Tensor,
    config: LossConfig,
    normalizer: Normalizer | None,
    weights: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
) -> tuple[Any, ...]:
    """sapo_ref's data checks (clauses 5.5, 8.2, 8.5, 8.6, 8.8, 10.4) in the computation dtype."""
    cdt = compute_dtype(*input_dtypes(logp, old_logp, advantages, ref_logp))
    lp, olp, adv = (x.detach().to(cdt) for x in (logp, old_logp, advantages))
    w, ref = (None if x is None else x.detach().to(cdt) for x in (weights, ref_logp))
    local = None if normalizer is None else _local(valid, config)
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
    return found
