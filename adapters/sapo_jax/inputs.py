r"""Inputs of :func:`sapo_jax.policy_loss`: conversion to JAX, the shape and dtype checks of
clause 8.1-8.2 (the reference's own function, so the same messages), the computation dtype of
clause 8.9 and the normaliser's type (clause 8.8).

Everything here reads shapes and dtypes only, which are static under ``jax.jit``, so it runs
once per trace and never synchronises with the device.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sapo_ref.aggregation import Normalizer
from sapo_ref.validation import check_arrays, check_normalizer_type

__all__ = [
    "Float64TruncationWarning",
    "as_inputs",
    "check_signature",
    "compute_dtype",
    "check_normalizer",
    "x64_enabled",
]

NAMES = ("logp", "old_logp", "advantages", "mask")


class Float64TruncationWarning(UserWarning):
    """A float64 input became float32 because ``jax_enable_x64`` is off (clause 6.4).

    Turn it into an error with ``warnings.simplefilter("error", Float64TruncationWarning)``.
    """


def x64_enabled() -> bool:
    """Whether JAX keeps float64 (``jax_enable_x64``); read, never changed."""
    return jax.dtypes.canonicalize_dtype(jnp.float64) == jnp.float64


def _stand_in_dtype(dtype: Any) -> Any:
    # NumPy has no bfloat16 in the array API sense: a float32 stand-in is in the same category.
    dtype = np.dtype(dtype)
    if dtype.kind in "biuf":
        return dtype
    if jnp.issubdtype(dtype, jnp.floating):
        return np.dtype(np.float32)
    return dtype  # object, str, complex, ...: check_arrays names them


@functools.lru_cache(maxsize=512)
def check_signature(
    signature: tuple[tuple[tuple[int, ...], Any], ...],
    extra: tuple[tuple[str, tuple[int, ...], Any], ...] = (),
) -> None:
    """:func:`sapo_ref.validation.check_arrays` of four ``(shape, dtype)`` pairs and the
    ``(name, shape, dtype)`` of ``weights``/``ref_logp`` when given (cached)."""
    # check_arrays reads only shapes and dtypes: empty NumPy stand-ins give its exact errors for
    # tracers, JAX arrays and host arrays of any dtype alike. Failures are not cached.
    check_arrays(
        *(np.empty(shape, _stand_in_dtype(dt)) for shape, dt in signature),
        **{name: np.empty(shape, _stand_in_dtype(dt)) for name, shape, dt in extra},
    )


def _as_array(x: Any) -> Any:
    # As the reference: a scalar or None is not an array (check_arrays names it); lists and
    # other array-likes are converted.
    if isinstance(x, jax.Array) or x is None or isinstance(x, (bool, int, float, complex)):
        return x
    return np.asarray(x)


def as_inputs(
    logp: Any,
    old_logp: Any,
    advantages: Any,
    mask: Any,
    *,
    weights: Any = None,
    ref_logp: Any = None,
) -> tuple[Any, ...]:
    """The inputs checked (clauses 8.1, 8.2, 10.4) and as JAX arrays (tracers pass through):
    ``(logp, old_logp, advantages, mask, weights, ref_logp)``, the last two ``None`` when not
    given.

    Warns :class:`Float64TruncationWarning` once per call when a float64 host array would
    silently become float32 (JAX converts it without a word when x64 is off; under an outer
    ``jax.jit`` that has already happened before this function sees the tracers).
    """
    names = NAMES + tuple(
        n for n, x in (("weights", weights), ("ref_logp", ref_logp)) if x is not None
    )
    given = (logp, old_logp, advantages, mask) + tuple(
        x for x in (weights, ref_logp) if x is not None
    )
    arrays = tuple(_as_array(x) for x in given)
    if not all(hasattr(x, "shape") for x in arrays):
        stand = [x if not hasattr(x, "shape") else np.empty((), np.float64) for x in arrays]
        check_arrays(*stand[:4], **dict(zip(names[4:], stand[4:])))
    check_signature(
        tuple((tuple(x.shape), np.dtype(x.dtype)) for x in arrays[:4]),
        tuple((n, tuple(x.shape), np.dtype(x.dtype)) for n, x in zip(names[4:], arrays[4:])),
    )
    if not x64_enabled():
        lost = [
            name
            for name, x in zip(names, arrays)
            if isinstance(x, np.ndarray) and x.dtype == np.float64
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
    out = dict(zip(names, (x if isinstance(x, jax.Array) else jnp.asarray(x) for x in arrays)))
    return tuple(out.get(n) for n in (*NAMES, "weights", "ref_logp"))


def compute_dtype(*dtypes: Any) -> Any:
    """The dtype the loss is computed in (clause 8.9): the promoted floating dtype of ``logp``,
    ``old_logp``, ``advantages`` (and ``ref_logp``), at least float32 (bfloat16 and float16 are computed in
    float32, clause 6.4).

    >>> import jax.numpy as jnp
    >>> compute_dtype(jnp.bfloat16, jnp.bfloat16, jnp.float16)
    dtype('float32')
    """
    return jnp.promote_types(jnp.result_type(*dtypes), jnp.float32)


def check_normalizer(norm: Any) -> Normalizer | None:
    """``norm`` as given, after the reference's type check (clause 8.8; its values are checked
    with the data: eagerly they raise, under tracing they poison)."""
    if norm is not None:
        check_normalizer_type(norm)
    return norm
