r"""Verdicts: the set of known deviations that explains a target's failures, per dtype.

For every target x dtype of a run, :func:`diagnose` searches sets of up to ``MAX_SET`` (five)
catalogue deviations (:mod:`.deviations`), each with its parameter fitted, for the set whose
composed model reproduces the most failing cases (loss and gradient within the case dtype's tolerances,
clause C.1), and says plainly how many failures remain unexplained::

    trl:loss float64 = spec 0.1.0 + {empty-rows-counted, nan-through-mask}: 33/33 failures explained

Search (beam search over the pruned candidates, smallest set first):

1. Candidates are the catalogue models with their TOML default parameters plus the parameters
   fitted from each failing case (a clamp bound by bisection on the loss, a dual-clip constant
   solved from the loss). Entries marked ``composes = false`` (a sign, a constant factor) are
   tried alone only.
2. Pruning: a candidate is only tried on a failing case whose numbers it can change (its model
   says so without evaluating: a clamp needs a log-ratio beyond its bound, empty-rows-counted an
   empty row, a float32 temperature a float64 SAPO case...). A set is evaluated on a case
   through the subset of its members that apply there, and that evaluation is cached, so the
   search runs only on failing cases and costs one model evaluation per distinct
   (case, applicable subset).
3. Every candidate alone, then the best ``_BEAM`` sets of each size grown by one composing
   candidate that can change a case they leave unexplained, up to ``max_set`` members; it
   stops at the first size where a set explains every failure, or where one more member
   explains nothing more than the best set of the size before. Ranking: most failures
   explained, then fewest deviations, then catalogue order.
4. Passing cases (decision): the chosen set must not contradict them. A passing case agreed
   with the reference within tolerance, so the reference's numbers stand in for the
   implementation's (no stored outcome needed): on every passing case where a member applies,
   the composed model must agree with the reference within the case's tolerances. The best
   ranked set without contradiction wins; ``contradicted`` counts the passing cases the chosen
   set disagrees with when every candidate contradicts some.
5. Partial deviations (``partial = true``: poisons such as NaN through the mask, 0 * inf, an
   overflowing exp) reach a case or not depending on how the code is arranged: on a failing
   case the set is also tried without them, and passing cases are not held against them.

The implementation's outcome on a failing case is the runner's record
(``CaseResult.outcome``); a result without one is run again in-process.

A failing case whose implementation raised, or whose only failures are metrics (clause 7.1) or
the finite-difference self-check, has no loss/gradient to explain: it counts as unexplained
(metric-only failures are reported apart, not diagnosed).

>>> from sapo_conformance import builtin_target, generate_cases, run_suite
>>> res = run_suite([builtin_target("reference")], generate_cases(0, 1), ["float64"])
>>> [(v.target, v.dtype, v.names, v.failures, v.passed) for v in diagnose(res)]
[('reference', 'float64', (), 0, 51)]
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sapo_ref import spec

from .cases import Materialized
from .deviations import (
    CATALOGUE,
    Applied,
    Deviation,
    applies,
    candidate_params,
    format_applied,
    reproduces,
)
from .drivers import Outcome, get_driver
from .targets import Target, tolerance_for

__all__ = ["Verdict", "diagnose", "diagnose_cases", "MAX_SET"]

#: Largest number of deviations composed in one set. The issue asked for three; real peers
#: have up to five at once (verl's GSPO: a clamp, NaN through the mask, no dual clip, 0/0 on an
#: empty batch, inf - inf in its straight-through term). The beam keeps five cheap, and a
#: larger set is only chosen when it explains strictly more failures.
MAX_SET = 5
#: Ranked sets checked against the passing cases before giving up on a contradiction-free one.
_MAX_CHECKED = 200
#: Parameter candidates kept per deviation (defaults first, then the most proposed fits).
_MAX_PARAMS = 4
#: Sets of one size extended to the next (beam width).
_BEAM = 6


@dataclass(frozen=True)
class Verdict:
    """What explains one target's failures in one dtype."""

    target: str
    dtype: str
    spec_version: str
    deviations: tuple[Applied, ...]
    explained: int
    failures: int
    passed: int
    unexplained_cases: tuple[str, ...] = ()
    unexplained_clauses: tuple[str, ...] = ()
    metric_failures: int = 0
    declared_limits: tuple[str, ...] = ()
    contradicted: int = 0
    seconds: float = 0.0

    @property
    def names(self) -> tuple[str, ...]:
        """The deviation ids of the set (sorted as the catalogue lists them)."""
        return tuple(a.deviation.id for a in self.deviations)

    @property
    def params(self) -> dict[str, dict[str, Any]]:
        """Fitted parameters by deviation id (entries without a parameter are absent)."""
        return {a.deviation.id: dict(a.param) for a in self.deviations if a.param}

    @property
    def complete(self) -> bool:
        """Every failure explained (or none to explain)."""
        return self.explained == self.failures

    @property
    def line(self) -> str:
        """One line: the target, dtype, spec version, the set and how much of the failures it explains."""
        head = f"{self.target} {self.dtype} = spec {self.spec_version}"
        if self.deviations:
            head += " + {" + ", ".join(format_applied(a) for a in self.deviations) + "}"
        if not self.failures:
            body = f"conforms ({self.passed}/{self.passed} cases passed)"
        else:
            body = f"{self.explained}/{self.failures} failures explained"
            missing = self.failures - self.explained
            if missing:
                body += f", {missing} unexplained (clauses {', '.join(self.unexplained_clauses)})"
        extra = []
        if self.contradicted:
            extra.append(f"the set disagrees with {self.contradicted} passing cases")
        if self.metric_failures:
            extra.append(f"{self.metric_failures} metric-only failures (clause 7.1) not diagnosed")
        if self.declared_limits:
            extra.append("declared limits: " + "; ".join(self.declared_limits))
        return f"{head}: {body}" + "".join(f"; {e}" for e in extra)

    def to_json(self) -> dict[str, Any]:
        """The verdict as JSON-ready data (the report carries it per target and dtype)."""
        return {
            "target": self.target,
            "dtype": self.dtype,
            "spec_version": self.spec_version,
            "deviations": [
                {
                    "id": a.deviation.id,
                    "params": dict(a.param),
                    "title": a.deviation.title,
                    "clause": a.deviation.clause,
                    "peers": list(a.deviation.peers),
                    "fix": a.deviation.fix,
                }
                for a in self.deviations
            ],
            "explained": self.explained,
            "failures": self.failures,
            "passed": self.passed,
            "unexplained_cases": list(self.unexplained_cases),
            "unexplained_clauses": list(self.unexplained_clauses),
            "metric_failures": self.metric_failures,
            "declared_limits": list(self.declared_limits),
            "contradicted_passing_cases": self.contradicted,
            "seconds": self.seconds,
            "line": self.line,
        }


