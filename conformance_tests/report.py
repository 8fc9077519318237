"""Reports of a suite run: rich terminal tables, JSON (versioned schema) and Markdown.

Terminal: one table per target, a row per clause, a column per dtype whose cell reads
``passed/applicable`` and the worst relative error (the worst case id where a case failed),
then each failure's messages, the known deviation that reproduces it, and a repro.

Every target's framework, driver, versions, device and declared limits are stated in all three
(so that a limited pass is never read as a full one), with the verdict line per target and dtype
(:mod:`sapo_conformance.verdict`) and, when the run checked less than it was asked to, why.

JSON: ``{"schema": "sapo-conformance-report/2", ...}`` described by the JSON Schema shipped as
``sapo_conformance/report.schema.json`` (:func:`json_schema`). Non-finite numbers are written
as the strings ``"inf"``, ``"-inf"``, ``"nan"`` (as in the spec's golden vectors).
"""

from __future__ import annotations

import json
import math
import platform
from importlib import resources
from typing import Any

import numpy as np
from sapo_ref.spec.vectors import encode_float

from sapo_ref import spec

from .cases import DTYPES
from .runner import CaseResult, ClauseRow, SuiteResult

__all__ = [
    "SCHEMA_ID",
    "json_schema",
    "to_json",
    "to_markdown",
    "render",
    "repro",
    "failure_title",
    "failure_body",
]

SCHEMA_ID = "sapo-conformance-report/2"
_SHORT = {"float64": "f64", "float32": "f32", "bfloat16": "bf16", "float16": "f16"}
#: Failures printed in full per target in the terminal (all of them go to JSON/Markdown).
MAX_DETAILED = 6


def json_schema() -> dict[str, Any]:
    """The JSON Schema of :func:`to_json`'s output."""
    text = resources.files(__package__).joinpath("report.schema.json").read_text(encoding="utf-8")
    return json.loads(text)


def _lit(a: np.ndarray) -> str:
    """A NumPy array as a Python literal that round-trips (nan/inf as names)."""

    def one(v: Any) -> str:
        if isinstance(v, (bool, np.bool_)):
            return "True" if v else "False"
        v = float(v)
        return (
            "nan"
            if math.isnan(v)
            else ("inf" if v == math.inf else ("-inf" if v == -math.inf else repr(v)))
        )

    def rec(x: Any) -> str:
        if isinstance(x, list):
            return "[" + ", ".join(rec(v) for v in x) + "]"
        return one(x)

    return rec(np.asarray(a, dtype=bool if a.dtype == bool else np.float64).tolist())


_CALLS = {
    "numpy": (
        "out = fn(logp.astype({np_dtype}), old_logp.astype({np_dtype}), advantages.astype({np_dtype}), mask, **options)\n"
        "loss, grad = float(out[0]), np.asarray(out[1], np.float64)\n"
    ),
    "torch": (
        "import torch\n"
        "t = lambda a: torch.tensor(a, dtype=torch.{dtype})\n"
        "x = t(logp).requires_grad_(True)\n"
        "out = fn(x, t(old_logp), t(advantages), torch.tensor(mask), **options)\n"
        "loss_t = out[0] if isinstance(out, tuple) else out\n"
        "loss_t.backward()\n"
        "loss, grad = float(loss_t), x.grad.double().numpy()\n"
    ),
    "jax": (
        "import jax, jax.numpy as jnp\n"
        "jax.config.update('jax_enable_x64', True)\n"
        "t = lambda a: jnp.asarray(a).astype(jnp.{dtype})\n"
        "f = lambda x: (lambda o: o[0] if isinstance(o, tuple) else o)(fn(x, t(old_logp), t(advantages), jnp.asarray(mask), **options))\n"
        "loss_j, g = jax.value_and_grad(f)(t(logp))\n"
        "loss, grad = float(loss_j), np.asarray(g.astype(jnp.float64 if '{dtype}' == 'float64' else jnp.float32), np.float64)\n"
    ),
    "mlx": (
        "import mlx.core as mx\n"
        "t = lambda a: mx.array(a, dtype=mx.float64) if '{dtype}' == 'float64' else mx.array(a.astype(np.float32)).astype(mx.{dtype})\n"
        "f = lambda x: (lambda o: o[0] if isinstance(o, tuple) else o)(fn(x, t(old_logp), t(advantages), mx.array(mask), **options))\n"
        "loss_m, g = mx.value_and_grad(f)(t(logp))\n"
        "loss, grad = float(loss_m.astype(mx.float32) if '{dtype}' != 'float64' else loss_m), np.array(g.astype(mx.float32) if '{dtype}' != 'float64' else g, np.float64)\n"
    ),
}


