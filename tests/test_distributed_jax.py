"""Clauses 3.8-3.9 in JAX: a batch sharded over 4 host CPU devices reproduces the unsharded one.

The rows are sharded over a mesh axis ``"data"`` (one device holds empty rows only); inside
``jax.shard_map`` :func:`sapo_jax.distributed.global_normalizer` ``psum``s the counts and the
per-device losses are ``psum``med. Checked against the reference on the full batch for every
method, aggregation and empty-row setting, plus gradient accumulation with ``lax.scan`` inside
each device and the gradient of a replicated parameter, with and without ``check_vma``.

The device count must be set before JAX initialises and this pytest process already has JAX:
the 4-device part runs this file as a script in a subprocess with ``XLA_FLAGS`` and x64 set.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from functools import partial

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sapo_jax = pytest.importorskip("sapo_jax")
# pytest's pythonpath has tests/; the worker runs this file as a script, which puts it there too.
import _distributed_batches as db  # noqa: E402
from sapo_jax.distributed import global_normalizer, local_counts  # noqa: E402

DEVICES = 4
TIMEOUT = 400  # seconds; one XLA compilation per config: measured 37-73 s on 2 busy cores
SCAN_CONFIGS = [("sapo", "seq-mean-token-mean", False), ("gspo", "token-mean", True)]
BATCH_KEYS = ("logp", "old_logp", "advantages", "mask", "features", "old_logp_model")


def _data(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """12 rows, 3 per device: device 0 gets three empty rows, the others ragged rows."""
    batch = db.ragged_batch(rng, 3 * DEVICES, 8, empty_rows=4)
    empty = np.flatnonzero(~batch["mask"].any(axis=1))
    others = rng.permutation(np.setdiff1d(np.arange(3 * DEVICES), empty[:3]))
    order = np.concatenate([empty[:3], others])
    batch = {k: v[order] for k, v in batch.items()}
    weights = rng.normal(size=3)
    logp_model, _ = db.model_logp(batch["features"], weights)
    old_model = logp_model + rng.uniform(-0.5, 0.5, size=logp_model.shape)
    return {**batch, "weights": weights, "old_logp_model": old_model}


# --- the worker (runs in a subprocess with 4 host devices) -------------------------------------


# The functions docs/distributed.md shows (included from here, so the page shows tested code).
# --8<-- [start:jax_step]
def device_loss(logp, old_logp, advantages, mask, *, count_empty_rows=False, **options):
    """Inside ``shard_map`` over ``"data"``: this device's exact share of the batch loss."""
    norm = global_normalizer(
        mask, count_empty_rows=count_empty_rows, axis_name="data"
    )  # psum of counts
    loss, _metrics = sapo_jax.policy_loss(
        logp, old_logp, advantages, mask, normalizer=norm, **options
    )
    return loss


def loss_and_grads(params, features, old_logp, advantages, mask, *, check_vma=True, **options):
    """Inside ``shard_map``: the batch loss and the gradient of replicated ``params``."""

    def local_loss(params):
        logp = jax.nn.log_sigmoid(features @ params)  # the policy's log-probs, [N_d, T]
        return device_loss(logp, old_logp, advantages, mask, **options)

    loss, grads = jax.value_and_grad(local_loss)(params)
    if not check_vma:  # with check_vma=True JAX has already summed them over "data"
        grads = jax.lax.psum(grads, "data")
    return jax.lax.psum(loss, "data"), grads  # sums, never pmean (clause 3.10)


# --8<-- [end:jax_step]


def _config_step(logp, old, adv, mask, *, count_empty_rows, **options):
    """Loss (psum), logp-gradient and counts of one config, inside shard_map."""
    device = partial(device_loss, count_empty_rows=count_empty_rows, **options)
    loss, grad = jax.value_and_grad(device)(logp, old, adv, mask)
    norm = global_normalizer(mask, count_empty_rows=count_empty_rows, axis_name="data")
    return jax.lax.psum(loss, "data"), grad, jnp.stack([norm.num_tokens, norm.num_rows])


def _scan_step(logp, old, adv, mask, *, count_empty_rows, **options):
    """Micro-batches of one row scanned on each device; the counts cover every micro-batch of
    the step and are reduced before the first loss; losses and gradients are summed."""
    micro = lambda a: a.reshape(a.shape[0], 1, *a.shape[1:])
    norm = global_normalizer(micro(mask), count_empty_rows=count_empty_rows, axis_name="data")

    def body(total, xs):
        lp, o, a, m = xs
        loss_fn = lambda lp: sapo_jax.policy_loss(lp, o, a, m, normalizer=norm, **options)[0]
        loss, grad = jax.value_and_grad(loss_fn)(lp)
        return total + loss, grad  # summed, never averaged (clause 3.10)

    zero = jax.lax.pcast(jnp.zeros((), logp.dtype), "data", to="varying")
    total, grads = jax.lax.scan(body, zero, tuple(map(micro, (logp, old, adv, mask))))
    return jax.lax.psum(total, "data"), grads.reshape(logp.shape)


