"""sapo_conformance: the SAPO-family conformance suite and the ``sapo-conformance`` command.

Point it at a backend or at your own implementation and learn, clause by clause of the spec
(``sapo_ref.spec``), whether it computes the loss and its gradient right, and if not, where,
by how much, and which known deviation it reproduces.

    sapo-conformance                                   # reference + every installed adapter
    sapo-conformance --impl mypkg.losses:sapo --framework torch --json report.json

Python API: :func:`generate_cases`, :func:`run_suite`, :func:`builtin_target`,
:func:`impl_target`.
"""

from __future__ import annotations

from .cases import DTYPES, Case, generate_cases, golden_cases, materialize
from .runner import SuiteResult, run_suite
from .targets import BUILTIN_TARGETS, Target, UsageError, builtin_target, impl_target

__version__ = "0.1.0"

__all__ = [
    "DTYPES",
    "Case",
    "generate_cases",
    "golden_cases",
    "materialize",
    "run_suite",
    "SuiteResult",
    "Target",
    "UsageError",
    "builtin_target",
    "impl_target",
    "BUILTIN_TARGETS",
    "__version__",
]
