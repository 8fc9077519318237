r"""Exact losses over shards of a batch: micro-batches and data-parallel ranks (clauses 3.8-3.10).

A shard evaluated with the *global* counts contributes exactly its share of the batch's loss
and gradient, so the shards' losses and gradients are **summed**, never averaged:

.. math::

    \mathcal{L} = \sum_k \mathcal{L}_k,\qquad
    \mathcal{L}_k = -\frac{1}{D(n, R)}\sum_{i\in S_k}\sum_t m_{it}\,\rho_{it}\,\ell_{it},\qquad
    n = \sum_k n_k,\ R = \sum_k R_k.

:func:`global_normalizer` adds the counts of the shards one process holds (micro-batches of any
padded lengths); ``sapo_torch.distributed``, ``sapo_jax.distributed`` and ``sapo_mlx.distributed`` add them
across ranks.
:func:`combine_metrics` gives a batch's metrics from its shards' (clause 3.11);
:func:`split_rows` makes the arbitrary row partitions the tests and examples use.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping, Sequence
from itertools import pairwise
from typing import Any

import numpy as np

from ._xp import namespace
from .aggregation import Normalizer, normalizer
from .validation import Fault, _is_real_floating, _isdtype, _require_array, raise_faults

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
        TypeError: ``masks`` is a single array or not iterable, a mask is not an array or has a
            dtype other than boolean, integer or floating, ``count_empty_rows`` is not a bool.
        ValueError: ``masks`` is empty, a mask is not 2-D, or holds a value other than 0 and 1
            (NaN included): the errors of :func:`sapo_ref.policy_loss`, prefixed with the shard.

    >>> import numpy as np
    >>> global_normalizer([np.array([[1, 1, 0]]), np.array([[0, 0], [1, 0]])])
    Normalizer(num_tokens=3.0, num_rows=2.0)
    >>> global_normalizer([np.array([[1, 1, 0]]), np.array([[0, 0], [1, 0]])], count_empty_rows=True)
    Normalizer(num_tokens=3.0, num_rows=3.0)
    >>> global_normalizer(np.array([[1, 1, 0]]))
    Traceback (most recent call last):
    ...
    TypeError: masks must be a list of shard masks (one [N_k, T_k] array per shard); got a single array of shape (1, 3): pass [mask]
    """
    if hasattr(masks, "shape") and hasattr(masks, "dtype"):
        raise TypeError(
            "masks must be a list of shard masks (one [N_k, T_k] array per shard); got a single "
            f"array of shape {tuple(int(d) for d in masks.shape)}: pass [mask]"
        )
    if isinstance(masks, (str, bytes, Mapping)) or not isinstance(masks, Iterable):
        raise TypeError(
            "masks must be a list of shard masks (one [N_k, T_k] array per shard); "
            f"got {type(masks).__name__}"
        )
    _check_bool("count_empty_rows", count_empty_rows)
    total: Normalizer | None = None
    for k, mask in enumerate(masks):
        _check_mask(f"masks[{k}]", mask)
        counts = normalizer(mask, count_empty_rows=bool(count_empty_rows))
        total = counts if total is None else total + counts
    if total is None:
        raise ValueError("masks must hold at least one shard mask; got none")
    return total


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool; got {type(value).__name__}")


def _check_mask(name: str, mask: Any) -> None:
    """The mask checks of :func:`sapo_ref.policy_loss` (clause 8.1, 8.2), for one shard."""
    try:
        _require_array("mask", mask)
        xp = namespace(mask)
        if mask.dtype != xp.bool and not (
            _isdtype(xp, mask.dtype, "integral") or _is_real_floating(xp, mask.dtype)
        ):
            raise TypeError(f"mask must be boolean or hold 0/1; got dtype {mask.dtype}")
        if mask.ndim != 2:
            shape = tuple(int(d) for d in mask.shape)
            raise ValueError(f"mask must be 2-D [N, T]; got shape {shape}")
        if mask.dtype != xp.bool:  # NaN != 0 and NaN != 1: a NaN fails too
            bad = (mask != 0) & (mask != 1)
            raise_faults(
                (Fault("mask", "8.2", "mask must hold only 0 and 1 (or be boolean)", bad),)
            )
    except (TypeError, ValueError) as err:
        raise type(err)(f"{name}: {err}") from None


