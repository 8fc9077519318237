"""The clause markers and the generated coverage page (docs/coverage.md).

Clause ids of ``@pytest.mark.clause`` are checked against the spec at collection (an unknown id
stops the run), and the committed page must be exactly what ``tools/clause_coverage.py``
writes from the spec, the suite's generators and the tests' markers.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import clause_coverage
import conftest
import pytest

from sapo_ref import spec

ROOT = Path(__file__).resolve().parents[1]


def _item(*ids: str) -> SimpleNamespace:
    mark = SimpleNamespace(args=ids)
    return SimpleNamespace(nodeid="tests/test_x.py::test_y[a]", iter_markers=lambda name: [mark])


@pytest.mark.clause("C.1")
def test_known_clause_ids_pass_collection():
    conftest.pytest_collection_modifyitems(None, None, [_item("3.8", "C.1")])


def test_an_unknown_clause_id_stops_collection_naming_it():
    with pytest.raises(pytest.UsageError, match=r"test_x\.py::test_y: '3\.99'"):
        conftest.pytest_collection_modifyitems(None, None, [_item("3.8", "3.99")])


def test_the_page_lists_every_clause_in_spec_order():
    page = clause_coverage.render([(c.id, c.title) for c in spec.CLAUSES], set(), set(), {})
    rows = [line.split("|")[1].strip() for line in page.splitlines() if line.startswith("| ")]
    assert rows[1:] == [c.id for c in spec.CLAUSES]
    assert "## Covered by neither" in page


def test_committed_coverage_page_is_what_the_generator_writes():
    """Regenerate with ``python tools/clause_coverage.py`` after changing markers or cases."""
    out = subprocess.run(
        [sys.executable, "tools/clause_coverage.py", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
