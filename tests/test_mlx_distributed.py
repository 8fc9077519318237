"""sapo_mlx under mx.distributed: 2 processes (ring backend on localhost, launched with
mlx.launch), each holding a different shard of rows as 2 micro-batches with ragged masks and
empty rows. With global_normalizer, the sum over ranks and micro-batches of the losses, and the
gradients, equal the reference's on the full batch (clauses 3.8, 3.9), in float64."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mlx.core")

import sapo_ref
from sapo_ref import spec

pytestmark = [pytest.mark.slow, pytest.mark.mlx]

WORKER = textwrap.dedent(
    """
    import json, sys
    import numpy as np, mlx.core as mx
    import sapo_mlx
    from sapo_mlx.distributed import global_normalizer

    group = mx.distributed.init(backend="ring")
    data = np.load(sys.argv[1])
    options = json.loads(sys.argv[2])
    rank, size = group.rank(), group.size()
    rows = np.array_split(np.arange(data["mask"].shape[0]), size)[rank]
    micro = np.array_split(rows, 2)
    # Each micro-batch padded to its own longest row, as trainers do.
    def shard(idx):
        width = max(1, int(np.max(np.nonzero(data["mask"][idx])[1], initial=-1)) + 1)
        return [sapo_mlx.to_mx(data[k][idx][:, :width]) for k in ("logp", "old_logp")] + [
            sapo_mlx.to_mx(data["advantages"][idx]), mx.array(data["mask"][idx][:, :width])]
    shards = [shard(idx) for idx in micro]
    norm = global_normalizer([s[3] for s in shards], count_empty_rows=options.pop("count_empty_rows"))
    total, grads = 0.0, {}
    for idx, (lp, old, adv, mask) in zip(micro, shards):
        f = lambda x: sapo_mlx.policy_loss(x, old, adv, mask, normalizer=norm, **options)[0]
        loss, g = mx.value_and_grad(f)(lp)
        total += loss.item()
        for i, row in zip(idx, np.array(g)):
            grads[int(i)] = row.tolist()
    out = {"rank": rank, "size": size, "loss": total, "grads": grads,
           "norm": [norm.num_tokens.item(), norm.num_rows.item()]}
    with open(f"{sys.argv[3]}/rank{rank}.json", "w") as fh:
        json.dump(out, fh)
    """
)


def _free_port_pair() -> int:
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            try:
                with socket.socket() as b:
                    b.bind(("127.0.0.1", port + 1))
                    return port
            except OSError:
                continue
    raise RuntimeError("no two consecutive free ports")  # pragma: no cover


def _launcher() -> str | None:
    sibling = Path(sys.executable).with_name("mlx.launch")
    return str(sibling) if sibling.exists() else shutil.which("mlx.launch")


@pytest.mark.clause("3.8", "3.9")
@pytest.mark.parametrize("count_empty_rows", [False, True])
@pytest.mark.parametrize(
    "method,loss_agg",
    [("sapo", "seq-mean-token-mean"), ("gspo", "token-mean"), ("grpo", "seq-mean-token-sum-norm")],
)
def test_two_ranks_sum_to_the_full_batch(tmp_path, method, loss_agg, count_empty_rows):
    launcher = _launcher()
    if launcher is None:
        pytest.skip("mlx.launch is not installed")
    rng = np.random.default_rng(3)
    n, t = 9, 11
    old = np.log(rng.uniform(0.05, 1.0, (n, t)))
    lp = old + rng.normal(0, 0.3, (n, t))
    lengths = rng.integers(0, t + 1, n)
    lengths[[2, 6]] = 0  # empty rows on both ranks
    mask = np.arange(t)[None, :] < lengths[:, None]
    adv = rng.normal(size=n)
    np.savez(tmp_path / "batch.npz", logp=lp, old_logp=old, advantages=adv, mask=mask)
    (tmp_path / "worker.py").write_text(WORKER)
    options = {"method": method, "loss_agg": loss_agg, "count_empty_rows": count_empty_rows}
    if loss_agg == "seq-mean-token-sum-norm":
        options["norm_length"] = 16.0
    subprocess.run(
        [
            launcher,
            "-n",
            "2",
            "--backend",
            "ring",
            "--starting-port",
            str(_free_port_pair()),
            "--python",
            sys.executable,
            str(tmp_path / "worker.py"),
            str(tmp_path / "batch.npz"),
            json.dumps(options),
            str(tmp_path),
        ],
        check=True,
        timeout=120,
        capture_output=True,
    )
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    ref = sapo_ref.policy_loss(lp, old, adv, mask, **options)
    want_norm = sapo_ref.normalizer(mask, count_empty_rows=count_empty_rows)
    tol = spec.TOLERANCES["float64"]
    for r in ranks:
        assert r["size"] == 2
        assert r["norm"] == [want_norm.num_tokens, want_norm.num_rows]
    loss = sum(r["loss"] for r in ranks)
    assert abs(loss - ref.loss) <= tol["value"].atol * max(1.0, abs(ref.loss)) + tol[
        "value"
    ].rtol * abs(ref.loss)
    grad = np.zeros((n, t))
    for r in ranks:
        for i, row in r["grads"].items():
            grad[int(i), : len(row)] = row
    scale = max(1.0, np.max(np.abs(ref.grad)))
    assert np.all(
        np.abs(grad - ref.grad) <= tol["grad"].atol * scale + tol["grad"].rtol * np.abs(ref.grad)
    )