def combine_metrics(shards: Sequence[Mapping[str, float]]) -> dict[str, float]:
    r"""The metrics of a batch from the metrics of its shards (clause 3.11).

    Counts add; a mean or fraction is the shards' values weighted by their companion count
    (``tokens``; ``rows`` for ``seq_ratio/*``; ``tokens_pos``/``tokens_neg`` for
    ``gate/mean_pos``/``gate/mean_neg``); a minimum or maximum is taken over the shards whose
    companion count is non-zero, and is 0 when there is none, as clause 7.1 defines it.

    Args:
        shards: one metrics dict per shard (``PolicyLossResult.metrics``, or floats of an
            adapter's metrics), all of the same method.

    Raises:
        TypeError: ``shards`` is a single dict or not a sequence of dicts.
        ValueError: ``shards`` is empty, its dicts have different keys (two methods), or a
            mean's companion count is missing.

    >>> combine_metrics([{"tokens": 3.0, "ratio/mean": 1.0, "ratio/max": 1.5},
    ...                  {"tokens": 1.0, "ratio/mean": 2.0, "ratio/max": 2.0}])
    {'tokens': 4.0, 'ratio/mean': 1.25, 'ratio/max': 2.0}
    """
    if isinstance(shards, Mapping) or not isinstance(shards, Sequence) or isinstance(shards, str):
        what = (
            "a single metrics dict: pass [metrics]"
            if isinstance(shards, Mapping)
            else type(shards).__name__
        )
        raise TypeError(f"shards must be a list of metrics dicts (one per shard); got {what}")
    if not shards:
        raise ValueError("shards must hold at least one metrics dict; got none")
    for k, m in enumerate(shards):
        if not isinstance(m, Mapping):
            raise TypeError(f"shards[{k}] must be a metrics dict; got {type(m).__name__}")
    keys = list(shards[0])
    for k, m in enumerate(shards[1:], start=1):
        if set(m) != set(keys):
            raise ValueError(
                "shards must all hold the metrics of one method (the same keys): "
                f"shards[{k}] and shards[0] differ in {sorted(set(m) ^ set(keys))}"
            )
    needed = {_COMPANION.get(key, "tokens") for key in keys if key not in COUNT_KEYS}
    missing = sorted(needed - set(keys))
    if missing:
        raise ValueError(
            f"shards must hold the counts their means are weighted by; missing {missing}"
        )
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
    >>> [s.tolist() for s in split_rows(5, np.int64(2))]  # NumPy integers are integers
    [[0, 1, 2], [3, 4]]
    """
    if not _is_int(num_rows):
        raise TypeError(f"num_rows must be an integer; got {type(num_rows).__name__} {num_rows!r}")
    if num_rows < 1:
        raise ValueError(f"num_rows must be >= 1; got {num_rows}")
    if rng is not None and not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator or None; got {type(rng).__name__}")
    num_rows = int(num_rows)
    if _is_int(sizes):
        if not 1 <= sizes <= num_rows:
            raise ValueError(f"number of shards must be in [1, num_rows={num_rows}]; got {sizes}")
        base, extra = divmod(num_rows, int(sizes))
        sizes = [base + (k < extra) for k in range(int(sizes))]
    elif isinstance(sizes, (str, bytes)) or not isinstance(sizes, Iterable):
        raise TypeError(
            "sizes must be a number of shards or a sequence of shard sizes (integers); "
            f"got {type(sizes).__name__} {sizes!r}"
        )
    else:
        sizes = list(sizes)
        bad = [s for s in sizes if not _is_int(s)]
        if bad:
            raise TypeError(f"sizes must hold integers (shard sizes); got {bad[0]!r}")
    sizes = [int(s) for s in sizes]
    if any(s < 1 for s in sizes) or sum(sizes) != num_rows:
        raise ValueError(
            f"sizes must be positive and sum to num_rows={num_rows}; got {list(sizes)}"
        )
    order = np.arange(num_rows) if rng is None else rng.permutation(num_rows)
    bounds = np.cumsum([0, *sizes])
    return [order[a:b] for a, b in pairwise(bounds)]


def _is_int(x: Any) -> bool:
    """An integer (Python or NumPy), not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))
