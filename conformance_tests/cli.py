"""``sapo-conformance``: run the conformance suite and report, clause by clause.

With no arguments it checks the reference itself (on NumPy and on array-api-strict) and every
installed adapter (``sapo_torch``, ``sapo_jax``, ``sapo_mlx``) in float64, float32, bfloat16 and
float16 where the target supports them. A third-party function::

    sapo-conformance --impl mypkg.losses:sapo_loss --framework torch \\
        [--methods sapo,grpo] [--loss-agg token-mean] [--dtypes float32,bfloat16] [--json r.json]

Exit status: 0 iff every applicable case passes, 1 on failures, 2 on usage errors.

When a JAX target runs, this command switches on ``jax_enable_x64`` in its own process before
any array exists, so that float64 is float64 (JAX would silently truncate it), and points JAX's
persistent compilation cache at ``~/.cache/sapo-conformance/jax`` (a jitted loss compiles once
per configuration and dtype; ``--no-jax-cache`` turns that off). Those are the application's
choices to make; ``sapo_jax`` itself never changes global JAX configuration.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import sapo_ref

from .cases import DTYPES, generate_cases, golden_cases
from .drivers import DRIVERS
from .runner import run_suite
from .targets import BUILTIN_TARGETS, Target, UsageError, builtin_target, impl_target

__all__ = ["main", "build_parser"]

DEFAULT_CASES_PER_CLAUSE = 2
QUICK_CASES_PER_CLAUSE = 1


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sapo-conformance",
        description="Check SAPO-family policy-loss implementations against the sapo_ref spec, clause by clause.",
        epilog=(
            "The suite calls fn(logp, old_logp, advantages, mask, **options) with framework arrays "
            "(options: only what the case needs of method, loss_agg, tau_pos, tau_neg, eps_low, "
            "eps_high, dual_clip, norm_length), takes the loss (or the first item of a tuple; a dict "
            "second item is compared as metrics) and differentiates it w.r.t. logp with the "
            "framework's autodiff; a numpy fn returns (loss, grad). A function may declare "
            "fn.sapo_capabilities = {'methods': [...], 'loss_aggs': [...], 'dtypes': [...], "
            "'metrics': bool, 'tolerance_deviations': {dtype: {'tolerance': 'float32', 'reason': ...}}}. "
            "Exit status: 0 iff every applicable case passes; 1 on failures; 2 on usage errors."
        ),
    )
    p.add_argument("--target", action="append", default=None, metavar="NAME[,NAME]",
                   help=f"built-in targets to run ({', '.join(BUILTIN_TARGETS)}); default: all, "
                        "or none when --impl is given")
    p.add_argument("--impl", metavar="MODULE:ATTR",
                   help="a third-party function fn(logp, old_logp, advantages, mask, **options)")
    p.add_argument("--framework", choices=None, metavar="{" + ",".join(DRIVERS) + "}",
                   help="framework of --impl (its arrays and autodiff)")
    p.add_argument("--methods", type=_csv, metavar="M[,M]", help="only these methods (what the implementation supports)")
    p.add_argument("--loss-agg", type=_csv, dest="loss_aggs", metavar="A[,A]", help="only these aggregations")
    p.add_argument("--dtypes", type=_csv, metavar="D[,D]", help=f"dtypes to check (default: {','.join(DTYPES)})")
    p.add_argument("--cases-per-clause", type=int, default=None, metavar="N",
                   help=f"random cases drawn per clause (default {DEFAULT_CASES_PER_CLAUSE})")
    p.add_argument("--quick", action="store_true",
                   help=f"{QUICK_CASES_PER_CLAUSE} random case per clause and no golden vectors")
    p.add_argument("--no-golden", action="store_true", help="leave out the spec's golden vectors")
    p.add_argument("--seed", type=int, default=0, help="seed of the random cases (default 0)")
    p.add_argument("--json", type=Path, metavar="PATH", help="write the JSON report (schema sapo-conformance-report/1)")
    p.add_argument("--markdown", type=Path, metavar="PATH", help="write the Markdown report")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-jax-cache", action="store_true",
                   help="do not use JAX's persistent compilation cache (~/.cache/sapo-conformance/jax)")
    return p


def _targets(args: argparse.Namespace) -> list[Target]:
    if args.framework and not args.impl:
        raise UsageError("--framework needs --impl MODULE:ATTR")
    if args.impl and not args.framework:
        raise UsageError(f"--impl needs --framework (one of: {', '.join(DRIVERS)})")
    names: list[str] = []
    for value in args.target or []:
        names += _csv(value)
    if args.target is None and not args.impl:
        names = list(BUILTIN_TARGETS)
    targets = [builtin_target(n) for n in dict.fromkeys(names)]
    if args.impl:
        targets.append(impl_target(args.impl, args.framework))
    return targets


def _restrict(targets: list[Target], methods: list[str] | None, aggs: list[str] | None) -> None:
    for name, allowed, known in (("--methods", methods, sapo_ref.METHOD_NAMES),
                                 ("--loss-agg", aggs, sapo_ref.LOSS_AGG_NAMES)):
        for v in allowed or []:
            if v not in known:
                raise UsageError(f"{name}: unknown name {v!r}; expected one of: {', '.join(known)}")
    for t in targets:
        if methods:
            t.methods = tuple(m for m in t.methods if m in methods)
        if aggs:
            t.loss_aggs = tuple(a for a in t.loss_aggs if a in aggs)


def _configure_jax(targets: list[Target], cache: bool) -> None:
    # The command is an application: it may set JAX's global switches in its own process.
    if not any(t.framework == "jax" and t.unavailable is None for t in targets):
        return
    try:
        import jax
    except ImportError:
        return
    jax.config.update("jax_enable_x64", True)
    if cache:  # one XLA compile per configuration and dtype: keep them across runs
        jax.config.update("jax_compilation_cache_dir", str(jax_cache_dir()))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def jax_cache_dir() -> Path:
    """Where the command keeps JAX's persistent compilation cache."""
    import os

    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sapo-conformance" / "jax"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``sapo-conformance``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse exits with 2 on its own usage errors
    try:
        dtypes = args.dtypes or list(DTYPES)
        for d in dtypes:
            if d not in DTYPES:
                raise UsageError(f"--dtypes: unknown dtype {d!r}; expected one of: {', '.join(DTYPES)}")
        if args.cases_per_clause is not None and args.cases_per_clause < 0:
            raise UsageError("--cases-per-clause must be >= 0")
        targets = _targets(args)
        _restrict(targets, args.methods, args.loss_aggs)
    except UsageError as err:
        parser.print_usage(sys.stderr)
        print(f"sapo-conformance: error: {err}", file=sys.stderr)
        return 2

    per_clause = args.cases_per_clause
    if per_clause is None:
        per_clause = QUICK_CASES_PER_CLAUSE if args.quick else DEFAULT_CASES_PER_CLAUSE
    golden = not (args.quick or args.no_golden)
    cases = generate_cases(seed=args.seed, per_clause=per_clause) + (golden_cases() if golden else [])
    _configure_jax(targets, cache=not args.no_jax_cache)
    settings = {"seed": args.seed, "cases_per_clause": per_clause, "golden": golden, "dtypes": dtypes,
                "methods": args.methods, "loss_aggs": args.loss_aggs, "targets": [t.name for t in targets]}

    from rich.console import Console

    console = Console()
    if not console.is_terminal:  # CI logs and pipes: wide enough for the tables
        console = Console(width=max(console.width, 130))
    result = _run(targets, cases, dtypes, args.seed, console, show=not args.no_progress)

    from .report import render, to_json, to_markdown

    render(result, settings, console)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(to_json(result, settings), indent=1) + "\n", encoding="utf-8")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(to_markdown(result, settings), encoding="utf-8")
    return 0 if result.passed else 1


def _run(targets, cases, dtypes, seed, console, show: bool):
    total = len(targets) * len(dtypes) * len(cases)
    if not show or not console.is_terminal:
        return run_suite(targets, cases, dtypes, seed)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("conformance"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task("cases", total=total)
        return run_suite(targets, cases, dtypes, seed, progress=lambda k: progress.advance(task, k))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