@dataclass
class _Failing:
    m: Materialized
    options: dict
    got: Outcome
    vt: spec.Tolerance
    gt: spec.Tolerance
    applicable: set[Applied] = field(default_factory=set)


@dataclass
class _Passing:
    m: Materialized
    options: dict
    vt: spec.Tolerance
    gt: spec.Tolerance


def _limits(target: Target | None) -> tuple[str, ...]:
    """A target's declared limits as readable strings (empty when it declares none)."""
    if target is None:
        return ()
    raw = None
    for name in ("declared_limits", "limits"):
        raw = getattr(target, name, None)
        if raw:
            break
    if not raw:
        return ()
    if isinstance(raw, dict):
        return tuple(f"{k}: {v}" for k, v in raw.items())
    if isinstance(raw, str):
        return (raw,)
    return tuple(str(v) for v in raw)


def _outcome(r: Any, target: Target | None, seed: int) -> Outcome | None:
    """The implementation's outcome on a failing case: kept by the runner, else run again here
    (in-process targets only)."""
    got = getattr(r, "outcome", None)
    if got is not None:
        return got
    if target is None or target.fn is None or r.materialized is None:
        return None
    from .runner import cotangent_for

    try:
        with np.errstate(all="ignore"):
            return get_driver(target.framework).run(
                target.fn, r.materialized, _options(r), cotangent_for(seed, r.case.id)
            )
    except Exception:  # it raised in the run too: nothing numeric to explain
        return None


def _options(r: Any) -> dict:
    """The options the implementation was called with: the runner's record when it adds some
    (a declared capability such as count_empty_rows), else the case's."""
    opts = getattr(r, "options", None)
    return dict(opts) if opts else dict(r.case.options)


def _numeric_failure(r: Any) -> bool:
    return any(not c.ok for c in r.checks if c.name in ("loss", "grad"))


