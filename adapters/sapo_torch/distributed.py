r"""Exact SAPO-family losses under gradient accumulation and ``torch.distributed`` (clauses 3.8-3.10).

Per optimizer step, on every rank:

1. ``norm = global_normalizer(micro_batch_masks)``: this rank's counts over **all** micro-batches of
   the step, summed across ranks by one ``all_reduce`` of a 2-element float64 tensor;
2. for each micro-batch: ``loss = policy_loss(..., normalizer=norm)``; ``loss.backward()``;
3. gradients are then the rank's exact share of the global gradient: they must be **summed** across
   ranks. DDP and FSDP average instead (they divide by the world size :math:`W`); register
   :func:`allreduce_sum_hook` on DDP, call ``set_gradient_divide_factor(1.0)`` on an FSDP2 module,
   or multiply each loss by :math:`W` before ``backward``.

.. math::

    \mathcal{L} = \sum_{\text{ranks } r}\ \sum_{\text{micro-batches } k} \mathcal{L}_{rk},\qquad
    (n, R) = \sum_{r,k} (n_{rk}, R_{rk}).

Imports only PyTorch and ``sapo_ref``. See docs/distributed.md for a complete training loop.
"""

# No ``from __future__ import annotations``: DDP checks a comm hook's annotations as objects.
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from sapo_ref.aggregation import Normalizer, normalizer
from sapo_ref.validation import faults, raise_faults

__all__ = ["allreduce_sum_hook", "global_normalizer", "local_counts", "valid_tokens"]


def traced() -> bool:
    """True where tensor values cannot be read: torch.compile, torch.jit tracing, torch.func."""
    return (
        bool(torch.compiler.is_compiling())
        or bool(torch.jit.is_tracing())
        or bool(torch._C._are_functorch_transforms_active())
    )


def binary(mask: torch.Tensor, valid: torch.Tensor) -> bool:
    """Whether a non-bool mask holds only 0 and 1 (one read of the mask for integers)."""
    if mask.is_floating_point():
        return torch.equal(mask, valid.to(mask.dtype))  # NaN and 0.5 differ from 1
    lo, hi = torch.aminmax(mask)
    return bool(lo >= 0) and bool(hi <= 1)


def valid_tokens(mask: torch.Tensor, name: str = "mask") -> tuple[torch.Tensor, Any]:
    """``(valid, bad)``: the boolean mask and, under tracing, a 0-d bool tensor that holds when a
    value is not 0/1 (``None`` eagerly, where such a mask raises the reference's ValueError)."""
    valid = mask if mask.dtype == torch.bool else mask != 0
    if mask.dtype == torch.bool:
        return valid, None
    if traced():
        return valid, ((mask != 0) & (mask != 1)).any()
    if not binary(mask, valid):
        z = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        try:
            raise_faults(faults(z, z, z, mask, valid, sequence=False))
        except ValueError as err:  # the reference's message, about this argument
            raise ValueError(str(err).replace("mask", name, 1)) from None
    return valid, None


def _masks(mask: Any) -> list[tuple[str, torch.Tensor]]:
    if isinstance(mask, torch.Tensor):
        named = [("mask", mask)]
    elif isinstance(mask, Sequence) and not isinstance(mask, (str, bytes)):
        named = [(f"mask[{k}]", m) for k, m in enumerate(mask)]
    else:
        raise TypeError(
            f"mask must be a torch.Tensor or a sequence of them; got {type(mask).__name__}"
        )
    if not named:
        raise ValueError(
            "mask must be a tensor or a non-empty sequence of tensors; got an empty sequence"
        )
    for name, m in named:
        if not isinstance(m, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(m).__name__}")
        if m.dim() != 2:
            raise ValueError(f"{name} must be 2-D [N, T]; got shape {tuple(m.shape)}")
        if m.is_complex():
            raise TypeError(f"{name} must be boolean or hold 0/1; got dtype {m.dtype}")
    return named


