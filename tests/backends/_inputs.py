"""Inputs of the cross-backend tests, built with the conformance suite's own generators.

A case is a :class:`sapo_conformance.cases.Case` (float64 inputs and options) drawn from a
seeded generator; :func:`materialized` rounds it to a dtype and evaluates the float64
reference on the rounded inputs (clause C.1), or skips the test with the reason it does not
apply in that dtype.
"""

from __future__ import annotations

from collections.abc import Callable
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


# ----------------------------------------------------------------------------- one small call
#: The small valid call the error and tracing tests break one way at a time.
N, T = 3, 4
Edit = Callable[[dict[str, Any]], dict[str, Any]]
ARRAYS = ("logp", "old_logp", "advantages", "mask")


def valid_call() -> dict[str, Any]:
    rng = np.random.default_rng(0)
    old = np.log(rng.uniform(0.1, 1.0, size=(N, T)))
    return {
        "logp": old + rng.normal(scale=0.1, size=(N, T)),
        "old_logp": old,
        "advantages": np.array([1.0, -0.5, 0.25]),
        "mask": np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=bool),
    }


def setting(**kw: Any) -> Edit:
    return lambda c: {**c, **kw}


def at(name: str, index: Any, value: float) -> Edit:
    def edit(c):
        x = np.array(c[name], dtype=float if name != "mask" else c[name].dtype)
        x[index] = value
        return {**c, name: x}

    return edit


def both(index: Any, logp: float, old_logp: float) -> Edit:
    return lambda c: at("old_logp", index, old_logp)(at("logp", index, logp)(c))


def then(*edits: Edit) -> Edit:
    def edit(c):
        for e in edits:
            c = e(c)
        return c

    return edit
