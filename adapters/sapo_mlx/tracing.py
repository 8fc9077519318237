"""What MLX lets a function do while it is transformed: read values under ``mx.grad`` (which
evaluates eagerly), not under ``mx.compile`` or ``mx.vmap`` (whose arrays have no values)."""

from __future__ import annotations

import mlx.core as mx

__all__ = ["concrete", "detached"]


def _traced(err: Exception) -> bool:
    # MLX: "[eval] Attempting to eval an array during function transformations like compile or
    # vmap is not allowed."
    return "transformations" in str(err)


def concrete(flag: mx.array) -> bool | None:
    """The value of a 0-d boolean ``flag``, or ``None`` while ``mx.compile``/``mx.vmap`` trace
    (arrays have no values then; ``mx.grad`` alone evaluates eagerly).

    >>> import mlx.core as mx
    >>> concrete(mx.array(True)), mx.compile(lambda x: mx.array(concrete(x) is None))(mx.array(1))
    (True, array(True, dtype=bool))
    """
    try:
        return bool(flag.item())
    except (ValueError, RuntimeError) as err:
        if _traced(err):
            return None
        raise


# Same-size unsigned integers: copies through them are bit-exact in every dtype.
_BITS = {1: mx.uint8, 2: mx.uint16, 4: mx.uint32, 8: mx.uint64}


def detached(args: tuple[mx.array, ...]) -> tuple[mx.array, ...]:
    """Copies of ``args`` that belong to no trace, or ``args`` while ``mx.compile``/``mx.vmap``
    trace (no values to copy).

    MLX runs a compiled function op by op when its inputs are being traced by ``mx.grad``; on
    copies (a memory copy, about 1% of the loss) it runs the fused kernels, which halves the
    eager ``value_and_grad`` time. The custom VJP supplies the gradient, so the forward need not
    be connected to the inputs.

    >>> import mlx.core as mx
    >>> y = detached((mx.array([1 / 3], mx.float64),))[0]
    >>> y.dtype, y.item() == 1 / 3
    (mlx.core.float64, True)
    """
    try:
        return tuple(
            mx.array(memoryview(a))
            if a.dtype == mx.bool_
            # through integers: memoryview would turn float64 into float32, and has no bfloat16
            else mx.array(memoryview(a.view(_BITS[a.dtype.size]))).view(a.dtype)
            for a in args
        )
    except (ValueError, RuntimeError) as err:
        if _traced(err):
            return args
        raise