def diagnose(result: Any, *, max_set: int = MAX_SET) -> list[Verdict]:
    """One :class:`Verdict` per target x dtype of a :class:`~sapo_conformance.runner.SuiteResult`
    that has passes or failures, in run order."""
    targets = {run.target.name: run.target for run in result.runs}
    groups: dict[tuple[str, str], list[Any]] = {}
    for r in result.results:
        if r.status in ("pass", "fail"):
            groups.setdefault((r.target, r.dtype), []).append(r)
    verdicts = []
    for (name, dtype), rs in groups.items():
        target = targets.get(name)
        failing, passing, unexplained, metric_only, raised_as_asked = [], [], [], 0, 0
        for r in rs:
            if r.status == "pass" and r.case.error is not None:
                raised_as_asked += 1  # an error case (clause 10.4): no numbers to model
                continue
            if r.status == "pass":
                if r.materialized is not None:
                    passing.append((r.materialized, _options(r)))
                continue
            if not _numeric_failure(r) and not r.reason:
                if any(not c.ok for c in r.checks if c.name == "metrics"):
                    metric_only += 1
                    continue
            got = _outcome(r, target, result.seed) if _numeric_failure(r) else None
            if got is None or r.materialized is None:
                unexplained.append(r)
            else:
                failing.append((r, got))
        if target is not None:
            vt, gt = tolerance_for(target, dtype, "value"), tolerance_for(target, dtype, "grad")
        else:
            vt, gt = spec.TOLERANCES[dtype]["value"], spec.TOLERANCES[dtype]["grad"]
        v = diagnose_cases(
            name,
            dtype,
            [(r.materialized, _options(r), got) for r, got in failing],
            passing,
            vt,
            gt,
            max_set=max_set,
            ids=[r.case.id for r, _ in failing],
            clauses=[r.failed_clauses for r, _ in failing],
            extra_unexplained=[(r.case.id, r.failed_clauses) for r in unexplained],
            limits=_limits(target),
            metric_failures=metric_only,
        )
        verdicts.append(dataclasses.replace(v, passed=v.passed + raised_as_asked))
    return verdicts


def _params(dev: Deviation, failing: list[_Failing]) -> list[dict]:
    """The TOML defaults of ``dev``, then the parameters its fit proposes most often (each
    proposal checked to reproduce its case alone)."""
    out: list[dict] = [dict(p) for p in dev.params] or [{}]
    counts: dict[tuple, int] = {}
    first: dict[tuple, dict] = {}
    for f in failing:
        for p in candidate_params(dev, f.m, f.options, f.got, f.vt, f.gt):
            if p not in out:
                key = tuple(sorted(p.items()))
                counts[key] = counts.get(key, 0) + 1
                first.setdefault(key, p)
    for key in sorted(counts, key=lambda k: -counts[k]):
        if len(out) >= _MAX_PARAMS:
            break
        out.append(first[key])
    return out


