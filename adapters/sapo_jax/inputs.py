r"""Inputs of :func:`sapo_jax.policy_loss`: conversion to JAX, the compute dtype, the shape and
dtype checks of clause 8.1-8.2, and the normaliser counts :math:`(n, R)` of clause 3.

Everything here is decided from shapes and dtypes only, which are static under ``jax.jit``,
so it runs once per trace and never synchronises with the device. Data checks (NaN at a valid
token, mask values other than 0/1, clause 8.2, 8.5, 8.6) need values and stay the reference's.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import jax
import jax.numpy as jnp

from sapo_ref.aggregation import Normalizer
from sapo_ref.validation import check_arrays

__all__ = [
    "Float64TruncationWarning",
    "check_signature",
    "compute_dtype",
    "normalizer_counts",
    "to_jax",
    "x64_enabled",
]


class Float64TruncationWarning(UserWarning):
    """A float64 input became float32 because ``jax_enable_x64`` is off (clause 6.4).

    Turn it into an error with ``warnings.simplefilter("error", Float64TruncationWarning)``.
    """


def x64_enabled() -> bool:
    """Whether JAX keeps float64 (``jax_enable_x64``); read, never changed."""
    return jax.dtypes.canonicalize_dtype(jnp.float64) == jnp.float64


def to_jax(**arrays: Any) -> tuple[Any, ...]:
    """The named inputs as JAX arrays (tracers pass through), warning once per call with
    :class:`Float64TruncationWarning` when a float64 host array would silently become float32.

    JAX converts float64 NumPy arrays to float32 without a word when x64 is off; under an
    outer ``jax.jit`` that has already happened before this function sees the tracers.
    """
    if not x64_enabled():
        lost = [
            name
            for name, x in arrays.items()
            if not isinstance(x, jax.Array) and getattr(x, "dtype", None) == jnp.float64
        ]
        if lost:
            warnings.warn(
                f"{', '.join(lost)}: float64 input truncated to float32 because jax_enable_x64 "
                "is off; the loss is computed and checked at float32 precision. Enable it with "
                "jax.config.update('jax_enable_x64', True) before creating arrays, or pass "
                "float32 arrays to silence this warning",
                Float64TruncationWarning,
                stacklevel=3,
            )
    return tuple(x if isinstance(x, jax.Array) else jnp.asarray(x) for x in arrays.values())


@functools.lru_cache(maxsize=512)
def _check_cached(signature: tuple[tuple[tuple[int, ...], Any], ...]) -> None:
    # check_arrays reads shapes and dtypes, plus mask values for a non-boolean mask: stand-in
    # zeros of the same shape and dtype (concrete even inside a trace) pass that data check,
    # which only the reference can do. Failures raise, and lru_cache does not keep them.
    with jax.ensure_compile_time_eval():
        check_arrays(*(jnp.zeros(shape, dtype) for shape, dtype in signature))


def check_signature(logp: Any, old_logp: Any, advantages: Any, mask: Any) -> None:
    """Clause 8.1-8.2 shape and dtype checks with the reference's messages, from shapes and
    dtypes only (works on tracers; cached per signature)."""
    _check_cached(
        tuple((tuple(x.shape), jnp.dtype(x.dtype)) for x in (logp, old_logp, advantages, mask))
    )


def compute_dtype(logp_dtype: Any, old_logp_dtype: Any) -> Any:
    """The dtype the loss is computed in: the wider of the two log-probability dtypes, at
    least float32 (bfloat16 and float16 are computed in float32, clause 6.4).

    >>> import jax.numpy as jnp
    >>> compute_dtype(jnp.bfloat16, jnp.bfloat16)
    dtype('float32')
    """
    return jnp.promote_types(jnp.promote_types(logp_dtype, old_logp_dtype), jnp.float32)


def normalizer_counts(norm: Any) -> tuple[Any, Any]:
    """The two counts of a :class:`sapo_ref.Normalizer` as 0-d JAX arrays (values may be
    Python numbers, 0-d arrays or tracers, e.g. the result of ``jax.lax.psum``).

    Only types and shapes are checked here; the reference also checks the values.
    """
    if not isinstance(norm, Normalizer):
        raise TypeError(f"normalizer must be a sapo_ref.Normalizer; got {type(norm).__name__}")
    out = []
    for name in ("num_tokens", "num_rows"):
        value = jnp.asarray(getattr(norm, name))
        if value.ndim != 0 or not (
            jnp.issubdtype(value.dtype, jnp.floating) or jnp.issubdtype(value.dtype, jnp.integer)
        ):
            raise TypeError(
                f"normalizer.{name} must be a real 0-d count; got dtype {value.dtype} "
                f"and shape {tuple(value.shape)}"
            )
        out.append(value)
    return out[0], out[1]
