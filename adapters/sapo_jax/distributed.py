r"""Batch counts :math:`(n, R)` for exact losses over shards of a batch (clauses 3.8-3.10).

:func:`local_counts` gives a shard's own counts; inside ``jax.shard_map`` :func:`global_normalizer`
sums them over the data axis with one ``jax.lax.psum``. Each device's loss evaluated with the
global counts is its exact share of the batch loss, so losses and gradients are then summed
(``psum``), never averaged (``pmean``):

.. math::

    (n, R) = \sum_{\text{devices}} (n_d, R_d),\qquad
    \mathcal{L} = \sum_d \mathcal{L}_d .

Under ``jax.jit`` with sharded inputs and no ``shard_map`` none of this is needed: the loss of the
global array is already global and XLA inserts the reductions. Imports only JAX and ``sapo_ref``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sapo_ref.aggregation import Normalizer
from sapo_ref.config import resolve_config
from sapo_ref.validation import faults, raise_faults

from .inputs import check_signature

F64 = np.dtype(np.float64)

__all__ = ["global_normalizer", "local_counts"]


def _counts(mask: Any, count_empty_rows: Any, *, stacked: bool) -> Any:
    """``[n, R]`` of a mask: [N, T], or [..., N, T] when ``stacked`` (leading axes hold more
    rows). Integers keep the counts exact whatever the float precision; the cast comes last.

    The mask is checked as ``policy_loss`` checks it (clause 8.1, 8.2): concrete values other
    than 0/1 raise its ``ValueError``; traced ones make the counts NaN, which poisons every
    loss given them (clause 8.7, 8.8).
    """
    count_empty_rows = resolve_config(count_empty_rows=count_empty_rows).count_empty_rows
    if not isinstance(mask, jax.Array):
        mask = np.asarray(mask)
    if mask.ndim != 2 and not (stacked and mask.ndim > 2):
        want = "[..., N, T]" if stacked else "[N, T] (2-D)"
        raise ValueError(f"mask must have shape {want}; got shape {tuple(mask.shape)}")
    t = mask.shape[-1]
    # policy_loss's own dtype check of the mask, with stand-ins for the other inputs.
    check_signature((((1, 1), F64), ((1, 1), F64), ((1,), F64), ((1, 1), np.dtype(mask.dtype))))
    bad = None
    if mask.dtype != bool:
        bad = (mask != 0) & (mask != 1)
        if not isinstance(mask, jax.core.Tracer) and np.any(np.asarray(bad)):
            flat = np.asarray(mask).reshape(-1, t)
            z = np.zeros(flat.shape)
            raise_faults(faults(z, z, z, flat, flat != 0, sequence=False))
    mask = jnp.asarray(mask)
    valid = mask if mask.dtype == jnp.bool_ else mask != 0
    lengths = jnp.sum(valid.reshape(-1, t), axis=-1, dtype=jnp.int32)  # all rows
    rows = jnp.asarray(lengths.shape[0], jnp.int32) if count_empty_rows else jnp.sum(lengths > 0)
    counts = jnp.stack([jnp.sum(lengths), rows.astype(jnp.int32)]).astype(jnp.result_type(float))
    return counts if bad is None else jnp.where(jnp.any(bad), jnp.nan, counts)


def _normalizer(counts: Any) -> Normalizer:
    return Normalizer(counts[0], counts[1])


def local_counts(mask: Any, *, count_empty_rows: bool = False) -> Normalizer:
    r"""This shard's own counts :math:`(n, R)` (clause 3.1, 3.6) as a :class:`sapo_ref.Normalizer`
    of 0-d arrays in JAX's default float dtype (float64 with ``jax_enable_x64``, else float32),
    usable under ``jax.jit`` and summable across shards with ``+``.

    Args:
        mask: [N, T] boolean or 0/1 validity mask, checked as ``policy_loss`` checks it.
        count_empty_rows: count rows without a valid token in :math:`R` (default ``False``).

    >>> import jax.numpy as jnp
    >>> norm = local_counts(jnp.array([[1, 1, 0], [0, 0, 0]]))
    >>> float(norm.num_tokens), float(norm.num_rows)
    (2.0, 1.0)
    >>> float(local_counts(jnp.array([[1, 0], [0, 0]]), count_empty_rows=True).num_rows)
    2.0
    """
    return _normalizer(_counts(mask, count_empty_rows, stacked=False))


def global_normalizer(mask: Any, *, count_empty_rows: bool = False, axis_name: Any) -> Normalizer:
    r"""The global :class:`~sapo_ref.Normalizer` of a batch sharded over ``axis_name`` (clause 3.9).

    Call inside ``shard_map`` (or any context where ``axis_name`` is bound) with the local shard's
    mask; every device gets the same counts, :math:`\sum_d (n_d, R_d)`, from one ``psum`` of a
    [2] integer array. Pass the result to every ``policy_loss`` of the step and ``psum`` the
    per-device losses (and gradients of replicated parameters).

    Args:
        mask: the local [..., N, T] mask (leading axes, e.g. stacked micro-batches for
            ``lax.scan``, hold more rows).
        count_empty_rows: count rows without valid tokens (clause 3.6); the setting is fixed
            here, so ``policy_loss`` must not be given ``count_empty_rows`` as well.
        axis_name: the mesh axis (or tuple of axes) the rows are sharded over.

    Returns:
        ``Normalizer(num_tokens, num_rows)`` of 0-d arrays in JAX's default float dtype, carrying
        no gradient.

    >>> import jax, jax.numpy as jnp
    >>> from jax.sharding import PartitionSpec as P
    >>> mesh = jax.make_mesh((1,), ("data",))
    >>> mask = jax.device_put(jnp.array([[1, 1, 0], [0, 0, 0]]), jax.NamedSharding(mesh, P("data")))
    >>> def counts(m):
    ...     norm = global_normalizer(m, axis_name="data")
    ...     return norm.num_tokens, norm.num_rows
    >>> [float(x) for x in jax.shard_map(counts, mesh=mesh, in_specs=P("data"), out_specs=P())(mask)]
    [2.0, 1.0]
    """
    counts = jax.lax.psum(_counts(mask, count_empty_rows, stacked=True), axis_name)
    return _normalizer(jax.lax.stop_gradient(counts))
