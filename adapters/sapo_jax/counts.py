r"""Batch counts :math:`(n, R)` of clause 3 in JAX: :math:`n = \sum_{it} m_{it}` valid tokens and
:math:`R` rows (non-empty ones, or every row with ``count_empty_rows``), summed as integers so
they are exact, then cast to a floating dtype.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from sapo_ref.aggregation import Normalizer

__all__ = ["local_normalizer", "normalizer"]


def local_normalizer(lengths: Any, count_empty_rows: bool) -> Normalizer:
    r"""Counts :math:`n = \sum_i L_i` and :math:`R` of row lengths ``lengths`` [N] (integers or
    floats holding integers: sums of integers below :math:`2^{24}` are exact in float32),
    in the dtype of ``lengths``."""
    n = jnp.sum(lengths)
    if count_empty_rows:
        rows = jnp.asarray(lengths.shape[-1], lengths.dtype)
    else:
        rows = jnp.sum(lengths > 0, dtype=lengths.dtype)
    return Normalizer(n, rows)


def normalizer(mask: Any, *, count_empty_rows: bool = False) -> Normalizer:
    r"""The :class:`sapo_ref.Normalizer` :math:`(n, R)` of a mask, as 0-d JAX arrays on device
    (JAX's default float dtype), usable under ``jax.jit`` and summable across shards with ``+``
    or ``jax.lax.psum`` on its fields (clause 3.8).

    Args:
        mask: [N, T] boolean or 0/1 validity mask.
        count_empty_rows: count rows without a valid token in :math:`R` (default ``False``).

    >>> import jax.numpy as jnp
    >>> norm = normalizer(jnp.array([[1, 0], [0, 0]]), count_empty_rows=True)
    >>> float(norm.num_tokens), float(norm.num_rows)
    (1.0, 2.0)
    """
    if not isinstance(count_empty_rows, bool):
        raise TypeError(f"count_empty_rows must be a bool; got {type(count_empty_rows).__name__}")
    mask = jnp.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D [N, T]; got shape {tuple(mask.shape)}")
    valid = mask if mask.dtype == jnp.bool_ else mask != 0
    counts = local_normalizer(jnp.sum(valid, axis=-1, dtype=jnp.int32), count_empty_rows)
    dtype = jnp.result_type(float)
    return Normalizer(counts.num_tokens.astype(dtype), counts.num_rows.astype(dtype))
