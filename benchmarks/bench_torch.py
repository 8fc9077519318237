"""sapo_torch.policy_loss (eager and compiled) vs the eager-autograd formula peers write, on CPU.

Forward + backward wall time and the bytes the autograd graph holds from forward to backward
(saved tensors, inputs excluded), side by side in one run, interleaved so that load from other
processes hits every variant alike; plus the compiled path against the memory-bandwidth floor.
Run (a few minutes, most of it compiling):

    /work/venv/bin/python benchmarks/bench_torch.py
    /work/venv/bin/python benchmarks/bench_torch.py --no-compile --rounds 15     # quick
    /work/venv/bin/python benchmarks/bench_torch.py --shapes 256x8192 --dtypes float32 --metrics

Variants (method sapo, seq-mean-token-mean, per-sequence advantages, ragged bool mask):

- ``baseline``: the straightforward eager formula as TRL-style trainers write it (exp, sigmoid,
  a ``where`` for the temperature, a masked mean by multiplication), differentiated by autograd;
  no exact saturation, no validation.
- ``sapo_torch``: the default call (validation, fused node, no metrics).
- ``sapo_torch+metrics``: with ``metrics=True`` (opt-in; shown with ``--metrics``).
- ``compiled``: ``torch.compile(fullgraph=True)`` of a step calling ``sapo_torch.policy_loss``.

Bandwidth floor: a fused forward + backward must at least read ``logp``, ``old_logp`` and the
mask and write the gradient: ``2 s + 1 + s`` bytes per token (``s`` = bytes of the dtype). The
achievable bandwidth is that of ``torch.add(a, b, out=c)`` on [N, T] tensors of the dtype
(``3 s`` bytes per token); floor time = bytes needed / that bandwidth.

Times are the median of interleaved rounds (wall), with the minimum and the median process CPU
time beside them: on a loaded machine the minimum and the CPU time are the better guides.

Targets (issue 4), at [256, 8192] float32: sapo_torch / baseline time <= 0.5 and saved bytes
<= 0.5; compiled <= 3x the floor.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import sapo_torch
import torch


def baseline_loss(logp, old_logp, adv, mask, tau_pos=1.0, tau_neg=1.05):
    """SAPO as peers write it in eager PyTorch (seq-mean-token-mean)."""
    m = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    a = adv.unsqueeze(-1)
    tau = torch.where(a > 0, tau_pos, tau_neg)
    gate = torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau)
    per_token = -gate * a
    per_row = (per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)
    return per_row.mean()


def make_inputs(rows: int, cols: int, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(rows, cols, generator=g) * 3.0 - 0.1
    logp = old + 0.1 * torch.randn(rows, cols, generator=g)
    lengths = torch.randint(cols // 4, cols + 1, (rows,), generator=g)
    mask = torch.arange(cols)[None, :] < lengths[:, None]
    adv = torch.randn(rows, generator=g)
    return {"logp": logp.to(dtype), "old_logp": old.to(dtype), "adv": adv.to(dtype), "mask": mask}


def step_fn(kind: str) -> Callable[..., torch.Tensor]:
    if kind == "baseline":
        return baseline_loss
    if kind == "sapo_torch+metrics":
        return lambda lp, old, adv, mask: sapo_torch.policy_loss(lp, old, adv, mask, metrics=True)[
            0
        ]

    def fused(lp, old, adv, mask):
        return sapo_torch.policy_loss(lp, old, adv, mask)[0]

    if kind == "compiled":
        return torch.compile(fused, fullgraph=True)
    return fused


def fwd_bwd(fn: Callable, x: dict[str, torch.Tensor], leaf: torch.Tensor) -> None:
    leaf.grad = None
    fn(leaf, x["old_logp"], x["adv"], x["mask"]).backward()


def saved_bytes(fn: Callable, x: dict[str, torch.Tensor], leaf: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd keeps for backward, inputs excluded."""
    inputs = {t.untyped_storage().data_ptr() for t in (leaf, *x.values())}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in inputs:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    leaf.grad = None
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn(leaf, x["old_logp"], x["adv"], x["mask"])
    loss.backward()
    return sum(seen.values())


def add_seconds(x: dict[str, torch.Tensor], rounds: int) -> float:
    a, b = x["logp"], x["old_logp"]
    c = torch.empty_like(a)
    for _ in range(3):
        torch.add(a, b, out=c)
    times = []
    for _ in range(max(rounds, 10)):
        t0 = time.perf_counter()
        torch.add(a, b, out=c)
        times.append(time.perf_counter() - t0)
    return min(times)  # the achievable bandwidth: the best observed


