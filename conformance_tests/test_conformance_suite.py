"""The conformance suite as pytest items: ``pytest --pyargs sapo_conformance [--sapo-impl ...]``.

One item per target x clause x dtype (parametrized by the ``sapo_conformance`` plugin); the
suite runs once per session and each item reports its clause's failures.
"""

from sapo_conformance.pytest_plugin import check_clause


def test_clause(sapo_clause, sapo_suite_result):
    target, clause, dtype = sapo_clause
    check_clause(sapo_suite_result, target, clause, dtype)
