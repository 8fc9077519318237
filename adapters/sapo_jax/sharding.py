"""Deprecated alias of :mod:`sapo_jax.distributed` (the module name every adapter uses).

Importing it warns :class:`DeprecationWarning`. The old positional ``axis_name`` of
``global_normalizer(mask, axis_name)`` still works here; :func:`local_counts` now returns a
:class:`sapo_ref.Normalizer` (it returned an int [2] array).
"""

from __future__ import annotations

import warnings
from typing import Any

from sapo_ref.aggregation import Normalizer

from . import distributed
from .distributed import local_counts

__all__ = ["global_normalizer", "local_counts"]

warnings.warn(
    "sapo_jax.sharding is deprecated: use sapo_jax.distributed "
    "(global_normalizer(mask, axis_name=...), local_counts(mask))",
    DeprecationWarning,
    stacklevel=2,
)


def global_normalizer(mask: Any, axis_name: Any, *, count_empty_rows: bool = False) -> Normalizer:
    """:func:`sapo_jax.distributed.global_normalizer` with ``axis_name`` also positional."""
    return distributed.global_normalizer(
        mask, count_empty_rows=count_empty_rows, axis_name=axis_name
    )
