r"""Aggregation as numerator over denominator (clause 3).

Every aggregation is :math:`J = \frac{1}{D}\sum_{it} m_{it}\rho_{it}\ell_{it}` with a row weight
:math:`\rho` (1 or :math:`1/L_i`) and a denominator :math:`D` that depends only on the batch counts
held by a :class:`Normalizer`: the valid-token count :math:`n` and the row count :math:`R`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import spec
from ._xp import namespace

__all__ = ["Normalizer", "normalizer", "denominator", "token_weights", "row_lengths"]


@dataclass(frozen=True)
class Normalizer:
    """Global batch counts for exact normalisation (clause 3.8).

    ``num_tokens`` is :math:`n = \\sum_{it} m_{it}`; ``num_rows`` is :math:`R`, the non-empty rows
    (or all rows when made with ``count_empty_rows=True``). Counts of disjoint shards add
    with ``+``. Fields may be Python numbers or 0-d arrays (adapters keep them on device).

    >>> import numpy as np
    >>> a = normalizer(np.array([[1, 1, 0], [0, 0, 0]]))
    >>> b = normalizer(np.array([[1, 0, 0]]))
    >>> a + b
    Normalizer(num_tokens=3.0, num_rows=2.0)
    """

    num_tokens: Any
    num_rows: Any

    def __post_init__(self) -> None:
        # Clause 8.8: a count is a real number or a 0-d real array; "9", True or None is a bug
        # in the caller (finiteness and range are checked where the counts are used).
        for name in ("num_tokens", "num_rows"):
            v = getattr(self, name)
            if isinstance(v, (bool, str, bytes)) or v is None:
                raise TypeError(
                    f"normalizer {name} must be a real number or a 0-d real array; "
                    f"got {type(v).__name__} {v!r}"
                )
            if hasattr(v, "shape") and tuple(v.shape) != ():
                raise ValueError(f"normalizer {name} must be 0-d; got shape {tuple(v.shape)}")
            if not hasattr(v, "dtype") and not isinstance(v, (int, float)):
                try:
                    float(v)  # e.g. numpy scalars, fractions
                except (TypeError, ValueError):
                    raise TypeError(
                        f"normalizer {name} must be a real number or a 0-d real array; "
                        f"got {type(v).__name__}"
                    ) from None

    def __add__(self, other: Normalizer) -> Normalizer:
        if not isinstance(other, Normalizer):
            return NotImplemented
        return Normalizer(self.num_tokens + other.num_tokens, self.num_rows + other.num_rows)


def row_lengths(valid: Any, dtype: Any) -> Any:
    """:math:`L_i = \\sum_t m_{it}` in ``dtype``, shape [N], from a boolean ``valid`` mask."""
    xp = namespace(valid)
    return xp.sum(xp.astype(valid, dtype), axis=1)


def normalizer(mask: Any, *, count_empty_rows: bool = False) -> Normalizer:
    r"""Counts :math:`(n, R)` of a batch's mask (clause 3.1, 3.6).

    Args:
        mask: [N, T] boolean or 0/1 validity mask.
        count_empty_rows: count rows with no valid token in :math:`R` (TRL, Liger), default
            ``False`` (verl).

    >>> import numpy as np
    >>> normalizer(np.array([[1, 0], [0, 0]]), count_empty_rows=True)
    Normalizer(num_tokens=1.0, num_rows=2.0)
    """
    xp = namespace(mask)
    valid = mask if mask.dtype == xp.bool else mask != 0
    # Counts are exact in float64 up to 2**53 tokens (float32 would stop at 2**24).
    lengths = row_lengths(valid, xp.float64 if hasattr(xp, "float64") else xp.float32)
    n = xp.sum(lengths)
    rows = (
        float(valid.shape[0]) if count_empty_rows else xp.sum(xp.astype(lengths > 0, lengths.dtype))
    )
    if _is_eager_numpy(xp):
        return Normalizer(float(n), float(rows))
    return Normalizer(n, rows)


def denominator(norm: Normalizer, loss_agg: str, norm_length: float | None = None) -> Any:
    r"""The aggregation's denominator :math:`D` (clause 3.2-3.5).

    >>> denominator(Normalizer(10.0, 4.0), "seq-mean-token-sum-norm", 512.0)
    2048.0
    """
    kind = spec.LOSS_AGGS[loss_agg].denominator
    if kind == "num_tokens":
        return norm.num_tokens
    if kind == "num_rows":
        return norm.num_rows
    if kind == "num_rows * norm_length":
        return norm.num_rows * norm_length
    raise AssertionError(f"spec denominator {kind!r} has no implementation")  # pragma: no cover


def token_weights(valid: Any, lengths: Any, loss_agg: str, den: Any) -> Any:
    r"""Aggregation weights :math:`c_{it} = m_{it}\rho_{it}/D`, [N, T], 0 at invalid tokens.

    :math:`0/0` is 0 (clause 3.7): an empty row or an empty batch gets weight 0.
    """
    xp = namespace(valid, lengths)
    dtype = lengths.dtype
    one = xp.ones_like(lengths)
    if spec.LOSS_AGGS[loss_agg].row_weight == "1/L_i":
        rho = one / xp.where(lengths > 0, lengths, one)
    else:
        rho = one
    den = xp.asarray(den, dtype=dtype) if isinstance(den, (int, float)) else xp.astype(den, dtype)
    den_safe = xp.where(den > 0, den, xp.ones_like(den))
    row = rho / den_safe
    full = xp.broadcast_to(xp.expand_dims(row, axis=1), valid.shape)
    return xp.where(valid, full, xp.zeros_like(full))


def _is_eager_numpy(xp: Any) -> bool:
    from ._xp import is_numpy

    return is_numpy(xp)
