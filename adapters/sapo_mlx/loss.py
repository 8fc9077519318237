"""``sapo_mlx.policy_loss``: the reference's loss in MLX, lazy, with a closed-form gradient."""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from typing import Any

import mlx.core as mx
import numpy as np

from sapo_ref import spec
from sapo_ref.aggregation import Normalizer
from sapo_ref.config import resolve_config
from sapo_ref.validation import check_arrays, check_data

from .convert import compute_dtype, numpy_dtype, to_mx, to_numpy
from .evaluate import loss_core, prepare, token_weights
from .metrics import compute_metrics

__all__ = ["check_inputs", "normalizer", "policy_loss"]

_DEFAULTS = spec.DATA["defaults"]


def _stand_in(x: mx.array) -> np.ndarray:
    # A zero-byte NumPy array of x's shape and dtype: the reference's shape/dtype checks and
    # messages run on it without reading x (no host sync, works under mx.compile).
    return np.broadcast_to(np.zeros((), numpy_dtype(x.dtype)), x.shape)


def normalizer(mask: Any, *, count_empty_rows: bool = False) -> Normalizer:
    r"""Counts :math:`(n, R)` of a mask as 0-d int32 ``mx.array`` s (clause 3.1, 3.6, 3.8).

    Shards' normalizers add with ``+``; pass the global one to every shard's
    :func:`policy_loss` and the shard losses and gradients sum to the whole batch's.

    >>> import mlx.core as mx
    >>> n = normalizer(mx.array([[1, 1, 0], [0, 0, 0]])) + normalizer(mx.array([[1, 0, 0]]))
    >>> n.num_tokens.item(), n.num_rows.item()
    (3, 2)
    """
    mask = to_mx(mask)
    valid = mask if mask.dtype == mx.bool_ else mask != 0
    lengths = mx.sum(valid.astype(mx.int32), axis=-1)
    rows = mx.array(valid.shape[-2], mx.int32) if count_empty_rows else mx.sum(lengths > 0).astype(mx.int32)
    return Normalizer(mx.sum(lengths), rows)


_mask_counts = normalizer  # policy_loss's keyword `normalizer` shadows the function