def _import_line(origin: str, framework: str, target: str) -> str:
    if target in ("reference", "reference-strict"):
        return (
            "import sapo_ref\n"
            "fn = lambda *a, **k: (lambda r: (r.loss, r.grad))(sapo_ref.policy_loss(*a, **k))\n"
        )
    if ":" in origin:
        module, _, attr = origin.partition(":")
        return (
            f"from {module} import {attr.split('.')[0]} as fn\n"
            if "." not in attr
            else (f"import {module}\nfn = {module}.{attr}\n")
        )
    if origin.startswith("sapo_"):
        return f"from {origin} import policy_loss as fn\n"
    return f"fn = ...  # {origin}\n"


def repro(r: CaseResult, origin: str, framework: str) -> str:
    """A runnable snippet reproducing one failing case (inputs as literals, then the call)."""
    m = r.materialized
    case = r.case
    if m is None:
        lp, old, adv, mask = case.logp, case.old_logp, case.advantages, case.mask
    else:
        lp, old, adv, mask = m.logp, m.old_logp, m.advantages, m.mask
    call = _CALLS.get(
        framework,
        f"# run fn through the {framework} driver (sapo_conformance.drivers.get_driver)\n",
    )
    call = call.format(dtype=r.dtype, np_dtype=f"np.{r.dtype}")
    return (
        f"# sapo-conformance repro: case {case.id}, target {r.target}, dtype {r.dtype}\n"
        "import numpy as np\nimport sapo_ref\n"
        "nan, inf = float('nan'), float('inf')\n"
        f"logp = np.array({_lit(lp)})\n"
        f"old_logp = np.array({_lit(old)})\n"
        f"advantages = np.array({_lit(adv)})\n"
        f"mask = np.array({_lit(mask)})\n"
        f"options = {case.options!r}\n"
        "want = sapo_ref.policy_loss(logp, old_logp, advantages, mask, **options)  # float64 reference\n"
        + _import_line(origin, framework, r.target)
        + call
        + "print('loss', loss, 'want', want.loss)\n"
        "print('grad - want', grad - want.grad, sep='\\n')\n"
    )


# ----------------------------------------------------------------------------- JSON


def _row_json(row: ClauseRow) -> dict[str, Any]:
    return {
        "target": row.target,
        "dtype": row.dtype,
        "clause": row.clause,
        "title": _title(row.clause),
        "status": row.status,
        "passed": row.passed,
        "failed": row.failed,
        "skipped": row.skipped,
        "worst_abs": encode_float(row.worst_abs),
        "worst_rel": encode_float(row.worst_rel),
        "worst_case": row.worst_case,
    }


def _clause_order(rows: list[ClauseRow]) -> list[str]:
    order = {c.id: i for i, c in enumerate(spec.CLAUSES)}
    return sorted({r.clause for r in rows}, key=lambda c: order.get(c, 999))


def _title(cid: str) -> str:
    try:
        return spec.clause(cid).title
    except KeyError:
        return ""


def cases_per_clause(result: SuiteResult) -> dict[str, int]:
    """How many cases exercise each clause (a case counts for every clause it is tagged with)."""
    counts: dict[str, int] = {}
    for c in result.cases:
        for cl in c.clauses:
            counts[cl] = counts.get(cl, 0) + 1
    order = {c.id: i for i, c in enumerate(spec.CLAUSES)}
    return dict(sorted(counts.items(), key=lambda kv: order.get(kv[0], 999)))


