r"""Batch counts for exact SAPO-family losses under gradient accumulation and ``mx.distributed``
(clauses 3.8-3.10).

Per optimizer step, on every rank:

1. ``norm = global_normalizer(micro_batch_masks)``: this rank's counts over **all** its
   micro-batches, summed across the ranks of ``group`` by one ``mx.distributed.all_sum``;
2. for each micro-batch: ``loss, _ = policy_loss(..., normalizer=norm)`` and its gradient;
3. the gradients are then this rank's exact share of the global gradient: **sum** them across
   ranks (``mx.distributed.all_sum``), never average them.

.. math::

    \mathcal{L} = \sum_{\text{ranks } r}\ \sum_{\text{micro-batches } k} \mathcal{L}_{rk},\qquad
    (n, R) = \sum_{r,k} (n_{rk}, R_{rk}).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from typing import Any

import mlx.core as mx
import numpy as np

from sapo_ref.aggregation import Normalizer, normalizer
from sapo_ref.validation import check_arrays, faults, raise_faults

from .convert import stand_in, to_mx
from .namespace import MLX
from .tracing import concrete

__all__ = ["global_normalizer", "local_counts", "valid_counts"]


def valid_counts(valid: mx.array, count_empty_rows: bool) -> Normalizer:
    """The counts of a boolean mask as 0-d float64 arrays, unchecked (``policy_loss`` checks)."""
    # float64 exists on the CPU device only (Metal has none); counts are exact to 2**53 tokens.
    cpu = mx.default_device() != mx.cpu
    with mx.stream(mx.cpu) if cpu else nullcontext():
        counts = normalizer(valid, count_empty_rows=count_empty_rows)
        # the row count of count_empty_rows=True is the Python number N: an array like the other
        return Normalizer(*(mx.array(c, mx.float64) for c in (counts.num_tokens, counts.num_rows)))


def local_counts(mask: Any, *, count_empty_rows: bool = False) -> Normalizer:
    r"""This shard's own counts :math:`(n, R)` as 0-d float64 ``mx.array`` s (clause 3.1, 3.6).

    ``mask`` is validated as :func:`policy_loss` validates it (2-D, boolean or 0/1; the values
    only when not traced). Shards' counts add with ``+``.

    >>> import mlx.core as mx
    >>> n = local_counts(mx.array([[1, 1, 0], [0, 0, 0]])) + local_counts(mx.array([[1, 0, 0]]))
    >>> n.num_tokens.item(), n.num_rows.item()
    (3.0, 2.0)
    """
    if not isinstance(count_empty_rows, (bool, np.bool_)):
        raise TypeError(
            f"count_empty_rows must be True or False; got {type(count_empty_rows).__name__}"
        )
    raw = mask if isinstance(mask, mx.array) else np.asarray(mask)
    one = np.zeros((1, 1))
    # the mask's dtype check and message are policy_loss's (a generator is an object array)
    check_arrays(one, one, one[:, 0], np.zeros((1, 1), stand_in(raw).dtype))
    shape = tuple(raw.shape)
    if len(shape) != 2:
        raise ValueError(f"mask must be 2-D [N, T]; got shape {shape}")
    mask = to_mx(raw)
    valid = mask if mask.dtype == mx.bool_ else mask != 0
    if mask.dtype != mx.bool_:
        z = mx.zeros(shape, mx.float32)
        found = faults(z, z, z, mask, valid, sequence=False)
        if concrete(MLX.any(found[0].where)):  # the mask's 0/1 check; nothing to raise traced
            raise_faults(found)
    return valid_counts(valid, bool(count_empty_rows))


def global_normalizer(
    mask: Any | Sequence[Any], *, count_empty_rows: bool = False, group: Any = None
) -> Normalizer:
    r"""The :class:`~sapo_ref.Normalizer` :math:`(n, R) = \sum_{\text{ranks}}\sum_k (n_k, R_k)` of
    one optimizer step, as 0-d float64 arrays (clause 3.8, 3.9).

    Args:
        mask: this rank's [N, T] mask, or a list, tuple or iterator (a generator) of the masks
            of all its micro-batches of the step (each padded to its own T).
        count_empty_rows: count rows without valid tokens in :math:`R` (clause 3.6); then do
            not pass ``count_empty_rows`` to ``policy_loss`` as well.
        group: the ``mx.distributed`` group of the data-parallel ranks (default: the global
            group; a single process is a group of one and gets its local counts).

    >>> import mlx.core as mx
    >>> n = global_normalizer([mx.array([[1, 1, 0]]), mx.array([[0, 0], [1, 0]])])
    >>> n.num_tokens.item(), n.num_rows.item()
    (3.0, 2.0)
    """
    # an iterator is never one mask (arrays are iterable, not iterators): count its masks
    masks = list(mask) if isinstance(mask, (list, tuple, Iterator)) else [mask]
    if not masks:
        raise ValueError("mask must be an array or a non-empty list of arrays; got an empty list")
    parts = [local_counts(m, count_empty_rows=count_empty_rows) for m in masks]
    total = parts[0]
    for p in parts[1:]:
        total = total + p
    group = mx.distributed.init() if group is None else group
    if group.size() > 1:
        counts = mx.stack([total.num_tokens, total.num_rows])
        with mx.stream(mx.cpu):  # float64: the CPU device
            counts = mx.distributed.all_sum(counts, group=group)
        return Normalizer(counts[0], counts[1])
    return total
