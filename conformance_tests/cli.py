"""``sapo-conformance``: run the conformance suite and report, clause by clause.

With no arguments it checks the reference itself (on NumPy and on array-api-strict) and every
installed adapter (``sapo_torch``, ``sapo_jax``, ``sapo_mlx``) in float64, float32, bfloat16 and
float16 where the target supports them. A third-party function::

    sapo-conformance --impl mypkg.losses:sapo_loss --framework torch [--device cuda] \\
        [--methods sapo,grpo] [--loss-agg token-mean] [--dtypes float32,bfloat16] [--json r.json]

A port outside Python goes through files::

    sapo-conformance export DIR [--dtypes ...] [--methods ...]   # the cases, as files
    sapo-conformance judge DIR [--json r.json]                    # the port's results, judged

Every target runs in a worker process the command supervises, one per target: an exit, a
crash, a hang (``--timeout``, per case) or an exception of the implementation fails that case
with its reason and the run goes on; the reports are always written.

Exit status: 0 iff every applicable case passes and at least one case was checked for every
target and dtype that ran; 1 on failures or when nothing was checked; 2 on usage errors
(flags, output paths, capabilities); 130 when interrupted.

JAX targets run with ``jax_enable_x64`` switched on in their worker before any array exists,
so that float64 is float64, and with JAX's persistent compilation cache at
``~/.cache/sapo-conformance/jax`` (``--no-jax-cache`` turns that off). Those are the
application's choices to make; ``sapo_jax`` itself never changes global JAX configuration.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import sapo_ref
from sapo_ref import spec

from .cases import DTYPES, generate_cases, golden_cases
from .drivers import discover_drivers
from .runner import SuiteResult, TargetRun, run_suite
from .targets import BUILTIN_TARGETS, Target, UsageError, builtin_target, impl_target
from .worker import DEFAULT_TIMEOUT, WorkerLost, WorkerPool, jax_cache_dir

__all__ = ["main", "build_parser", "jax_cache_dir", "method_defaults"]

DEFAULT_CASES_PER_CLAUSE = 2
QUICK_CASES_PER_CLAUSE = 1
#: Exit statuses.
EXIT_PASS, EXIT_FAIL, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def method_defaults() -> str:
    """The contract's per-method parameter defaults, from the spec (for ``--help`` and docs).

    >>> method_defaults().split("; ")[0]
    'sapo: tau_pos=1.0, tau_neg=1.05'
    """
    parts = []
    for name, m in spec.DATA["methods"].items():
        parts.append(f"{name}: " + ", ".join(f"{k}={v}" for k, v in m.get("defaults", {}).items()))
    return "; ".join(parts)


def _add_case_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--methods",
        type=_csv,
        metavar="M[,M]",
        help="only these methods: the cases are drawn for them",
    )
    p.add_argument(
        "--loss-agg",
        type=_csv,
        dest="loss_aggs",
        metavar="A[,A]",
        help="only these aggregations: the cases are drawn for them",
    )
    p.add_argument(
        "--dtypes",
        type=_csv,
        metavar="D[,D]",
        help=f"dtypes to check (default: {','.join(DTYPES)})",
    )
    p.add_argument(
        "--cases-per-clause",
        type=int,
        default=None,
        metavar="N",
        help=f"random cases drawn per clause (default {DEFAULT_CASES_PER_CLAUSE})",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK_CASES_PER_CLAUSE} random case per clause and no golden vectors",
    )
    p.add_argument("--no-golden", action="store_true", help="leave out the spec's golden vectors")
    p.add_argument("--seed", type=int, default=0, help="seed of the random cases, >= 0 (default 0)")


def _add_report_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--json",
        type=Path,
        metavar="PATH",
        help="write the JSON report (schema sapo-conformance-report/2)",
    )
    p.add_argument("--markdown", type=Path, metavar="PATH", help="write the Markdown report")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sapo-conformance",
        usage="sapo-conformance [export DIR | judge DIR] [options]",
        description="Check SAPO-family policy-loss implementations against the sapo_ref spec, clause by clause. "
        "Subcommands: `export DIR` writes the cases as files for a port outside Python; "
        "`judge DIR` judges the port's results (`sapo-conformance export --help`).",
        epilog=(
            "The suite calls fn(logp, old_logp, advantages, mask, **options) with framework arrays "
            "(options: only what the case needs of method, loss_agg, tau_pos, tau_neg, eps_low, "
            "eps_high, dual_clip, norm_length, and count_empty_rows=True when the target declares "
            "empty rows counted). An option not passed takes the spec's default: "
            f"method={spec.DATA['defaults']['method']}, loss_agg={spec.DATA['defaults']['loss_agg']}, "
            f"empty rows not counted, and per method {method_defaults()}. "
            "It takes the loss (or the first item of a tuple; a dict second item is compared as "
            "clause 7.1 metrics if the target declares metrics) and differentiates it w.r.t. logp "
            "with the framework's autodiff; a numpy fn returns (loss, grad). A function may declare "
            "fn.sapo_capabilities = {'methods': [...], 'loss_aggs': [...], 'dtypes': [...], "
            "'metrics': bool, 'tolerance_deviations': {dtype: {'tolerance': 'float32', 'reason': ...}}, "
            "'count_empty_rows': 'excluded'|'counted'|'both', 'advantages': ['sequence', 'token'], "
            "'norm_length': 'any'|'T', 'temperatures': 'any'|'tau_neg>=tau_pos', "
            "'mask_dtype': 'bool'|'float'|'int', 'weights': bool, 'kl_estimators': ['k1', 'k2', "
            "'k3', 'low-var-k3']}: cases outside are skipped with the reason and every "
            "report states the declared limits. The terms of spec 0.2.0 (clause 10) are opt-in: "
            "a target that declares weights gets weights= ([N] or [N, T]), one that declares KL "
            "estimators gets ref_logp=, kl_coef=, kl_estimator= (and their error cases, which "
            "must raise ValueError); the gradient of ref_logp is checked through the autodiff. "
            "Exit status: 0 iff every applicable case passes and something was checked for every "
            "target and dtype that ran; 1 on failures or nothing checked; 2 on usage errors."
        ),
    )
    p.add_argument(
        "--target",
        action="append",
        default=None,
        metavar="NAME[,NAME]",
        help=f"built-in targets to run ({', '.join(BUILTIN_TARGETS)}); default: all, "
        "or none when --impl is given",
    )
    p.add_argument(
        "--impl",
        metavar="MODULE:ATTR",
        help="a third-party function fn(logp, old_logp, advantages, mask, **options)",
    )
    p.add_argument(
        "--framework",
        metavar="NAME",
        help="framework of --impl: its driver's arrays and autodiff (--list-frameworks)",
    )
    p.add_argument(
        "--device",
        metavar="D",
        help="device the drivers run on: a torch device (cuda, cuda:1, mps, cpu), a JAX "
        "platform (gpu, tpu, cpu), an MLX device (gpu, cpu); absent: a skip with the reason",
    )
    _add_case_flags(p)
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"time limit per case; past it the case fails and the worker restarts (default {DEFAULT_TIMEOUT:g})",
    )
    _add_report_flags(p)
    p.add_argument(
        "--no-jax-cache",
        action="store_true",
        help="do not use JAX's persistent compilation cache (~/.cache/sapo-conformance/jax)",
    )
    p.add_argument(
        "--list-frameworks",
        action="store_true",
        help="list every framework driver: installed or not and why, dtypes, devices, versions",
    )
    return p


def _export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sapo-conformance export",
        description="Write the cases a live run would use as files (JSON manifest + raw "
        "little-endian arrays) for a port outside Python.",
    )
    p.add_argument(
        "dir",
        type=Path,
        metavar="DIR",
        help="folder to write (an earlier export there is replaced)",
    )
    _add_case_flags(p)
    return p


def _judge_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sapo-conformance judge",
        description="Judge a port's results in an exported folder: the same report, "
        "JSON, Markdown and exit status as a live run.",
    )
    p.add_argument(
        "dir", type=Path, metavar="DIR", help="a folder written by `sapo-conformance export`"
    )
    _add_report_flags(p)
    return p


# ----------------------------------------------------------------------------- validation


def _writable(path: Path | None, flag: str) -> None:
    """Fail before the run when a report could not be written there."""
    if path is None:
        return
    if path.is_dir():
        raise UsageError(f"{flag}: {path} is a directory; give a file path")
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(
            f"{flag}: cannot create the folder {parent}: {err.strerror or err}"
        ) from None
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UsageError(f"{flag}: {path} is not writable")


def _case_settings(args: argparse.Namespace) -> tuple[list[str], int, bool]:
    dtypes = args.dtypes or list(DTYPES)
    for d in dtypes:
        if d not in DTYPES:
            raise UsageError(f"--dtypes: unknown dtype {d!r}; expected one of: {', '.join(DTYPES)}")
    for name, allowed, known in (
        ("--methods", args.methods, sapo_ref.METHOD_NAMES),
        ("--loss-agg", args.loss_aggs, sapo_ref.LOSS_AGG_NAMES),
    ):
        for v in allowed or []:
            if v not in known:
                raise UsageError(f"{name}: unknown name {v!r}; expected one of: {', '.join(known)}")
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0 (a NumPy seed); got {args.seed}")
    if args.cases_per_clause is not None and args.cases_per_clause < 0:
        raise UsageError("--cases-per-clause must be >= 0")
    per_clause = args.cases_per_clause
    if per_clause is None:
        per_clause = QUICK_CASES_PER_CLAUSE if args.quick else DEFAULT_CASES_PER_CLAUSE
    golden = not (args.quick or args.no_golden)
    if per_clause == 0 and not golden:
        raise UsageError(
            "nothing to check: --cases-per-clause 0 without the golden vectors "
            "(drop --no-golden/--quick or draw cases)"
        )
    return dtypes, per_clause, golden


def _cases(
    seed: int,
    per_clause: int,
    golden: bool,
    methods: list[str] | None,
    aggs: list[str] | None,
    advantages: tuple[str, ...] | None = None,
) -> list:
    """The run's cases: each clause's random cases drawn inside the chosen methods,
    aggregations and advantage layouts (as many per clause as a full run), then the golden
    vectors."""
    drawn = generate_cases(
        seed=seed,
        per_clause=per_clause,
        methods=tuple(methods) if methods else None,
        loss_aggs=tuple(aggs) if aggs else None,
        advantages=advantages,
    )
    return drawn + (golden_cases() if golden else [])


def _declared(targets: list[Target], attr: str) -> tuple[str, ...] | None:
    """What every runnable target declares for ``attr`` when they all declare the same thing
    (cases are then drawn inside it, as many per clause as a full run), else None."""
    values = {tuple(getattr(t, attr)) for t in targets if t.unavailable is None}
    return next(iter(values)) if len(values) == 1 else None


def _targets(args: argparse.Namespace) -> list[Target]:
    if args.framework and not args.impl:
        raise UsageError("--framework needs --impl MODULE:ATTR")
    if args.impl and not args.framework:
        raise UsageError(f"--impl needs --framework (one of: {', '.join(discover_drivers())})")
    names: list[str] = []
    for value in args.target or []:
        names += _csv(value)
    explicit = args.target is not None
    if not explicit and not args.impl:
        names = list(BUILTIN_TARGETS)
    targets = [builtin_target(n, load=False) for n in dict.fromkeys(names)]
    for t in targets:
        t.requested = explicit
    if args.impl:
        info = discover_drivers().get(args.framework)
        if info is not None and info.cls is None:
            raise UsageError(f"--framework {args.framework}: {info.error}")
        t = impl_target(args.impl, args.framework, load=False)
        t.requested = True
        targets.append(t)
    return targets


def _restrict(targets: list[Target], methods: list[str] | None, aggs: list[str] | None) -> None:
    """Narrow every target to ``--methods``/``--loss-agg`` (names validated here too)."""
    for name, allowed, known in (
        ("--methods", methods, sapo_ref.METHOD_NAMES),
        ("--loss-agg", aggs, sapo_ref.LOSS_AGG_NAMES),
    ):
        for v in allowed or []:
            if v not in known:
                raise UsageError(f"{name}: unknown name {v!r}; expected one of: {', '.join(known)}")
    for t in targets:
        if methods:
            t.methods = tuple(m for m in t.methods if m in methods)
        if aggs:
            t.loss_aggs = tuple(a for a in t.loss_aggs if a in aggs)


def _overlap(
    target: Target, args: argparse.Namespace, dtypes: list[str], declared: dict[str, tuple]
) -> None:
    """A requested target whose declaration leaves nothing of the request: a usage error."""
    for key, flag, asked in (
        ("methods", "--methods", args.methods),
        ("loss_aggs", "--loss-agg", args.loss_aggs),
        ("dtypes", "--dtypes", dtypes),
    ):
        if not getattr(target, key):
            raise UsageError(
                f"target {target.name}: its capabilities declare no {key[:-1].replace('_', ' ')} "
                f"among {flag} {','.join(asked or [])} (it declares: {', '.join(declared[key])}); "
                "nothing would be checked"
            )


def _load(
    pool: WorkerPool, targets: list[Target], args: argparse.Namespace, dtypes: list[str]
) -> None:
    """Wait for every worker to load its target; apply the capabilities each one found."""
    for t in targets:
        w = pool.get(t.name)
        if w is None:
            continue
        try:
            info = w.ready()  # UsageError: the module cannot be imported, bad capabilities
        except WorkerLost:
            continue  # the run records it as the target's error (and fails)
        if info.unavailable:
            t.unavailable = info.unavailable
            continue
        t.apply_capabilities(info.capabilities, strict=False)  # validated in the worker already
    for t in targets:
        declared = {"methods": t.methods, "loss_aggs": t.loss_aggs, "dtypes": t.dtypes}
        _restrict([t], args.methods, args.loss_aggs)
        t.dtypes = tuple(d for d in t.dtypes if d in dtypes)
        if t.requested and t.unavailable is None:
            _overlap(t, args, dtypes, declared)
        t.dtypes = declared[
            "dtypes"
        ]  # dtypes outside --dtypes are not run; the report shows the declaration


# ----------------------------------------------------------------------------- output


def _console():
    from rich.console import Console

    console = Console()
    if not console.is_terminal:  # CI logs and pipes: wide enough for the tables
        console = Console(width=max(console.width, 130))
    return console


def _usage_error(parser: argparse.ArgumentParser, err: Exception) -> int:
    parser.print_usage(sys.stderr)
    print(f"sapo-conformance: error: {err}", file=sys.stderr)
    return EXIT_USAGE


def _report(
    result: SuiteResult, settings: dict[str, Any], args: argparse.Namespace, console: Any
) -> int:
    """Print and write every report (always), and the exit status."""
    from .report import render, to_json, to_markdown

    verdicts = _verdicts(result)
    render(result, settings, console, verdicts=verdicts)
    if args.json:
        args.json.write_text(
            json.dumps(to_json(result, settings, verdicts=verdicts), indent=1) + "\n",
            encoding="utf-8",
        )
    if args.markdown:
        args.markdown.write_text(to_markdown(result, settings, verdicts=verdicts), encoding="utf-8")
    if result.interrupted:
        return EXIT_INTERRUPTED
    return EXIT_PASS if result.passed else EXIT_FAIL


def _verdicts(result: SuiteResult) -> list | None:
    """The verdict lines (known deviations that explain the failures), when available."""
    try:
        from .verdict import diagnose
    except ImportError:
        return None
    try:
        return diagnose(result)
    except Exception as err:  # a diagnosis bug must not cost the report
        print(
            f"sapo-conformance: warning: verdicts not computed: {type(err).__name__}: {err}",
            file=sys.stderr,
        )
        return None


def _progress_run(console, show: bool, total: int, fn):
    if not show or not console.is_terminal:
        return fn(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("conformance"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task("cases", total=total)
        return fn(lambda k: progress.advance(task, k))


def list_frameworks(console: Any = None) -> int:
    """Print every framework driver: installed or not and why, dtypes, devices, versions."""
    from rich.table import Table

    console = console or _console()
    table = Table(
        title="sapo-conformance framework drivers (entry-point group sapo_conformance.drivers)",
        title_justify="left",
    )
    for col in ("framework", "driver", "status", "dtypes", "devices", "versions"):
        table.add_column(col, overflow="fold")
    for name, info in discover_drivers().items():
        driver = f"{info.source} ({info.package} {info.package_version})".strip()
        if info.cls is None:
            table.add_row(name, driver, f"[red]broken[/]: {info.error}", "", "", "")
            continue
        d = info.cls()
        try:
            why = d.unavailable()
        except Exception as err:
            why = f"{type(err).__name__}: {err}"
        if why:
            table.add_row(
                name, driver, f"[yellow]not available[/]: {why}", ", ".join(d.dtypes), "", ""
            )
            continue
        try:
            devices, versions = (
                ", ".join(d.devices()),
                ", ".join(f"{k} {v}" for k, v in d.versions().items()),
            )
        except Exception as err:  # a framework that imports but fails to start
            devices, versions = f"unknown ({type(err).__name__}: {err})", ""
        table.add_row(name, driver, "[green]installed[/]", ", ".join(d.dtypes), devices, versions)
    console.print(table)
    return EXIT_PASS


# ----------------------------------------------------------------------------- commands


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``sapo-conformance``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "export":
        return _export(argv[1:])
    if argv and argv[0] == "judge":
        return _judge(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse exits with 2 on its own usage errors
    if args.list_frameworks:
        return list_frameworks()
    try:
        dtypes, per_clause, golden = _case_settings(args)
        if not (args.timeout > 0 and math.isfinite(args.timeout)):
            raise UsageError(
                f"--timeout must be a positive number of seconds; got {args.timeout:g}"
            )
        _writable(args.json, "--json")
        _writable(args.markdown, "--markdown")
        targets = _targets(args)
    except UsageError as err:
        return _usage_error(parser, err)

    pool = WorkerPool(
        targets,
        timeout=args.timeout,
        device=args.device,
        jax_cache=not args.no_jax_cache,
        dtypes=tuple(dtypes),
    )
    settings = {
        "seed": args.seed,
        "cases_per_clause": per_clause,
        "golden": golden,
        "dtypes": dtypes,
        "methods": args.methods,
        "loss_aggs": args.loss_aggs,
        "targets": [t.name for t in targets],
        "timeout_s": args.timeout,
        "device": args.device,
        "isolation": "worker process per target",
    }
    console = _console()
    with pool:
        try:
            pool.start()  # every target's worker imports its framework at once
            try:
                _load(pool, targets, args, dtypes)
            except UsageError as err:
                return _usage_error(parser, err)
            cases = _cases(
                args.seed,
                per_clause,
                golden,
                args.methods or _declared(targets, "methods"),
                args.loss_aggs or _declared(targets, "loss_aggs"),
                _declared(targets, "advantages"),
            )
            total = len(targets) * len(dtypes) * len(cases)
            result = _progress_run(
                console,
                not args.no_progress,
                total,
                lambda progress: run_suite(
                    targets, cases, dtypes, args.seed, progress, pool=pool, device=args.device
                ),
            )
        except KeyboardInterrupt:  # before the run started: still a report, and not a pass
            runs = [TargetRun(t, skipped="not run: the run was interrupted") for t in targets]
            result = SuiteResult(runs, [], [], args.seed, 0.0, tuple(dtypes), interrupted=True)
    return _report(result, settings, args, console)


def _export(argv: list[str]) -> int:
    parser = _export_parser()
    args = parser.parse_args(argv)
    try:
        dtypes, per_clause, golden = _case_settings(args)
        if args.dir.exists() and not args.dir.is_dir():
            raise UsageError(f"DIR: {args.dir} exists and is not a folder")
        _writable(args.dir / "manifest.json", "DIR")
        from .protocol import ProtocolError, export_cases

        cases = _cases(args.seed, per_clause, golden, args.methods, args.loss_aggs)
        settings = {
            "seed": args.seed,
            "cases_per_clause": per_clause,
            "golden": golden,
            "methods": args.methods,
            "loss_aggs": args.loss_aggs,
        }
        try:
            export_cases(args.dir, cases, dtypes, settings)
        except (ProtocolError, OSError) as err:
            raise UsageError(f"export to {args.dir}: {err}") from None
    except UsageError as err:
        return _usage_error(parser, err)
    manifest = json.loads((args.dir / "manifest.json").read_text(encoding="utf-8"))
    print(
        f"sapo-conformance: wrote {len(manifest['cases'])} cases ({len(manifest['skipped'])} skipped) "
        f"to {args.dir}; run the port on them, then `sapo-conformance judge {args.dir}`"
    )
    return EXIT_PASS


def _judge(argv: list[str]) -> int:
    parser = _judge_parser()
    args = parser.parse_args(argv)
    try:
        _writable(args.json, "--json")
        _writable(args.markdown, "--markdown")
        from .protocol import ProtocolError, judge_dir

        try:
            result, settings = judge_dir(args.dir)
        except ProtocolError as err:
            raise UsageError(f"judge {args.dir}: {err}") from None
    except UsageError as err:
        return _usage_error(parser, err)
    return _report(result, settings, args, _console())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