def policy_loss(
    logp: mx.array,
    old_logp: mx.array,
    advantages: mx.array,
    mask: mx.array,
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
) -> tuple[mx.array, dict[str, mx.array]]:
    r"""SAPO-family policy loss (paper eq. 5-8, 10; spec clauses 1-7) as a lazy ``mx.array``.

    .. math::

        \mathcal{L} = -\frac{1}{D}\sum_{i,t} m_{it}\,\rho_{it}\,A_{it}\,f_{it}(x_{it}),\qquad
        f^\text{SAPO}(x) = \frac{4}{\tau_{it}}\sigma\big(\tau_{it}(x-1)\big)

    with :math:`x_{it}` the token ratio :math:`e^{\log\pi_\theta-\log\pi_\text{old}}` or the
    sequence ratio :math:`s_i`, :math:`f` the method's gate and :math:`\rho/D` the aggregation,
    exactly as :func:`sapo_ref.policy_loss` (same keywords, defaults and messages).
    Differentiable w.r.t. ``logp`` (and ``old_logp``) through ``mx.grad`` with a closed-form
    VJP; works under ``mx.compile``, ``mx.vmap`` and ``mx.value_and_grad``. Nothing is
    evaluated here: the caller decides when (``mx.eval``).

    Inputs are ``mx.array`` s (NumPy data is converted with :func:`sapo_mlx.to_mx`, float64
    kept). float64 and float32 are computed as given, bfloat16 and float16 in float32; the
    loss is in that compute dtype, ``mx.grad`` returns ``logp``'s dtype. The metrics are
    float64 (computed on the CPU stream from the inputs as given, whatever their dtype).
    ``advantages`` and ``mask`` are constants (zero gradient). Data checks that need the
    values (NaN at valid tokens, clause 8.5, 8.6) are in :func:`check_inputs`.
    ``mx.compile(..., shapeless=True)`` is refused by MLX (the blocked sums depend on ``T``).

    Returns:
        ``(loss, metrics)``: a 0-d array and the clause 7.1 metrics as 0-d arrays.

    Example:
        >>> import mlx.core as mx, numpy as np, sapo_ref, sapo_mlx
        >>> lp = np.log([[0.5, 0.25, 0.9], [0.3, 0.6, 0.1]])
        >>> old = np.log([[0.5, 0.20, 0.9], [0.3, 0.5, 0.2]])
        >>> adv, mask = np.array([1.0, -0.5]), np.array([[1, 1, 1], [1, 1, 0]])
        >>> f = lambda x: sapo_mlx.policy_loss(x, sapo_mlx.to_mx(old), mx.array(adv), mx.array(mask))[0]
        >>> loss, grad = mx.value_and_grad(f)(sapo_mlx.to_mx(lp))
        >>> ref = sapo_ref.policy_loss(lp, old, adv, mask)
        >>> abs(loss.item() - ref.loss) < 1e-15, np.allclose(np.array(grad), ref.grad, rtol=1e-14)
        (True, True)
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
    logp, old_logp, advantages, mask = (to_mx(a) for a in (logp, old_logp, advantages, mask))
    check_arrays(*(_stand_in(a) for a in (logp, old_logp, advantages, mask)))
    if normalizer is not None and not isinstance(normalizer, Normalizer):
        raise TypeError(f"normalizer must be a sapo_ref.Normalizer; got {type(normalizer).__name__}")
    dtype = compute_dtype(logp.dtype)
    if dtype != mx.float64 and mx.float64 in (old_logp.dtype, advantages.dtype):
        warnings.warn(
            f"old_logp/advantages are float64 but logp is {str(logp.dtype).split('.')[-1]}: the "
            "loss is computed in float32 (pass logp as float64, e.g. sapo_mlx.to_mx(numpy_array), "
            "for a float64 loss)",
            stacklevel=2,
        )
    # float64 exists only on the CPU device (Metal has none).
    cpu = mx.default_device() != mx.cpu
    with mx.stream(mx.cpu) if cpu and dtype == mx.float64 else nullcontext():
        p = prepare(logp, old_logp, advantages, mask, dtype)
        if normalizer is None:
            normalizer = _mask_counts(p.valid, count_empty_rows=config.count_empty_rows)
        c = token_weights(p, config, normalizer)
        loss, _ = loss_core(config)(p.delta, p.adv, c, p.valid)
    # Metrics are diagnostics, computed only if evaluated: in float64 (on the CPU stream, which
    # shares memory on Apple silicon) they are the reference's own numbers for every input
    # dtype; float32 would overflow sums of ratios near 3e38 and lose the mean of cancelling
    # log-ratios of magnitude 1e4.
    with mx.stream(mx.cpu) if cpu else nullcontext():
        inputs = (mx.stop_gradient(a) for a in (logp, old_logp, advantages))
        metrics = compute_metrics(prepare(*inputs, mask, mx.float64), config)
    return loss, metrics


def check_inputs(
    logp: Any, old_logp: Any, advantages: Any, mask: Any, *, method: str = _DEFAULTS["method"]
) -> None:
    """The reference's checks of clause 8 on the values (NaN or infinite advantages, NaN or
    :math:`\\infty-\\infty` log-ratios at valid tokens, rows of clause 5.5, mask values 0/1).

    These need the data on the host, so :func:`policy_loss` (lazy, compilable) does not run
    them; call this where a sync is acceptable (e.g. once per rollout batch).

    >>> import mlx.core as mx
    >>> check_inputs(mx.array([[float("nan")]]), mx.zeros((1, 1)), mx.ones(1), mx.ones((1, 1)))
    Traceback (most recent call last):
    ...
    ValueError: logp is NaN at a valid token; first at (0, 0)
    """
    config = resolve_config(method)
    arrays = [to_numpy(to_mx(a)) for a in (logp, old_logp, advantages, mask)]
    check_arrays(*arrays)
    lp, olp, adv = (a.astype(np.float64) for a in arrays[:3])
    valid = arrays[3] if arrays[3].dtype == np.bool_ else arrays[3] != 0
    check_data(lp, olp, adv, valid, sequence=config.sequence_value)
