"""What the suite checks: built-in targets and third-party implementations.

Built-ins: ``reference`` (``sapo_ref`` on NumPy), ``reference-strict`` (``sapo_ref`` on
``array_api_strict`` arrays, proving the reference is written against the array API),
``torch``, ``jax``, ``mlx`` (the adapter packages ``sapo_torch``, ``sapo_jax``, ``sapo_mlx``;
a package without ``policy_loss`` yet counts as not available).

A third-party implementation is ``MODULE:ATTR`` run by a framework driver. It may declare what
it supports with ``fn.sapo_capabilities`` (adapters use a module-level ``CAPABILITIES``); the
schema and its validation are in :mod:`sapo_conformance.capabilities`. A declared tolerance
deviation names another row of the spec's tolerance table (``"tolerance": "float32"``) or gives
``{"value": {"rtol", "atol"}, "grad": {...}}``; the dtype is then judged with it and every
report shows the deviation and its reason.

The command builds its targets with ``load=False`` (nothing of the implementation is imported
in the supervising process); the worker that runs them calls :func:`load_target`.

>>> t = builtin_target("reference")
>>> t.framework, t.unavailable is None
('numpy', True)
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import sapo_ref
from sapo_ref import spec

from .capabilities import CapabilityError, declared_limits, validate
from .cases import DTYPES, KL_ESTIMATORS

__all__ = [
    "Target",
    "UsageError",
    "BUILTIN_TARGETS",
    "builtin_target",
    "impl_target",
    "load_target",
    "tolerance_for",
]

BUILTIN_TARGETS: tuple[str, ...] = ("reference", "reference-strict", "torch", "jax", "mlx")


class UsageError(Exception):
    """Bad command-line usage (exit status 2)."""


@dataclass
class Target:
    """A function under test, its framework, what it claims to support, or why it cannot run."""

    name: str
    framework: str
    fn: Callable | None
    origin: str
    methods: tuple[str, ...] = sapo_ref.METHOD_NAMES
    loss_aggs: tuple[str, ...] = sapo_ref.LOSS_AGG_NAMES
    dtypes: tuple[str, ...] = DTYPES
    metrics: bool = True
    tolerance_deviations: dict[str, dict[str, Any]] = field(default_factory=dict)
    metrics_option: dict[str, Any] = field(default_factory=dict)
    unavailable: str | None = None
    count_empty_rows: str = "excluded"
    advantages: tuple[str, ...] = ("sequence", "token")
    norm_length: str = "any"
    temperatures: str = "any"
    mask_dtype: str = "bool"
    #: Clause 10 terms the target takes (opt-in): per-token weights, KL estimators.
    weights: bool = False
    kl_estimators: tuple[str, ...] = ()
    #: How a worker process rebuilds it: ("builtin", name) or ("impl", "MODULE:ATTR"); None for
    #: a bare callable (run in-process only).
    loader: tuple[str, str] | None = None
    #: Named explicitly (--target/--impl): it must check at least one case.
    requested: bool = False

    def apply_capabilities(self, caps: Any, *, strict: bool = True) -> None:
        """Apply a capabilities dict (:mod:`sapo_conformance.capabilities`), validated first;
        :class:`UsageError` naming the key when it is not valid."""
        try:
            caps = validate(caps, strict=strict)
        except CapabilityError as err:
            raise UsageError(f"{self.name}: {err}") from None
        for key in ("methods", "loss_aggs", "dtypes", "advantages", "kl_estimators"):
            if key in caps:
                setattr(self, key, tuple(caps[key]))
        for key in ("count_empty_rows", "norm_length", "temperatures", "mask_dtype"):
            if key in caps:
                setattr(self, key, caps[key])
        if "metrics" in caps:
            self.metrics = caps["metrics"]
        if "weights" in caps:
            self.weights = caps["weights"]
        if "metrics_option" in caps:  # metrics are opt-in: ask for them apart
            self.metrics_option = dict(caps["metrics_option"])
            self.metrics = True
        if "tolerance_deviations" in caps:
            self.tolerance_deviations = caps["tolerance_deviations"]

    def capabilities(self) -> dict[str, Any]:
        """What the target declares, in the capabilities schema (plain data)."""
        return {
            "methods": list(self.methods),
            "loss_aggs": list(self.loss_aggs),
            "dtypes": list(self.dtypes),
            "metrics": self.metrics,
            "metrics_option": dict(self.metrics_option) or None,
            "tolerance_deviations": dict(self.tolerance_deviations),
            "count_empty_rows": self.count_empty_rows,
            "advantages": list(self.advantages),
            "norm_length": self.norm_length,
            "temperatures": self.temperatures,
            "mask_dtype": self.mask_dtype,
            "weights": self.weights,
            "kl_estimators": list(self.kl_estimators),
        }

    @property
    def declared_limits(self) -> tuple[str, ...]:
        """Every way this target's run is narrower than the full contract (shown in reports)."""
        return declared_limits(self)


