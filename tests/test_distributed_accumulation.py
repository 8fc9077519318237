"""Clause 3.8 in one process: micro-batches evaluated with the global counts sum to the full batch.

For every method, aggregation and empty-row setting, the rows of a ragged batch (empty rows,
garbage padding) are split into micro-batches, each padded to its own length; the sum of the
micro-batch losses and the scattered micro-batch gradients must equal the unsplit batch's
(float64 tolerances of the spec), with the reference and with each installed adapter.
"""

from __future__ import annotations

import doctest
import zlib
from pathlib import Path

import _distributed_batches as db
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import sapo_ref
from sapo_ref.sharding import combine_metrics, global_normalizer, split_rows

N_ROWS, T_MAX = 11, 8


def _config_id(config) -> str:
    return f"{config[0]}-{config[1]}-{'count' if config[2] else 'skip'}_empty"


def _case(config, per_token: bool):
    """A batch for ``config`` and micro-batches: one made of the empty rows, the rest random."""
    rng = np.random.default_rng(zlib.crc32(repr((config, per_token)).encode()))
    batch = db.ragged_batch(rng, N_ROWS, T_MAX, empty_rows=3, per_token=per_token)
    empty = np.flatnonzero(~batch["mask"].any(axis=1))
    rest = rng.permutation(np.flatnonzero(batch["mask"].any(axis=1)))
    micro = [empty] + [rest[idx] for idx in split_rows(len(rest), [1, 3, len(rest) - 4])]
    return batch, micro


def _full(batch, config):
    method, loss_agg, count_empty = config
    return sapo_ref.policy_loss(
        batch["logp"],
        batch["old_logp"],
        batch["advantages"],
        batch["mask"],
        count_empty_rows=count_empty,
        **db.options(method, loss_agg),
    )


def _check_sum(config, total_loss, parts, batch, full, dtype="float64"):
    db.assert_close(total_loss, full.loss, dtype, "value", f"{config} loss")
    grad = db.scatter_rows(parts, batch["mask"].shape)
    db.assert_close(grad, full.grad, dtype, "grad", f"{config} grad")


@pytest.mark.clause("3.8", "3.6", "3.10")
@pytest.mark.parametrize("per_token", [False, True], ids=["seq_adv", "token_adv"])
@pytest.mark.parametrize("config", db.CONFIGS, ids=_config_id)
def test_reference_micro_batches_sum_to_full_batch(config, per_token):
    batch, micro = _case(config, per_token)
    method, loss_agg, count_empty = config
    norm = global_normalizer([batch["mask"][rows] for rows in micro], count_empty_rows=count_empty)
    total, parts = 0.0, []
    for rows in micro:
        s = db.shard(batch, rows)
        res = sapo_ref.policy_loss(
            s["logp"],
            s["old_logp"],
            s["advantages"],
            s["mask"],
            normalizer=norm,
            **db.options(method, loss_agg),
        )
        total += res.loss
        parts.append((rows, res.grad))
    _check_sum(config, total, parts, batch, _full(batch, config))


@given(
    seed=st.integers(0, 2**32 - 1),
    n_rows=st.integers(1, 12),
    data=st.data(),
)
@pytest.mark.clause("3.8")
def test_any_row_partition_and_its_counts(seed, n_rows, data):
    """Counts of any partition add up to the batch's, and its shard losses to the batch loss."""
    config = data.draw(st.sampled_from(db.CONFIGS))
    method, loss_agg, count_empty = config
    rng = np.random.default_rng(seed)
    batch = db.ragged_batch(rng, n_rows, 5, empty_rows=data.draw(st.integers(0, n_rows)))
    k = data.draw(st.integers(1, n_rows))
    micro = split_rows(n_rows, k, rng=rng)
    norm = global_normalizer([batch["mask"][rows] for rows in micro], count_empty_rows=count_empty)
    want = sapo_ref.normalizer(batch["mask"], count_empty_rows=count_empty)
    assert (norm.num_tokens, norm.num_rows) == (want.num_tokens, want.num_rows)
    total, parts = 0.0, []
    for rows in micro:
        s = db.shard(batch, rows)
        res = sapo_ref.policy_loss(
            s["logp"],
            s["old_logp"],
            s["advantages"],
            s["mask"],
            normalizer=norm,
            **db.options(method, loss_agg),
        )
        total += res.loss
        parts.append((rows, res.grad))
    _check_sum(config, total, parts, batch, _full(batch, config))