def _status(run: Any) -> str:
    return "error" if run.error else "skipped" if run.skipped else "ran"


def to_json(
    result: SuiteResult, settings: dict[str, Any], verdicts: list | None = None
) -> dict[str, Any]:
    """The run as a JSON-able dict following :func:`json_schema`."""
    from . import __version__

    origins = {run.target.name: run.target for run in result.runs}
    targets = []
    for run in result.runs:
        t = run.target
        targets.append(
            {
                "name": t.name,
                "framework": t.framework,
                "driver": run.driver,
                "versions": dict(run.versions),
                "device": run.device or "default",
                "isolation": run.isolation,
                "worker_restarts": run.worker_restarts,
                "origin": t.origin,
                "status": _status(run),
                "reason": run.error or run.skipped or "",
                "declared_limits": list(t.declared_limits),
                "capabilities": {
                    k: t.capabilities()[k]
                    for k in (
                        "count_empty_rows",
                        "advantages",
                        "norm_length",
                        "temperatures",
                        "mask_dtype",
                        "metrics",
                        "weights",
                        "kl_estimators",
                    )
                },
                "dtype_skips": dict(run.dtype_skips),
                "wall_time_s": round(run.seconds, 3),
                "methods": list(t.methods),
                "loss_aggs": list(t.loss_aggs),
                "dtypes": list(t.dtypes),
                "tolerance_deviations": {
                    k: {
                        kk: (vv if isinstance(vv, (str, int, float, bool)) else dict(vv))
                        for kk, vv in v.items()
                    }
                    for k, v in t.tolerance_deviations.items()
                },
            }
        )
    failures = []
    for r in result.failures:
        t = origins[r.target]
        failures.append(
            {
                "target": r.target,
                "dtype": r.dtype,
                "case": r.case.id,
                "clauses": list(r.failed_clauses),
                "options": dict(r.case.options),
                "messages": r.messages,
                "deviations": [
                    {
                        "id": d.id,
                        "title": d.title,
                        "clause": d.clause,
                        "peers": list(d.peers),
                        "fix": d.fix,
                    }
                    for d in r.deviations
                ],
                "repro": repro(r, t.origin, t.framework),
            }
        )
    statuses = [r.status for r in result.results]
    return {
        "schema": SCHEMA_ID,
        "tool_version": __version__,
        "spec_version": spec.VERSION,
        "python": platform.python_version(),
        "settings": settings,
        "wall_time_s": round(result.wall_time, 3),
        "passed": result.passed,
        "interrupted": result.interrupted,
        "unchecked": result.unchecked(),
        "verdicts": [v.to_json() for v in verdicts or []],
        "totals": {s: statuses.count(s) for s in ("pass", "fail", "skip")},
        "cases_per_clause": cases_per_clause(result),
        "targets": targets,
        "clauses": [_row_json(row) for row in result.rows()],
        "failures": failures,
    }


# ----------------------------------------------------------------------------- Markdown


