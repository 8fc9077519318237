"""The suite's verdicts on the peers' wrappers: one run per wrapper, shared by the tests and docs.

Each wrapper gets the golden vectors plus ``PER_CLAUSE`` seeded cases per clause drawn inside
what it declares (methods, aggregations, advantage layouts), so a wrapper with one method gets
as many cases per clause as a full run. Print the verdict lines the porting guide shows with::

    PYTHONPATH=tests .venv-peers/bin/python -m peers.verdicts [verl:sapo trl:grpo ...]
"""

from __future__ import annotations

import sys

import sapo_conformance as sc
from sapo_conformance.verdict import Verdict, diagnose

__all__ = ["PER_CLAUSE", "SEED", "WRAPPERS", "target", "verdicts"]

PER_CLAUSE = 12
SEED = 0
WRAPPERS = (
    "verl:sapo",
    "verl:vanilla",
    "verl:gspo",
    "trl:sapo",
    "trl:grpo",
    "liger:sapo",
    "liger:grpo",
    "areal:sapo",
    "areal:ppo",
    "trinity:sapo",
)


def target(wrapper: str) -> sc.Target:
    """The suite's target for ``peers.wrappers.<wrapper>``; ``sc.UsageError`` if it does not import."""
    return sc.impl_target(f"peers.wrappers.{wrapper}", "torch")


def verdicts(wrapper: str) -> list[Verdict]:
    """Run the suite on one wrapper (every dtype it declares) and diagnose its failures."""
    t = target(wrapper)
    cases = sc.generate_cases(
        seed=SEED,
        per_clause=PER_CLAUSE,
        methods=t.methods,
        loss_aggs=t.loss_aggs,
        advantages=t.advantages,
    )
    result = sc.run_suite([t], cases + sc.golden_cases(), dtypes=list(t.dtypes))
    if not result.results:
        raise RuntimeError(f"the suite ran no case on {wrapper}")
    return diagnose(result)


def main(argv: list[str]) -> int:
    for wrapper in argv or WRAPPERS:
        try:
            lines = [v.line for v in verdicts(wrapper)]
        except sc.UsageError as err:
            lines = [f"peers.wrappers.{wrapper}: not run: {err}"]
        print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
