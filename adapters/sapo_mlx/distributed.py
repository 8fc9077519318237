r"""Exact SAPO-family losses under gradient accumulation and ``mx.distributed`` (clauses 3.8-3.10).

Per optimizer step, on every rank:

1. ``norm = global_normalizer(micro_batch_masks)``: this rank's counts over **all** its
   micro-batches, summed across the ranks of ``group`` by one lazy ``mx.distributed.all_sum``;
2. for each micro-batch: ``loss, _ = policy_loss(..., normalizer=norm)`` and its gradient;
3. the gradients are then this rank's exact share of the global gradient: **sum** them across
   ranks (``mx.distributed.all_sum``), never average them.

.. math::

    \mathcal{L} = \sum_{\text{ranks } r}\ \sum_{\text{micro-batches } k} \mathcal{L}_{rk},\qquad
    (n, R) = \sum_{r,k} (n_{rk}, R_{rk}).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mlx.core as mx

from sapo_ref.aggregation import Normalizer

from .loss import normalizer

__all__ = ["global_normalizer"]


def global_normalizer(
    mask: Any | Sequence[Any], *, count_empty_rows: bool = False, group: Any = None
) -> Normalizer:
    r"""The :class:`~sapo_ref.Normalizer` :math:`(n, R) = \sum_{\text{ranks}}\sum_k (n_k, R_k)` of
    one optimizer step, as 0-d int32 arrays (clause 3.8, 3.9). Lazy: nothing is evaluated.

    Args:
        mask: this rank's [N, T] mask, or the masks of all its micro-batches of the step (each
            padded to its own T).
        count_empty_rows: count rows without valid tokens in :math:`R` (clause 3.6); then do
            not pass ``count_empty_rows`` to ``policy_loss`` as well.
        group: the ``mx.distributed`` group of the data-parallel ranks (default: the global
            group; a single process is a group of one and gets its local counts).

    >>> import mlx.core as mx
    >>> n = global_normalizer([mx.array([[1, 1, 0]]), mx.array([[0, 0], [1, 0]])])
    >>> n.num_tokens.item(), n.num_rows.item()
    (3, 2)
    """
    masks = list(mask) if isinstance(mask, (list, tuple)) else [mask]
    if not masks:
        raise ValueError("mask must be an array or a non-empty sequence of arrays; got an empty sequence")
    parts = [normalizer(m, count_empty_rows=count_empty_rows) for m in masks]
    counts = mx.sum(mx.stack([mx.stack([c.num_tokens, c.num_rows]) for c in parts]), axis=0)
    group = mx.distributed.init() if group is None else group
    if group.size() > 1:
        counts = mx.distributed.all_sum(counts, group=group)
    return Normalizer(counts[0], counts[1])