@pytest.mark.clause("3.11")
@pytest.mark.parametrize("per_token", [False, True], ids=["seq_adv", "token_adv"])
@pytest.mark.parametrize("method", list(sapo_ref.spec.METHODS))
def test_shard_metrics_combine_to_the_batch_metrics(method, per_token):
    """Clause 3.11: counts add, means weight by their companion count, extremes skip empties."""
    config = (method, "token-mean", False)
    batch, micro = _case(config, per_token)
    norm = global_normalizer([batch["mask"][rows] for rows in micro])
    shards = []
    for rows in micro:  # the first micro-batch holds only empty rows
        s = db.shard(batch, rows)
        res = sapo_ref.policy_loss(
            s["logp"], s["old_logp"], s["advantages"], s["mask"], method=method, normalizer=norm
        )
        shards.append(res.metrics)
    got = combine_metrics(shards)
    want = _full(batch, config).metrics
    assert list(got) == list(want)
    for key in want:
        db.assert_close(got[key], want[key], "float64", "value", key)


@pytest.mark.clause("3.11")
def test_combine_metrics_needs_a_shard():
    with pytest.raises(ValueError, match="at least one metrics dict"):
        combine_metrics([])


@pytest.mark.clause("3.10")
def test_mean_of_micro_batch_means_is_another_loss():
    """Clause 3.10 (a): local normalisation averaged over micro-batches differs on ragged batches."""
    config = ("sapo", "token-mean", False)
    batch, micro = _case(config, False)
    micro = micro[1:]  # non-empty micro-batches only: their local means are defined
    local = [
        sapo_ref.policy_loss(
            *(db.shard(batch, r)[k] for k in ("logp", "old_logp", "advantages", "mask"))
        )
        for r in micro
    ]
    full = _full(batch, config).loss
    mean_of_means = sum(res.loss for res in local) / len(local)
    assert abs(mean_of_means - full) > 1e-3 * abs(full)