def tolerance_for(target: Target, dtype: str, kind: str) -> spec.Tolerance:
    """The tolerance ``kind`` ("value" or "grad") a target is judged with in ``dtype``."""
    dev = target.tolerance_deviations.get(dtype)
    if dev:
        row = dev.get("tolerance")
        if isinstance(row, str) and row in spec.TOLERANCES:
            return spec.TOLERANCES[row][kind]
        if isinstance(dev.get(kind), dict):
            return spec.Tolerance(rtol=float(dev[kind]["rtol"]), atol=float(dev[kind]["atol"]))
    return spec.TOLERANCES[dtype][kind]


# ----------------------------------------------------------------------------- built-ins


def _reference_numpy(logp, old_logp, advantages, mask, **options):
    res = sapo_ref.policy_loss(logp, old_logp, advantages, mask, **options)
    return res.loss, res.grad, res.metrics


def _reference_strict(logp, old_logp, advantages, mask, **options):
    import array_api_strict as xp

    arrays = [xp.asarray(np.asarray(a)) for a in (logp, old_logp, advantages, mask)]
    for key in ("weights", "ref_logp"):
        if options.get(key) is not None:
            options[key] = xp.asarray(np.asarray(options[key]))
    res = sapo_ref.policy_loss(*arrays, **options)
    return res.loss, np.from_dlpack(res.grad), res.metrics


#: The reference takes every clause 10 term.
_TERMS = {"weights": True, "kl_estimators": KL_ESTIMATORS}


def _adapter(name: str, module: str, load: bool) -> Target:
    t = Target(name=name, framework=name, fn=None, origin=module, loader=("builtin", name))
    if not load:  # the worker imports it; here only whether it is there at all
        if importlib.util.find_spec(module) is None:
            t.unavailable = f"{module} is not installed"
        return t
    try:
        mod = importlib.import_module(module)
    except ImportError as err:
        t.unavailable = f"{module} cannot be imported ({err})"
        return t
    fn = getattr(mod, "policy_loss", None)
    if not callable(fn):
        t.unavailable = f"{module} has no policy_loss yet (placeholder package)"
        return t
    t.fn = fn
    # The adapters' CAPABILITIES also document things the suite does not read.
    t.apply_capabilities(getattr(mod, "CAPABILITIES", None), strict=False)
    return t


def builtin_target(name: str, load: bool = True) -> Target:
    """A built-in target by name; :class:`UsageError` for an unknown name.

    With ``load=False`` nothing is imported (the command's workers load it).

    >>> builtin_target("reference-strict").dtypes
    ('float64', 'float32')
    """
    if name == "reference":
        return Target(
            "reference",
            "numpy",
            _reference_numpy,
            "sapo_ref.policy_loss",
            dtypes=("float64", "float32", "float16"),
            loader=("builtin", name),
            **_TERMS,
        )
    if name == "reference-strict":
        t = Target(
            "reference-strict",
            "numpy",
            _reference_strict,
            "sapo_ref.policy_loss on array_api_strict",
            dtypes=("float64", "float32"),
            loader=("builtin", name),
            **_TERMS,
        )
        if importlib.util.find_spec("array_api_strict") is None:
            t.unavailable = "array_api_strict is not installed"
        return t
    if name in ("torch", "jax", "mlx"):
        return _adapter(name, f"sapo_{name}", load)
    raise UsageError(f"unknown target {name!r}; expected one of: {', '.join(BUILTIN_TARGETS)}")


def impl_target(spec_str: str, framework: str, load: bool = True) -> Target:
    """A third-party ``MODULE:ATTR`` run by ``framework``'s driver; :class:`UsageError` if bad.

    With ``load=False`` only the syntax and the framework are checked: the module is imported
    by the worker that runs it (a module that exits or crashes on import cannot take the
    command down with it). Metrics are compared only when its capabilities declare them.

    >>> impl_target("sapo_ref:policy_loss", "numpy").name
    'sapo_ref:policy_loss'
    >>> impl_target("sapo_ref:nope", "numpy")
    Traceback (most recent call last):
    ...
    sapo_conformance.targets.UsageError: --impl: module 'sapo_ref' has no attribute 'nope'
    """
    from .drivers import discover_drivers

    if framework not in discover_drivers():
        raise UsageError(
            f"unknown framework {framework!r}; expected one of: {', '.join(discover_drivers())}"
        )
    module, sep, attr = spec_str.partition(":")
    if not sep or not module or not attr:
        raise UsageError(
            f"--impl must be MODULE:ATTR (e.g. mypkg.losses:sapo_loss); got {spec_str!r}"
        )
    t = Target(
        name=spec_str,
        framework=framework,
        fn=None,
        origin=spec_str,
        metrics=False,
        loader=("impl", spec_str),
    )
    if not load:
        return t
    try:
        mod = importlib.import_module(module)
    except Exception as err:  # ImportError, or the module failing while it imports
        raise UsageError(
            f"--impl: cannot import module {module!r}: {type(err).__name__}: {err}"
        ) from None
    obj: Any = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"--impl: module {module!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(f"--impl: {spec_str} is a {type(obj).__name__}, not callable")
    t.fn = obj
    t.apply_capabilities(getattr(obj, "sapo_capabilities", None))
    return t


def load_target(loader: tuple[str, str], framework: str) -> Target:
    """Rebuild a target from its ``loader`` with its function imported (in a worker)."""
    kind, name = loader
    if kind == "builtin":
        return builtin_target(name)
    return impl_target(name, framework)
