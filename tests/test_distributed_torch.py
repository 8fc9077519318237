"""Clauses 3.8-3.9 with torch.distributed: two gloo ranks on localhost reproduce the full batch.

Each rank holds a different set of rows (ragged masks, empty rows, a micro-batch of empty rows
only), split into micro-batches padded to their own lengths. With one ``all_reduce`` of the
counts (:func:`sapo_torch.distributed.global_normalizer`) the summed losses and gradients equal
the reference on the unsplit batch, for every method, aggregation and empty-row setting; and the
training step of docs/distributed.md (gradient accumulation, then one optimizer step) gives the
full batch's parameter gradient and loss under DDP and FSDP2, both with a summing reduction and
with the default average undone by scaling the loss by the world size.

The workers are this file run as a script (``python test_distributed_torch.py RANK ...``): two
subprocesses rendezvous through a file store in a temporary folder (no port to race for) and are
killed after ``TIMEOUT`` seconds.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
# tests/ is on pytest's pythonpath, and on sys.path when this file runs as a worker script.
import _distributed_batches as db  # noqa: E402 (after the torch skip)
import sapo_torch  # noqa: E402 (after the torch skip)
import torch.distributed as dist  # noqa: E402 (after the torch skip)
from sapo_torch.distributed import allreduce_sum_hook, global_normalizer  # noqa: E402 (after the torch skip)

WORLD = 2
TIMEOUT = 300  # seconds for both workers; measured 15-26 s on 2 busy cores (load 6-11)
DDP_CONFIGS = [("sapo", "seq-mean-token-mean", False), ("gspo", "token-mean", True)]
# How the step sums gradients over ranks: a sum reduction, or the default average and loss x W.
VARIANTS = ("ddp_sum_hook", "ddp_scale_loss", "fsdp2_sum", "fsdp2_scale_loss")
BATCH_KEYS = ("logp", "old_logp", "advantages", "mask", "features", "old_logp_model")


def _data(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A 14-row batch, rows dealt to two ranks in micro-batches of different sizes and widths."""
    batch = db.ragged_batch(rng, 14, 9, empty_rows=3)
    empty = np.flatnonzero(~batch["mask"].any(axis=1))
    full = rng.permutation(np.flatnonzero(batch["mask"].any(axis=1)))
    micro = {
        # rank 0: a micro-batch of two empty rows, then 3 rows; rank 1: 1 + 4 + 4 rows (one empty)
        "r0m0": empty[:2],
        "r0m1": full[:3],
        "r1m0": full[3:4],
        "r1m1": np.concatenate([full[4:7], empty[2:]]),
        "r1m2": full[7:],
    }
    weights = rng.normal(size=3)
    logp_model, _ = db.model_logp(batch["features"], weights)
    # The DDP model computes logp itself: behaviour log-probs near it keep ratios in range.
    old_model = logp_model + rng.uniform(-0.5, 0.5, size=logp_model.shape)
    return {**batch, **micro, "weights": weights, "old_logp_model": old_model}


def _micro_keys(data, rank: int) -> list[str]:
    return sorted(k for k in data if k.startswith(f"r{rank}m"))


# --- the worker (runs in a subprocess) ---------------------------------------------------------


# The training step docs/distributed.md shows (included from here, so the page shows tested code).
# --8<-- [start:train_step]
def train_step(
    model, optimizer, micro_batches, *, scale_loss=False, count_empty_rows=False, **loss_options
):
    """One exact optimizer step over this rank's micro-batches (clauses 3.8-3.10).

    ``model`` is wrapped in DDP or FSDP2 and either sums gradients over ranks (DDP with
    ``allreduce_sum_hook``, FSDP2 with ``set_gradient_divide_factor(1.0)``) or averages them, the
    default; then ``scale_loss=True`` multiplies each loss by the world size to undo the average.
    """
    # 1. The counts of the whole step (every micro-batch, every rank): one all_reduce, first.
    norm = global_normalizer(
        [mb["mask"] for mb in micro_batches], count_empty_rows=count_empty_rows
    )
    scale = dist.get_world_size() if scale_loss else 1
    optimizer.zero_grad(set_to_none=True)
    step_loss = torch.zeros((), dtype=torch.float64)
    for k, mb in enumerate(micro_batches):
        # 2. Gradients stay local until the last micro-batch; .grad sums the micro-batches.
        with accumulating(model, k < len(micro_batches) - 1):
            logp = model(mb["features"])  # [N_k, T_k] log-probs of the response tokens
            loss, _metrics = sapo_torch.policy_loss(
                logp,
                mb["old_logp"],
                mb["advantages"],
                mb["mask"],
                normalizer=norm,
                **loss_options,
            )
            (loss * scale).backward()  # never divided by the number of micro-batches
        step_loss += loss.detach()
    # 3. The last backward all-reduced the accumulated gradients across ranks: a sum.
    optimizer.step()
    dist.all_reduce(step_loss)  # the step's loss, for logging: also a sum over ranks
    return step_loss


