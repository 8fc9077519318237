"""sapo_mlx.policy_loss (eager and compiled) vs mx.grad of a straightforward MLX formula.

Every variant is timed in the same run, interleaved round by round, on the same inputs
([256, 8192] float32 on the CPU by default), so the ratios mean something on a shared machine;
the load average (``uptime``) is printed with the table. Run:

    .venv/bin/python benchmarks/bench_mlx.py                    # sapo and grpo
    .venv/bin/python benchmarks/bench_mlx.py --all              # every method
    .venv/bin/python benchmarks/bench_mlx.py --rows 64 --cols 2048 --repeats 30

Variants (loss and d loss / d logp, both evaluated with ``mx.eval``):

* ``sapo_mlx eager``: ``mx.value_and_grad(policy_loss)``, the default call: the reference's
  formula on MLX arrays, compiled inside once per configuration, with the clause 8 data checks
  (one flag read back) and the closed-form VJP;
* ``sapo_mlx compiled``: the same under ``mx.compile`` (checks become NaN poisoning);
* ``plain grad``: ``mx.value_and_grad`` of :func:`plain_loss` (exp, sigmoid, clip, min, masked
  mean), as a porter writes it first: no exact saturation, no checks, no metrics;
* ``plain compiled``: the same under ``mx.compile`` (MLX fuses the elementwise chain).

With ``--terms``, two more: ``sapo_mlx eager +terms`` and ``sapo_mlx compiled +terms``, the same
calls with the clause 10 terms ([N, T] weights in [0, 2) and a k3 KL penalty, ``kl_coef=0.1``,
against ``ref_logp = logp + N(0, 0.2)``): what the terms cost.

The headline is ``sapo_mlx eager / plain grad`` (issue 15: no slower than the plain formula);
``sapo_mlx compiled / plain compiled`` is printed too. sapo_mlx's metrics are returned but not
evaluated, so MLX's lazy graph never computes them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable

import mlx.core as mx
import numpy as np
import sapo_mlx

import sapo_ref
from sapo_ref.config import LossConfig


def plain_loss(
    logp: mx.array,
    old_logp: mx.array,
    advantages: mx.array,
    mask: mx.array,
    config: LossConfig,
    denominator: float,
) -> mx.array:
    """The loss of ``config`` as a user writes it first (exp, sigmoid, clip, min, a masked
    mean), differentiated by ``mx.grad``: the baseline. Overflows for large log-ratios; no
    checks, no metrics."""
    valid = mask.astype(mx.bool_)
    delta = mx.where(valid, logp - old_logp, 0.0)
    adv = advantages if advantages.ndim == 2 else advantages[:, None]
    adv = mx.where(valid, adv, 0.0)
    lengths = valid.sum(axis=1, keepdims=True).astype(logp.dtype)
    if config.method_spec.ratio == "token":
        x = mx.exp(delta)
    else:
        s = mx.exp(delta.sum(axis=1, keepdims=True) / mx.maximum(lengths, 1.0))
        if config.method_spec.ratio == "sequence-token":  # GSPO eq. 13-14
            s = mx.stop_gradient(s) * mx.exp(delta - mx.stop_gradient(delta))
        x = s
    if config.is_soft:
        tau = mx.where(adv > 0, config.tau_pos, config.tau_neg)
        term = 4.0 / tau * mx.sigmoid(tau * (x - 1.0)) * adv
    else:
        term = mx.minimum(x * adv, mx.clip(x, 1.0 - config.eps_low, 1.0 + config.eps_high) * adv)
        if config.dual_clip is not None:
            term = mx.where(adv < 0, mx.maximum(term, config.dual_clip * adv), term)
    if config.per_row_mean:
        term = term / mx.maximum(lengths, 1.0)
    return -mx.where(valid, term, 0.0).sum() / denominator


def make_inputs(rows: int, cols: int, seed: int = 0):
    """Ragged float32 batch: ratios near 1 (|delta| ~ 0.1), 1/8 of the rows padded to half."""
    rng = np.random.default_rng(seed)
    old = np.log(rng.uniform(0.05, 1.0, (rows, cols))).astype(np.float32)
    lp = (old + rng.normal(0.0, 0.1, (rows, cols))).astype(np.float32)
    lengths = rng.integers(cols // 2, cols + 1, rows)
    mask = np.arange(cols)[None, :] < lengths[:, None]
    adv = rng.normal(size=rows).astype(np.float32)
    return [mx.array(a) for a in (lp, old, adv, mask)], mask


def variants(method: str, inputs, mask_np, terms: bool = False) -> dict[str, Callable[[], object]]:
    lp, old, adv, mask = inputs
    config = sapo_ref.resolve_config(method)
    den = float(sapo_ref.denominator(sapo_ref.normalizer(mask_np), config.loss_agg))

    def ours(x):
        return sapo_mlx.policy_loss(x, old, adv, mask, method=method)[0]

    def plain(x):
        return plain_loss(x, old, adv, mask, config, den)

    fns = {
        "sapo_mlx eager": mx.value_and_grad(ours),
        "plain grad": mx.value_and_grad(plain),
        "sapo_mlx compiled": mx.compile(mx.value_and_grad(ours)),
        "plain compiled": mx.compile(mx.value_and_grad(plain)),
    }
    if terms:
        rng = np.random.default_rng(1)
        w = mx.array(rng.uniform(0.0, 2.0, lp.shape).astype(np.float32))
        ref = lp + mx.array(rng.normal(0.0, 0.2, lp.shape).astype(np.float32))

        def ours_terms(x):
            kw = {"weights": w, "ref_logp": ref, "kl_coef": 0.1}
            return sapo_mlx.policy_loss(x, old, adv, mask, method=method, **kw)[0]

        fns["sapo_mlx eager +terms"] = mx.value_and_grad(ours_terms)
        fns["sapo_mlx compiled +terms"] = mx.compile(mx.value_and_grad(ours_terms))
    return {name: (lambda f=f: mx.eval(f(lp))) for name, f in fns.items()}


def time_interleaved(
    fns: dict[str, Callable[[], object]], repeats: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall-clock and process CPU times of every variant, interleaved round by round.

    The CPU time (all of this process's threads) is less disturbed than the wall clock by other
    processes on a shared machine; both are reported.
    """
    for f in fns.values():  # compile and warm up
        f()
        f()
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, f in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            f()
            cpu[name].append(time.process_time() - c0)
            wall[name].append(time.perf_counter() - t0)
    return wall, cpu


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
    ap.add_argument(
        "--method",
        action="append",
        choices=sapo_ref.METHOD_NAMES,
        help="a method to time (repeatable; default: sapo and grpo)",
    )
    ap.add_argument("--all", action="store_true", help="every method")
    ap.add_argument("--json", help="write the results to this file")
    ap.add_argument("--terms", action="store_true", help="add the clause 10 variants")
    args = ap.parse_args()
    mx.set_default_device(mx.cpu)
    inputs, mask_np = make_inputs(args.rows, args.cols)
    methods = sapo_ref.METHOD_NAMES if args.all else tuple(args.method or ("sapo", "grpo"))
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs")
    print(
        f"MLX {mx.__version__}, device {mx.default_device()}, [{args.rows}, {args.cols}] float32, "
        f"{args.repeats} interleaved rounds, times in ms"
    )
    results = {}
    for method in methods:
        fns = variants(method, inputs, mask_np, args.terms)
        wall, cpu = time_interleaved(fns, args.repeats)
        res = {}
        for clock, times in (("wall", wall), ("cpu", cpu)):
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            low = {k: min(v) * 1e3 for k, v in times.items()}
            res[clock] = {
                "median_ms": med,
                "min_ms": low,
                "eager_vs_plain_grad": med["sapo_mlx eager"] / med["plain grad"],
                "eager_vs_plain_grad_min": low["sapo_mlx eager"] / low["plain grad"],
                "compiled_vs_plain_compiled": med["sapo_mlx compiled"] / med["plain compiled"],
            }
        res["grad_rel_diff"] = check_agreement(method, inputs, mask_np)
        print(f"\n{method}{'':14s}  wall median / min    cpu median / min")
        for k in wall:
            w, c = res["wall"], res["cpu"]
            print(
                f"  {k:26s} {w['median_ms'][k]:8.1f} / {w['min_ms'][k]:7.1f}"
                f"  {c['median_ms'][k]:8.1f} / {c['min_ms'][k]:7.1f}"
            )
        for label, key in (
            ("sapo_mlx eager / plain grad (median)", "eager_vs_plain_grad"),
            ("sapo_mlx eager / plain grad (min)", "eager_vs_plain_grad_min"),
            ("sapo_mlx compiled / plain compiled (median)", "compiled_vs_plain_compiled"),
        ):
            print(f"  {label:44s} wall {res['wall'][key]:.2f}  cpu {res['cpu'][key]:.2f}")
        print(f"  max relative gradient difference vs plain = {res['grad_rel_diff']:.1e}")
        results[method] = res
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {
                    "mlx": mx.__version__,
                    "load": load,
                    "shape": [args.rows, args.cols],
                    "results": results,
                },
                fh,
                indent=2,
            )


if __name__ == "__main__":
    main()
