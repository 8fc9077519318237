r"""Run cases over targets and dtypes; collect per-case results and per-clause rows.

Per case and dtype the suite checks (clause C.1):

- ``loss`` against the reference with the dtype's value tolerance;
- ``grad`` (autodiff with a random scalar cotangent ``c``, divided by ``c``) with the gradient
  tolerance;
- ``fd`` (float64 only, smooth cases): the directional derivative :math:`\langle g, v\rangle` of the
  implementation's own gradient along a random direction ``v`` against a fourth-order central
  difference of its own loss, :math:`(8(L_{+h}-L_{-h}) - (L_{+2h}-L_{-2h}))/12h`, ``h = 1e-4``.
  This catches a custom backward inconsistent with its forward. The float64 difference is
  accurate to about 1e-10 relative, so it is judged with the spec's float32 gradient row, the
  tightest row it is sure to meet;
- ``ref_grad`` (clause 10.3) where a case passes ``ref_logp`` and the driver pulls the
  cotangent back to it too: the gradient of ``ref_logp``, gradient tolerance;
- ``metrics`` (clause 7.1) when the function returns them: every key of the method, value
  tolerance; an entry whose reference value the dtype cannot hold is not compared. The keys of
  the clause 10 terms (``kl_ref/mean``, ``weights/mean``) are compared when returned;
- ``error`` for an error case (clause 10.4): the call must raise the case's exception (by
  class name, its bases included), or, for a data fault, may return a NaN loss and an all-NaN
  gradient instead (a traced call, clause 8.7).

Loss, grad and fd failures count against the case's clauses (clause 7.1 only ever counts
metric comparisons), metric failures against 7.1, an input modified by the call against 6.5
(every call of every driver checks it, so every checked case counts for 6.5).

A target's declared limits (:mod:`sapo_conformance.capabilities`) skip the cases outside them
with the reason (:func:`applicable`); ``count_empty_rows: "counted"`` runs every case with
``count_empty_rows=True`` and the reference evaluated the same way (:func:`cases_for`).

The function runs through an executor: :class:`~sapo_conformance.worker.InProcess`, or the
target's supervised worker process when :func:`run_suite` gets a
:class:`~sapo_conformance.worker.WorkerPool` (the command always does).
"""

from __future__ import annotations

import dataclasses
import math
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sapo_ref import spec

from .cases import Case, Materialized, _max_finite, materialize, resolve
from .compare import Comparison, compare
from .deviations import Deviation, identify
from .drivers import Outcome, get_driver
from .targets import Target, UsageError, tolerance_for
from .worker import Failure, InProcess, WorkerLost, WorkerPool, describe, gather

__all__ = [
    "CaseResult",
    "ClauseRow",
    "TargetRun",
    "SuiteResult",
    "run_suite",
    "run_case",
    "applicable",
    "cases_for",
    "cotangent_for",
    "FD_STEP",
    "INPUTS_CLAUSE",
]

#: Clause every call checks: the implementation must not modify its inputs.
INPUTS_CLAUSE = "6.5"

FD_STEP = 1e-4
#: Checks against the reference's numbers (the worst errors of a case and a clause row).
_VALUE_CHECKS = ("loss", "grad", "ref_grad")
#: Metric keys of the clause 10 terms: compared when the implementation returns them.
_OPTIONAL_METRICS = ("kl_ref/mean", "weights/mean")
_COTANGENTS = (0.625, 0.75, 1.25, 1.5, 2.0, -0.75, -1.25, -1.5)  # exact in bfloat16


def cotangent_for(seed: int, case_id: str) -> float:
    """The case's upstream cotangent: a dyadic number, exact in every dtype."""
    return _COTANGENTS[zlib.crc32(f"{seed}:{case_id}".encode()) % len(_COTANGENTS)]