def test_docs_page_examples():
    """The single-process example of docs/distributed.md runs and says what it claims."""
    page = Path(__file__).parents[1] / "docs" / "distributed.md"
    result = doctest.testfile(str(page), module_relative=False, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.clause("3.8")
def test_global_normalizer_needs_a_mask():
    with pytest.raises(ValueError, match="at least one shard mask"):
        global_normalizer([])


@pytest.mark.clause("3.8")
@pytest.mark.parametrize("sizes", [0, 6, [2, 2], [0, 5], [1, 3]])
def test_split_rows_rejects_bad_sizes(sizes):
    with pytest.raises(ValueError, match="num_rows=5"):
        split_rows(5, sizes)


# --- the adapters: the same sums through their own autodiff ----------------------------------


def _adapter(name: str):
    module = pytest.importorskip(name)
    if not hasattr(module, "policy_loss"):
        pytest.skip(f"{name} has no policy_loss yet")
    return module


@pytest.mark.clause("3.8", "3.9")
@pytest.mark.torch
@pytest.mark.parametrize("config", db.CONFIGS, ids=_config_id)
def test_torch_micro_batches_sum_to_full_batch(config):
    sapo_torch = _adapter("sapo_torch")
    import torch
    from sapo_torch.distributed import global_normalizer as torch_global_normalizer

    batch, micro = _case(config, per_token=True)
    method, loss_agg, count_empty = config
    shards = [{k: torch.from_numpy(v) for k, v in db.shard(batch, rows).items()} for rows in micro]
    norm = torch_global_normalizer([s["mask"] for s in shards], count_empty_rows=count_empty)
    total, parts = torch.zeros((), dtype=torch.float64), []
    for rows, s in zip(micro, shards):
        logp = s["logp"].clone().requires_grad_(True)
        loss, _ = sapo_torch.policy_loss(
            logp,
            s["old_logp"],
            s["advantages"],
            s["mask"],
            normalizer=norm,
            **db.options(method, loss_agg),
        )
        loss.backward()
        total = total + loss.detach()
        parts.append((rows, logp.grad.numpy()))
    _check_sum(config, float(total), parts, batch, _full(batch, config))


@pytest.mark.clause("3.8", "3.9")
@pytest.mark.jax
@pytest.mark.parametrize("config", db.CONFIGS, ids=_config_id)
def test_jax_micro_batches_sum_to_full_batch(config):
    sapo_jax = _adapter("sapo_jax")
    import jax
    import jax.numpy as jnp

    # JAX trainers use static shapes: equal micro-batches padded to the batch width, so that
    # jit compiles once per config (not once per micro-batch shape).
    method, loss_agg, count_empty = config
    rng = np.random.default_rng(zlib.crc32(repr(config).encode()))
    batch = db.ragged_batch(rng, 12, T_MAX, empty_rows=3, per_token=True)
    empty = np.flatnonzero(~batch["mask"].any(axis=1))
    rest = rng.permutation(np.flatnonzero(batch["mask"].any(axis=1)))
    micro = [empty] + [rest[idx] for idx in split_rows(len(rest), 3)]
    shards = [{k: jnp.asarray(v) for k, v in db.shard(batch, r, trim=False).items()} for r in micro]
    norm = global_normalizer([s["mask"] for s in shards], count_empty_rows=count_empty)

    def loss_fn(logp, s, counts):
        loss, _ = sapo_jax.policy_loss(
            logp,
            s["old_logp"],
            s["advantages"],
            s["mask"],
            normalizer=sapo_ref.Normalizer(*counts),
            **db.options(method, loss_agg),
        )
        return loss

    value_and_grad = jax.jit(jax.value_and_grad(loss_fn))
    total, parts = 0.0, []
    for rows, s in zip(micro, shards):
        assert s["logp"].dtype == jnp.float64
        loss, grad = value_and_grad(s["logp"], s, (norm.num_tokens, norm.num_rows))
        total += float(loss)
        parts.append((rows, np.asarray(grad)))
    _check_sum(config, total, parts, batch, _full(batch, config))


@pytest.mark.clause("3.8", "3.9")
@pytest.mark.mlx
@pytest.mark.parametrize("config", db.CONFIGS, ids=_config_id)
def test_mlx_micro_batches_sum_to_full_batch(config):
    sapo_mlx = _adapter("sapo_mlx")
    import mlx.core as mx

    batch, micro = _case(config, per_token=True)
    method, loss_agg, count_empty = config
    norm = global_normalizer([batch["mask"][rows] for rows in micro], count_empty_rows=count_empty)

    def to_mx(v):  # mx.array(float64 ndarray) alone would give float32
        return mx.array(v) if v.dtype == bool else mx.array(v, dtype=mx.float64)

    total, parts = 0.0, []
    with mx.stream(mx.cpu):  # float64 exists on the CPU device only
        for rows in micro:
            s = {k: to_mx(v) for k, v in db.shard(batch, rows).items()}

            def loss_fn(logp, s=s):
                return sapo_mlx.policy_loss(
                    logp,
                    s["old_logp"],
                    s["advantages"],
                    s["mask"],
                    normalizer=norm,
                    **db.options(method, loss_agg),
                )[0]

            loss, grad = mx.value_and_grad(loss_fn)(s["logp"])
            assert grad.dtype == mx.float64
            total += loss.item()
            parts.append((rows, np.array(grad)))
    _check_sum(config, total, parts, batch, _full(batch, config))
