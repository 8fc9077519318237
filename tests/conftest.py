"""Project-wide test configuration: hypothesis profiles, framework set-up, clause markers.

JAX's float64 must be switched on before any JAX array exists, and only by tests (the adapter
never changes global JAX configuration): this is the one place that does it. Every
``@pytest.mark.clause(...)`` id is checked against the spec's clause ids at collection: an
unknown id is a collection error.

A test module may declare ``PENDING = {regex: reason}``: the tests whose name (with its
parameters) matches a regex are expected to fail, strictly (``xfail(strict=True)``), until
what the reason names lands; a pass then fails the run, so the entry must be removed.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=30, deadline=None)
settings.register_profile("thorough", max_examples=1000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


def pytest_configure(config):
    try:
        import jax
    except ImportError:
        return
    jax.config.update("jax_enable_x64", True)


def clause_ids(item: pytest.Item) -> list[str]:
    """The clause ids the ``clause`` markers of a test name (all markers, in order)."""
    return [str(cid) for mark in item.iter_markers("clause") for cid in mark.args]


def pytest_collection_modifyitems(session, config, items):
    import re

    from sapo_ref import spec

    for item in items:
        for pattern, reason in getattr(getattr(item, "module", None), "PENDING", {}).items():
            if re.fullmatch(pattern, item.name):
                item.add_marker(pytest.mark.xfail(strict=True, reason=reason))

    known = {c.id: None for c in spec.CLAUSES}
    bad = sorted(
        {
            f"{item.nodeid.split('[')[0]}: {cid!r}"
            for item in items
            for cid in clause_ids(item)
            if cid not in known
        }
    )
    if bad:
        raise pytest.UsageError(
            "clause markers name ids that spec/clauses.toml does not define:\n  "
            + "\n  ".join(bad)
            + f"\nknown ids: {', '.join(known)}"
        )
