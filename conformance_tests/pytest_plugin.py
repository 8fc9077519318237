"""pytest plugin: the conformance suite in a framework maintainer's CI.

Installed with sapo-ref (entry point ``pytest11``); it only adds options and a fixture until
asked to run. Run the suite's own test module, one test item per target x clause x dtype::

    pytest --pyargs sapo_conformance --sapo-impl mypkg.losses:sapo_loss --sapo-framework torch
    pytest --pyargs sapo_conformance --sapo-target torch,jax --sapo-dtypes float32,bfloat16

(with neither option it checks the reference). A failing item prints the same messages,
known-deviation diagnosis and repro as the command. Or call the fixture from your own test::

    def test_my_loss_conforms(sapo_conformance):
        sapo_conformance.check("mypkg.losses:sapo_loss", framework="torch", dtypes=["float32"])

JAX float64 needs ``jax_enable_x64``, which a plugin must not switch on behind your back:
enable it in your ``conftest.py`` or float64 JAX items skip with that reason.

The plugin runs the function in the pytest process (your test session is already the
supervisor); the ``sapo-conformance`` command runs every target in its own worker process.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pytest

__all__ = ["pytest_addoption", "pytest_generate_tests", "ConformanceFixture"]

_RESULT: pytest.StashKey[Any] = pytest.StashKey()


def pytest_addoption(parser: Any) -> None:
    g = parser.getgroup("sapo-conformance", "SAPO-family conformance suite (sapo_conformance)")
    g.addoption("--sapo-impl", default=None, metavar="MODULE:ATTR", help="function under test")
    g.addoption(
        "--sapo-framework", default=None, help="framework of --sapo-impl: numpy, torch, jax, mlx"
    )
    g.addoption(
        "--sapo-target",
        default=None,
        metavar="NAME[,NAME]",
        help="built-in targets (reference, reference-strict, torch, jax, mlx)",
    )
    g.addoption("--sapo-dtypes", default=None, metavar="D[,D]", help="dtypes (default: all four)")
    g.addoption("--sapo-methods", default=None, metavar="M[,M]", help="only these methods")
    g.addoption("--sapo-loss-agg", default=None, metavar="A[,A]", help="only these aggregations")
    g.addoption(
        "--sapo-cases-per-clause",
        default=None,
        type=int,
        metavar="N",
        help="random cases per clause",
    )
    g.addoption("--sapo-seed", default=0, type=int, help="seed of the random cases")


def _csv(v: str | None) -> list[str] | None:
    return None if v is None else [x.strip() for x in v.split(",") if x.strip()]


@dataclass
class _Plan:
    targets: list
    cases: list
    dtypes: list[str]
    seed: int


_PLAN = pytest.StashKey()


def _plan(config: Any) -> _Plan:
    from .cases import DTYPES, generate_cases, golden_cases
    from .cli import DEFAULT_CASES_PER_CLAUSE, _restrict
    from .targets import builtin_target, impl_target

    impl, fw = config.getoption("--sapo-impl"), config.getoption("--sapo-framework")
    if bool(impl) != bool(fw):
        raise pytest.UsageError("--sapo-impl and --sapo-framework go together")
    names = _csv(config.getoption("--sapo-target")) or ([] if impl else ["reference"])
    targets = [builtin_target(n) for n in names] + ([impl_target(impl, fw)] if impl else [])
    methods, aggs = (
        _csv(config.getoption("--sapo-methods")),
        _csv(config.getoption("--sapo-loss-agg")),
    )
    _restrict(targets, methods, aggs)
    per = config.getoption("--sapo-cases-per-clause")
    per = DEFAULT_CASES_PER_CLAUSE if per is None else per
    seed = config.getoption("--sapo-seed")
    cases = (
        generate_cases(seed=seed, per_clause=per, methods=methods, loss_aggs=aggs) + golden_cases()
    )
    return _Plan(targets, cases, _csv(config.getoption("--sapo-dtypes")) or list(DTYPES), seed)


def pytest_generate_tests(metafunc: Any) -> None:
    if "sapo_clause" not in metafunc.fixturenames:
        return
    from .targets import UsageError

    try:
        plan = _plan(metafunc.config)
    except UsageError as err:
        raise pytest.UsageError(str(err)) from None
    metafunc.config.stash[_PLAN] = plan  # one run of the suite serves every item
    clauses = list(dict.fromkeys(cl for c in plan.cases for cl in c.clauses))
    from sapo_ref import spec

    order = {c.id: i for i, c in enumerate(spec.CLAUSES)}
    clauses = sorted(set(clauses) | {"7.1"}, key=lambda c: order.get(c, 999))
    params = [(t.name, cl, d) for t in plan.targets for cl in clauses for d in plan.dtypes]
    metafunc.parametrize("sapo_clause", params, ids=[f"{t}-{cl}-{d}" for t, cl, d in params])


def _result(config: Any):
    res = config.stash.get(_RESULT, None)
    if res is None:
        from .runner import run_suite

        plan = config.stash[_PLAN]
        res = config.stash[_RESULT] = run_suite(plan.targets, plan.cases, plan.dtypes, plan.seed)
    return res


def check_clause(result: Any, target: str, clause: str, dtype: str) -> None:
    """Fail (with the CLI's messages) or skip one target x clause x dtype of a suite result."""
    from .report import failure_body, failure_title, repro

    run = next(r for r in result.runs if r.target.name == target)
    if run.skipped:
        pytest.skip(f"target {target}: {run.skipped}")
    if dtype in run.dtype_skips:
        pytest.skip(f"target {target}: {run.dtype_skips[dtype]}")
    mine = [
        r
        for r in result.results
        if r.target == target
        and r.dtype == dtype
        and (clause in r.case.clauses or (clause == "7.1" and r.metrics_compared))
    ]
    ran = [r for r in mine if r.status != "skip"]
    if not ran:
        pytest.skip(f"no applicable case for clause {clause} in {dtype}")
    failed = [r for r in ran if clause in r.failed_clauses]
    if failed:
        t = run.target
        text = [f"clause {clause}: {len(failed)}/{len(ran)} cases failed for {target} in {dtype}"]
        for r in failed[:3]:
            text += ["", failure_title(r), failure_body(r), repro(r, t.origin, t.framework)]
        pytest.fail("\n".join(text), pytrace=False)


class ConformanceFixture:
    """What the ``sapo_conformance`` fixture gives: :meth:`check` runs the suite and asserts."""

    def check(
        self,
        impl: Any,
        framework: str,
        *,
        dtypes: Sequence[str] | None = None,
        methods: Sequence[str] | None = None,
        loss_aggs: Sequence[str] | None = None,
        cases_per_clause: int = 2,
        seed: int = 0,
    ) -> Any:
        """Run the suite on ``impl`` (a callable or "MODULE:ATTR"); fail with every failure's text."""
        from .cases import DTYPES, generate_cases, golden_cases
        from .cli import _restrict
        from .report import failure_body, failure_title
        from .runner import run_suite
        from .targets import Target, impl_target

        if isinstance(impl, str):
            target = impl_target(impl, framework)
        else:
            target = Target(
                getattr(impl, "__name__", "impl"), framework, impl, getattr(impl, "__module__", "?")
            )
            target.apply_capabilities(getattr(impl, "sapo_capabilities", None))
        methods = list(methods) if methods else None
        loss_aggs = list(loss_aggs) if loss_aggs else None
        _restrict([target], methods, loss_aggs)
        cases = generate_cases(
            seed=seed, per_clause=cases_per_clause, methods=methods, loss_aggs=loss_aggs
        )
        cases += golden_cases()
        res = run_suite([target], cases, list(dtypes or DTYPES), seed)
        if res.runs[0].skipped:
            pytest.skip(res.runs[0].skipped)
        if res.failures:
            text = [f"{len(res.failures)} conformance failures"]
            for r in res.failures[:5]:
                text += ["", failure_title(r), failure_body(r)]
            pytest.fail("\n".join(text), pytrace=False)
        return res


@pytest.fixture
def sapo_conformance() -> ConformanceFixture:
    """Run the SAPO-family conformance suite on an implementation from a test."""
    return ConformanceFixture()


@pytest.fixture
def sapo_suite_result(request: Any) -> Any:
    """The session's suite result (run once, on first use)."""
    return _result(request.config)