def bench(rows: int, cols: int, dtype_name: str, rounds: int, kinds: list[str]) -> dict[str, Any]:
    dtype = getattr(torch, dtype_name)
    x = make_inputs(rows, cols, dtype)
    leaf = x["logp"].clone().requires_grad_(True)
    fns = {k: step_fn(k) for k in kinds}
    compile_s = {}
    for k, fn in fns.items():  # warm-up (compiles the compiled variant)
        t0 = time.perf_counter()
        fwd_bwd(fn, x, leaf)
        compile_s[k] = time.perf_counter() - t0
        fwd_bwd(fn, x, leaf)
    times: dict[str, list[float]] = {k: [] for k in kinds}
    cpu: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(rounds):  # interleaved rounds: shared-machine load hits every variant
        for k, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fwd_bwd(fn, x, leaf)
            times[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    out: dict[str, Any] = {"shape": [rows, cols], "dtype": dtype_name, "variants": {}}
    for k in kinds:
        out["variants"][k] = {
            "median_ms": 1e3 * statistics.median(times[k]),
            "min_ms": 1e3 * min(times[k]),
            "cpu_median_ms": 1e3 * statistics.median(cpu[k]),
            "saved_bytes": saved_bytes(fns[k], x, leaf),
            "first_call_s": compile_s[k],
        }
    size = dtype.itemsize
    t_add = add_seconds(x, rounds)
    bandwidth = 3 * size * rows * cols / t_add
    floor_s = (3 * size + 1) * rows * cols / bandwidth
    out["bandwidth_GBps"] = bandwidth / 1e9
    out["floor_ms"] = 1e3 * floor_s
    return out


def report(res: dict[str, Any]) -> None:
    rows, cols = res["shape"]
    v = res["variants"]
    base = v.get("baseline")
    print(
        f"\n[{rows}, {cols}] {res['dtype']}   add bandwidth {res['bandwidth_GBps']:.1f} GB/s, "
        f"floor {res['floor_ms']:.3f} ms (read logp, old_logp, mask; write grad)"
    )
    print(
        f"  {'variant':<20}{'median ms':>11}{'min ms':>9}{'cpu ms':>9}{'saved MiB':>11}"
        f"{'time/base':>11}{'min/base':>10}{'cpu/base':>10}{'saved/base':>12}{'min/floor':>11}"
    )
    for k, m in v.items():

        def r(key: str, m: dict = m) -> float:
            return m[key] / base[key] if base and base[key] else float("nan")

        print(
            f"  {k:<20}{m['median_ms']:>11.2f}{m['min_ms']:>9.2f}{m['cpu_median_ms']:>9.2f}"
            f"{m['saved_bytes'] / 2**20:>11.2f}{r('median_ms'):>11.2f}{r('min_ms'):>10.2f}"
            f"{r('cpu_median_ms'):>10.2f}{r('saved_bytes'):>12.2f}{m['min_ms'] / res['floor_ms']:>11.1f}"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="64x8192,256x8192", help="comma-separated NxT")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--rounds", type=int, default=9, help="interleaved timing rounds (median)")
    p.add_argument("--no-compile", action="store_true", help="skip the compiled variant")
    p.add_argument(
        "--metrics", action="store_true", help="also time policy_loss(..., metrics=True)"
    )
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave)")
    p.add_argument("--json", help="write the results to this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    kinds = ["baseline", "sapo_torch"] + (["sapo_torch+metrics"] if args.metrics else [])
    kinds += [] if args.no_compile else ["compiled"]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; "
        f"sapo, seq-mean-token-mean; median of {args.rounds} interleaved rounds"
    )
    results = []
    for shape in args.shapes.split(","):
        rows, cols = (int(s) for s in shape.lower().split("x"))
        for dt in args.dtypes.split(","):
            res = bench(rows, cols, dt, args.rounds, kinds)
            report(res)
            results.append(res)
    target = next(
        (r for r in results if r["shape"] == [256, 8192] and r["dtype"] == "float32"), None
    )
    if target:
        v = target["variants"]
        s, b = v["sapo_torch"], v["baseline"]
        print("\nTargets at [256, 8192] float32 (median wall / min wall / median CPU time):")
        print(
            f"  sapo_torch/baseline time  {s['median_ms'] / b['median_ms']:.2f} / "
            f"{s['min_ms'] / b['min_ms']:.2f} / {s['cpu_median_ms'] / b['cpu_median_ms']:.2f}"
            "  (target <= 0.5)"
        )
        print(
            f"  sapo_torch/baseline saved {s['saved_bytes'] / b['saved_bytes']:.2f}"
            "  (target <= 0.5)"
        )
        if "compiled" in v:
            c, floor = v["compiled"], target["floor_ms"]
            print(
                f"  compiled / floor          {c['median_ms'] / floor:.2f} / {c['min_ms'] / floor:.2f}"
                "  (target <= 3)"
            )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
