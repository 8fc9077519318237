"""Input validation of clause 8: shapes, dtypes and data at valid tokens.

Shape and dtype checks work on any array; the data checks need concrete values and so are
the reference's (adapters under jit cannot raise on data).
"""

from __future__ import annotations

from typing import Any

from ._xp import namespace

__all__ = ["check_arrays", "check_data"]


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(int(s) for s in x.shape)


def check_arrays(logp: Any, old_logp: Any, advantages: Any, mask: Any) -> None:
    """Shapes and dtypes (clause 8.1, 8.2); raises ``ValueError``/``TypeError`` naming the argument."""
    xp = namespace(logp, old_logp, advantages, mask)
    for name, x in (("logp", logp), ("old_logp", old_logp), ("advantages", advantages)):
        if not xp.isdtype(x.dtype, "real floating"):
            raise TypeError(f"{name} must be a real floating array; got dtype {x.dtype}")
    if logp.ndim != 2:
        raise ValueError(f"logp must be 2-D [N, T]; got shape {_shape(logp)}")
    n, t = _shape(logp)
    if n < 1 or t < 1:
        raise ValueError(f"logp must have N >= 1 rows and T >= 1 tokens; got shape {(n, t)}")
    for name, x in (("old_logp", old_logp), ("mask", mask)):
        if _shape(x) != (n, t):
            raise ValueError(f"{name} must have the shape of logp {(n, t)}; got {_shape(x)}")
    if _shape(advantages) not in ((n,), (n, t)):
        raise ValueError(
            f"advantages must have shape [N] = {(n,)} or [N, T] = {(n, t)}; got {_shape(advantages)}"
        )
    if mask.dtype != xp.bool:
        if not (xp.isdtype(mask.dtype, "integral") or xp.isdtype(mask.dtype, "real floating")):
            raise TypeError(f"mask must be boolean or hold 0/1; got dtype {mask.dtype}")
        if bool(xp.any((mask != 0) & (mask != 1))):
            raise ValueError("mask must hold only 0 and 1 (or be boolean)")


def _first(xp: Any, bad: Any) -> tuple[int, ...]:
    import numpy as np

    idx = np.argwhere(np.asarray(bad))
    return tuple(int(i) for i in idx[0])


def check_data(
    logp: Any, old_logp: Any, advantages: Any, valid: Any, sequence: bool
) -> None:
    """Values at valid tokens (clause 8.5, 8.6, 5.5); raises ``ValueError`` with the position."""
    xp = namespace(logp, old_logp, advantages, valid)
    adv = advantages
    if adv.ndim == 1:
        adv = xp.broadcast_to(xp.expand_dims(adv, axis=1), valid.shape)
    bad = valid & ~xp.isfinite(adv)
    if bool(xp.any(bad)):
        raise ValueError(f"advantages must be finite at valid tokens; first bad at {_first(xp, bad)}")
    for name, x in (("logp", logp), ("old_logp", old_logp)):
        bad = valid & xp.isnan(x)
        if bool(xp.any(bad)):
            raise ValueError(f"{name} is NaN at a valid token; first at {_first(xp, bad)}")
    bad = valid & xp.isinf(logp) & (logp == old_logp)
    if bool(xp.any(bad)):
        raise ValueError(
            "log-ratio logp - old_logp is undefined (inf - inf) at a valid token; "
            f"first at {_first(xp, bad)}"
        )
    if sequence:
        zero = xp.zeros_like(logp)
        lp = xp.where(valid, logp, zero)
        olp = xp.where(valid, old_logp, zero)
        plus = xp.any(valid & ((lp == xp.inf) | (olp == -xp.inf)), axis=1)
        minus = xp.any(valid & ((lp == -xp.inf) | (olp == xp.inf)), axis=1)
        bad_rows = plus & minus
        if bool(xp.any(bad_rows)):
            row = _first(xp, bad_rows)[0]
            raise ValueError(
                f"row {row} holds both +inf and -inf log-ratios at valid tokens: its sequence "
                "ratio s_i is undefined (clause 5.5)"
            )