def to_markdown(result: SuiteResult, settings: dict[str, Any], verdicts: list | None = None) -> str:
    """The run as Markdown (for CI summaries and issue comments)."""
    data = to_json(result, settings, verdicts)
    lines = [f"# sapo-conformance report (spec {data['spec_version']})", ""]
    verdict = "PASS" if data["passed"] else "FAIL"
    t = data["totals"]
    lines += [
        f"**{verdict}**: {t['pass']} passed, {t['fail']} failed, {t['skip']} skipped "
        f"in {data['wall_time_s']:.1f} s (seed {settings.get('seed')}).",
        "",
    ]
    lines += [f"- **not a pass**: {why}" for why in data["unchecked"]]
    if data["unchecked"]:
        lines.append("")
    lines += [
        "| target | framework, versions, device, driver | status | notes |",
        "|---|---|---|---|",
    ]
    for tg in data["targets"]:
        notes = tg["reason"] or "; ".join(f"{k}: {v}" for k, v in tg["dtype_skips"].items())
        fw = ", ".join(
            [tg["framework"]]
            + [f"{k} {v}" for k, v in tg["versions"].items()]
            + [f"device {tg['device']}"]
            + ([f"driver {tg['driver']}"] if tg["driver"] else [])
        )
        lines.append(
            f"| {tg['name']} | {fw} | {tg['status']} ({tg['wall_time_s']:.1f} s) | "
            f"{notes.strip('; ')} |"
        )
    lines.append("")
    for tg in data["targets"]:
        lines.append(
            f"- {tg['name']}: declared limits: "
            + (
                "; ".join(tg["declared_limits"])
                if tg["declared_limits"]
                else "none (the full contract)"
            )
        )
    lines.append("")
    if data["verdicts"]:
        lines += ["## Verdicts", ""] + [f"- `{v['line']}`" for v in data["verdicts"]] + [""]
    rows = result.rows()
    dtypes = [d for d in DTYPES if any(r.dtype == d for r in rows)]
    for run in result.runs:
        mine = [r for r in rows if r.target == run.target.name]
        if not mine:
            continue
        lines += [
            f"## {run.target.name}",
            "",
            "| clause | title | " + " | ".join(dtypes) + " |",
            "|---|---|" + "---|" * len(dtypes),
        ]
        for cid in _clause_order(mine):
            cells = []
            for d in dtypes:
                row = next((r for r in mine if r.clause == cid and r.dtype == d), None)
                cells.append(_cell(row, markdown=True))
            lines.append(f"| {cid} | {_title(cid)} | " + " | ".join(cells) + " |")
        lines.append("")
    if data["failures"]:
        lines += ["## Failures", ""]
        for run in result.runs:
            fails = [r for r in result.failures if r.target == run.target.name]
            if fails:
                lines += [f"- **{run.target.name}**: {diagnosis(fails)}"]
        lines.append("")
        for f in data["failures"]:
            devs = ", ".join(
                f"`{d['id']}` ({d['title']}; fix: {d['fix']})" for d in f["deviations"]
            )
            lines += [
                f"### {f['target']} / {f['dtype']} / case `{f['case']}` (clauses {', '.join(f['clauses'])})",
                "",
            ]
            lines += [f"- {msg}" for msg in f["messages"]]
            if devs:
                lines.append(f"- reproduced by known deviation: {devs}")
            lines += ["", "```python", f["repro"].rstrip(), "```", ""]
    lines += ["## Cases per clause", "", "| clause | cases |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in data["cases_per_clause"].items()]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- terminal


def _cell(row: ClauseRow | None, markdown: bool = False) -> str:
    if row is None or row.passed + row.failed == 0:
        return "-" if markdown else "[dim]-[/]"
    n = row.passed + row.failed
    if row.failed:
        text = f"FAIL {row.failed}/{n} {row.worst_rel:.1e} {row.worst_case}"
        return text if markdown else f"[bold red]{text}[/]"
    text = f"{n} ok {row.worst_rel:.0e}"
    return text if markdown else f"[green]{text}[/]"


def diagnosis(fails: list[CaseResult]) -> str:
    """Which known deviations reproduce how many of a target's failures."""
    counts: dict[str, int] = {}
    for r in fails:
        for d in r.deviations:
            counts[d.id] = counts.get(d.id, 0) + 1
    unexplained = sum(1 for r in fails if not r.deviations)
    parts = [
        f"{k} reproduces {v}/{len(fails)} failures"
        for k, v in sorted(counts.items(), key=lambda kv: -kv[1])
    ]
    if unexplained:
        parts.append(f"{unexplained}/{len(fails)} match no known deviation")
    return "; ".join(parts)


def failure_title(r: CaseResult) -> str:
    """One line naming a failure: target, dtype, case, clauses, options."""
    return f"{r.target} {r.dtype} case {r.case.id} clauses {', '.join(r.failed_clauses)} options {r.case.options}"


def failure_body(r: CaseResult) -> str:
    """A failure's messages and the known deviations that reproduce it (CLI and pytest alike)."""
    body = "\n".join(r.messages)
    if r.deviations:
        body += "\nreproduced by known deviation: " + "; ".join(
            f"{d.id} ({d.title}; seen in {', '.join(d.peers)}; fix: {d.fix})" for d in r.deviations
        )
    else:
        body += "\nno known deviation reproduces these numbers"
    return body


def _where(run: Any) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in run.versions.items())
    return (
        f"{run.target.framework}"
        + (f" ({versions})" if versions else "")
        + f", device {run.device or 'default'}"
    )


