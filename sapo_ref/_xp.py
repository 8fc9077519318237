"""Array-namespace plumbing shared by the reference and the adapters (array API standard)."""

from __future__ import annotations

from typing import Any

from array_api_compat import array_namespace

__all__ = ["namespace", "full_like", "where0", "as_float", "is_numpy"]


def namespace(*arrays: Any) -> Any:
    """The array API namespace of ``arrays`` (array-api-compat wrapped)."""
    return array_namespace(*arrays)


def is_numpy(xp: Any) -> bool:
    """Whether ``xp`` is NumPy's namespace (compat-wrapped or not)."""
    from array_api_compat import is_numpy_namespace

    return bool(is_numpy_namespace(xp))


def full_like(xp: Any, x: Any, value: float) -> Any:
    """An array shaped and typed like ``x`` filled with ``value``."""
    return xp.full_like(x, value)


def where0(xp: Any, cond: Any, x: Any) -> Any:
    """``x`` where ``cond`` holds, exactly 0 elsewhere (selection, never multiplication)."""
    return xp.where(cond, x, xp.zeros_like(x))


def as_float(xp: Any, x: Any, dtype: Any) -> Any:
    """``x`` cast to ``dtype`` (no copy when it already has it)."""
    return x if x.dtype == dtype else xp.astype(x, dtype)
