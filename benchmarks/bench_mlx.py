"""Compiled value_and_grad of sapo_mlx.policy_loss vs mx.grad of a straightforward MLX formula.

Every variant is timed in the same run, interleaved round by round, on the same inputs
([256, 8192] float32 on the CPU by default), so the ratios mean something on a shared machine.
Run:

    /work/venv/bin/python benchmarks/bench_mlx.py               # sapo, seq-mean-token-mean
    /work/venv/bin/python benchmarks/bench_mlx.py --all         # every method
    /work/venv/bin/python benchmarks/bench_mlx.py --rows 64 --cols 2048 --repeats 30

Variants (loss and d loss / d logp, both evaluated with ``mx.eval``):

* ``sapo_mlx compiled``: ``mx.compile(mx.value_and_grad(policy_loss))``, the closed-form VJP;
* ``sapo_mlx eager``: the same without an outer ``mx.compile`` (the default call; the loss
  kernel inside is compiled once per configuration);
* ``plain grad``: ``mx.value_and_grad`` of the straightforward formula
  (:func:`sapo_mlx.plain.plain_loss`: exp, sigmoid, clip, min, masked mean), as a porter
  writes it first; no exact saturation, no metrics;
* ``plain compiled``: the same under ``mx.compile`` (MLX fuses the elementwise chain).

The headline is ``sapo_mlx compiled / plain grad`` (the issue's comparison); the
compiled-vs-compiled ratio is printed too. sapo_mlx's metrics are returned but not evaluated,
so MLX's lazy graph never computes them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import mlx.core as mx
import numpy as np
import sapo_mlx
from sapo_mlx.plain import plain_loss

import sapo_ref


def make_inputs(rows: int, cols: int, seed: int = 0):
    """Ragged float32 batch: ratios near 1 (|delta| ~ 0.1), 1/8 of the rows padded to half."""
    rng = np.random.default_rng(seed)
    old = np.log(rng.uniform(0.05, 1.0, (rows, cols))).astype(np.float32)
    lp = (old + rng.normal(0.0, 0.1, (rows, cols))).astype(np.float32)
    lengths = rng.integers(cols // 2, cols + 1, rows)
    mask = np.arange(cols)[None, :] < lengths[:, None]
    adv = rng.normal(size=rows).astype(np.float32)
    return [mx.array(a) for a in (lp, old, adv, mask)], mask


def variants(method: str, inputs, mask_np) -> dict[str, Callable[[], object]]:
    lp, old, adv, mask = inputs
    config = sapo_ref.resolve_config(method)
    den = float(sapo_ref.denominator(sapo_ref.normalizer(mask_np), config.loss_agg))

    def ours(x):
        return sapo_mlx.policy_loss(x, old, adv, mask, method=method)[0]

    def plain(x):
        return plain_loss(x, old, adv, mask, config, den)

    fns = {
        "sapo_mlx compiled": mx.compile(mx.value_and_grad(ours)),
        "sapo_mlx eager": mx.value_and_grad(ours),
        "plain grad": mx.value_and_grad(plain),
        "plain compiled": mx.compile(mx.value_and_grad(plain)),
    }
    return {name: (lambda f=f: mx.eval(f(lp))) for name, f in fns.items()}


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    for f in fns.values():  # compile and warm up
        f()
        f()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    return times


def check_agreement(method: str, inputs, mask_np) -> float:
    """Max relative gradient difference between sapo_mlx and the plain formula (sanity)."""
    lp, old, adv, mask = inputs
    config = sapo_ref.resolve_config(method)
    den = float(sapo_ref.denominator(sapo_ref.normalizer(mask_np), config.loss_agg))
    g1 = mx.grad(lambda x: sapo_mlx.policy_loss(x, old, adv, mask, method=method)[0])(lp)
    g2 = mx.grad(lambda x: plain_loss(x, old, adv, mask, config, den))(lp)
    a, b = np.array(g1), np.array(g2)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--cols", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--method", default="sapo", choices=sapo_ref.METHOD_NAMES)
    ap.add_argument("--all", action="store_true", help="every method")
    ap.add_argument("--json", help="write the results to this file")
    args = ap.parse_args()
    mx.set_default_device(mx.cpu)
    inputs, mask_np = make_inputs(args.rows, args.cols)
    methods = sapo_ref.METHOD_NAMES if args.all else (args.method,)
    print(f"MLX {mx.__version__}, device {mx.default_device()}, [{args.rows}, {args.cols}] float32, "
          f"{args.repeats} interleaved rounds, times in ms (median / min)")
    results = {}
    for method in methods:
        times = time_interleaved(variants(method, inputs, mask_np), args.repeats)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        low = {k: min(v) * 1e3 for k, v in times.items()}
        ratio = med["sapo_mlx compiled"] / med["plain grad"]
        ratio_cc = med["sapo_mlx compiled"] / med["plain compiled"]
        agree = check_agreement(method, inputs, mask_np)
        print(f"\n{method}")
        for k in times:
            print(f"  {k:18s} {med[k]:8.2f} / {low[k]:8.2f}")
        print(f"  ratio sapo_mlx compiled / plain grad     = {ratio:.2f}")
        print(f"  ratio sapo_mlx compiled / plain compiled = {ratio_cc:.2f}")
        print(f"  max relative gradient difference vs plain = {agree:.1e}")
        results[method] = {"median_ms": med, "min_ms": low, "ratio_vs_plain_grad": ratio,
                           "ratio_vs_plain_compiled": ratio_cc, "grad_rel_diff": agree}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"mlx": mx.__version__, "shape": [args.rows, args.cols], "results": results}, fh, indent=2)


if __name__ == "__main__":
    main()