def _worker(data_file: str, out_file: str) -> None:
    assert jax.device_count() == DEVICES and jax.config.jax_enable_x64
    mesh = jax.make_mesh((DEVICES,), ("data",))
    rows = P("data")
    data = dict(np.load(data_file))
    b = {k: jax.device_put(jnp.asarray(data[k]), NamedSharding(mesh, rows)) for k in BATCH_KEYS}
    out: dict[str, np.ndarray] = {}

    def shard_map(f, in_specs, out_specs, **kw):
        return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, **kw))

    # 1. Every config: per-device loss with the psum-ed counts, losses psum-ed.
    for c, (method, loss_agg, count_empty) in enumerate(db.CONFIGS):
        opts = {"count_empty_rows": count_empty, **db.options(method, loss_agg)}
        f = shard_map(partial(_config_step, **opts), (rows,) * 4, (P(), rows, P()))
        loss, grad, counts = f(b["logp"], b["old_logp"], b["advantages"], b["mask"])
        out[f"loss{c}"], out[f"grad{c}"], out[f"counts{c}"] = map(np.asarray, (loss, grad, counts))

    for c, (method, loss_agg, count_empty) in enumerate(SCAN_CONFIGS):
        opts = {"count_empty_rows": count_empty, **db.options(method, loss_agg)}
        # 2. Gradient accumulation on each device, micro-batches scanned.
        f = shard_map(partial(_scan_step, **opts), (rows,) * 4, (P(), rows))
        loss, grad = f(b["logp"], b["old_logp"], b["advantages"], b["mask"])
        out[f"scan_loss{c}"], out[f"scan_grad{c}"] = np.asarray(loss), np.asarray(grad)

        # 3. A replicated parameter, with and without check_vma.
        for check_vma in (True, False):
            f = shard_map(
                partial(loss_and_grads, check_vma=check_vma, **opts),
                (P(), rows, rows, rows, rows),
                (P(), P()),
                check_vma=check_vma,
            )
            w = jnp.asarray(data["weights"])
            loss, grad = f(w, b["features"], b["old_logp_model"], b["advantages"], b["mask"])
            out[f"param_vma{int(check_vma)}_{c}"] = np.asarray(grad)
            out[f"param_loss_vma{int(check_vma)}_{c}"] = np.asarray(loss)

    np.savez(out_file, **out)


# --- the tests (pytest process) ----------------------------------------------------------------


