"""sapo_conformance: the SAPO-family conformance suite and the ``sapo-conformance`` command.

Point it at a backend or at your own implementation and learn, clause by clause of the spec
(``sapo_ref.spec``), whether it computes the loss and its gradient right, and if not, where,
by how much, and which known deviation it reproduces.

    sapo-conformance                                   # reference + every installed adapter
    sapo-conformance --impl mypkg.losses:sapo --framework torch --json report.json
    sapo-conformance --list-frameworks                 # drivers: built-in and plugins
    sapo-conformance export DIR; sapo-conformance judge DIR   # ports outside Python

Python API: :func:`generate_cases`, :func:`run_suite` (in-process, or one supervised worker
per target with a :class:`WorkerPool`), :func:`builtin_target`, :func:`impl_target`; a new
framework is a :class:`Driver` subclass declared in the entry-point group
``sapo_conformance.drivers``.
"""

from __future__ import annotations

from .cases import DTYPES, Case, generate_cases, golden_cases, materialize
from .drivers import Driver, discover_drivers
from .runner import SuiteResult, run_suite
from .targets import BUILTIN_TARGETS, Target, UsageError, builtin_target, impl_target
from .worker import WorkerPool

__version__ = "0.2.0"

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
    "Driver",
    "discover_drivers",
    "WorkerPool",
    "__version__",
]