@dataclass
class CaseResult:
    """One case x target x dtype."""

    target: str
    dtype: str
    case: Case
    status: str  # "pass" | "fail" | "skip"
    reason: str = ""
    checks: list[Comparison] = field(default_factory=list)
    failed_clauses: tuple[str, ...] = ()
    deviations: list[Deviation] = field(default_factory=list)
    materialized: Materialized | None = None
    metrics_compared: bool = False
    #: What the implementation returned (kept for the verdicts: the function is not re-run).
    outcome: Outcome | None = None

    @property
    def worst_abs(self) -> float:
        return max((c.worst_abs for c in self.checks if c.name in _VALUE_CHECKS), default=0.0)

    @property
    def worst_rel(self) -> float:
        return max((c.worst_rel for c in self.checks if c.name in _VALUE_CHECKS), default=0.0)

    @property
    def messages(self) -> list[str]:
        out = [c.message for c in self.checks if not c.ok]
        return out + ([self.reason] if self.reason and self.status == "fail" else [])


@dataclass
class ClauseRow:
    """Per clause x target x dtype: counts, worst errors and the worst case."""

    target: str
    dtype: str
    clause: str
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    worst_abs: float = 0.0
    worst_rel: float = 0.0
    worst_case: str = ""
    _worst_key: tuple = (False, -1.0)

    @property
    def status(self) -> str:
        if self.failed:
            return "fail"
        return "pass" if self.passed else "skip"


@dataclass
class TargetRun:
    """A target and why (if) it or some of its dtypes did not run.

    ``skipped``: it could not run here (not installed, no such device); ``error``: it was asked
    to run and could not (its worker died or hung while loading it), which fails the run."""

    target: Target
    skipped: str | None = None
    dtype_skips: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None
    device: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    driver: str = ""
    isolation: str = "in-process"  # or "worker process"
    worker_restarts: int = 0


@dataclass
class SuiteResult:
    runs: list[TargetRun]
    results: list[CaseResult]
    cases: list[Case]
    seed: int
    wall_time: float = 0.0
    dtypes: tuple[str, ...] = ()
    interrupted: bool = False

    @property
    def failures(self) -> list[CaseResult]:
        return [r for r in self.results if r.status == "fail"]

    @property
    def passed(self) -> bool:
        """No failure, and something checked for every target and dtype that ran."""
        return not self.failures and not self.unchecked()

    def unchecked(self) -> list[str]:
        """Why this run certifies less than it was asked to (empty when it is complete).

        Every target that ran must check at least one case in every dtype it did not skip
        with a reason; a target named explicitly must run and check at least one dtype;
        something must be checked at all.
        """
        if self.interrupted:  # what did not run is not the implementation's doing
            return ["the run was interrupted before its end"]
        out: list[str] = []
        checked = {(r.target, r.dtype) for r in self.results if r.status != "skip"}
        dtypes = self.dtypes or tuple(dict.fromkeys(r.dtype for r in self.results))
        for run in self.runs:
            name = run.target.name
            if run.error:
                out.append(f"target {name}: {run.error}")
                continue
            if run.skipped:
                if run.target.requested:
                    out.append(f"target {name}: not run: {run.skipped}")
                continue
            tried = [d for d in dtypes if d not in run.dtype_skips]
            if not tried and run.target.requested:  # a default built-in without them: a skip
                skips = "; ".join(f"{d}: {why}" for d, why in run.dtype_skips.items())
                out.append(f"target {name}: 0 cases checked: no dtype could run ({skips})")
            for d in tried:
                if (name, d) not in checked:
                    reasons = [r.reason for r in self.results if r.target == name and r.dtype == d]
                    common = max(set(reasons), key=reasons.count) if reasons else "no case applies"
                    out.append(
                        f"target {name} {d}: 0 cases checked: "
                        f"{len(reasons)} cases skipped (e.g. {common})"
                    )
        if not checked and not out:
            out.append("0 cases checked in total")
        return out

    def rows(self) -> list[ClauseRow]:
        """Per clause x target x dtype aggregation, in spec clause order."""
        order = {c.id: i for i, c in enumerate(spec.CLAUSES)}
        table: dict[tuple[str, str, str], ClauseRow] = {}
        for r in self.results:
            clauses = [c for c in r.case.clauses if c != "7.1"] + list(r.failed_clauses)
            if (
                r.status != "skip" and r.outcome is not None
            ):  # the call ran: its inputs were compared
                clauses.append(INPUTS_CLAUSE)
            if r.metrics_compared:
                clauses.append("7.1")
            for cl in dict.fromkeys(clauses):
                row = table.setdefault((r.target, r.dtype, cl), ClauseRow(r.target, r.dtype, cl))
                if r.status == "skip":
                    row.skipped += 1
                    continue
                failed = cl in r.failed_clauses
                if failed:
                    row.failed += 1
                else:
                    row.passed += 1
                # Errors against the reference only (the fd check is the target against itself).
                names = {"7.1": ("metrics",), INPUTS_CLAUSE: ()}.get(cl, _VALUE_CHECKS)
                checks = [c for c in r.checks if c.name in names]
                ab = max((c.worst_abs for c in checks), default=0.0)
                rel = max((c.worst_rel for c in checks), default=0.0)
                row.worst_abs = max(row.worst_abs, ab)
                row.worst_rel = max(row.worst_rel, rel)
                key = (failed, rel)
                if key > row._worst_key:
                    row._worst_key, row.worst_case = key, r.case.id
        return sorted(table.values(), key=lambda x: (x.target, x.dtype, order.get(x.clause, 999)))


