"""The canonical loss against TRL-style plain PyTorch, forward and backward, interleaved.

The plainest way a TRL user writes the loss is TRL's own few lines (ratio, clamp or sigmoid,
per-row masked means, autograd). This times them against ``sapo_torch.policy_loss`` with the
settings ``SapoGRPOTrainer`` uses for ``loss_type`` ``sapo`` and ``grpo`` (token level, empty
rows counted), on the same float32 inputs, round by round, and prints median and min of each
and their ratios with the load average. No TRL import needed:

    python benchmarks/bench_trl_plain.py                        # [16, 1024] and [64, 4096]
    python benchmarks/bench_trl_plain.py --shapes 256x8192 --rounds 40
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import sapo_torch
import torch


def _variants(n: int, t: int) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    old = torch.randn(n, t, generator=gen) * 0.1 - 1.0
    adv = torch.randn(n, generator=gen)
    mask = torch.rand(n, t, generator=gen) > 0.1
    valid = mask.float()
    a = adv.unsqueeze(1)

    def masked_mean(per_token: torch.Tensor) -> torch.Tensor:
        return ((per_token * valid).sum(-1) / valid.sum(-1).clamp(min=1.0)).mean()

    def plain_sapo(logp: torch.Tensor) -> torch.Tensor:
        r = torch.exp(logp - old)
        tau = torch.where(a > 0, 1.0, 1.05)
        return masked_mean(-torch.sigmoid(tau * (r - 1)) * 4 / tau * a)

    def plain_grpo(logp: torch.Tensor) -> torch.Tensor:
        r = torch.exp(logp - old)
        return masked_mean(-torch.min(r * a, torch.clamp(r, 0.8, 1.2) * a))

    def ours(method: str) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda logp: sapo_torch.policy_loss(
            logp, old, adv, mask, method=method, count_empty_rows=True
        )[0]

    return {
        "plain sapo": plain_sapo,
        "sapo_torch sapo": ours("sapo"),
        "plain grpo": plain_grpo,
        "sapo_torch grpo": ours("grpo"),
    }, old


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="16x1024,64x4096")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {os.getloadavg()}")
    for shape in args.shapes.split(","):
        n, t = (int(x) for x in shape.split("x"))
        variants, old = _variants(n, t)
        start = old + 0.05 * torch.randn(n, t, generator=torch.Generator().manual_seed(1))
        times: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(args.warmup + args.rounds):
            for name, fn in variants.items():
                logp = start.clone().requires_grad_()
                t0 = time.perf_counter()
                fn(logp).backward()
                times[name].append((time.perf_counter() - t0) * 1e3)
        kept = {k: v[args.warmup :] for k, v in times.items()}
        print(f"[{n}, {t}] float32, load {os.getloadavg()[0]:.2f}")
        for name, v in kept.items():
            print(f"  {name:16s} median {statistics.median(v):8.3f} ms  min {min(v):8.3f} ms")
        for method in ("sapo", "grpo"):
            ours, plain = kept[f"sapo_torch {method}"], kept[f"plain {method}"]
            ratio_med = statistics.median(ours) / statistics.median(plain)
            print(
                f"  {method}: ours / plain  median {ratio_med:.2f}  min {min(ours) / min(plain):.2f}"
            )


if __name__ == "__main__":
    main()
