"""What the spec's metrics cost ``SapoGRPOTrainer``, relative to the loss itself.

For each TRL loss type (mapped by ``canonical_options``), on the same float32 inputs, interleaved:

- loss: ``sapo_torch.policy_loss(..., metrics=False)``, forward and backward;
- loss + metrics: ``metrics=True`` (computed in the same pass) plus what the trainer does with
  them per micro-batch: ``reduce_metrics`` (one stacked tensor through the all-gather, here a
  single process, then ``sapo_ref.combine_metrics`` on host floats).

Prints the median and minimum of each side and the extra cost of the metrics as a fraction of
the loss's time (of the medians, and of the minima, steadier on a loaded machine), with the load
average. Run (TRL installed, e.g. the peers venv):

    .venv-peers/bin/python benchmarks/bench_trl_metrics.py                  # 16 x 1024
    .venv-peers/bin/python benchmarks/bench_trl_metrics.py --rows 64 --cols 4096 --repeats 30
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import sapo_torch
import torch
from sapo_torch.integrations.trl import canonical_options, reduce_metrics
from trl import GRPOConfig

import sapo_ref

LOSS_TYPES = ("sapo", "grpo", "bnpo", "dr_grpo", "dapo", "luspo")


def _inputs(rows: int, cols: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(rows, cols, generator=g) * 3
    old = logp + 0.1 * torch.randn(rows, cols, generator=g)
    adv = torch.randn(rows, generator=g)
    lengths = torch.randint(cols // 4, cols + 1, (rows,), generator=g)
    mask = torch.arange(cols)[None, :] < lengths[:, None]
    return logp, old, adv, mask


def _step(inputs: tuple[torch.Tensor, ...], options: dict, metrics: bool) -> tuple[float, float]:
    """(loss and backward, then the reduction of the metrics) in seconds."""
    logp, old, adv, mask = inputs
    x = logp.clone().requires_grad_()
    start = time.perf_counter()
    loss, values = sapo_torch.policy_loss(x, old, adv, mask, metrics=metrics, **options)
    loss.backward()
    middle = time.perf_counter()
    if metrics:
        reduce_metrics(values, lambda t: t)  # one process: the gather is the identity
    return middle - start, time.perf_counter() - middle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--cols", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--level", choices=["token", "sequence"], default="token")
    args = parser.parse_args()
    torch.set_num_threads(1)
    inputs = _inputs(args.rows, args.cols)
    print(f"[{args.rows}, {args.cols}] float32, level {args.level}, load {os.getloadavg()[0]:.2f}")
    for loss_type in LOSS_TYPES:
        config = GRPOConfig(
            "bench",
            loss_type=loss_type,
            importance_sampling_level=args.level,
            max_completion_length=args.cols,
            use_cpu=True,
            bf16=False,
            report_to="none",
        )
        opts = canonical_options(config)
        options = dict(method=opts.method, loss_agg=opts.loss_agg, **opts.options)
        if opts.global_tokens:  # dapo: a generation batch of 4 micro-batches like this one
            n = float(inputs[3].sum()) * 4
            options["normalizer"] = sapo_ref.Normalizer(n, 4.0 * args.rows)
        plain, full, reduce = [], [], []
        for _ in range(3):  # warm-up
            _step(inputs, options, False), _step(inputs, options, True)
        for _ in range(args.repeats):
            plain.append(_step(inputs, options, False)[0])
            t_pass, t_reduce = _step(inputs, options, True)
            full.append(t_pass + t_reduce)
            reduce.append(t_reduce)
        p, f, r = statistics.median(plain), statistics.median(full), statistics.median(reduce)
        print(
            f"{loss_type:8s} {opts.method:5s} loss {p * 1e3:6.3f} ms (min {min(plain) * 1e3:.3f})"
            f"  loss+metrics {f * 1e3:6.3f} ms (min {min(full) * 1e3:.3f},"
            f" reduction {r * 1e3:.3f})  metrics {100 * (f - p) / p:+5.0f}% of the loss"
            f" (mins: {100 * (min(full) - min(plain)) / min(plain):+4.0f}%)"
        )
    print(f"load at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
