"""Jitted value_and_grad of sapo_jax.policy_loss vs jax.grad of a straightforward jnp formula.

Both sides are timed in the same run, interleaved, on the same inputs ([256, 8192] float32 by
default, CPU): the ratio is what matters on a shared machine. The median and the minimum of
each side are printed (the minimum is each side's best case, steadier under load), with the
load average at the start and the end. Run:

    .venv/bin/python benchmarks/bench_jax.py --all      # every method
    .venv/bin/python benchmarks/bench_jax.py --method sapo --rows 64 --cols 2048 --repeats 50

The baseline is what a porter writes first: the formula in jnp with mask selection, the sigmoid
gate and the mean, differentiated by ``jax.grad`` (XLA fuses it). It has no exact saturation and
no metrics; sapo_jax computes none unless asked (``--metrics`` passes ``metrics=True``).
``--terms`` adds the clause 10 terms to both sides: [N, T] weights on the policy term and a k3
KL penalty (beta = 0.1) against reference log-probabilities (``exp(u) - 1 - u`` in the plain
formula).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import sapo_jax


def plain_loss(method: str, tau_pos=1.0, tau_neg=1.05, eps_low=0.2, eps_high=0.2, terms=None):
    """The straightforward formula of each method, seq-mean-token-mean, for jax.grad; with
    ``terms = (weights, ref_logp)`` the weighted policy term plus 0.1 times k3."""

    def loss(logp, old_logp, adv, mask):
        lengths = jnp.sum(mask, axis=1)
        a = jnp.broadcast_to(adv[:, None], logp.shape)
        delta = jnp.where(mask, logp - old_logp, 0.0)
        if method in ("sapo-seq", "gspo", "gspo-token"):
            mu = jnp.sum(delta, axis=1) / jnp.maximum(lengths, 1)
            if method == "gspo-token":
                mu = jax.lax.stop_gradient(mu)[:, None] + delta - jax.lax.stop_gradient(delta)
            else:
                mu = jnp.broadcast_to(mu[:, None], logp.shape)
            x = jnp.exp(mu)
        else:
            x = jnp.exp(delta)
        if method in ("sapo", "sapo-seq"):
            tau = jnp.where(a > 0, tau_pos, tau_neg)
            term = 4.0 / tau * jax.nn.sigmoid(tau * (x - 1.0)) * a
        else:
            term = jnp.minimum(x * a, jnp.clip(x, 1 - eps_low, 1 + eps_high) * a)
        if terms is not None:
            u = terms[1] - logp
            term = term * terms[0] - KL_COEF * (jnp.exp(u) - 1.0 - u)
        term = jnp.where(mask, term, 0.0)
        per_row = jnp.sum(term, axis=1) / jnp.maximum(lengths, 1)
        rows = jnp.sum(lengths > 0)
        return -jnp.sum(per_row) / jnp.maximum(rows, 1)

    return loss


KL_COEF = 0.1


def make_terms(logp, seed: int = 1):
    """[N, T] weights in [0, 2) and ref_logp = logp + N(0, 0.2)."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    weights = 2.0 * jax.random.uniform(k1, logp.shape, jnp.float32)
    return weights, logp + 0.2 * jax.random.normal(k2, logp.shape, jnp.float32)


def make_inputs(rows: int, cols: int, seed: int = 0):
    k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
    logp = -jnp.abs(jax.random.normal(k1, (rows, cols), jnp.float32)) - 0.1
    old = logp + 0.05 * jax.random.normal(k2, (rows, cols), jnp.float32)
    adv = jax.random.normal(k3, (rows,), jnp.float32)
    lengths = jax.random.randint(k4, (rows, 1), cols // 4, cols + 1)
    mask = jnp.arange(cols)[None, :] < lengths
    return logp, old, adv, mask


def time_fn(fn, args, repeats: int) -> list[float]:
    """Wall seconds per call."""
    wall = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        wall.append(time.perf_counter() - t0)
    return wall


def bench(
    method: str, rows: int, cols: int, repeats: int, metrics: bool, terms: bool = False
) -> dict[str, float]:
    """Median and minimum wall milliseconds of both sides, timed interleaved in chunks."""
    logp, old, adv, mask = make_inputs(rows, cols)
    opts = {"eps_low": 0.2, "eps_high": 0.2} if method in ("gspo", "gspo-token") else {}
    extra = make_terms(logp) if terms else None
    if terms:
        opts |= {"weights": extra[0], "ref_logp": extra[1], "kl_coef": KL_COEF}

    def ours_loss(lp, o, a, m):
        loss, mets = sapo_jax.policy_loss(lp, o, a, m, method=method, metrics=metrics, **opts)
        return (loss, mets) if metrics else loss

    ours = jax.jit(jax.value_and_grad(ours_loss, has_aux=metrics))
    plain = jax.jit(jax.value_and_grad(plain_loss(method, terms=extra)))
    args = (logp, old, adv, mask)
    for fn in (ours, plain):  # compile and warm up
        jax.block_until_ready(fn(*args))
        jax.block_until_ready(fn(*args))
    times: dict[str, list[float]] = {"ours_wall": [], "plain_wall": []}
    chunk = max(1, repeats // 10)
    for _ in range(10):  # interleave so both sides see the same machine load
        for name, fn in (("ours", ours), ("plain", plain)):
            times[name + "_wall"] += time_fn(fn, args, chunk)
    out = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    out.update({"min_" + k: min(v) * 1e3 for k, v in times.items()})
    return out


def load() -> str:
    """The 1-, 5- and 15-minute load averages (what `uptime` prints)."""
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--cols", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=100)
    p.add_argument("--method", default="sapo", choices=sapo_jax.CAPABILITIES["methods"])
    p.add_argument("--all", action="store_true", help="every method (a third of the repeats each)")
    p.add_argument("--metrics", action="store_true", help="metrics=True, returned (has_aux)")
    p.add_argument("--terms", action="store_true", help="[N, T] weights and a k3 KL penalty")
    a = p.parse_args()
    methods = list(sapo_jax.CAPABILITIES["methods"]) if a.all else [a.method]
    repeats = max(10, a.repeats // 3) if a.all else a.repeats
    print(
        f"jax {jax.__version__}, {jax.devices()[0].platform}, [{a.rows}, {a.cols}] float32, "
        f"jit(value_and_grad), seq-mean-token-mean, {repeats} interleaved calls each"
        + (", metrics returned" if a.metrics else "")
        + (", weights and k3 KL on both sides" if a.terms else "")
        + f"; {load()}"
    )
    print(
        f"{'method':<12}{'sapo_jax ms':>12}{'plain ms':>10}{'ratio':>7}  |"
        f"{'min sapo_jax':>13}{'min plain':>10}{'ratio':>7}"
    )
    for m in methods:
        r = bench(m, a.rows, a.cols, repeats, a.metrics, a.terms)
        print(
            f"{m:<12}{r['ours_wall']:>12.2f}{r['plain_wall']:>10.2f}"
            f"{r['ours_wall'] / r['plain_wall']:>7.2f}  |{r['min_ours_wall']:>13.2f}"
            f"{r['min_plain_wall']:>10.2f}{r['min_ours_wall'] / r['min_plain_wall']:>7.2f}",
            flush=True,
        )
    print(f"end: {load()}")


if __name__ == "__main__":
    main()