def local_counts(
    mask: torch.Tensor | Sequence[torch.Tensor], *, count_empty_rows: bool = False
) -> Normalizer:
    r"""This process's counts :math:`(n, R)` (clause 3.6), 0-d float64 tensors on the mask's device.

    ``mask`` is one [N, T] mask or a sequence of micro-batch masks (each padded to its own T);
    counted by :func:`sapo_ref.normalizer`. float64 keeps counts exact up to :math:`2^{53}`. A mask
    value other than 0/1 raises the reference's ValueError (under tracing: NaN counts, which
    ``policy_loss`` turns into a NaN loss and gradient, clause 8.7).

    >>> import torch
    >>> local_counts([torch.tensor([[1, 1, 0]]), torch.tensor([[0, 0], [1, 0]])])
    Normalizer(num_tokens=tensor(3., dtype=torch.float64), num_rows=tensor(2., dtype=torch.float64))
    """
    if not isinstance(count_empty_rows, bool):
        raise TypeError(f"count_empty_rows must be a bool; got {type(count_empty_rows).__name__}")
    named = _masks(mask)
    device = named[0][1].device
    total = None
    for name, m in named:
        valid, bad = valid_tokens(m.detach(), name)
        c = normalizer(valid, count_empty_rows=count_empty_rows)
        n, r = (
            torch.as_tensor(v, dtype=torch.float64, device=device)
            for v in (c.num_tokens, c.num_rows)
        )
        if bad is not None:
            n = torch.where(bad, torch.nan, n)
        total = Normalizer(n, r) if total is None else total + Normalizer(n, r)
    return total


def global_normalizer(
    mask: torch.Tensor | Sequence[torch.Tensor],
    *,
    count_empty_rows: bool = False,
    group: Any = None,
) -> Normalizer:
    r"""The global :class:`~sapo_ref.Normalizer` of one optimizer step across ranks (clause 3.9).

    :math:`(n, R) = \sum_{\text{ranks}} \sum_{\text{micro-batches}} (n_k, R_k)`, from one ``all_reduce``
    (sum) of a float64 [2] tensor over ``group``. Call it **once per optimizer step**, on every rank of
    the group (it is a collective), with the masks of all micro-batches this rank will process
    before the step, and pass the result to every ``policy_loss`` call of that step. Without an
    initialised process group the local counts are returned (single-process accumulation).

    Args:
        mask: this rank's [N, T] mask, or the sequence of its micro-batch masks.
        count_empty_rows: count rows without valid tokens in :math:`R` (clause 3.6); the setting is
            fixed here, so ``policy_loss`` must not be given ``count_empty_rows`` as well.
        group: the data-parallel process group (default: the world).

    Returns:
        ``Normalizer(num_tokens, num_rows)`` of 0-d float64 tensors on the mask's device, not
        requiring grad.

    >>> import torch
    >>> global_normalizer(torch.tensor([[1, 0], [0, 0]]), count_empty_rows=True)  # no process group
    Normalizer(num_tokens=tensor(1., dtype=torch.float64), num_rows=tensor(2., dtype=torch.float64))
    """
    local = local_counts(mask, count_empty_rows=count_empty_rows)
    counts = torch.stack([local.num_tokens, local.num_rows])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
    elif group is not None:
        raise RuntimeError("group was given but torch.distributed is not initialised")
    return Normalizer(counts[0], counts[1])


def allreduce_sum_hook(
    process_group: Any, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook that **sums** gradients across ranks instead of averaging them.

    With every rank's loss normalised by the global counts, the sum is the global gradient.
    ``ddp_model.register_comm_hook(None, allreduce_sum_hook)`` (``None``: the DDP model's group).
    """
    group = process_group if process_group is not None else dist.group.WORLD
    work = dist.all_reduce(bucket.buffer(), op=dist.ReduceOp.SUM, group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])
