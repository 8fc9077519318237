"""Array-namespace plumbing shared by the reference and the adapters (array API standard)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from array_api_compat import array_namespace

__all__ = ["namespace", "register_namespace", "full_like", "where0", "as_float", "is_numpy"]

# (predicate, namespace) pairs for array types array-api-compat does not know (e.g. MLX):
# a backend registers a shim namespace so that the one formula runs on its arrays unchanged.
_REGISTERED: list[tuple[Callable[[Any], bool], Any]] = []


def register_namespace(predicate: Callable[[Any], bool], xp: Any) -> None:
    """Make :func:`namespace` return ``xp`` for arrays where ``predicate(array)`` holds.

    Used by adapters whose framework has no array-API namespace of its own (``sapo_mlx``).
    Registering the same namespace twice is a no-op.
    """
    if not any(p is predicate and x is xp for p, x in _REGISTERED):
        _REGISTERED.append((predicate, xp))


def namespace(*arrays: Any) -> Any:
    """The array API namespace of ``arrays`` (array-api-compat wrapped, or a registered shim)."""
    for predicate, xp in _REGISTERED:
        if any(predicate(a) for a in arrays):
            return xp
    return array_namespace(*arrays)


def is_numpy(xp: Any) -> bool:
    """Whether ``xp`` is NumPy's namespace (compat-wrapped or not)."""
    if any(xp is x for _, x in _REGISTERED):  # a registered shim never is (and Dynamo-friendly)
        return False
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