@pytest.fixture(scope="module")
def four_devices(tmp_path_factory):
    """Run the 4-device worker once; return the data, its results and the wall time."""
    if not hasattr(sapo_jax, "policy_loss"):
        pytest.skip("sapo_jax has no policy_loss yet")
    tmp = tmp_path_factory.mktemp("jax4")
    data = _data(np.random.default_rng(20251121))
    np.savez(tmp / "data.npz", **data)
    env = {
        **os.environ,
        "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={DEVICES}",
        "JAX_ENABLE_X64": "1",
        "JAX_PLATFORMS": "cpu",
    }
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, __file__, str(tmp / "data.npz"), str(tmp / "out.npz")],
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"the 4-device JAX worker did not finish within {TIMEOUT} s")
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, (
        f"worker failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    )
    print(f"4-device JAX worker: {elapsed:.1f} s")
    return data, dict(np.load(tmp / "out.npz")), elapsed


def _full(data, config, logp_key="logp", old_key="old_logp"):
    import sapo_ref

    method, loss_agg, count_empty = config
    return sapo_ref.policy_loss(
        data[logp_key],
        data[old_key],
        data["advantages"],
        data["mask"],
        count_empty_rows=count_empty,
        **db.options(method, loss_agg),
    )


@pytest.mark.slow
@pytest.mark.jax
@pytest.mark.parametrize(
    "c", range(len(db.CONFIGS)), ids=lambda c: "-".join(map(str, db.CONFIGS[c]))
)
def test_sharded_batch_equals_unsharded(four_devices, c):
    import sapo_ref

    data, out, _ = four_devices
    full = _full(data, db.CONFIGS[c])
    want = sapo_ref.normalizer(data["mask"], count_empty_rows=db.CONFIGS[c][2])
    assert out[f"counts{c}"].tolist() == [want.num_tokens, want.num_rows]
    db.assert_close(out[f"loss{c}"], full.loss, "float64", "value", "loss")
    db.assert_close(out[f"grad{c}"], full.grad, "float64", "grad", "grad")


@pytest.mark.slow
@pytest.mark.jax
@pytest.mark.parametrize(
    "c", range(len(SCAN_CONFIGS)), ids=lambda c: "-".join(map(str, SCAN_CONFIGS[c]))
)
def test_scanned_micro_batches_on_sharded_batch(four_devices, c):
    data, out, _ = four_devices
    full = _full(data, SCAN_CONFIGS[c])
    db.assert_close(out[f"scan_loss{c}"], full.loss, "float64", "value", "loss")
    db.assert_close(out[f"scan_grad{c}"], full.grad, "float64", "grad", "grad")


@pytest.mark.slow
@pytest.mark.jax
@pytest.mark.parametrize("check_vma", [True, False])
@pytest.mark.parametrize(
    "c", range(len(SCAN_CONFIGS)), ids=lambda c: "-".join(map(str, SCAN_CONFIGS[c]))
)
def test_replicated_parameter_gradient(four_devices, c, check_vma):
    data, out, _ = four_devices
    logp, dlogp_dw = db.model_logp(data["features"], data["weights"])
    full = _full({**data, "logp_model": logp}, SCAN_CONFIGS[c], "logp_model", "old_logp_model")
    want = np.einsum("it,itf->f", full.grad, dlogp_dw)  # chain rule through the model
    db.assert_close(out[f"param_vma{int(check_vma)}_{c}"], want, "float64", "grad", "dL/dw")
    db.assert_close(
        out[f"param_loss_vma{int(check_vma)}_{c}"], full.loss, "float64", "value", "loss"
    )


@pytest.mark.jax
@pytest.mark.parametrize("count_empty", [False, True])
def test_global_normalizer_on_one_device(count_empty):
    import sapo_ref

    data = _data(np.random.default_rng(3))
    mesh = jax.make_mesh((1,), ("data",))

    def counts(m):
        norm = global_normalizer(m, count_empty_rows=count_empty, axis_name="data")
        return jnp.stack([norm.num_tokens, norm.num_rows])

    f = jax.shard_map(counts, mesh=mesh, in_specs=P("data"), out_specs=P())
    want = sapo_ref.normalizer(data["mask"], count_empty_rows=count_empty)
    for mask in (data["mask"], data["mask"].reshape(4, 3, -1), data["mask"].astype(np.int32)):
        got = f(jax.device_put(jnp.asarray(mask), NamedSharding(mesh, P("data"))))
        assert got.dtype == jnp.float64
        assert got.tolist() == [want.num_tokens, want.num_rows], mask.shape


@pytest.mark.jax
@pytest.mark.clause("8.1", "8.2", "8.7")
def test_local_counts_checks_the_mask_as_policy_loss_does():
    """Eagerly a 1-D or 3-D mask or a mask value other than 0/1 raises naming the mask; under
    jit a bad value makes the counts NaN, so every loss given them is NaN (clause 8.7, 8.8)."""
    for mask in (jnp.ones(3, bool), jnp.ones((1, 2, 3), bool)):
        with pytest.raises(ValueError, match=r"mask must have shape \[N, T\]"):
            local_counts(mask)
    with pytest.raises(ValueError, match=r"mask must hold only 0 and 1.*\(0, 1\)"):
        local_counts(jnp.array([[1.0, 2.0, 0.0]]))
    lp = jnp.zeros((1, 3))

    @jax.jit
    def loss(mask):
        norm = local_counts(mask)
        return sapo_jax.policy_loss(lp, lp, jnp.ones(1), mask > 0, normalizer=norm)[0]

    assert np.isnan(float(loss(jnp.array([[1.0, 2.0, 0.0]]))))
    assert np.isfinite(float(loss(jnp.array([[1.0, 1.0, 0.0]]))))


@pytest.mark.jax
@pytest.mark.clause("3.6", "3.8")
@pytest.mark.parametrize("count_empty", [False, True])
def test_local_counts_are_the_references(count_empty):
    import sapo_ref

    mask = _data(np.random.default_rng(4))["mask"]
    want = sapo_ref.normalizer(mask, count_empty_rows=count_empty)
    got = local_counts(jnp.asarray(mask.astype(np.int32)), count_empty_rows=count_empty)
    assert (float(got.num_tokens), float(got.num_rows)) == (want.num_tokens, want.num_rows)
    assert sapo_jax.normalizer is local_counts  # the name it had first


@pytest.mark.jax
def test_sharding_is_a_deprecated_alias():
    import importlib

    import sapo_jax.distributed

    sys.modules.pop("sapo_jax.sharding", None)
    with pytest.warns(DeprecationWarning, match="sapo_jax.distributed"):
        sharding = importlib.import_module("sapo_jax.sharding")
    assert sharding.local_counts is sapo_jax.distributed.local_counts
    mesh = jax.make_mesh((1,), ("data",))
    mask = jax.device_put(jnp.array([[1, 1, 0], [0, 0, 0]]), NamedSharding(mesh, P("data")))

    def counts(m):
        norm = sharding.global_normalizer(m, "data")  # axis_name positional, as it was
        return jnp.stack([norm.num_tokens, norm.num_rows])

    f = jax.shard_map(counts, mesh=mesh, in_specs=P("data"), out_specs=P())
    assert f(mask).tolist() == [2.0, 1.0]


if __name__ == "__main__":
    _worker(*sys.argv[1:3])
