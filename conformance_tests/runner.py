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
- ``metrics`` (clause 7.1) when the function returns them: every key of the method, value
  tolerance; an entry whose reference value the dtype cannot hold is not compared.

Loss, grad and fd failures count against the case's clauses, metric failures against 7.1.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np

from sapo_ref import spec

from .cases import Case, Materialized, _max_finite, materialize
from .compare import Comparison, compare
from .deviations import Deviation, identify
from .drivers import ConformanceError, Outcome, get_driver
from .targets import Target, tolerance_for

__all__ = ["CaseResult", "ClauseRow", "TargetRun", "SuiteResult", "run_suite", "cotangent_for", "FD_STEP"]

FD_STEP = 1e-4
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

    @property
    def worst_abs(self) -> float:
        return max((c.worst_abs for c in self.checks if c.name in ("loss", "grad")), default=0.0)

    @property
    def worst_rel(self) -> float:
        return max((c.worst_rel for c in self.checks if c.name in ("loss", "grad")), default=0.0)

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
    """A target and why (if) it or some of its dtypes did not run."""

    target: Target
    skipped: str | None = None
    dtype_skips: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class SuiteResult:
    runs: list[TargetRun]
    results: list[CaseResult]
    cases: list[Case]
    seed: int
    wall_time: float = 0.0

    @property
    def failures(self) -> list[CaseResult]:
        return [r for r in self.results if r.status == "fail"]

    @property
    def passed(self) -> bool:
        return not self.failures

    def rows(self) -> list[ClauseRow]:
        """Per clause x target x dtype aggregation, in spec clause order."""
        order = {c.id: i for i, c in enumerate(spec.CLAUSES)}
        table: dict[tuple[str, str, str], ClauseRow] = {}
        for r in self.results:
            clauses = list(r.case.clauses) + (["7.1"] if r.metrics_compared else [])
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
                names = ("metrics",) if cl == "7.1" else ("loss", "grad")
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
    keys = list(m.want_metrics)
    missing = [k for k in keys if k not in got]
    if missing:
        return Comparison("metrics", False, len(missing), len(keys), np.inf, np.inf, (), np.nan, np.nan,
                          f"metrics: missing keys {missing}")
    top = _max_finite(m.dtype)
    keep = [k for k in keys if not (np.isfinite(m.want_metrics[k]) and abs(m.want_metrics[k]) > top)]
    want = np.array([m.want_metrics[k] for k in keep])
    have = np.array([got[k] for k in keep])
    c = compare("metrics", have, want, tol)
    if not c.ok and c.worst_index:
        c = Comparison(c.name, c.ok, c.mismatches, c.total, c.worst_abs, c.worst_rel, c.worst_index,
                       c.got_at_worst, c.want_at_worst,
                       c.message.replace(f"at {list(c.worst_index)}", f"at {keep[c.worst_index[0]]!r}"))
    return c


def _fd_check(driver, target: Target, m: Materialized, out: Outcome, seed: int) -> Comparison | None:
    # gspo-token's gradient is not its value's derivative by design (a stop-gradient, clause 2.8).
    if target.tolerance_deviations.get(m.dtype):  # declared less accurate than float64
        return None
    if m.dtype != "float64" or not m.case.fd or m.case.method == "gspo-token" or not np.isfinite(out.loss) or not np.all(np.isfinite(out.grad)):
        return None
    if not np.isfinite(m.want_loss) or not m.mask.any():
        return None
    rng = np.random.default_rng([seed, zlib.crc32(m.case.id.encode())])
    v = np.where(m.mask, rng.normal(size=m.mask.shape), 0.0)
    v /= max(np.abs(v).max(), 1e-300)
    h = FD_STEP
    L = lambda s: driver.value(target.fn, m, m.case.options, m.logp + s * v)
    fd = (8.0 * (L(h) - L(-h)) - (L(2 * h) - L(-2 * h))) / (12.0 * h)
    directional = float(np.sum(out.grad * v))
    c = compare("fd", directional, fd, spec.TOLERANCES["float32"]["grad"])
    if not c.ok:
        c = Comparison("fd", False, 1, 1, c.worst_abs, c.worst_rel, (), directional, fd,
                       f"fd: the gradient disagrees with the function's own loss along a random direction: "
                       f"<grad, v> = {directional:.10g}, finite difference {fd:.10g}")
    return c


