r"""Exact losses over shards of a batch: micro-batches and data-parallel ranks (clauses 3.8-3.10).

A shard evaluated with the *global* counts contributes exactly its share of the batch's loss
and gradient, so the shards' losses and gradients are **summed**, never averaged:

.. math::

    \mathcal{L} = \sum_k \mathcal{L}_k,\qquad
    \mathcal{L}_k = -\frac{1}{D(n, R)}\sum_{i\in S_k}\sum_t m_{it}\,\rho_{it}\,\ell_{it},\qquad
    n = \sum_k n_k,\ R = \sum_k R_k.

:func:`global_normalizer` adds the counts of the shards one process holds (micro-batches of any
padded lengths); ``sapo_torch.distributed`` and ``sapo_jax.sharding`` add them across ranks.
:func:`combine_metrics` gives a batch's metrics from its shards' (clause 3.11);
:func:`split_rows` makes the arbitrary row partitions the tests and examples use.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from itertools import pairwise
from typing import Any

import numpy as np

from .aggregation import Normalizer, normalizer

__all__ = ["combine_metrics", "global_normalizer", "split_rows"]

#: Count metrics: they add over shards (clause 3.11).
COUNT_KEYS: tuple[str, ...] = ("tokens", "rows", "tokens_pos", "tokens_neg")
#: The count a metric's mean, fraction or extreme is taken over; ``tokens`` for the others.
_COMPANION = {
    "seq_ratio/mean": "rows",
    "seq_ratio/min": "rows",
    "seq_ratio/max": "rows",
    "gate/mean_pos": "tokens_pos",
    "gate/mean_neg": "tokens_neg",
}


def global_normalizer(masks: Iterable[Any], *, count_empty_rows: bool = False) -> Normalizer:
    r"""The counts :math:`(n, R) = \sum_k (n_k, R_k)` of a batch given as shard masks (clause 3.8).

    Shards may have different padded lengths (a micro-batch is usually padded to its own longest
    row), so the masks are counted one by one rather than concatenated.

    Args:
        masks: the [N_k, T_k] masks of every shard of the batch (one optimizer step).
        count_empty_rows: count rows without valid tokens in :math:`R` (clause 3.6).

    Raises:
        ValueError: ``masks`` is empty.

    >>> import numpy as np
    >>> global_normalizer([np.array([[1, 1, 0]]), np.array([[0, 0], [1, 0]])])
    Normalizer(num_tokens=3.0, num_rows=2.0)
    >>> global_normalizer([np.array([[1, 1, 0]]), np.array([[0, 0], [1, 0]])], count_empty_rows=True)
    Normalizer(num_tokens=3.0, num_rows=3.0)
    """
    total: Normalizer | None = None
    for mask in masks:
        counts = normalizer(mask, count_empty_rows=count_empty_rows)
        total = counts if total is None else total + counts
    if total is None:
        raise ValueError("masks must hold at least one shard mask; got none")
    return total


def combine_metrics(shards: Sequence[Mapping[str, float]]) -> dict[str, float]:
    r"""The metrics of a batch from the metrics of its shards (clause 3.11).

    Counts add; a mean or fraction is the shards' values weighted by their companion count
    (``tokens``; ``rows`` for ``seq_ratio/*``; ``tokens_pos``/``tokens_neg`` for
    ``gate/mean_pos``/``gate/mean_neg``); a minimum or maximum is taken over the shards whose
    companion count is non-zero, and is 0 when there is none, as clause 7.1 defines it.

    Args:
        shards: one metrics dict per shard (``PolicyLossResult.metrics``, or floats of an
            adapter's metrics), all of the same method.

    >>> combine_metrics([{"tokens": 3.0, "ratio/mean": 1.0, "ratio/max": 1.5},
    ...                  {"tokens": 1.0, "ratio/mean": 2.0, "ratio/max": 2.0}])
    {'tokens': 4.0, 'ratio/mean': 1.25, 'ratio/max': 2.0}
    """
    if not shards:
        raise ValueError("shards must hold at least one metrics dict; got none")
    keys = list(shards[0])
    out: dict[str, float] = {}
    for key in keys:
        values = [float(m[key]) for m in shards]
        if key in COUNT_KEYS:
            out[key] = float(sum(values))
            continue
        weights = [float(m[_COMPANION.get(key, "tokens")]) for m in shards]
        present = [v for v, w in zip(values, weights) if w > 0]
        if key.endswith("/min"):
            out[key] = min(present, default=0.0)
        elif key.endswith("/max"):
            out[key] = max(present, default=0.0)
        else:
            total = sum(weights)
            # an empty set's mean is 0 (clause 7.1); skip weight-0 shards so inf * 0 never occurs
            out[key] = (
                sum(v * w for v, w in zip(values, weights) if w > 0) / total if total else 0.0
            )
    return out


def split_rows(
    num_rows: int, sizes: Sequence[int] | int, *, rng: np.random.Generator | None = None
) -> list[np.ndarray]:
    """Partition row indices ``0..num_rows-1`` into shards of the given sizes.

    Args:
        num_rows: rows in the batch.
        sizes: the shard sizes (positive, summing to ``num_rows``), or a number of shards,
            split as evenly as possible.
        rng: if given, rows are assigned in a random order (an arbitrary partition, clause 3.8);
            otherwise shards are contiguous.

    Returns:
        One int64 index array per shard, in shard order.

    >>> [s.tolist() for s in split_rows(5, 2)]
    [[0, 1, 2], [3, 4]]
    >>> [s.tolist() for s in split_rows(5, [1, 4])]
    [[0], [1, 2, 3, 4]]
    """
    if isinstance(sizes, int):
        if not 1 <= sizes <= num_rows:
            raise ValueError(f"number of shards must be in [1, num_rows={num_rows}]; got {sizes}")
        base, extra = divmod(num_rows, sizes)
        sizes = [base + (k < extra) for k in range(sizes)]
    sizes = [int(s) for s in sizes]
    if any(s < 1 for s in sizes) or sum(sizes) != num_rows:
        raise ValueError(
            f"sizes must be positive and sum to num_rows={num_rows}; got {list(sizes)}"
        )
    order = np.arange(num_rows) if rng is None else rng.permutation(num_rows)
    bounds = np.cumsum([0, *sizes])
    return [order[a:b] for a, b in pairwise(bounds)]
