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

from sapo_ref.aggregation import Normalizer
from sapo_ref.aggregation import normalizer as _local_normalizer

__all__ = ["allreduce_sum_hook", "global_normalizer", "local_counts"]


def local_counts(
    mask: torch.Tensor | Sequence[torch.Tensor], *, count_empty_rows: bool = False
) -> torch.Tensor:
    r"""This process's counts :math:`(n, R)` as a float64 tensor of shape [2] on the mask's device.

    ``mask`` is one [N, T] mask or a sequence of micro-batch masks (each padded to its own T).
    float64 keeps counts exact up to :math:`2^{53}` (float32 would stop at :math:`2^{24}` tokens).

    >>> import torch
    >>> local_counts([torch.tensor([[1, 1, 0]]), torch.tensor([[0, 0], [1, 0]])]).tolist()
    [3.0, 2.0]
    """
    masks = [mask] if isinstance(mask, torch.Tensor) else list(mask)
    if not masks:
        raise ValueError(
            "mask must be a tensor or a non-empty sequence of tensors; got an empty sequence"
        )
    for k, m in enumerate(masks):
        if not isinstance(m, torch.Tensor):
            raise TypeError(f"mask[{k}] must be a torch.Tensor; got {type(m).__name__}")
    device = masks[0].device
    parts = []
    for m in masks:
        c = _local_normalizer(m.detach(), count_empty_rows=count_empty_rows)
        parts.append(
            torch.stack(
                [
                    torch.as_tensor(v, dtype=torch.float64, device=device)
                    for v in (c.num_tokens, c.num_rows)
                ]
            )
        )
    return torch.stack(parts).sum(dim=0)


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
    counts = local_counts(mask, count_empty_rows=count_empty_rows)
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