def diagnose_cases(
    target: str,
    dtype: str,
    failing: list[tuple[Materialized, dict, Outcome]],
    passing: list[tuple[Materialized, dict]],
    value_tol: spec.Tolerance,
    grad_tol: spec.Tolerance,
    *,
    max_set: int = MAX_SET,
    ids: list[str] | None = None,
    clauses: list[tuple[str, ...]] | None = None,
    extra_unexplained: Iterable[tuple[str, tuple[str, ...]]] = (),
    limits: tuple[str, ...] = (),
    metric_failures: int = 0,
) -> Verdict:
    """The verdict for one target and dtype from its failing cases (with the implementation's
    outcomes) and its passing cases (see the module docstring for the search)."""
    start = time.perf_counter()
    ids = ids or [m.case.id for m, _, _ in failing]
    clauses = clauses or [m.case.clauses for m, _, _ in failing]
    fails = [_Failing(m, o, got, value_tol, grad_tol) for m, o, got in failing]
    passes = [_Passing(m, o, value_tol, grad_tol) for m, o in passing]
    extra_unexplained = list(extra_unexplained)

    modelled = [d for d in CATALOGUE if d.model]
    cands: list[Applied] = []
    app: list[set[int]] = [set() for _ in fails]  # candidates that can change each failing case
    for dev in modelled:
        for p in _params(dev, fails) if fails else []:
            a = Applied(dev, p)
            hits = [i for i, f in enumerate(fails) if applies(f.m, f.options, a)]
            if hits:
                for i in hits:
                    app[i].add(len(cands))
                cands.append(a)
    order = {d.id: i for i, d in enumerate(CATALOGUE)}
    partial = {k for k, a in enumerate(cands) if a.deviation.partial}
    cache: dict[tuple[int, tuple[int, ...]], bool] = {}

    def _variants(sub: tuple[int, ...]) -> list[tuple[int, ...]]:
        # A partial member (a poison) may not reach this case: try the set without it too.
        opt = [k for k in sub if k in partial]
        out = []
        for r in range(len(opt) + 1):
            for drop in itertools.combinations(opt, r):
                v = tuple(k for k in sub if k not in drop)
                if v:
                    out.append(v)
        return out

    def explains(i: int, combo: tuple[int, ...]) -> bool:
        sub = tuple(k for k in combo if k in app[i])
        if not sub:
            return False
        key = (i, sub)
        if key not in cache:
            f = fails[i]
            cache[key] = any(
                reproduces(f.m, f.options, tuple(cands[k] for k in v), f.got, f.vt, f.gt)
                for v in _variants(sub)
            )
        return cache[key]

    pass_app: dict[tuple[int, int], bool] = {}
    pass_cache: dict[tuple[int, tuple[int, ...]], bool] = {}

    def contradictions(combo: tuple[int, ...]) -> int:
        bad = 0
        for j, p in enumerate(passes):
            sub = []
            for k in combo:
                if k in partial:
                    continue  # a poison that did not reach a passing case contradicts nothing
                if (j, k) not in pass_app:
                    pass_app[(j, k)] = applies(p.m, p.options, cands[k])
                if pass_app[(j, k)]:
                    sub.append(k)
            if not sub:
                continue
            key = (j, tuple(sub))
            if key not in pass_cache:
                proxy = Outcome(p.m.want_loss, p.m.want_grad, None, p.m.dtype)
                pass_cache[key] = reproduces(
                    p.m,
                    p.options,
                    tuple(cands[k] for k in sub),
                    proxy,
                    p.vt,
                    p.gt,
                    must_differ=False,
                )
            bad += not pass_cache[key]
        return bad

    n = len(fails)
    composing = [k for k, a in enumerate(cands) if a.deviation.composes]
    solo = [k for k, a in enumerate(cands) if not a.deviation.composes]
    scored: dict[tuple[int, ...], frozenset[int]] = {}

    def score(combo: tuple[int, ...]) -> None:
        combo = tuple(sorted(combo))
        if combo in scored or len({cands[k].deviation.id for k in combo}) < len(combo):
            return  # seen, or two parameters of one deviation
        scored[combo] = frozenset(i for i in range(n) if explains(i, combo))

    def rank(combo: tuple[int, ...]) -> tuple:
        return (
            -len(scored[combo]),
            len(combo),
            tuple(sorted(order[cands[k].deviation.id] for k in combo)),
        )

    for k in composing:
        score((k,))
    # Beam: the best sets of one size are extended by every composing candidate that can
    # change a case they leave unexplained (another member could not help there).
    frontier = [(k,) for k in composing]
    for _size in range(2, max_set + 1):
        frontier = sorted((c for c in frontier if scored.get(c)), key=rank)[:_BEAM]
        grown = []
        for combo in frontier:
            missing = [i for i in range(n) if i not in scored[combo]]
            for k in sorted({k for i in missing for k in app[i] if k in composing} - set(combo)):
                new = tuple(sorted(combo + (k,)))
                score(new)
                grown.append(new)
        before = max((len(scored[c]) for c in frontier), default=0)
        frontier = grown
        best = max((len(scored[c]) for c in grown if c in scored), default=0)
        if best == n or best <= before:
            break  # all explained, or one more member explains nothing more: stop growing
    if not any(len(v) == n for v in scored.values()):
        for k in solo:  # whole-output transforms, tried alone when no composed set is complete
            score((k,))
    ranked = sorted((c for c in scored if scored[c]), key=rank)

    chosen: tuple[Applied, ...] = ()
    explained: frozenset[int] = frozenset()
    contradicted = 0
    fallback = None
    for combo in ranked[:_MAX_CHECKED]:
        c = contradictions(combo)
        if c == 0:
            chosen, explained = tuple(cands[k] for k in combo), scored[combo]
            break
        if fallback is None:
            fallback = (tuple(cands[k] for k in combo), scored[combo], c)
    else:
        if fallback is not None:
            chosen, explained, contradicted = fallback

    chosen = tuple(sorted(chosen, key=lambda a: order[a.deviation.id]))
    un_ids = [ids[i] for i in range(n) if i not in explained] + [
        cid for cid, _ in extra_unexplained
    ]
    un_cl = [cl for i in range(n) if i not in explained for cl in clauses[i]]
    un_cl += [cl for _, cls in extra_unexplained for cl in cls]
    spec_order = {c.id: k for k, c in enumerate(spec.CLAUSES)}
    un_cl = sorted(set(un_cl), key=lambda c: spec_order.get(c, 999))
    return Verdict(
        target=target,
        dtype=dtype,
        spec_version=spec.VERSION,
        deviations=chosen,
        explained=len(explained),
        failures=n + len(extra_unexplained),
        passed=len(passes),
        unexplained_cases=tuple(un_ids),
        unexplained_clauses=tuple(un_cl),
        metric_failures=metric_failures,
        declared_limits=tuple(limits),
        contradicted=contradicted,
        seconds=time.perf_counter() - start,
    )