@contextlib.contextmanager
def accumulating(model, active: bool):
    """While ``active``, backward passes keep gradients local: DDP's ``no_sync``, FSDP2's
    ``set_requires_gradient_sync(False)``. The last micro-batch's backward reduces the sum."""
    if not active:
        yield
    elif hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    else:  # FSDP2 (fully_shard)
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)


def pad_micro_batches(micro_batches):
    """FSDP runs collectives in every forward and backward, so every rank must run the same
    number of micro-batches: pad with fully masked copies, which add exactly 0 (clause 3.7)."""
    count = torch.tensor([len(micro_batches)])
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    blank = {k: v[:1].clone() for k, v in micro_batches[0].items()}
    blank["mask"] = torch.zeros_like(blank["mask"])
    return list(micro_batches) + [blank] * (int(count) - len(micro_batches))


# --8<-- [end:train_step]


class Model(torch.nn.Module):
    """The test policy: logp = log sigmoid(x . w), one parameter vector."""

    def __init__(self, weights: np.ndarray):
        super().__init__()
        self.w = torch.nn.Parameter(torch.from_numpy(weights).clone())

    def forward(self, features):
        return torch.nn.functional.logsigmoid(features @ self.w)


def _worker(rank: int, init_file: str, data_file: str, out_dir: str) -> None:
    from datetime import timedelta

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=TIMEOUT),
    )
    data = dict(np.load(data_file))
    micro = [data[k] for k in _micro_keys(data, rank)]
    batch = {k: data[k] for k in BATCH_KEYS}
    shape = data["mask"].shape
    out: dict[str, np.ndarray] = {}

    # 1. Loss and logp-gradient of every config: counts all-reduced, shard results summed.
    for c, (method, loss_agg, count_empty) in enumerate(db.CONFIGS):
        shards = [
            {k: torch.from_numpy(v) for k, v in db.shard(batch, rows).items()} for rows in micro
        ]
        norm = global_normalizer([s["mask"] for s in shards], count_empty_rows=count_empty)
        loss_sum = torch.zeros((), dtype=torch.float64)
        grad = torch.zeros(shape, dtype=torch.float64)
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
            loss_sum += loss.detach()
            grad[torch.from_numpy(rows), : logp.shape[1]] = logp.grad
        dist.all_reduce(loss_sum)
        dist.all_reduce(grad)
        out[f"counts{c}"] = torch.stack([norm.num_tokens, norm.num_rows]).numpy()
        out[f"loss{c}"], out[f"grad{c}"] = loss_sum.numpy(), grad.numpy()

    # 2. The training step with gradient accumulation; SGD with lr 1: w_old - w_new = grad.
    mesh = init_device_mesh("cpu", (WORLD,))
    for c, (method, loss_agg, count_empty) in enumerate(DDP_CONFIGS):
        for variant in VARIANTS:
            if variant.startswith("ddp"):
                model = DDP(Model(data["weights"]))
                if variant == "ddp_sum_hook":
                    model.register_comm_hook(None, allreduce_sum_hook)
            else:
                model = fully_shard(Model(data["weights"]), mesh=mesh)
                if variant == "fsdp2_sum":
                    model.set_gradient_divide_factor(1.0)
            optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
            micro_batches = [
                {k: torch.from_numpy(v) for k, v in db.shard(batch, r).items()} for r in micro
            ]
            for mb in micro_batches:
                mb["old_logp"] = mb.pop("old_logp_model")
            if variant.startswith("fsdp2"):
                micro_batches = pad_micro_batches(micro_batches)
            step_loss = train_step(
                model,
                optimizer,
                micro_batches,
                scale_loss=variant.endswith("scale_loss"),
                count_empty_rows=count_empty,
                **db.options(method, loss_agg),
            )
            w_new = model.module.w if variant.startswith("ddp") else model.w.full_tensor()
            out[f"{variant}{c}"] = data["weights"] - w_new.detach().numpy()
            out[f"{variant}_loss{c}"] = step_loss.numpy()

    np.savez(Path(out_dir) / f"rank{rank}.npz", **out)
    dist.barrier()
    dist.destroy_process_group()


# --- the tests (pytest process) ----------------------------------------------------------------


