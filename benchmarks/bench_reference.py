"""Time and peak memory of the NumPy reference, sapo_ref.policy_loss, at [256, 8192] float64.

For every method (default aggregation, seq-mean-token-mean) three things are timed in the same
run, interleaved, on the same inputs, so the ratios mean something on a shared machine:

* ``policy_loss``: the whole reference call (validation, data checks, loss, closed-form
  gradient, metrics);
* ``evaluate``: only the loss and gradient (``sapo_ref.evaluate`` on prepared float64 arrays);
* ``plain``: the straightforward NumPy formula of loss and gradient a porter writes first (no
  exact saturation, no checks, no metrics): the floor the reference is compared with.

Peak memory is measured separately with tracemalloc (NumPy reports its buffers to it) and given
in MiB and in units of one [N, T] float64 array. Run:

    /work/venv/bin/python benchmarks/bench_reference.py
    /work/venv/bin/python benchmarks/bench_reference.py --rows 64 --cols 2048 --repeats 20
"""

from __future__ import annotations

import argparse
import statistics
import time
import tracemalloc
from collections.abc import Callable

import numpy as np

import sapo_ref


def make_inputs(rows: int, cols: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    old = -np.abs(rng.normal(size=(rows, cols))) - 0.1
    logp = old + 0.05 * rng.normal(size=(rows, cols))
    lengths = rng.integers(cols // 4, cols + 1, size=rows)  # ragged right padding
    mask = np.arange(cols)[None, :] < lengths[:, None]
    adv = rng.normal(size=rows)
    return logp, old, adv, mask


def plain(method: str, logp, old, adv, mask, tau_pos=1.0, tau_neg=1.05, eps=(0.2, 0.2)):
    """Loss and d loss / d logp, seq-mean-token-mean, straight from the formulas."""
    lengths = mask.sum(axis=1)
    safe = np.maximum(lengths, 1)
    rows = max(int((lengths > 0).sum()), 1)
    a = np.broadcast_to(adv[:, None], logp.shape)
    delta = np.where(mask, logp - old, 0.0)
    c = np.where(mask, 1.0 / (safe[:, None] * rows), 0.0)
    if method in ("sapo-seq", "gspo", "gspo-token"):
        x = np.broadcast_to(np.exp(delta.sum(axis=1) / safe)[:, None], logp.shape)
    else:
        x = np.exp(delta)
    if method.startswith("sapo"):
        tau = np.where(a > 0, tau_pos, tau_neg)
        p = 1.0 / (1.0 + np.exp(-tau * (x - 1.0)))
        term, dlog = 4.0 / tau * p * a, 4.0 * p * (1.0 - p) * x * a
    else:
        lo, hi = (1 - eps[0], 1 + eps[1]) if method == "grpo" else (1 - 3e-4, 1 + 4e-4)
        term = np.minimum(x * a, np.clip(x, lo, hi) * a)
        active = np.where(a > 0, x <= hi, x >= lo) & (a != 0)
        dlog = np.where(active, x * a, 0.0)
    loss = -np.sum(c * term)
    coef = c * dlog
    if method in ("sapo-seq", "gspo"):
        grad = np.where(mask, -(coef.sum(axis=1) / safe)[:, None], 0.0)
    else:
        grad = np.where(mask, -coef, 0.0)
    return loss, grad


def candidates(method: str, logp, old, adv, mask) -> dict[str, Callable[[], object]]:
    config = sapo_ref.resolve_config(method)
    norm = sapo_ref.normalizer(mask)
    return {
        "policy_loss": lambda: sapo_ref.policy_loss(logp, old, adv, mask, method=method),
        "evaluate": lambda: sapo_ref.evaluate(logp, old, adv, mask, config, norm),
        "plain": lambda: plain(method, logp, old, adv, mask),
    }


def peak_mib(fn: Callable[[], object]) -> float:
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return (peak - base) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--cols", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--methods", nargs="*", default=list(sapo_ref.METHOD_NAMES))
    args = parser.parse_args()

    logp, old, adv, mask = make_inputs(args.rows, args.cols)
    unit = logp.nbytes / 2**20
    tokens = int(mask.sum())
    print(
        f"sapo_ref {sapo_ref.__version__}, numpy {np.__version__}; [{args.rows}, {args.cols}] "
        f"float64, {int(mask.sum())} valid tokens; one [N, T] float64 array = {unit:.1f} MiB; "
        f"median of {args.repeats} (after 1 warm-up)"
    )
    for method in args.methods:  # sanity: the plain formula computes the same numbers
        ref = sapo_ref.policy_loss(logp, old, adv, mask, method=method)
        loss, grad = plain(method, logp, old, adv, mask)
        assert np.isclose(loss, ref.loss, rtol=1e-9) and np.allclose(
            grad, ref.grad, rtol=1e-9, atol=1e-15
        ), method

    header = (
        f"{'method':<11} {'candidate':<12} {'median ms':>10} {'min ms':>8} {'Mtok/s':>7} "
        f"{'x plain':>8} {'peak MiB':>9} {'x [N,T]':>8}"
    )
    print(header)
    print("-" * len(header))
    for method in args.methods:
        fns = candidates(method, logp, old, adv, mask)
        times: dict[str, list[float]] = {k: [] for k in fns}
        for fn in fns.values():
            fn()  # warm-up
        for _ in range(args.repeats):
            for name, fn in fns.items():  # interleaved: load changes hit every candidate alike
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        base = statistics.median(times["plain"])
        for name, fn in fns.items():
            med = statistics.median(times[name])
            peak = peak_mib(fn)
            print(
                f"{method:<11} {name:<12} {med * 1e3:>10.1f} {min(times[name]) * 1e3:>8.1f} "
                f"{tokens / med / 1e6:>7.1f} {med / base:>8.2f} {peak:>9.1f} {peak / unit:>8.1f}"
            )


if __name__ == "__main__":
    main()
