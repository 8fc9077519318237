"""Inputs of the cross-backend tests, built with the conformance suite's own generators.

A case is a :class:`sapo_conformance.cases.Case` (float64 inputs and options) drawn from a
seeded generator; :func:`materialized` rounds it to a dtype and evaluates the float64
reference on the rounded inputs (clause C.1), or skips the test with the reason it does not
apply in that dtype.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from sapo_conformance.cases import Case, Materialized, _batch, _opts, materialize

import sapo_ref
from sapo_ref import spec

METHODS: tuple[str, ...] = sapo_ref.METHOD_NAMES
LOSS_AGGS: tuple[str, ...] = sapo_ref.LOSS_AGG_NAMES
DTYPES: tuple[str, ...] = ("float64", "float32", "bfloat16", "float16")
SEQUENCE_METHODS: tuple[str, ...] = tuple(m for m in METHODS if spec.METHODS[m].is_sequence)


def make_case(
    method: str,
    loss_agg: str,
    *,
    seed: int = 0,
    per_token: bool | None = None,
    empty: bool = True,
    sigma: float = 0.4,
    **options: Any,
) -> Case:
    """A seeded case of ``method`` and ``loss_agg``: ragged mask (an empty row if ``empty``),
    finite garbage at invalid positions, options around the paper's plus ``options``."""
    rng = np.random.default_rng([seed, METHODS.index(method), LOSS_AGGS.index(loss_agg)])
    lp, old, adv, mask = _batch(rng, sigma=sigma, empty=empty, per_token=per_token)
    opts = {**_opts(rng, method, mask.shape[1], loss_agg), **options}
    return Case(f"{method}/{loss_agg}/{seed}", ("C.1",), lp, old, adv, mask, opts)


def materialized(case: Case, dtype: str) -> Materialized:
    """``case`` in ``dtype`` with the reference on the rounded inputs; skip if it does not apply."""
    m = materialize(case, dtype)
    if isinstance(m, str):
        pytest.skip(m)
    return m


def with_inputs(case: Case, **arrays: np.ndarray) -> Case:
    """``case`` with some of its input arrays replaced."""
    fields = {k: getattr(case, k) for k in ("logp", "old_logp", "advantages", "mask")}
    fields.update(arrays)
    return Case(case.id, case.clauses, options=dict(case.options), fd=False, **fields)
