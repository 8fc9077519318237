"""The ``sapo-ref`` command (also ``python -m sapo_ref``).

Subcommands:

* ``sapo-ref plot OUTDIR`` writes the documentation's figures (needs matplotlib:
  ``pip install 'sapo-ref[plots]'``); see :mod:`sapo_ref.plots`.
* ``sapo-ref selfcheck`` evaluates the reference on a small random batch for every method, alone
  and with the terms of clause 10 (per-token weights and a k3 KL penalty), and compares its
  closed-form gradient with central finite differences of its own loss; exits 1 if any gradient
  disagrees.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np

from . import SPEC_VERSION, __version__
from .config import METHOD_NAMES
from .loss import policy_loss

__all__ = ["main", "selfcheck"]

#: Finite-difference step and the agreement required (float64, smooth points only).
_FD_STEP = 1e-6
_FD_RTOL = 1e-6


def _batch(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    n, t = 4, 6
    old = np.log(rng.uniform(0.05, 0.95, size=(n, t)))
    logp = old + rng.normal(0.0, 0.1, size=(n, t))
    adv = np.array([1.0, -0.5, 0.8, -1.2])
    mask = np.arange(t)[None, :] < np.array([[6], [4], [2], [5]])
    return logp, old, adv, mask


def selfcheck(seed: int = 0, out=None) -> bool:
    r"""Print loss, gradient check and metrics per method; return whether every check passed.

    The gradient check is :math:`|g - g_\text{fd}| \le 10^{-6}(|g_\text{fd}| + \max|g_\text{fd}|)` with
    central differences of step :math:`10^{-6}` on every valid token. The hard clip has kinks
    where finite differences are meaningless; the fixed batch has no ratio within
    :math:`10^{-3}` of one (clause 2.5 samples the same way).

    >>> import io
    >>> selfcheck(out=io.StringIO())
    True
    """
    out = sys.stdout if out is None else out
    logp, old, adv, mask = _batch(seed)
    ok = True
    print(
        f"sapo-ref {__version__}, spec {SPEC_VERSION}: selfcheck on a {logp.shape} batch "
        f"(seed {seed})",
        file=out,
    )
    rng = np.random.default_rng(seed + 1)
    terms = {  # clause 10: detached weights and a KL penalty against a nearby reference
        "weights": rng.uniform(0.0, 2.0, size=logp.shape),
        "ref_logp": logp + rng.normal(0.0, 0.3, size=logp.shape),
        "kl_coef": 0.05,
    }
    print(f"{'method':<18}{'loss':>14}{'max |grad|':>12}{'fd error':>12}  status  metric", file=out)
    # gspo-token's gradient is its surrogate's (clause 2.8), a finite difference of its value
    # only when A and the weights are constant along each row: it gets one weight per row.
    row_terms = {**terms, "weights": terms["weights"][:, 0]}
    runs = [(m, m, {}) for m in METHOD_NAMES] + [
        (f"{m} +terms", m, row_terms if m == "gspo-token" else terms) for m in METHOD_NAMES
    ]
    for label, method, extra in runs:
        res = policy_loss(logp, old, adv, mask, method=method, **extra)
        fd = np.zeros_like(logp)
        for i, t in zip(*np.nonzero(mask)):
            up, dn = logp.copy(), logp.copy()
            up[i, t] += _FD_STEP
            dn[i, t] -= _FD_STEP
            lu = policy_loss(up, old, adv, mask, method=method, **extra).loss
            ld = policy_loss(dn, old, adv, mask, method=method, **extra).loss
            fd[i, t] = (lu - ld) / (2 * _FD_STEP)
        err = float(np.max(np.abs(res.grad - fd)))
        scale = float(np.max(np.abs(fd)))
        passed = bool(np.all(np.abs(res.grad - fd) <= _FD_RTOL * (np.abs(fd) + scale)))
        ok &= passed
        key = "gate/mean" if "gate/mean" in res.metrics else "clip/frac"
        print(
            f"{label:<18}{res.loss:>14.8f}{np.max(np.abs(res.grad)):>12.5f}{err:>12.2e}"
            f"  {'ok' if passed else 'FAIL':<6}  {key} = {res.metrics[key]:.4f}",
            file=out,
        )
    print("all gradients agree with finite differences" if ok else "GRADIENT MISMATCH", file=out)
    return ok


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sapo-ref`` script."""
    parser = argparse.ArgumentParser(prog="sapo-ref", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--version", action="version", version=f"sapo-ref {__version__} (spec {SPEC_VERSION})"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    plot = sub.add_parser("plot", help="write the documentation's figures (SVG) into OUTDIR")
    plot.add_argument("outdir")
    check = sub.add_parser("selfcheck", help="run the reference on a small random batch")
    check.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "plot":
        from .plots import write_figures  # matplotlib only when asked for

        for path in write_figures(args.outdir):
            print(path)
        return 0
    return 0 if selfcheck(args.seed) else 1


if __name__ == "__main__":
    sys.exit(main())
