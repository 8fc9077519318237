r"""Exact SAPO-family losses on a batch sharded over a mesh axis (clauses 3.8-3.10).

Inside ``jax.shard_map`` each device holds a shard of the rows. :func:`global_normalizer` sums the
shards' counts with ``jax.lax.psum`` over the data axis; each device's loss evaluated with it is
its exact share of the global loss, so losses and gradients are then summed (``psum``), never
averaged (``pmean``):

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

from sapo_ref.aggregation import Normalizer

from .counts import local_normalizer

__all__ = ["global_normalizer", "local_counts"]


def local_counts(mask: jax.Array, *, count_empty_rows: bool = False) -> jax.Array:
    r"""This shard's counts :math:`(n, R)`, an integer array of shape [2].

    ``mask`` is [..., N, T] (leading axes, e.g. stacked micro-batches for ``lax.scan``, hold more
    rows); boolean or 0/1. Integers keep the counts exact whatever the float precision.

    >>> import jax.numpy as jnp
    >>> local_counts(jnp.array([[1, 1, 0], [0, 0, 0]])).tolist()
    [2, 1]
    """
    if mask.ndim < 2:
        raise ValueError(f"mask must have shape [..., N, T]; got shape {tuple(mask.shape)}")
    valid = mask if mask.dtype == jnp.bool_ else mask != 0
    lengths = jnp.sum(valid.reshape(-1, valid.shape[-1]), axis=-1, dtype=jnp.int32)  # all rows
    counts = local_normalizer(lengths, count_empty_rows)
    return jnp.stack([counts.num_tokens, counts.num_rows])


def global_normalizer(
    mask: jax.Array, axis_name: Any, *, count_empty_rows: bool = False
) -> Normalizer:
    r"""The global :class:`~sapo_ref.Normalizer` of a batch sharded over ``axis_name`` (clause 3.9).

    Call inside ``shard_map`` (or any context where ``axis_name`` is bound) with the local shard's
    mask; every device gets the same counts, :math:`\sum_d (n_d, R_d)`, from one ``psum`` of a
    [2] integer array. Pass the result to every ``policy_loss`` of the step and ``psum`` the
    per-device losses (and gradients of replicated parameters).

    Args:
        mask: the local [..., N, T] mask.
        axis_name: the mesh axis (or tuple of axes) the rows are sharded over.
        count_empty_rows: count rows without valid tokens (clause 3.6); the setting is fixed
            here, so ``policy_loss`` must not be given ``count_empty_rows`` as well.

    Returns:
        ``Normalizer(num_tokens, num_rows)`` of 0-d arrays in JAX's default float dtype (float64
        with x64 enabled, else float32).

    >>> import jax, jax.numpy as jnp, numpy as np
    >>> from jax.sharding import PartitionSpec as P
    >>> mesh = jax.make_mesh((1,), ("data",))
    >>> mask = jax.device_put(jnp.array([[1, 1, 0], [0, 0, 0]]), jax.NamedSharding(mesh, P("data")))
    >>> def counts(m):
    ...     norm = global_normalizer(m, "data")
    ...     return norm.num_tokens, norm.num_rows
    >>> [float(x) for x in jax.shard_map(counts, mesh=mesh, in_specs=P("data"), out_specs=P())(mask)]
    [2.0, 1.0]
    """
    counts = jax.lax.psum(local_counts(mask, count_empty_rows=count_empty_rows), axis_name)
    counts = jax.lax.stop_gradient(counts.astype(jnp.result_type(float)))
    return Normalizer(counts[0], counts[1])