def _metric_check(m: Materialized, got: dict[str, float], tol: spec.Tolerance) -> Comparison:
    keys = [k for k in m.want_metrics if k in got or k not in _OPTIONAL_METRICS]
    missing = [k for k in keys if k not in got]
    if missing:
        return Comparison(
            "metrics",
            False,
            len(missing),
            len(keys),
            np.inf,
            np.inf,
            (),
            np.nan,
            np.nan,
            f"metrics: missing keys {missing}",
        )
    top = _max_finite(m.dtype)
    keep = [
        k for k in keys if not (np.isfinite(m.want_metrics[k]) and abs(m.want_metrics[k]) > top)
    ]
    want = np.array([m.want_metrics[k] for k in keep])
    have = np.array([got[k] for k in keep])
    c = compare("metrics", have, want, tol)
    if not c.ok and c.worst_index:
        c = Comparison(
            c.name,
            c.ok,
            c.mismatches,
            c.total,
            c.worst_abs,
            c.worst_rel,
            c.worst_index,
            c.got_at_worst,
            c.want_at_worst,
            c.message.replace(f"at {list(c.worst_index)}", f"at {keep[c.worst_index[0]]!r}"),
        )
    return c


def _fd_points(
    target: Target, m: Materialized, seed: int
) -> tuple[np.ndarray, list[np.ndarray]] | None:
    """The random direction ``v`` and the four points ``logp + s v`` of the check, or None
    where it does not apply."""
    # gspo-token's gradient is not its value's derivative by design (a stop-gradient, clause 2.8).
    if target.tolerance_deviations.get(m.dtype):  # declared less accurate than float64
        return None
    if m.dtype != "float64" or not m.case.fd or m.case.method == "gspo-token":
        return None
    if not np.isfinite(m.want_loss) or not m.mask.any():
        return None
    rng = np.random.default_rng([seed, zlib.crc32(m.case.id.encode())])
    v = np.where(m.mask, rng.normal(size=m.mask.shape), 0.0)
    v /= max(np.abs(v).max(), 1e-300)
    h = FD_STEP
    return v, [m.logp + s * v for s in (h, -h, 2 * h, -2 * h)]


def _fd_check(out: Outcome, v: np.ndarray, losses: list[float]) -> Comparison:
    lp, lm, lp2, lm2 = losses
    fd = (8.0 * (lp - lm) - (lp2 - lm2)) / (12.0 * FD_STEP)
    directional = float(np.sum(out.grad * v))
    c = compare("fd", directional, fd, spec.TOLERANCES["float32"]["grad"])
    if not c.ok:
        c = Comparison(
            "fd",
            False,
            1,
            1,
            c.worst_abs,
            c.worst_rel,
            (),
            directional,
            fd,
            f"fd: the gradient disagrees with the function's own loss along a random direction: "
            f"<grad, v> = {directional:.10g}, finite difference {fd:.10g}",
        )
    return c