def render(
    result: SuiteResult, settings: dict[str, Any], console: Any = None, verdicts: list | None = None
) -> None:
    """Print the terminal report with rich."""
    from rich.console import Console
    from rich.panel import Panel
    from rich.syntax import Syntax
    from rich.table import Table

    console = console or Console()
    rows = result.rows()
    dtypes = [d for d in DTYPES if any(r.dtype == d for r in rows)]
    for run in result.runs:
        t = run.target
        if run.error:
            console.print(
                f"[bold red]error[/] target [bold]{t.name}[/] ({t.framework}): {run.error}"
            )
            continue
        if run.skipped:
            console.print(
                f"[yellow]skipped[/] target [bold]{t.name}[/] ({t.framework}): {run.skipped}"
            )
            continue
        console.print(
            f"target [bold]{t.name}[/]: {_where(run)}; driver {run.driver or '?'}; {run.isolation}"
            + (f" (restarted {run.worker_restarts}x)" if run.worker_restarts else "")
        )
        limits = t.declared_limits
        console.print(
            f"[magenta]target {t.name}: declared limits[/]: "
            + ("; ".join(limits) if limits else "none (the full contract)")
        )
        for dt, why in run.dtype_skips.items():
            console.print(f"[dim]target {t.name}: {dt} skipped: {why}[/]")
        mine = [r for r in rows if r.target == t.name]
        table = Table(
            title=f"{t.name} ({t.framework}: {t.origin}, {run.seconds:.1f} s): cases passed, "
            "worst relative error (C.1)",
            title_justify="left",
            show_lines=False,
        )
        table.add_column("clause", no_wrap=True, min_width=6)
        wide = console.width >= 110
        if wide:
            table.add_column(
                "title", overflow="ellipsis", no_wrap=True, max_width=max(20, console.width - 95)
            )
        for d in dtypes:
            table.add_column(_SHORT[d], no_wrap=True)
        for cid in _clause_order(mine):
            table.add_row(
                cid,
                *([_title(cid)] if wide else []),
                *[
                    _cell(next((r for r in mine if r.clause == cid and r.dtype == d), None))
                    for d in dtypes
                ],
            )
        console.print(table)
        fails = [r for r in result.failures if r.target == t.name]
        if fails:
            console.print(f"[bold]{t.name} diagnosis[/]: {diagnosis(fails)}")
        for r in fails[:MAX_DETAILED]:
            console.print(
                Panel(failure_body(r), title=f"[red]{failure_title(r)}[/]", title_align="left")
            )
            console.print(Syntax(repro(r, t.origin, t.framework), "python", word_wrap=True))
        if len(fails) > MAX_DETAILED:
            console.print(
                f"[red]... and {len(fails) - MAX_DETAILED} more failures of {t.name}[/] "
                "(all of them with repros in --json/--markdown)"
            )
    for v in verdicts or []:
        console.print(f"[bold]verdict[/] {v.line}", highlight=False)
    for why in result.unchecked():
        console.print(f"[bold red]not a pass[/]: {why}")
    statuses = [r.status for r in result.results]
    verdict = "[bold green]PASS[/]" if result.passed else "[bold red]FAIL[/]"
    counts = cases_per_clause(result)
    console.print(
        f"{verdict}: {statuses.count('pass')} passed, {statuses.count('fail')} failed, "
        f"{statuses.count('skip')} skipped (case x target x dtype) in {result.wall_time:.1f} s; "
        f"{len(result.cases)} cases over {len(counts)} clauses, seed {settings.get('seed')}"
    )
