"""sapo_torch.policy_loss (eager, with metrics, compiled) vs the plain autograd formula, on CPU.

Forward + backward wall time and the bytes the autograd graph holds from forward to backward
(saved tensors, inputs excluded), side by side in one run, interleaved round by round so that
load from other processes hits every variant alike; the machine's load average (``uptime``) is
printed before and after. Run (a few minutes, most of it compiling):

    python benchmarks/bench_torch.py                                  # the targets below
    python benchmarks/bench_torch.py --no-compile --rounds 31 --threads 1   # quick, loaded machine
    python benchmarks/bench_torch.py --shapes 256x8192 --dtypes float32,bfloat16
    python benchmarks/bench_torch.py --shapes 256x8192 --no-compile --terms   # clause 10 terms

Variants (method sapo, seq-mean-token-mean, per-sequence advantages, ragged bool mask):

- ``plain``: the loss as a user writes it in eager PyTorch (exp, sigmoid, a ``where`` for the
  temperature, a masked mean by multiplication), differentiated by autograd; no exact
  saturation, no validation, no metrics.
- ``sapo_torch``: the default call (validation, one autograd node, no metrics).
- ``+metrics``: ``metrics=True`` (every clause 7.1 metric, computed in the same pass).
- ``compiled``: ``torch.compile(fullgraph=True)`` of a step calling ``sapo_torch.policy_loss``.
- ``plain compiled``: ``torch.compile`` of the plain formula: what Inductor makes of the same
  math without exact saturation or checks, the yardstick for what bounds ``compiled``.

With ``--terms`` (clause 10: [N, T] float weights and a k3 KL penalty, beta = 0.1, ``ref_logp``
not requiring grad, as in training):

- ``plain+terms``: the plain formula with the weights and ``exp(u) - 1 - u`` added, by autograd;
- ``+terms``: ``sapo_torch`` with the terms (the fused pass: weights folded into its per-token
  coefficient, the KL part from ``sapo_ref.kl_penalty``);
- ``+weights``, ``+terms k1``: the weights alone, and the terms with the k1 estimator (what the
  terms cost apart from ``kl_penalty``'s k3);
- ``+terms+metrics``: the same with ``metrics=True`` (``kl_ref/mean`` and ``weights/mean`` too);
- ``+terms generic``: the same call routed through ``sapo_ref.evaluate`` on tensors (the
  generic path every other method takes): the alternative the fused pass was chosen over.

Bandwidth floor: a fused forward + backward must at least read ``logp``, ``old_logp`` and the
mask and write the gradient: ``3 s + 1`` bytes per token (``s`` = bytes of the dtype), at the
bandwidth of ``torch.add(a, b, out=c)`` on [N, T] tensors of the dtype (its best time).

Targets (issue 15) at [256, 8192] float32: sapo_torch / plain time <= 0.5 (median and min) and
saved bytes <= 0.5; +metrics / sapo_torch <= 1.5; compiled <= 3x the floor (or what bounds it);
at [64, 512], sapo_torch / plain <= 1.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import sapo_torch
import torch
from sapo_torch import _kernels


def plain_loss(logp, old_logp, adv, mask, tau_pos=1.0, tau_neg=1.05):
    """SAPO as a user writes it in eager PyTorch (seq-mean-token-mean)."""
    m = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    a = adv.unsqueeze(-1)
    tau = torch.where(a > 0, tau_pos, tau_neg)
    gate = torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau)
    per_token = -gate * a
    per_row = (per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)
    return per_row.mean()


def plain_loss_terms(logp, old_logp, adv, mask, weights, ref_logp, beta=0.1):
    """SAPO with per-token weights and a k3 KL penalty, as a user writes it (seq-mean-token-mean)."""
    m = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    a = adv.unsqueeze(-1)
    tau = torch.where(a > 0, 1.0, 1.05)
    gate = torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau)
    u = ref_logp - logp
    per_token = -gate * a * weights + beta * (torch.exp(u) - 1.0 - u)
    per_row = (per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)
    return per_row.mean()


def make_inputs(rows: int, cols: int, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(rows, cols, generator=g) * 3.0 - 0.1
    logp = old + 0.1 * torch.randn(rows, cols, generator=g)
    lengths = torch.randint(cols // 4, cols + 1, (rows,), generator=g)
    mask = torch.arange(cols)[None, :] < lengths[:, None]
    adv = torch.randn(rows, generator=g)
    weights = torch.rand(rows, cols, generator=g) * 2.0  # e.g. truncated IS ratios
    ref = logp + 0.2 * torch.randn(rows, cols, generator=g)
    out = {"logp": logp, "old_logp": old, "adv": adv, "weights": weights, "ref_logp": ref}
    return {**{k: v.to(dtype) for k, v in out.items()}, "mask": mask}


#: The clause 10 options of the ``--terms`` variants.
TERMS = {"kl_coef": 0.1, "kl_estimator": "k3"}


def step_fn(kind: str, x: dict[str, torch.Tensor]) -> Callable[..., torch.Tensor]:
    if kind == "plain":
        return plain_loss
    if kind == "plain compiled":
        return torch.compile(plain_loss, fullgraph=True)
    if kind == "plain+terms":
        return lambda lp, old, adv, mask: plain_loss_terms(
            lp, old, adv, mask, x["weights"], x["ref_logp"]
        )
    if kind == "+metrics":
        return lambda lp, old, adv, mask: sapo_torch.policy_loss(lp, old, adv, mask, metrics=True)[
            0
        ]
    if kind == "+weights":
        return lambda lp, old, adv, mask: sapo_torch.policy_loss(
            lp, old, adv, mask, weights=x["weights"]
        )[0]
    if kind.startswith("+terms"):
        metrics = kind == "+terms+metrics"
        terms = {"weights": x["weights"], "ref_logp": x["ref_logp"], **TERMS}
        if kind == "+terms k1":
            terms["kl_estimator"] = "k1"

        def with_terms(lp, old, adv, mask):
            return sapo_torch.policy_loss(lp, old, adv, mask, **terms, metrics=metrics)[0]

        if kind != "+terms generic":
            return with_terms

        def generic(lp, old, adv, mask):
            # the same call through sapo_ref.evaluate on tensors (every other method's path)
            fused = _kernels.sapo_token_pass
            _kernels.sapo_token_pass = _kernels.generic_pass
            try:
                return with_terms(lp, old, adv, mask)
            finally:
                _kernels.sapo_token_pass = fused

        return generic

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
    fns = {k: step_fn(k, x) for k in kinds}
    compile_s = {}
    for k, fn in fns.items():  # warm-up (compiles the compiled variants)
        t0 = time.perf_counter()
        fwd_bwd(fn, x, leaf)
        compile_s[k] = time.perf_counter() - t0
        fwd_bwd(fn, x, leaf)
    # Calls per sample: at least ~5 ms of work, so that small shapes are not timer noise.
    t0 = time.perf_counter()
    fwd_bwd(fns["plain"], x, leaf)
    reps = max(1, int(5e-3 / max(time.perf_counter() - t0, 1e-6)))
    times: dict[str, list[float]] = {k: [] for k in kinds}
    cpu: dict[str, list[float]] = {k: [] for k in kinds}
    for i in range(rounds):  # interleaved, order rotated: load hits every variant alike
        for k in kinds[i % len(kinds) :] + kinds[: i % len(kinds)]:
            fn = fns[k]
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(reps):
                fwd_bwd(fn, x, leaf)
            times[k].append((time.perf_counter() - t0) / reps)
            cpu[k].append((time.process_time() - c0) / reps)
    out: dict[str, Any] = {"shape": [rows, cols], "dtype": dtype_name, "calls_per_sample": reps}
    out["variants"] = {}
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
    base = v["plain"]
    print(
        f"\n[{rows}, {cols}] {res['dtype']}   add bandwidth {res['bandwidth_GBps']:.1f} GB/s, "
        f"floor {res['floor_ms']:.3f} ms (read logp, old_logp, mask; write grad)"
    )
    print(
        f"  {'variant':<16}{'median ms':>11}{'min ms':>9}{'cpu ms':>9}{'saved MiB':>11}"
        f"{'med/plain':>11}{'min/plain':>10}{'cpu/plain':>10}{'saved/plain':>12}{'min/floor':>11}"
    )
    for k, m in v.items():

        def r(key: str, m: dict = m) -> float:
            return m[key] / base[key] if base[key] else float("nan")

        print(
            f"  {k:<16}{m['median_ms']:>11.3f}{m['min_ms']:>9.3f}{m['cpu_median_ms']:>9.3f}"
            f"{m['saved_bytes'] / 2**20:>11.2f}{r('median_ms'):>11.2f}{r('min_ms'):>10.2f}"
            f"{r('cpu_median_ms'):>10.2f}{r('saved_bytes'):>12.2f}"
            f"{m['min_ms'] / res['floor_ms']:>11.1f}"
        )


def _ratios(a: dict[str, float], b: dict[str, float]) -> str:
    return " / ".join(f"{a[k] / b[k]:.2f}" for k in ("median_ms", "min_ms", "cpu_median_ms"))


def targets(results: list[dict[str, Any]]) -> None:
    """The issue 15 targets, as ratios (median wall / min wall / median CPU time)."""
    by = {(tuple(r["shape"]), r["dtype"]): r for r in results}
    big, small = by.get(((256, 8192), "float32")), by.get(((64, 512), "float32"))
    print("\nTargets (median wall / min wall / median CPU):")
    if big:
        v = big["variants"]
        s, p = v["sapo_torch"], v["plain"]
        print(f"  [256, 8192] sapo_torch / plain        {_ratios(s, p)}   (target <= 0.5)")
        print(
            f"  [256, 8192] saved bytes / plain       {s['saved_bytes'] / p['saved_bytes']:.2f}"
            "   (target <= 0.5)"
        )
        if "+metrics" in v:
            print(
                f"  [256, 8192] +metrics / sapo_torch     {_ratios(v['+metrics'], s)}   (target <= 1.5)"
            )
        if "+terms" in v:
            t = v["+terms"]
            print(f"  [256, 8192] +weights / sapo_torch     {_ratios(v['+weights'], s)}")
            print(f"  [256, 8192] +terms k1 / sapo_torch    {_ratios(v['+terms k1'], s)}")
            print(f"  [256, 8192] +terms / sapo_torch       {_ratios(t, s)}")
            print(f"  [256, 8192] +terms / plain+terms      {_ratios(t, v['plain+terms'])}")
            print(
                f"  [256, 8192] +terms saved / plain+terms "
                f"{t['saved_bytes'] / v['plain+terms']['saved_bytes']:.2f}"
            )
            print(f"  [256, 8192] +terms+metrics / +terms   {_ratios(v['+terms+metrics'], t)}")
            print(f"  [256, 8192] +terms generic / +terms   {_ratios(v['+terms generic'], t)}")
        if "compiled" in v:
            c, floor = v["compiled"], big["floor_ms"]
            print(
                f"  [256, 8192] compiled / floor          {c['median_ms'] / floor:.1f} / "
                f"{c['min_ms'] / floor:.1f}   (target <= 3)"
            )
            if "plain compiled" in v:
                print(f"  [256, 8192] compiled / plain compiled {_ratios(c, v['plain compiled'])}")
    if small:
        v = small["variants"]
        print(
            f"  [64, 512]   sapo_torch / plain        {_ratios(v['sapo_torch'], v['plain'])}"
            "   (target <= 1)"
        )


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f} on {os.cpu_count()} CPUs"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="256x8192,64x512", help="comma-separated NxT")
    p.add_argument("--dtypes", default="float32")
    p.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds")
    p.add_argument("--no-compile", action="store_true", help="skip the compiled variants")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave)")
    p.add_argument("--json", help="write the results to this file")
    p.add_argument(
        "--terms", action="store_true", help="add the clause 10 variants (weights and KL, k3)"
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    kinds = ["plain", "sapo_torch", "+metrics"]
    kinds += [] if args.no_compile else ["compiled", "plain compiled"]
    if args.terms:
        kinds += ["plain+terms", "+weights", "+terms k1", "+terms", "+terms+metrics"]
        kinds += ["+terms generic"]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; "
        f"sapo, seq-mean-token-mean; {args.rounds} interleaved rounds; {load()} (start)"
    )
    results = []
    for shape in args.shapes.split(","):
        rows, cols = (int(s) for s in shape.lower().split("x"))
        for dt in args.dtypes.split(","):
            res = bench(rows, cols, dt, args.rounds, kinds)
            report(res)
            results.append(res)
    targets(results)
    print(f"\n{load()} (end)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"load_end": os.getloadavg(), "results": results}, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