def _error_check(case: Case, out: Outcome | Failure) -> Comparison:
    """Clause 10.4: the call raised the case's error (or, for a data fault, poisoned)."""
    want = f"{case.error} (clause 10.4)"
    if isinstance(out, Failure):
        ok = out.kind == "raised" and case.error in out.types
        got = out.text if out.kind == "raised" else f"{out.kind}: {out.text}"
        msg = f"error: expected {want}; the call raised {got}"
        return Comparison("error", ok, int(not ok), 1, 0.0, 0.0, (), np.nan, np.nan, msg)
    poisoned = math.isnan(out.loss) and bool(np.all(np.isnan(out.grad)))
    ok = case.poison and poisoned
    if poisoned and not case.poison:
        msg = f"error: expected {want}; the call returned NaN (allowed for data faults only)"
    else:
        msg = f"error: expected {want}; the call returned loss {out.loss!r}"
    return Comparison("error", ok, int(not ok), 1, 0.0, 0.0, (), np.nan, np.nan, msg)


def _value_clauses(case: Case) -> tuple[str, ...]:
    """The clauses a loss/gradient failure counts against (7.1 counts metrics only)."""
    return tuple(c for c in case.clauses if c != "7.1") or ("C.1",)


def _failed(res: CaseResult, reason: str, clause: str | None = None) -> CaseResult:
    res.status, res.reason = "fail", reason
    res.failed_clauses = (clause,) if clause else _value_clauses(res.case)
    return res


def run_case(
    target: Target,
    m: Materialized,
    seed: int,
    identify_deviations: bool = True,
    executor: Any = None,
) -> CaseResult:
    """Run one materialised case on a target and judge it.

    ``executor`` runs the calls (default: in this process, the target's framework driver); a
    worker's losses (exit, signal, time limit) and the implementation's exceptions become a
    failing case with the reason.
    """
    executor = executor or InProcess(target)
    case = m.case
    res = CaseResult(target.name, m.dtype, case, "pass", materialized=m)
    vt, gt = tolerance_for(target, m.dtype, "value"), tolerance_for(target, m.dtype, "grad")
    cot = cotangent_for(seed, case.id)
    fd_plan = _fd_points(target, m, seed)
    extra = dict(target.metrics_option) if target.metrics_option and target.metrics else None
    try:
        executor.begin_case(f"{case.id} ({m.dtype})")
        points = None if fd_plan is None else fd_plan[1]
        if hasattr(executor, "case"):  # one request for every call of the case
            calls = executor.case(m, dict(case.options), cot, points, extra)
        else:
            calls = gather(executor, m, dict(case.options), cot, points, extra)
    except WorkerLost as err:
        return _failed(res, f"worker: {err.reason}")
    except Exception as err:  # the whole request failed (e.g. SystemExit in a worker)
        f = describe(err)
        return _failed(res, f"{f.kind}: {f.text}", f.clause)
    if case.error is not None:
        if isinstance(calls.out, Failure) and calls.out.clause:  # e.g. an input modified (6.5)
            return _failed(res, f"{calls.out.kind}: {calls.out.text}", calls.out.clause)
        check = _error_check(case, calls.out)
        res.checks.append(check)
        if isinstance(calls.out, Outcome):
            res.outcome = calls.out
        if not check.ok:
            res.status, res.failed_clauses = "fail", _value_clauses(case)
        return res
    if isinstance(calls.out, Failure):  # the function raised on a valid case, or broke the contract
        return _failed(res, f"{calls.out.kind}: {calls.out.text}", calls.out.clause)
    out = res.outcome = calls.out
    res.checks.append(compare("loss", out.loss, m.want_loss, vt))
    res.checks.append(compare("grad", out.grad, m.want_grad, gt))
    if m.want_ref_grad is not None and out.ref_grad is not None:
        res.checks.append(compare("ref_grad", out.ref_grad, m.want_ref_grad, gt))
    if isinstance(calls.fd, Failure):
        if calls.fd.clause:
            return _failed(res, f"{calls.fd.kind}: {calls.fd.text}", calls.fd.clause)
        res.checks.append(
            Comparison(
                "fd",
                False,
                1,
                1,
                np.inf,
                np.inf,
                (),
                np.nan,
                np.nan,
                f"fd: {calls.fd.kind}: {calls.fd.text}",
            )
        )
    elif calls.fd is not None and fd_plan is not None:
        res.checks.append(_fd_check(out, fd_plan[0], calls.fd))
    metrics = out.metrics
    if extra is not None:  # opt-in metrics: the second call asked for them
        if isinstance(calls.extra, Failure):
            res.checks.append(
                Comparison(
                    "metrics",
                    False,
                    1,
                    1,
                    np.inf,
                    np.inf,
                    (),
                    np.nan,
                    np.nan,
                    f"metrics: the call with {extra}: {calls.extra.kind}: {calls.extra.text}",
                )
            )
            res.metrics_compared = True
            metrics = None
        else:
            metrics = calls.extra.metrics if calls.extra is not None else None
    if metrics is not None and target.metrics:
        res.metrics_compared = True
        res.checks.append(_metric_check(m, metrics, vt))
    failed: list[str] = []
    if any(not c.ok for c in res.checks if c.name != "metrics"):
        failed += _value_clauses(case)
    if any(not c.ok for c in res.checks if c.name == "metrics"):
        failed.append("7.1")
    if failed:
        res.status, res.failed_clauses = "fail", tuple(dict.fromkeys(failed))
        if identify_deviations and any(not c.ok for c in res.checks if c.name != "metrics"):
            res.deviations = identify(m, dict(case.options), out, vt, gt)
    return res