@pytest.fixture(scope="module")
def gloo_run(tmp_path_factory):
    """Run both workers once; return the data, each rank's results and the wall time."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    tmp = tmp_path_factory.mktemp("gloo")
    data = _data(np.random.default_rng(20251120))
    np.savez(tmp / "data.npz", **data)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if Path("/sys/class/net/lo").exists():  # both ranks are local: keep gloo on the loopback
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                str(rank),
                str(tmp / "store"),
                str(tmp / "data.npz"),
                str(tmp),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(WORLD)
    ]
    logs = []
    try:
        for p in procs:
            remaining = max(1.0, TIMEOUT - (time.perf_counter() - start))
            logs.append(p.communicate(timeout=remaining)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        logs = "\n".join(f"rank {r}:\n{p.communicate()[0]}" for r, p in enumerate(procs))
        pytest.fail(f"gloo workers did not finish within {TIMEOUT} s\n{logs}")
    elapsed = time.perf_counter() - start
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {rank} failed (exit {p.returncode}):\n{log}"
    results = [dict(np.load(tmp / f"rank{rank}.npz")) for rank in range(WORLD)]
    print(f"gloo workers: {elapsed:.1f} s")
    return data, results, elapsed


@pytest.mark.slow
@pytest.mark.torch
@pytest.mark.clause("3.8", "3.9")
@pytest.mark.parametrize(
    "c", range(len(db.CONFIGS)), ids=lambda c: "-".join(map(str, db.CONFIGS[c]))
)
def test_two_ranks_sum_to_the_full_batch(gloo_run, c):
    import sapo_ref

    data, results, _ = gloo_run
    method, loss_agg, count_empty = db.CONFIGS[c]
    full = sapo_ref.policy_loss(
        data["logp"],
        data["old_logp"],
        data["advantages"],
        data["mask"],
        count_empty_rows=count_empty,
        **db.options(method, loss_agg),
    )
    want_counts = sapo_ref.normalizer(data["mask"], count_empty_rows=count_empty)
    for rank, res in enumerate(results):
        assert res[f"counts{c}"].tolist() == [want_counts.num_tokens, want_counts.num_rows]
        db.assert_close(res[f"loss{c}"], full.loss, "float64", "value", f"rank {rank} loss")
        db.assert_close(res[f"grad{c}"], full.grad, "float64", "grad", f"rank {rank} grad")


@pytest.mark.slow
@pytest.mark.torch
@pytest.mark.clause("3.9", "3.10")
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(
    "c", range(len(DDP_CONFIGS)), ids=lambda c: "-".join(map(str, DDP_CONFIGS[c]))
)
def test_training_step_gives_the_full_batch_parameter_gradient(gloo_run, c, variant):
    import sapo_ref

    data, results, _ = gloo_run
    method, loss_agg, count_empty = DDP_CONFIGS[c]
    logp, dlogp_dw = db.model_logp(data["features"], data["weights"])
    full = sapo_ref.policy_loss(
        logp,
        data["old_logp_model"],
        data["advantages"],
        data["mask"],
        count_empty_rows=count_empty,
        **db.options(method, loss_agg),
    )
    want = np.einsum("it,itf->f", full.grad, dlogp_dw)  # chain rule through the model
    for rank, res in enumerate(results):
        db.assert_close(res[f"{variant}{c}"], want, "float64", "grad", f"rank {rank} dL/dw")
        db.assert_close(res[f"{variant}_loss{c}"], full.loss, "float64", "value", "step loss")


@pytest.mark.torch
@pytest.mark.clause("3.6", "3.9")
def test_global_normalizer_without_process_group_counts_all_micro_batches():
    import sapo_ref

    data = _data(np.random.default_rng(7))
    keys = _micro_keys(data, 0) + _micro_keys(data, 1)
    micro = [torch.from_numpy(db.shard({"mask": data["mask"]}, data[k])["mask"]) for k in keys]
    for count_empty in (False, True):
        got = global_normalizer(micro, count_empty_rows=count_empty)
        want = sapo_ref.normalizer(data["mask"], count_empty_rows=count_empty)
        assert got.num_tokens.dtype == torch.float64 and not got.num_tokens.requires_grad
        assert [float(got.num_tokens), float(got.num_rows)] == [want.num_tokens, want.num_rows]


@pytest.mark.torch
def test_global_normalizer_rejects_bad_masks():

    with pytest.raises(ValueError, match="non-empty sequence"):
        global_normalizer([])
    with pytest.raises(TypeError, match=r"mask\[1\] must be a torch.Tensor"):
        global_normalizer([torch.ones(2, 2), np.ones((2, 2))])
    with pytest.raises(RuntimeError, match="not initialised"):
        global_normalizer(torch.ones(2, 2), group=object())


if __name__ == "__main__":
    _worker(int(sys.argv[1]), *sys.argv[2:5])
