"""Doctests of every module of the listed packages, and the rule that public functions have one.

Runs ``doctest.testmod`` on modules imported by name (not ``pytest --doctest-modules``: the
repository folders spec/ and adapters/* are installed under other import names, which
``--doctest-modules`` cannot map). To cover a new package, add it to ``PACKAGES`` with the
frameworks it needs; its modules are discovered with pkgutil, and a package whose framework is
not installed shows as skipped with the reason.
"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import inspect
import pkgutil
import warnings

import pytest

#: Package -> the frameworks it needs (skipped when one is missing). Adapter helpers add
#: e.g. ``"sapo_torch": ("torch",)``.
PACKAGES: dict[str, tuple[str, ...]] = {
    "sapo_ref": (),
    "sapo_ref.spec": (),
    "sapo_torch": ("torch",),
    "sapo_jax": ("jax",),
}

#: Optional dependencies a single module may need (e.g. plotting); the module is skipped
#: when its import fails on one of these, with the reason shown.
# The trainer integrations' frameworks are installed only in the peers venv (tools/setup_peers.sh).
OPTIONAL = (
    *("matplotlib", "mpmath", "rich", "torch", "jax", "mlx"),
    *("trl", "verl", "areal", "trinity", "liger_kernel", "swift"),
)

#: Functions that must carry an example, whatever else changes.
REQUIRED_EXAMPLES = (
    "sapo_ref.policy_loss",
    "sapo_ref.group_advantages",
    "sapo_ref.sequence_gate_diagnostics",
    "sapo_ref.sapo_gate",
    "sapo_ref.sapo_weight",
    "sapo_ref.clip_parts",
    "sapo_ref.normalizer",
)

#: Public functions (in a listed package's ``__all__``) known to lack an example: the rule
#: "public API has a doctest" is enforced for every other one, and an entry here fails once
#: the function gains an example, so the list only shrinks.
KNOWN_GAPS = frozenset(
    {
        "sapo_ref.token_weights",
        "sapo_ref.evaluate",
        "sapo_ref.compute_metrics",
        "sapo_ref.metric_keys",
        "sapo_ref.spec.clause",
        "sapo_ref.spec.vectors_dir",
    }
)


def _missing(frameworks: tuple[str, ...]) -> list[str]:
    return [f for f in frameworks if importlib.util.find_spec(f) is None]


def _modules() -> list:
    params = []
    for package, frameworks in PACKAGES.items():
        missing = _missing(frameworks)
        if missing:
            params.append(
                pytest.param(
                    package,
                    marks=pytest.mark.skip(
                        reason=f"{package} needs {', '.join(missing)}, not installed"
                    ),
                )
            )
            continue
        pkg = importlib.import_module(package)
        names = [package]
        if hasattr(pkg, "__path__"):
            names += sorted(m.name for m in pkgutil.walk_packages(pkg.__path__, package + "."))
        params += [pytest.param(n, id=n) for n in names]
    return params


#: Deprecated alias modules: importing them warns by design (tested in their own test files).
DEPRECATED = ("sapo_jax.sharding",)


def _import(name: str):
    try:
        if name in DEPRECATED:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                return importlib.import_module(name)
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] in OPTIONAL:
            pytest.skip(f"{name} needs {exc.name}, not installed")
        raise


@pytest.mark.parametrize("module_name", _modules())
def test_doctests(module_name):
    module = _import(module_name)
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    result = doctest.testmod(module, optionflags=flags, verbose=False, report=True)
    assert result.failed == 0, (
        f"{result.failed} of {result.attempted} examples failed in {module_name}"
    )


def _has_example(obj) -> bool:
    return bool(doctest.DocTestParser().get_examples(inspect.getdoc(obj) or ""))


def _resolve(dotted: str):
    module, _, attr = dotted.rpartition(".")
    return getattr(importlib.import_module(module), attr)


@pytest.mark.parametrize("name", REQUIRED_EXAMPLES)
def test_required_functions_have_examples(name):
    assert _has_example(_resolve(name)), f"{name} has no doctest example"


def _public_functions() -> list[str]:
    out = []
    for package, frameworks in PACKAGES.items():
        if _missing(frameworks):
            continue
        pkg = importlib.import_module(package)
        for attr in getattr(pkg, "__all__", ()):
            if inspect.isfunction(getattr(pkg, attr)):
                out.append(f"{package}.{attr}")
    return out


def test_public_functions_have_examples():
    """Every function in a listed package's ``__all__`` has a doctest, except KNOWN_GAPS."""
    public = _public_functions()
    missing = {name for name in public if not _has_example(_resolve(name))}
    assert sorted(missing - KNOWN_GAPS) == [], "public functions without a doctest example"
    assert sorted(KNOWN_GAPS - missing) == [], "these now have examples: drop them from KNOWN_GAPS"