def applicable(target: Target, case: Case) -> str | None:
    """Why ``target`` does not take ``case`` (outside what it declares), or None.

    >>> from sapo_conformance.targets import Target
    >>> import numpy as np
    >>> t = Target("t", "numpy", None, "t", advantages=("sequence",))
    >>> c = Case("x", ("1.5",), np.zeros((1, 2)), np.zeros((1, 2)), np.ones((1, 2)), np.ones((1, 2), bool))
    >>> applicable(t, c)
    'advantages per token ([N, T]): the target declares advantages: sequence'
    """
    if case.method not in target.methods:
        return f"method {case.method} not supported by the target"
    if case.loss_agg not in target.loss_aggs:
        return f"loss_agg {case.loss_agg} not supported by the target"
    shape = "token" if np.ndim(case.advantages) == 2 else "sequence"
    if shape not in target.advantages:
        dims = "[N, T]" if shape == "token" else "[N]"
        return f"advantages per {shape} ({dims}): the target declares advantages: {', '.join(target.advantages)}"
    nl = case.options.get("norm_length")
    if target.norm_length == "T" and nl is not None and nl != case.mask.shape[1]:
        return (
            f"norm_length {nl} is not the padded length T = {case.mask.shape[1]} (declared: T only)"
        )
    why = _terms_applicable(target, case)
    if why:
        return why
    if target.temperatures == "tau_neg>=tau_pos" and case.error is None:
        cfg = resolve(case.options, has_ref_logp=case.ref_logp is not None)
        if cfg.is_soft and cfg.tau_neg < cfg.tau_pos:
            return (
                f"tau_neg {cfg.tau_neg} < tau_pos {cfg.tau_pos} (declared: tau_neg >= tau_pos only)"
            )
    return None


def _terms_applicable(target: Target, case: Case) -> str | None:
    """Why a case's clause 10 terms are outside what ``target`` declares, or None."""
    if case.weights is not None and not target.weights:
        return "weights (clause 10.1): the target does not declare the weights capability"
    est = case.kl_estimator
    if est is None:
        return None
    if not target.kl_estimators:
        return "KL penalty (clause 10.2): the target declares no kl_estimators"
    if case.error is None and est not in target.kl_estimators:
        return f"kl_estimator {est} (clause 10.2): the target declares kl_estimators: " + ", ".join(
            target.kl_estimators
        )
    return None


def cases_for(target: Target, cases: list[Case]) -> list[Case]:
    """The cases as ``target`` runs them: with ``count_empty_rows=True`` when it declares
    ``"counted"``; ``"both"`` adds a counted copy (id suffix ``+counted``) of every case
    with an empty row."""
    mode = target.count_empty_rows
    if mode == "excluded":
        return cases
    counted = lambda c, suffix="": dataclasses.replace(
        c, id=c.id + suffix, options={**c.options, "count_empty_rows": True}
    )
    if mode == "counted":
        return [counted(c) for c in cases]
    out = []
    for c in cases:
        out.append(c)
        if (~np.asarray(c.mask, bool).any(axis=1)).any():
            out.append(counted(c, "+counted"))
    return out


