"""What the suite checks: built-in targets and third-party implementations.

Built-ins: ``reference`` (``sapo_ref`` on NumPy), ``reference-strict`` (``sapo_ref`` on
``array_api_strict`` arrays, proving the reference is written against the array API),
``torch``, ``jax``, ``mlx`` (the adapter packages ``sapo_torch``, ``sapo_jax``, ``sapo_mlx``;
a package without ``policy_loss`` yet counts as not available).

A third-party implementation is ``MODULE:ATTR`` run by a framework driver. It may declare what
it supports with an attribute on the function (adapters use a module-level ``CAPABILITIES``)::

    fn.sapo_capabilities = {
        "methods": ["sapo", "grpo"],            # default: every method
        "loss_aggs": ["token-mean"],            # default: every aggregation
        "dtypes": ["float32", "bfloat16"],      # default: every dtype of the framework
        "metrics": True,                        # compare returned metrics (default: if returned)
        "metrics_option": {"metrics": True},    # keyword that turns opt-in metrics on; the suite
                                                # then makes a second call for the metrics alone
        "tolerance_deviations": {               # optional, shown in every report
            "float64": {"tolerance": "float32", "reason": "exp is float32-accurate"},
        },
    }

A declared tolerance deviation names another row of the spec's tolerance table
(``"tolerance": "float32"``) or gives ``{"value": {"rtol", "atol"}, "grad": {...}}``; the
dtype is then judged with it and every report shows the deviation and its reason.

>>> t = builtin_target("reference")
>>> t.framework, t.unavailable is None
('numpy', True)
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

import sapo_ref
from sapo_ref import spec

from .cases import DTYPES

__all__ = ["Target", "UsageError", "BUILTIN_TARGETS", "builtin_target", "impl_target", "tolerance_for"]

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

    def apply_capabilities(self, caps: Any) -> None:
        """Read a capabilities dict (see the module docstring); unknown keys are ignored."""
        if not isinstance(caps, dict):
            return
        for key in ("methods", "loss_aggs", "dtypes"):
            if caps.get(key) is not None:
                setattr(self, key, tuple(str(v) for v in caps[key]))
        if "metrics" in caps:
            self.metrics = bool(caps["metrics"])
        if isinstance(caps.get("metrics_option"), dict):  # metrics are opt-in: ask for them apart
            self.metrics_option = dict(caps["metrics_option"])
            self.metrics = True
        devs = caps.get("tolerance_deviations", caps.get("tolerances"))
        if isinstance(devs, dict):
            self.tolerance_deviations = {str(k): dict(v) for k, v in devs.items() if isinstance(v, dict)}


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
    res = sapo_ref.policy_loss(*arrays, **options)
    return res.loss, np.from_dlpack(res.grad), res.metrics


def _adapter(name: str, module: str) -> Target:
    t = Target(name=name, framework=name, fn=None, origin=module)
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
    t.apply_capabilities(getattr(mod, "CAPABILITIES", None))
    return t


def builtin_target(name: str) -> Target:
    """A built-in target by name; :class:`UsageError` for an unknown name.

    >>> builtin_target("reference-strict").dtypes
    ('float64', 'float32')
    """
    if name == "reference":
        return Target("reference", "numpy", _reference_numpy, "sapo_ref.policy_loss",
                      dtypes=("float64", "float32", "float16"))
    if name == "reference-strict":
        t = Target("reference-strict", "numpy", _reference_strict,
                   "sapo_ref.policy_loss on array_api_strict", dtypes=("float64", "float32"))
        try:
            importlib.import_module("array_api_strict")
        except ImportError:
            t.unavailable = "array_api_strict is not installed"
        return t
    if name in ("torch", "jax", "mlx"):
        return _adapter(name, f"sapo_{name}")
    raise UsageError(f"unknown target {name!r}; expected one of: {', '.join(BUILTIN_TARGETS)}")


def impl_target(spec_str: str, framework: str) -> Target:
    """A third-party ``MODULE:ATTR`` run by ``framework``'s driver; :class:`UsageError` if bad.

    >>> impl_target("sapo_ref:policy_loss", "numpy").name
    'sapo_ref:policy_loss'
    >>> impl_target("sapo_ref:nope", "numpy")
    Traceback (most recent call last):
    ...
    sapo_conformance.targets.UsageError: --impl: module 'sapo_ref' has no attribute 'nope'
    """
    from .drivers import DRIVERS

    if framework not in DRIVERS:
        raise UsageError(f"unknown framework {framework!r}; expected one of: {', '.join(DRIVERS)}")
    module, sep, attr = spec_str.partition(":")
    if not sep or not module or not attr:
        raise UsageError(f"--impl must be MODULE:ATTR (e.g. mypkg.losses:sapo_loss); got {spec_str!r}")
    try:
        mod = importlib.import_module(module)
    except Exception as err:  # ImportError, or the module failing while it imports
        raise UsageError(f"--impl: cannot import module {module!r}: {type(err).__name__}: {err}") from None
    obj: Any = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"--impl: module {module!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(f"--impl: {spec_str} is a {type(obj).__name__}, not callable")
    t = Target(name=spec_str, framework=framework, fn=obj, origin=spec_str, metrics=True)
    t.apply_capabilities(getattr(obj, "sapo_capabilities", None))
    return t
