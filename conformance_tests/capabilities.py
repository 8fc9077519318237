"""What an implementation declares it supports: the capabilities schema, validated.

A function under test may carry ``fn.sapo_capabilities`` (the built-in adapters a module-level
``CAPABILITIES``). Every key is optional; the defaults are the full contract::

    {
        "methods": ["sapo", "grpo"],          # list of spec method names; default: all
        "loss_aggs": ["token-mean"],          # list of spec aggregation names; default: all
        "dtypes": ["float64", "float32"],     # list of dtype names; default: the framework's
        "metrics": True,                      # compare a returned dict as clause 7.1 metrics
        "metrics_option": {"metrics": True},  # keyword that turns opt-in metrics on
        "tolerance_deviations": {"float64": {"tolerance": "float32", "reason": "..."}},
        "count_empty_rows": "excluded",       # "excluded" (spec default) | "counted" | "both"
        "advantages": ["sequence", "token"],  # advantages [N] and/or [N, T]
        "norm_length": "any",                 # "any" | "T" (only the padded length)
        "temperatures": "any",                # "any" | "tau_neg>=tau_pos"
        "mask_dtype": "bool",                 # "bool" | "float" (0./1. in the case dtype) | "int"
        "weights": False,                     # takes per-token weights= (clause 10.1)
        "kl_estimators": [],                  # ref_logp=, kl_coef=, kl_estimator= with these
    }                                         # estimators (clause 10.2): k1, k2, k3, low-var-k3

The terms of spec 0.2.0 (clause 10) are opt-in: a target that does not declare ``weights`` or
a KL estimator is not sent the cases that pass them (nor their error cases, clause 10.4), and
its reports say so.

A declared limit never fails a case: the cases outside it are skipped with the reason, and
every report states each limit (:func:`declared_limits`) so that a limited pass is not read as
a full one. ``count_empty_rows: "counted"`` makes the suite pass ``count_empty_rows=True`` in
every case, with the reference evaluated the same way, so the implementation is certified as
conforming *with that option*; ``"both"`` checks each case with an empty row both ways.

>>> validate({"methods": ["sapo"], "mask_dtype": "float"})["methods"]
('sapo',)
>>> validate({"methods": "sapo"})
Traceback (most recent call last):
...
sapo_conformance.capabilities.CapabilityError: capabilities['methods'] must be a list of names; got the string 'sapo' (write ['sapo'])
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import sapo_ref
from sapo_ref import spec

from .cases import DTYPES, KL_ESTIMATORS

__all__ = [
    "CapabilityError",
    "KNOWN_KEYS",
    "INFORMATIONAL_KEYS",
    "DEFAULTS",
    "validate",
    "declared_limits",
]

#: Keys the suite reads, each with its default (None: the framework's or the full set).
DEFAULTS: dict[str, Any] = {
    "methods": None,
    "loss_aggs": None,
    "dtypes": None,
    "metrics": None,
    "metrics_option": None,
    "tolerance_deviations": None,
    "count_empty_rows": "excluded",
    "advantages": ("sequence", "token"),
    "norm_length": "any",
    "temperatures": "any",
    "mask_dtype": "bool",
    "weights": False,
    "kl_estimators": (),
}
KNOWN_KEYS: tuple[str, ...] = tuple(DEFAULTS)
#: Descriptive keys of the built-in adapters' ``CAPABILITIES`` (documentation, not read).
INFORMATIONAL_KEYS: tuple[str, ...] = (
    "package",
    "framework",
    "api",
    "requires",
    "compute_dtype",
    "grad_dtype",
    "normalizer",
    "data_checks",
    "differentiable",
    "transforms",
    "notes",
)
_CHOICES = {
    "count_empty_rows": ("excluded", "counted", "both"),
    "norm_length": ("any", "T"),
    "temperatures": ("any", "tau_neg>=tau_pos"),
    "mask_dtype": ("bool", "float", "int"),
}
_NAMES = {
    "methods": sapo_ref.METHOD_NAMES,
    "loss_aggs": sapo_ref.LOSS_AGG_NAMES,
    "dtypes": DTYPES,
    "advantages": ("sequence", "token"),
    "kl_estimators": KL_ESTIMATORS,
}


class CapabilityError(ValueError):
    """A capabilities declaration that is not valid (the command exits with status 2)."""


def _names(key: str, value: Any) -> tuple[str, ...]:
    known = _NAMES[key]
    if isinstance(value, str):
        raise CapabilityError(
            f"capabilities[{key!r}] must be a list of names; got the string {value!r} "
            f"(write [{value!r}])"
        )
    if not isinstance(value, (list, tuple)):
        raise CapabilityError(
            f"capabilities[{key!r}] must be a list of names (one of: {', '.join(known)}); "
            f"got {type(value).__name__} {value!r}"
        )
    out = []
    for v in value:
        if not isinstance(v, str) or v not in known:
            raise CapabilityError(
                f"capabilities[{key!r}]: unknown name {v!r}; expected names among: {', '.join(known)}"
            )
        out.append(v)
    if not out:
        raise CapabilityError(f"capabilities[{key!r}] is empty: nothing could be checked")
    return tuple(dict.fromkeys(out))


def _tolerance_deviations(value: Any) -> dict[str, dict[str, Any]]:
    if not isinstance(value, Mapping):
        raise CapabilityError(
            f"capabilities['tolerance_deviations'] must be a dict dtype -> deviation; got "
            f"{type(value).__name__}"
        )
    out: dict[str, dict[str, Any]] = {}
    for dtype, dev in value.items():
        if dtype not in DTYPES:
            raise CapabilityError(
                f"capabilities['tolerance_deviations']: unknown dtype {dtype!r}; expected one of: "
                f"{', '.join(DTYPES)}"
            )
        if not isinstance(dev, Mapping):
            raise CapabilityError(
                f"capabilities['tolerance_deviations'][{dtype!r}] must be a dict with 'tolerance' "
                "(a row of the spec's table) or 'value' and 'grad' {rtol, atol}, and 'reason'"
            )
        row = dev.get("tolerance")
        if row is not None and row not in spec.TOLERANCES:
            raise CapabilityError(
                f"capabilities['tolerance_deviations'][{dtype!r}]['tolerance']: unknown row "
                f"{row!r}; expected one of: {', '.join(spec.TOLERANCES)}"
            )
        for kind in ("value", "grad"):
            tol = dev.get(kind)
            if tol is None:
                continue
            ok = isinstance(tol, Mapping) and all(
                isinstance(tol.get(k), (int, float))
                and not isinstance(tol.get(k), bool)
                and tol.get(k) >= 0
                for k in ("rtol", "atol")
            )
            if not ok:
                raise CapabilityError(
                    f"capabilities['tolerance_deviations'][{dtype!r}][{kind!r}] must be "
                    "{'rtol': number >= 0, 'atol': number >= 0}"
                )
        if row is None and (dev.get("value") is None or dev.get("grad") is None):
            raise CapabilityError(
                f"capabilities['tolerance_deviations'][{dtype!r}] needs 'tolerance' (a spec row) "
                "or both 'value' and 'grad'"
            )
        out[dtype] = dict(dev)
    return out


def validate(caps: Any, *, strict: bool = True) -> dict[str, Any]:
    """The declaration with every known key checked and normalised (lists become tuples).

    ``strict`` rejects unknown keys (a typo must not silently widen what is certified); the
    built-in adapters' ``CAPABILITIES`` also carry :data:`INFORMATIONAL_KEYS`, accepted and
    ignored. Raises :class:`CapabilityError` naming the key and what was expected.

    >>> validate({"dtype": ["float32"]})
    Traceback (most recent call last):
    ...
    sapo_conformance.capabilities.CapabilityError: capabilities: unknown key 'dtype'; known keys: methods, loss_aggs, dtypes, metrics, metrics_option, tolerance_deviations, count_empty_rows, advantages, norm_length, temperatures, mask_dtype, weights, kl_estimators
    """
    if caps is None:
        return {}
    if not isinstance(caps, Mapping):
        raise CapabilityError(f"capabilities must be a dict; got {type(caps).__name__}")
    out: dict[str, Any] = {}
    for key, value in caps.items():
        if key not in DEFAULTS:
            if key in INFORMATIONAL_KEYS or not strict:
                continue
            raise CapabilityError(
                f"capabilities: unknown key {key!r}; known keys: {', '.join(KNOWN_KEYS)}"
            )
        if value is None:
            continue
        if key == "kl_estimators" and isinstance(value, (list, tuple)) and not value:
            out[key] = ()  # declared: no KL penalty
        elif key in _NAMES:
            out[key] = _names(key, value)
        elif key in ("metrics", "weights"):
            if not isinstance(value, bool):
                raise CapabilityError(
                    f"capabilities[{key!r}] must be True or False; got {type(value).__name__} "
                    f"{value!r}"
                )
            out[key] = value
        elif key == "metrics_option":
            if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
                raise CapabilityError(
                    "capabilities['metrics_option'] must be a dict of keyword arguments, e.g. "
                    "{'metrics': True}"
                )
            out[key] = dict(value)
        elif key == "tolerance_deviations":
            out[key] = _tolerance_deviations(value)
        else:
            if value not in _CHOICES[key]:
                raise CapabilityError(
                    f"capabilities[{key!r}] must be one of: "
                    f"{', '.join(repr(c) for c in _CHOICES[key])}; got {value!r}"
                )
            out[key] = value
    return out


def declared_limits(target: Any) -> tuple[str, ...]:
    """Every way a target's run is narrower than the full contract, as readable strings.

    >>> from sapo_conformance.targets import builtin_target
    >>> declared_limits(builtin_target("reference"))
    ('dtypes: float64, float32, float16',)
    """
    out: list[str] = []
    for key, full in (
        ("methods", sapo_ref.METHOD_NAMES),
        ("loss_aggs", sapo_ref.LOSS_AGG_NAMES),
        ("dtypes", DTYPES),
    ):
        have = tuple(getattr(target, key))
        if set(have) != set(full):
            out.append(f"{key}: {', '.join(have)}")
    if target.count_empty_rows == "counted":
        out.append(
            "count_empty_rows: counted (every case passes count_empty_rows=True; the spec "
            "default, empty rows excluded, is not checked)"
        )
    elif target.count_empty_rows == "both":
        out.append(
            "count_empty_rows: both (cases with an empty row also run with count_empty_rows=True)"
        )
    if set(target.advantages) != {"sequence", "token"}:
        out.append(f"advantages: {', '.join(target.advantages)} only")
    if target.norm_length != "any":
        out.append("norm_length: the padded length T only")
    if target.temperatures != "any":
        out.append("temperatures: tau_neg >= tau_pos only")
    if target.mask_dtype != "bool":
        out.append(f"mask passed as {target.mask_dtype}")
    if not target.metrics:
        out.append("metrics (clause 7.1) not compared")
    if not target.weights:
        out.append("weights (clause 10.1) not declared: those cases are not run")
    if not target.kl_estimators:
        out.append("KL penalty (clause 10.2) not declared: those cases are not run")
    elif set(target.kl_estimators) != set(KL_ESTIMATORS):
        out.append(f"kl_estimators: {', '.join(target.kl_estimators)} only")
    for dtype, dev in target.tolerance_deviations.items():
        judged = dev.get("tolerance") or {k: dev.get(k) for k in ("value", "grad")}
        out.append(
            f"{dtype} judged with tolerance {judged}: {dev.get('reason', 'no reason given')}"
        )
    return tuple(out)