def _prepare(run: TargetRun, pool: WorkerPool | None, device: str | None) -> Any:
    """The executor of a target (its worker, or in-process), or None when it cannot run."""
    target = run.target
    run.device = device
    worker = pool.get(target.name) if pool is not None else None
    if worker is not None:
        run.isolation = "worker process"
        try:
            info = worker.ready()
        except WorkerLost as err:
            run.error = f"could not be loaded: {err.reason}"
            return None
        run.versions, run.driver = dict(info.versions), info.driver
        why = info.unavailable or info.device_unavailable
        if why:
            run.skipped = why
            return None
        for d, reason in info.dtype_unavailable.items():
            if reason:
                run.dtype_skips.setdefault(d, reason)
        return worker
    if target.fn is None and target.unavailable is None:
        raise UsageError(
            f"target {target.name} was built without its function (load=False) and no worker"
        )
    driver = get_driver(target.framework)
    why = target.unavailable or driver.unavailable() or driver.device_unavailable(device)
    if why:
        run.skipped = why
        return None
    run.versions = driver.versions()
    run.driver = f"{type(driver).__module__}:{type(driver).__name__}"
    return InProcess(target, device)


def run_suite(
    targets: Iterable[Target],
    cases: list[Case],
    dtypes: Iterable[str],
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
    *,
    pool: WorkerPool | None = None,
    device: str | None = None,
) -> SuiteResult:
    """Every case on every available target in every dtype both support.

    With a ``pool`` each target runs in its supervised worker process; otherwise in-process.
    A Ctrl-C ends the run early with what was checked so far (``interrupted``: not a pass).

    >>> from sapo_conformance import builtin_target, generate_cases
    >>> res = run_suite([builtin_target("reference")], generate_cases(0, 1), ["float64"])
    >>> res.passed, len(res.results)
    (True, 51)
    """
    start = time.perf_counter()
    cache: dict[tuple[str, str, bool], Materialized | str] = {}
    runs: list[TargetRun] = []
    results: list[CaseResult] = []
    dtypes = tuple(dtypes)
    interrupted = False
    for target in targets:
        run = TargetRun(target)
        runs.append(run)
        if interrupted:
            run.skipped = "not run: the run was interrupted"
            continue
        t0 = time.perf_counter()
        executor = _prepare(run, pool, device)
        mine = cases_for(target, cases) if executor is not None else []
        if executor is None and progress:
            progress(len(cases) * len(dtypes))
        try:
            _run_target(run, executor, mine, dtypes, seed, cache, results, progress)
        except KeyboardInterrupt:
            interrupted = True
        run.seconds = time.perf_counter() - t0
        run.worker_restarts = getattr(executor, "restarts", 0)
    return SuiteResult(runs, results, cases, seed, time.perf_counter() - start, dtypes, interrupted)


def _run_target(run, executor, cases, dtypes, seed, cache, results, progress) -> None:
    if executor is None:
        return
    target = run.target
    for dtype in dtypes:
        why = None if dtype in target.dtypes else f"{dtype} not supported by the target"
        why = why or run.dtype_skips.get(dtype)
        if why is None and run.isolation == "in-process":
            why = get_driver(target.framework).dtype_unavailable(dtype)
        if why:
            run.dtype_skips[dtype] = why
            if progress:
                progress(len(cases))
            continue
        for case in cases:
            if dtype not in case.dtypes:  # e.g. float64 golden vectors: not a skip, not a case
                if progress:
                    progress(1)
                continue
            key = (case.id, dtype, bool(case.options.get("count_empty_rows")))
            if key not in cache:
                cache[key] = materialize(case, dtype)
            m = cache[key]
            why = m if isinstance(m, str) else applicable(target, case)
            if why:
                results.append(CaseResult(target.name, dtype, case, "skip", reason=why))
            elif getattr(executor, "given_up", False):
                res = CaseResult(target.name, dtype, case, "pass", materialized=m)
                results.append(
                    _failed(
                        res,
                        f"not run: the worker was lost {executor.losses} times in a "
                        f"row (the last time: {executor.last_loss})",
                    )
                )
            else:
                results.append(run_case(target, m, seed, executor=executor))
            if progress:
                progress(1)
