"""Input validation of clause 8: shapes and dtypes (:func:`check_arrays`), data (:func:`faults`).

Shape and dtype checks read only static facts and so run everywhere, also while a framework
traces (``jax.jit``, ``torch.compile``, ``mx.compile``). The data checks are written with array
operations only: :func:`faults` returns, per check, a boolean array of where it fails, so one
function serves both ways an implementation can react (clause 8.7):

- with concrete values, :func:`raise_faults` raises the first failing check's ``ValueError``
  with its position (what the reference and every eager adapter do);
- under tracing, :func:`any_fault` is a 0-d boolean array; the adapter returns NaN for the loss
  and every gradient entry where it holds (never a silently wrong finite number).

>>> import numpy as np
>>> mask = np.array([[1, 2]])
>>> fs = faults(np.zeros((1, 2)), np.zeros((1, 2)), np.zeros(1), mask, mask != 0, sequence=False)
>>> [f.argument for f in fs if bool(np.any(f.where))]
['mask']
>>> raise_faults(fs)
Traceback (most recent call last):
...
ValueError: mask must hold only 0 and 1 (or be boolean); first bad value at (0, 1)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ._xp import namespace

__all__ = [
    "Fault",
    "check_arrays",
    "check_normalizer_type",
    "faults",
    "normalizer_faults",
    "raise_faults",
    "any_fault",
]


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(int(s) for s in x.shape)


def _require_array(name: str, x: Any) -> None:
    if not (hasattr(x, "shape") and hasattr(x, "dtype") and hasattr(x, "ndim")):
        raise TypeError(f"{name} must be an array; got {type(x).__name__}")


def check_arrays(
    logp: Any,
    old_logp: Any,
    advantages: Any,
    mask: Any,
    *,
    weights: Any = None,
    ref_logp: Any = None,
) -> None:
    """Shapes and dtypes (clauses 8.1, 8.2, 10.4); raises ``ValueError``/``TypeError`` naming the
    argument. ``weights`` and ``ref_logp`` are checked when given.

    Reads static facts only (shape, dtype), so it also runs while a framework traces.
    """
    extra = [(n, x) for n, x in (("weights", weights), ("ref_logp", ref_logp)) if x is not None]
    for name, x in (
        ("logp", logp),
        ("old_logp", old_logp),
        ("advantages", advantages),
        ("mask", mask),
        *extra,
    ):
        _require_array(name, x)
    xp = namespace(logp, old_logp, advantages, mask, *(x for _, x in extra))
    floating = [("logp", logp), ("old_logp", old_logp), ("advantages", advantages)]
    if ref_logp is not None:
        floating.append(("ref_logp", ref_logp))
    for name, x in floating:
        if not _is_real_floating(xp, x.dtype):
            raise TypeError(f"{name} must be a real floating array; got dtype {x.dtype}")
    if logp.ndim != 2:
        raise ValueError(f"logp must be 2-D [N, T]; got shape {_shape(logp)}")
    n, t = _shape(logp)
    if n < 1 or t < 1:
        raise ValueError(f"logp must have N >= 1 rows and T >= 1 tokens; got shape {(n, t)}")
    same = [("old_logp", old_logp), ("mask", mask)]
    if ref_logp is not None:
        same.append(("ref_logp", ref_logp))
    for name, x in same:
        if _shape(x) != (n, t):
            raise ValueError(f"{name} must have the shape of logp {(n, t)}; got {_shape(x)}")
    if weights is not None:
        if _shape(weights) not in ((n,), (n, t)):
            raise ValueError(
                f"weights must have shape [N] = {(n,)} or [N, T] = {(n, t)}; got {_shape(weights)}"
            )
        if weights.dtype != xp.bool and not (
            _isdtype(xp, weights.dtype, "integral") or _is_real_floating(xp, weights.dtype)
        ):
            raise TypeError(
                f"weights must be real floating, boolean or integer; got dtype {weights.dtype}"
            )
    if _shape(advantages) not in ((n,), (n, t)):
        raise ValueError(
            f"advantages must have shape [N] = {(n,)} or [N, T] = {(n, t)}; got {_shape(advantages)}"
        )
    if mask.dtype != xp.bool and not (
        _isdtype(xp, mask.dtype, "integral") or _is_real_floating(xp, mask.dtype)
    ):
        raise TypeError(f"mask must be boolean or hold 0/1; got dtype {mask.dtype}")


def _isdtype(xp: Any, dtype: Any, kind: str) -> bool:
    try:
        return bool(xp.isdtype(dtype, kind))
    except (TypeError, ValueError, AttributeError):  # object, string, other libraries' dtypes
        return False


def _is_real_floating(xp: Any, dtype: Any) -> bool:
    return _isdtype(xp, dtype, "real floating")


@dataclass(frozen=True)
class Fault:
    """One data check of clause 8: the argument it is about, the clause, the message, and
    ``where`` — a boolean array ([N, T] tokens, [N] rows or 0-d) true where the check fails."""

    argument: str
    clause: str
    message: str | Callable[[], str]  # a callable is formatted only when raised (traced values)
    where: Any
    unit: str = "token"  # how a position is named: "token" (i, t), "row" i, or "" (no position)


def faults(
    logp: Any,
    old_logp: Any,
    advantages: Any,
    mask: Any,
    valid: Any,
    *,
    sequence: bool,
    normalizer: Any = None,
    local: Any = None,
    weights: Any = None,
    ref_logp: Any = None,
) -> tuple[Fault, ...]:
    r"""Every data check of clauses 5.5, 8.2, 8.5, 8.6, 8.8 and 10.4, as array operations only.

    Args:
        logp, old_logp: [N, T] log-probabilities in the computation dtype.
        advantages: [N] or [N, T].
        mask: the mask as given (its values are checked when it is not boolean).
        valid: [N, T] boolean, ``mask != 0``.
        sequence: whether the method takes the sequence ratio (clause 5.5 applies).
        normalizer, local: an explicit :class:`~sapo_ref.Normalizer` and the shard's own counts
            (clause 8.8); both or neither.
        weights: [N] or [N, T] per-token weights already in a floating dtype (clause 10.1).
        ref_logp: [N, T] reference log-probabilities (clause 10.2).

    The clause 5.5 check looks at the computed log-ratios :math:`\delta = \log\pi_\theta -
    \log\pi_\text{old}`, so a row whose finite inputs give differences that overflow to
    :math:`+\infty` and :math:`-\infty` is caught as well as raw infinities.
    """
    xp = namespace(logp, old_logp, advantages, valid)
    out: list[Fault] = []
    if mask.dtype != xp.bool:
        # NaN != 0 and NaN != 1: a NaN mask value fails here too.
        bad = (mask != 0) & (mask != 1)
        out.append(Fault("mask", "8.2", "mask must hold only 0 and 1 (or be boolean)", bad))
    adv = advantages
    if adv.ndim == 1:
        adv = xp.broadcast_to(xp.expand_dims(adv, axis=1), valid.shape)
    out.append(
        Fault(
            "advantages",
            "8.5",
            "advantages must be finite at valid tokens",
            valid & ~xp.isfinite(adv),
        )
    )
    for name, x in (("logp", logp), ("old_logp", old_logp)):
        out.append(Fault(name, "8.6", f"{name} is NaN at a valid token", valid & xp.isnan(x)))
    out.append(
        Fault(
            "logp",
            "8.6",
            "log-ratio logp - old_logp is undefined (inf - inf) at a valid token",
            valid & xp.isinf(logp) & (logp == old_logp),
        )
    )
    if weights is not None:
        w = weights
        if w.ndim == 1:
            w = xp.broadcast_to(xp.expand_dims(w, axis=1), valid.shape)
        out.append(
            Fault(
                "weights",
                "10.4",
                "weights must be finite and >= 0 at valid tokens",
                valid & ~(xp.isfinite(w) & (w >= 0)),
            )
        )
    if ref_logp is not None:
        out.append(
            Fault(
                "ref_logp", "10.4", "ref_logp is NaN at a valid token", valid & xp.isnan(ref_logp)
            )
        )
        out.append(
            Fault(
                "ref_logp",
                "10.4",
                "log-ratio logp - ref_logp is undefined (inf - inf) at a valid token",
                valid & xp.isinf(logp) & (logp == ref_logp),
            )
        )
    if sequence:
        zero = xp.zeros_like(logp)
        delta = xp.where(valid, logp, zero) - xp.where(valid, old_logp, zero)
        plus = xp.any(valid & (delta == math.inf), axis=1)
        minus = xp.any(valid & (delta == -math.inf), axis=1)
        out.append(
            Fault(
                "logp",
                "5.5",
                "holds both +inf and -inf log-ratios logp - old_logp at valid tokens (infinite inputs "
                "or a difference of finite inputs that overflows): its sequence ratio s_i is "
                "undefined (clause 5.5)",
                plus & minus,
                unit="row",
            )
        )
    if normalizer is not None:
        out += normalizer_faults(normalizer, local, xp)
    return tuple(out)


def check_normalizer_type(norm: Any) -> None:
    """Clause 8.8's type check of an explicit normalizer (its values are checked with the data).

    >>> check_normalizer_type((3, 1))
    Traceback (most recent call last):
    ...
    TypeError: normalizer must be a sapo_ref.Normalizer; got tuple
    """
    from .aggregation import Normalizer

    if not isinstance(norm, Normalizer):
        raise TypeError(f"normalizer must be a sapo_ref.Normalizer; got {type(norm).__name__}")


def normalizer_faults(norm: Any, local: Any, xp: Any = None) -> tuple[Fault, ...]:
    """Clause 8.8 checks of an explicit normalizer against the shard's own counts ``local``.

    >>> from sapo_ref import Normalizer
    >>> raise_faults(normalizer_faults(Normalizer(2.0, 1.0), Normalizer(3.0, 1.0)))
    Traceback (most recent call last):
    ...
    ValueError: normalizer Normalizer(num_tokens=2.0, num_rows=1.0) counts fewer tokens or rows than this shard's own mask (Normalizer(num_tokens=3.0, num_rows=1.0)): it must hold the global counts of the whole batch
    """
    if xp is None:
        arrays = [
            v
            for v in (norm.num_tokens, norm.num_rows, local.num_tokens, local.num_rows)
            if hasattr(v, "dtype")
        ]
        if arrays:
            xp = namespace(*arrays)
        else:
            import numpy as xp  # plain Python counts
    n, r, ln, lr = (
        _arr(xp, v) for v in (norm.num_tokens, norm.num_rows, local.num_tokens, local.num_rows)
    )
    bad_value = ~(xp.isfinite(n) & xp.isfinite(r) & (n >= 0) & (r >= 0))
    fewer = ~bad_value & ~((n >= ln) & (r >= lr))
    return (
        Fault(
            "normalizer",
            "8.8",
            lambda: f"normalizer counts must be finite and >= 0; got {_show(norm)}",
            bad_value,
            unit="",
        ),
        Fault(
            "normalizer",
            "8.8",
            lambda: (
                f"normalizer {_show(norm)} counts fewer tokens or rows than this shard's own "
                f"mask ({_show(local)}): it must hold the global counts of the whole batch"
            ),
            fewer,
            unit="",
        ),
    )


def _arr(xp: Any, v: Any) -> Any:
    # Python and NumPy numbers become 0-d arrays of ``xp`` so that ~, & and isfinite mean the
    # same everywhere (a NumPy scalar would not combine with another library's arrays).
    if isinstance(v, (int, float)) or (
        type(v).__module__ == "numpy" and getattr(v, "ndim", 0) == 0
    ):
        return xp.asarray(float(v), dtype=xp.float64 if hasattr(xp, "float64") else xp.float32)
    return v


def _show(norm: Any) -> str:
    def one(v: Any) -> str:
        try:
            return repr(float(v))
        except Exception:  # a traced value has no concrete number
            return "<traced>"

    return f"Normalizer(num_tokens={one(norm.num_tokens)}, num_rows={one(norm.num_rows)})"


def raise_faults(found: tuple[Fault, ...]) -> None:
    """Raise the first failing check's ``ValueError``, naming the first bad position (eager)."""
    import numpy as np

    for f in found:
        where = np.asarray(_to_numpy(f.where))
        if not where.any():
            continue
        message = f.message() if callable(f.message) else f.message
        if f.unit == "":
            raise ValueError(message)
        first = tuple(int(i) for i in np.argwhere(where)[0])
        if f.unit == "row":
            raise ValueError(f"row {first[0]} {message}")
        where_word = (
            "first bad value at"
            if f.argument == "mask"
            else ("first bad at" if f.argument in ("advantages", "weights") else "first at")
        )
        raise ValueError(f"{message}; {where_word} {first}")


def any_fault(found: tuple[Fault, ...], xp: Any) -> Any:
    """A 0-d boolean array: whether any check fails (for poisoning under tracing, clause 8.7).

    The ``where`` arrays of one shape are OR-ed first, so there is one reduction per shape.
    """
    by_shape: dict[tuple[int, ...], Any] = {}
    for f in found:
        w = f.where if hasattr(f.where, "shape") else xp.asarray(bool(f.where))
        key = tuple(int(s) for s in w.shape)
        by_shape[key] = w if key not in by_shape else by_shape[key] | w
    bad = xp.asarray(False)
    for w in by_shape.values():
        bad = bad | xp.any(w)
    return bad


def _to_numpy(x: Any) -> Any:
    import numpy as np

    if isinstance(x, (bool, int, float)) or type(x).__module__ == "numpy":
        return x
    try:
        return np.from_dlpack(x)
    except Exception:
        return np.asarray(x)
