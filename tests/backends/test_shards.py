"""Shards evaluated with the global normaliser sum to the full batch (clauses 3.6, 3.8, 3.11).

The rows of a batch are split into shards in a random order, each shard padded to its own
length; every shard is evaluated with the global counts (the sum of the shards' own counts from
``sapo_ref.normalizer`` or ``<adapter>.distributed.local_counts``). The shard losses must sum to
the reference's loss of the whole batch and the shard gradients must be its rows (clause C.1),
also with the clause 10 terms (weights and ref_logp cut like the other arrays).
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
from backends._inputs import (
    KL_ESTIMATORS,
    LOSS_AGGS,
    METHODS,
    Terms,
    make_case,
    make_terms,
    materialized,
    materialized_with_terms,
)
from sapo_conformance.cases import Case, Materialized
from sapo_conformance.compare import compare

from sapo_ref import Normalizer
from sapo_ref.sharding import split_rows


def _shards(m: Materialized, seed: int) -> list[tuple[np.ndarray, Materialized]]:
    """(rows, shard) pairs: a random row partition, each shard cut to its own padded length."""
    n = m.mask.shape[0]
    out = []
    for rows in split_rows(n, [1, n - 1], rng=np.random.default_rng(seed)):
        cols = np.flatnonzero(m.mask[rows].any(axis=0))
        t = int(cols.max()) + 1 if cols.size else 1
        cut = lambda a: a[rows][:, :t] if a.ndim == 2 else a[rows]
        arrays = [cut(a) for a in (m.logp, m.old_logp, m.advantages, m.mask)]
        case = Case(f"{m.case.id}/shard", m.case.clauses, *arrays, dict(m.case.options))
        out.append((rows, Materialized(case, m.dtype, *arrays, np.nan, np.zeros(0), {})))
    return out


#: Every method x aggregation in float64; float32 on one aggregation per method (each JAX
#: configuration and shard shape is one more compilation).
GRID = [(m, a, "float64") for m in METHODS for a in LOSS_AGGS] + [
    (m, LOSS_AGGS[i % len(LOSS_AGGS)], "float32") for i, m in enumerate(METHODS)
]


@pytest.mark.clause("3.8", "3.6")
@pytest.mark.parametrize("method,loss_agg,dtype", GRID, ids=["-".join(g) for g in GRID])
def test_shards_with_global_counts_sum_to_the_batch(backend, method, loss_agg, dtype):
    backend.require_dtype(dtype)
    count_empty = METHODS.index(method) % 2 == 1
    case = make_case(method, loss_agg, seed=2, empty=True, count_empty_rows=count_empty)
    full = materialized(case, dtype)
    _check_shards(backend, full, _shards(full, seed=METHODS.index(method)), count_empty)


def _check_shards(
    backend, full: Materialized, shards: list, count_empty: bool, terms: Terms | None = None
) -> None:
    """Each shard with the global counts (and its rows of ``terms``): the losses sum to the
    batch's, the gradients are its rows (clause C.1 at the dtype's tolerance)."""
    dtype, case = full.dtype, full.case
    opts = {k: v for k, v in case.options.items() if k != "count_empty_rows"}
    counts = [
        backend.local_counts(backend.to_array(s.mask), count_empty_rows=count_empty)
        for _, s in shards
    ]
    norm = counts[0]
    for c in counts[1:]:
        norm = norm + c
    assert float(norm.num_tokens) == full.mask.sum()
    loss, grad = 0.0, np.zeros(full.mask.shape)
    for rows, shard in shards:
        options = {**opts, "normalizer": norm}
        if terms is not None:
            part = _shard_terms(terms, rows, shard.mask.shape[1])
            options.update(part.options(backend, dtype))
        out = backend.run(shard, options=options, cotangent=0.75)
        loss += out.loss
        grad[rows, : shard.mask.shape[1]] = out.grad
    checks = [
        compare("sum of shard losses", loss, full.want_loss, backend.tolerance(dtype, "value")),
        compare("shard gradients", grad, full.want_grad, backend.tolerance(dtype, "grad")),
    ]
    bad = [c.message for c in checks if not c.ok]
    assert not bad, f"{backend.name} {dtype} {case.options}: " + "; ".join(bad)


@pytest.mark.clause("3.8", "3.6")
@pytest.mark.parametrize("count_empty_rows", (False, True))
def test_global_normalizer_adds_the_shards_counts(backend, count_empty_rows):
    """One process holding several micro-batches: ``global_normalizer(list of masks)``."""
    fn = backend.distributed.global_normalizer
    if "axis_name" in inspect.signature(fn).parameters:
        pytest.skip(f"{backend.name}'s global_normalizer is a collective over a mesh axis")
    masks = [np.array([[1, 1, 0]], bool), np.array([[0, 0], [1, 0], [0, 0]], bool)]
    got = fn([backend.to_array(m) for m in masks], count_empty_rows=count_empty_rows)
    want = Normalizer(3.0, 4.0 if count_empty_rows else 2.0)
    assert isinstance(got, Normalizer)
    assert (float(got.num_tokens), float(got.num_rows)) == (want.num_tokens, want.num_rows)


BAD_MASKS = {
    "1-D": (np.array([1, 1, 0], bool), ValueError),
    "3-D": (np.ones((1, 2, 3), bool), ValueError),
    "value 2": (np.array([[1, 2, 0]]), ValueError),
    "value -1": (np.array([[1, -1, 0]]), ValueError),
    "NaN": (np.array([[1.0, np.nan, 0.0]]), ValueError),
}


@pytest.mark.clause("3.8", "8.1", "8.2")
@pytest.mark.parametrize("mask,exc", list(BAD_MASKS.values()), ids=list(BAD_MASKS))
def test_counting_helpers_reject_the_masks_policy_loss_rejects(backend, mask, exc):
    """``local_counts`` (the reference: ``global_normalizer([mask])``) names the mask."""
    x = backend.native(mask) if mask.dtype.kind in "biu" else backend.to_array(mask, "float64")
    with pytest.raises(Exception) as err:
        if backend.is_adapter:
            backend.distributed.local_counts(x)
        else:
            backend.distributed.global_normalizer([x])
    assert type(err.value) is exc, f"{backend.name}: {err.value!r}"
    assert "mask" in str(err.value), str(err.value)


@pytest.mark.clause("3.8")
def test_global_normalizer_of_a_generator_counts_or_says_so(backend):
    """Issue 11: a generator of masks is counted, or refused with an error naming its type."""
    fn = backend.distributed.global_normalizer
    if "axis_name" in inspect.signature(fn).parameters:
        pytest.skip(f"{backend.name}'s global_normalizer is a collective over a mesh axis")
    masks = [np.array([[1, 1, 0]], bool), np.array([[0, 0], [1, 0]], bool)]
    try:
        got = fn(backend.to_array(m) for m in masks)
    except TypeError as err:
        assert "generator" in str(err), f"{backend.name}: {err}"
        return
    assert (float(got.num_tokens), float(got.num_rows)) == (3.0, 2.0)


def _shard_terms(terms: Terms, rows: np.ndarray, t: int) -> Terms:
    """The rows of ``terms`` a shard holds, cut to its padded length ``t``."""
    w = terms.weights
    if w is not None:
        w = w[rows][:, :t] if w.ndim == 2 else w[rows]
    ref = None if terms.ref_logp is None else terms.ref_logp[rows][:, :t]
    return Terms(w, ref, dict(terms.kl))


TERMS_GRID = [
    (m, LOSS_AGGS[i % len(LOSS_AGGS)], KL_ESTIMATORS[i % len(KL_ESTIMATORS)], d)
    for i, m in enumerate(METHODS)
    for d in ("float64", "float32")
]


@pytest.mark.clause("3.8", "10.1", "10.2")
@pytest.mark.parametrize(
    "method,loss_agg,estimator,dtype", TERMS_GRID, ids=["-".join(g) for g in TERMS_GRID]
)
def test_shards_with_terms_sum_to_the_batch(backend, method, loss_agg, estimator, dtype):
    """Weights and the KL term are per token: with the global counts the shards' losses and
    gradients are the batch's (clause 3.8 holds for the clause 10 terms as written)."""
    backend.require_dtype(dtype)
    i = METHODS.index(method)
    count_empty = i % 2 == 0
    case = make_case(method, loss_agg, seed=14, empty=True, count_empty_rows=count_empty)
    terms = make_terms(
        case, seed=i, weights=("token", "row")[i % 2], kl_estimator=estimator, kl_coef=0.2
    )
    full, rounded = materialized_with_terms(case, dtype, terms)
    _check_shards(backend, full, _shards(full, seed=i + 1), count_empty, rounded)
