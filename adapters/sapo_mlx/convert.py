"""Moving data between NumPy and MLX without losing precision.

Two MLX traps live here: ``mx.array(x)`` turns a float64 NumPy array into float32 without a
word, and a bfloat16 ``mx.array`` cannot be handed to NumPy (no PEP 3118 format). :func:`to_mx`
keeps every dtype (float64 stays float64) and :func:`to_numpy` goes through float32 for
bfloat16, which is exact. The conformance driver and the tests use these two.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import numpy as np

__all__ = ["FLOAT_DTYPES", "compute_dtype", "numpy_dtype", "stand_in", "to_mx", "to_numpy"]

#: The floating dtypes the adapter accepts, by name (the spec's dtype names).
FLOAT_DTYPES: dict[str, mx.Dtype] = {
    "float64": mx.float64,
    "float32": mx.float32,
    "bfloat16": mx.bfloat16,
    "float16": mx.float16,
}

_MX_OF_NP: dict[str, mx.Dtype] = {
    "bool": mx.bool_,
    "int8": mx.int8,
    "int16": mx.int16,
    "int32": mx.int32,
    "int64": mx.int64,
    "uint8": mx.uint8,
    "uint16": mx.uint16,
    "uint32": mx.uint32,
    "uint64": mx.uint64,
    "float16": mx.float16,
    "float32": mx.float32,
    "float64": mx.float64,
    "complex64": mx.complex64,
}
_NP_OF_MX: dict[mx.Dtype, str] = {v: k for k, v in _MX_OF_NP.items()}


def to_mx(x: Any, dtype: mx.Dtype | str | None = None) -> mx.array:
    """An ``mx.array`` holding exactly the values of ``x`` (NumPy array, scalar, list, mx.array).

    Without ``dtype`` the dtype of ``x`` is kept: float64 stays float64 (``mx.array`` alone
    would give float32), ``ml_dtypes.bfloat16`` becomes ``mx.bfloat16``. A ``dtype``
    (an ``mx.Dtype`` or its name, e.g. ``"bfloat16"``) converts explicitly, rounding once.

    >>> import numpy as np, mlx.core as mx
    >>> to_mx(np.array([1 / 3])).dtype, mx.array(np.array([1 / 3])).dtype
    (mlx.core.float64, mlx.core.float32)
    >>> to_mx(np.array([1 / 3])).item() == 1 / 3
    True
    """
    if isinstance(dtype, str):
        dtype = FLOAT_DTYPES.get(dtype) or _MX_OF_NP[dtype]
    if isinstance(x, mx.array):
        return x if dtype is None or x.dtype == dtype else x.astype(dtype)
    a = np.asarray(x)
    name = a.dtype.name
    if name == "bfloat16":  # ml_dtypes: widen exactly, then narrow back in MLX
        out = mx.array(a.astype(np.float32)).astype(mx.bfloat16)
    elif name in _MX_OF_NP:
        out = mx.array(a, dtype=_MX_OF_NP[name])
    else:
        raise TypeError(f"cannot convert an array of dtype {a.dtype} to MLX")
    return out if dtype is None or out.dtype == dtype else out.astype(dtype)


def to_numpy(x: mx.array) -> np.ndarray:
    """A NumPy copy of ``x`` with the same values; bfloat16 comes back as float32 (exact).

    >>> import mlx.core as mx
    >>> to_numpy(mx.array([1.5], dtype=mx.bfloat16))
    array([1.5], dtype=float32)
    """
    if x.dtype == mx.bfloat16:
        x = x.astype(mx.float32)
    return np.array(x, copy=True)


def numpy_dtype(dtype: mx.Dtype) -> np.dtype:
    """The NumPy dtype of an MLX dtype (float32 for bfloat16, which NumPy lacks)."""
    if dtype == mx.bfloat16:
        return np.dtype(np.float32)
    return np.dtype(_NP_OF_MX[dtype])


def compute_dtype(*dtypes: mx.Dtype) -> mx.Dtype:
    """The dtype the loss is computed in: the promoted dtype of ``dtypes``, bfloat16 and float16
    in float32 (clause 6.4, 8.9).

    >>> import mlx.core as mx
    >>> compute_dtype(mx.bfloat16), compute_dtype(mx.float32, mx.float64)
    (mlx.core.float32, mlx.core.float64)
    """
    return mx.float64 if mx.result_type(*dtypes) == mx.float64 else mx.float32


def stand_in(x: Any) -> np.ndarray:
    """A zero-byte NumPy array of ``x``'s shape and dtype (an ``mx.array`` or a NumPy array).

    The reference's shape and dtype checks run on it with the reference's messages (NumPy dtype
    names), without reading ``x``: no host sync, and it works while ``mx.compile`` traces.

    >>> import mlx.core as mx
    >>> stand_in(mx.zeros((2, 3), dtype=mx.bfloat16)).shape, stand_in(mx.zeros(2)).dtype
    ((2, 3), dtype('float32'))
    """
    if isinstance(x, mx.array):
        dtype = numpy_dtype(x.dtype)
    else:
        dtype = np.dtype(np.float32) if x.dtype.name == "bfloat16" else x.dtype
    return np.broadcast_to(np.zeros((), dtype), x.shape)