def run_case(target: Target, m: Materialized, seed: int, identify_deviations: bool = True) -> CaseResult:
    """Run one materialised case on a target (driver chosen by the target's framework)."""
    driver = get_driver(target.framework)
    case = m.case
    res = CaseResult(target.name, m.dtype, case, "pass", materialized=m)
    vt, gt = tolerance_for(target, m.dtype, "value"), tolerance_for(target, m.dtype, "grad")
    cot = cotangent_for(seed, case.id)
    try:
        with np.errstate(all="ignore"):
            out = driver.run(target.fn, m, dict(case.options), cot)
    except Exception as err:  # the function raised on a valid case, or broke the contract
        res.status, res.failed_clauses = "fail", case.clauses
        kind = "contract" if isinstance(err, ConformanceError) else "raised"
        res.reason = f"{kind}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        return res
    res.checks.append(compare("loss", out.loss, m.want_loss, vt))
    res.checks.append(compare("grad", out.grad, m.want_grad, gt))
    try:
        with np.errstate(all="ignore"):
            fd = _fd_check(driver, target, m, out, seed)
    except Exception as err:
        fd = Comparison("fd", False, 1, 1, np.inf, np.inf, (), np.nan, np.nan, f"fd: raised {err!r}")
    if fd is not None:
        res.checks.append(fd)
    if target.metrics_option and target.metrics:  # opt-in metrics: a second call asks for them
        try:
            with np.errstate(all="ignore"):
                extra = driver.run(target.fn, m, {**case.options, **target.metrics_option}, cot)
            out = Outcome(out.loss, out.grad, extra.metrics, out.grad_dtype)
        except Exception as err:
            res.checks.append(Comparison("metrics", False, 1, 1, np.inf, np.inf, (), np.nan, np.nan,
                                         f"metrics: the call with {target.metrics_option} raised {err!r}"))
            res.metrics_compared = True
    if out.metrics is not None and target.metrics:
        res.metrics_compared = True
        res.checks.append(_metric_check(m, out.metrics, vt))
    failed: list[str] = []
    if any(not c.ok for c in res.checks if c.name != "metrics"):
        failed += case.clauses
    if any(not c.ok for c in res.checks if c.name == "metrics"):
        failed.append("7.1")
    if failed:
        res.status, res.failed_clauses = "fail", tuple(dict.fromkeys(failed))
        if identify_deviations and any(not c.ok for c in res.checks if c.name != "metrics"):
            res.deviations = identify(m, dict(case.options), out, vt, gt)
    return res


def applicable(target: Target, case: Case) -> str | None:
    """Why ``target`` does not take ``case`` (method or aggregation not claimed), or None."""
    if case.method not in target.methods:
        return f"method {case.method} not supported by the target"
    if case.loss_agg not in target.loss_aggs:
        return f"loss_agg {case.loss_agg} not supported by the target"
    return None


def run_suite(
    targets: Iterable[Target],
    cases: list[Case],
    dtypes: Iterable[str],
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> SuiteResult:
    """Every case on every available target in every dtype both support.

    >>> from sapo_conformance import builtin_target, generate_cases
    >>> res = run_suite([builtin_target("reference")], generate_cases(0, 1), ["float64"])
    >>> res.passed, len(res.results)
    (True, 25)
    """
    start = time.perf_counter()
    cache: dict[tuple[str, str], Materialized | str] = {}
    runs: list[TargetRun] = []
    results: list[CaseResult] = []
    dtypes = tuple(dtypes)
    for target in targets:
        run = TargetRun(target)
        runs.append(run)
        t0 = time.perf_counter()
        driver = get_driver(target.framework)
        why = target.unavailable or driver.unavailable()
        if why:
            run.skipped = why
            if progress:
                progress(len(cases) * len(dtypes))
            continue
        for dtype in dtypes:
            why = None if dtype in target.dtypes else f"{dtype} not supported by the target"
            why = why or driver.dtype_unavailable(dtype)
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
                key = (case.id, dtype)
                if key not in cache:
                    cache[key] = materialize(case, dtype)
                m = cache[key]
                why = m if isinstance(m, str) else applicable(target, case)
                if why:
                    results.append(CaseResult(target.name, dtype, case, "skip", reason=why))
                else:
                    results.append(run_case(target, m, seed))
                if progress:
                    progress(1)
        run.seconds = time.perf_counter() - t0
    return SuiteResult(runs, results, cases, seed, time.perf_counter() - start)
