r"""Golden vectors: versioned input/output cases computed by an independent mpmath
implementation of the spec (``tools/mpmath_reference.py``, 60 digits), rounded correctly to
float64. Import name ``sapo_ref.spec.vectors``.

Files live in ``spec/vectors/<spec version>/<group>.json`` and are written only by
``python tools/make_vectors.py`` (a test checks that regenerating reproduces them byte for
byte). Format (:data:`VECTOR_SCHEMA`, strict JSON; a non-finite float is the string ``"nan"``,
``"inf"`` or ``"-inf"``)::

    {"schema": "sapo-ref-vectors/1", "spec_version": "0.1.0", "generator": ..., "digits": 60,
     "cases": [{"id", "kind", "clauses": [...], "description",
                "inputs": {"logp", "old_logp", "advantages", "mask"[, "weights", "ref_logp"]},
                "options": {only the keywords the case sets},
                "expected": {"loss", "grad", "metrics"[, "grad_ref_logp"]}}, ...]}

Since spec 0.2.0 (clause 10) a case may carry ``weights`` ([N] or [N, T]) and ``ref_logp``
([N, T]) among its inputs, ``kl_coef`` and ``kl_estimator`` among its options, and then
``grad_ref_logp`` (d loss / d ref_logp) among its expected values; :meth:`Vector.kwargs` passes
the two inputs as keywords. The files of every version stay readable: ``load_vectors("0.1.0")``.

``kind`` is ``"policy_loss"`` for the cases above; the tool cases of clause 9 use
``"group_advantages"`` (inputs ``rewards``; expected ``advantages``) and
``"sequence_gate_diagnostics"`` (inputs ``logp``, ``old_logp``, ``mask``; expected ``var``,
``gap``, ``bound``, ``mean_log_ratio``). In ``options`` a ``normalizer`` (clause 3.8) is the
object ``{"num_tokens": n, "num_rows": R}``; :meth:`Vector.kwargs` turns it into a
:class:`sapo_ref.Normalizer`.

>>> from sapo_ref.spec.vectors import load_vectors
>>> vectors = load_vectors()
>>> v = next(v for v in vectors if "2.1" in v.clauses)
>>> v.inputs["logp"].dtype, v.inputs["mask"].dtype, v.grad.shape == v.inputs["logp"].shape
(dtype('float64'), dtype('bool'), True)
>>> import sapo_ref
>>> res = sapo_ref.policy_loss(*v.args(), **v.kwargs())
>>> abs(res.loss - v.loss) <= 1e-12 * max(1.0, abs(v.loss))
True
>>> t = next(v for v in vectors if "ref_logp" in v.inputs and "weights" in v.inputs)
>>> sorted(set(t.kwargs()) - {"method", "loss_agg", "norm_length"})
['kl_coef', 'kl_estimator', 'ref_logp', 'weights']
>>> t.grad_ref_logp.shape == t.inputs["ref_logp"].shape, "kl_ref/mean" in t.metrics
(True, True)
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from . import VERSION, vectors_dir

__all__ = [
    "SCHEMA_ID",
    "KINDS",
    "KEYWORD_INPUTS",
    "VECTOR_SCHEMA",
    "Vector",
    "load_vectors",
    "vector_files",
    "decode_float",
    "encode_float",
]

SCHEMA_ID = "sapo-ref-vectors/1"
#: policy_loss inputs passed as keywords (clause 10, spec 0.2.0).
KEYWORD_INPUTS: tuple[str, ...] = ("weights", "ref_logp")
KINDS: tuple[str, ...] = ("policy_loss", "group_advantages", "sequence_gate_diagnostics")

_FLOAT = {"oneOf": [{"type": "number"}, {"enum": ["nan", "inf", "-inf"]}]}
_VEC = {"type": "array", "items": _FLOAT, "minItems": 1}
_MAT = {"type": "array", "items": _VEC, "minItems": 1}
_MASK = {"type": "array", "minItems": 1, "items": {"type": "array", "items": {"type": "boolean"}}}

#: JSON Schema (draft 2020-12) of one vector file.
VECTOR_SCHEMA: Mapping[str, Any] = MappingProxyType(
    {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "sapo-ref golden vectors",
        "type": "object",
        "required": ["schema", "spec_version", "generator", "digits", "cases"],
        "additionalProperties": False,
        "properties": {
            "schema": {"const": SCHEMA_ID},
            "spec_version": {"type": "string", "pattern": r"^\d+\.\d+\.\d+$"},
            "generator": {"type": "string"},
            "digits": {"type": "integer", "minimum": 50},
            "cases": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "required": [
                        "id",
                        "kind",
                        "clauses",
                        "description",
                        "inputs",
                        "options",
                        "expected",
                    ],
                    "additionalProperties": False,
                    "properties": {
                        "id": {"type": "string", "pattern": r"^[a-z0-9][a-z0-9_.=/+-]*$"},
                        "kind": {"enum": list(KINDS)},
                        "clauses": {
                            "type": "array",
                            "minItems": 1,
                            "items": {"type": "string", "pattern": r"^([0-9]+|C)\.[0-9]+$"},
                        },
                        "description": {"type": "string"},
                        "inputs": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "logp": _MAT,
                                "old_logp": _MAT,
                                "advantages": {"oneOf": [_VEC, _MAT]},
                                "mask": _MASK,
                                "rewards": _VEC,
                                "weights": {"oneOf": [_VEC, _MAT]},
                                "ref_logp": _MAT,
                            },
                        },
                        "options": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "method": {"type": "string"},
                                "loss_agg": {"type": "string"},
                                **{
                                    k: {"type": "number"}
                                    for k in (
                                        "tau_pos",
                                        "tau_neg",
                                        "eps_low",
                                        "eps_high",
                                        "dual_clip",
                                        "norm_length",
                                        "eps",
                                        "kl_coef",
                                    )
                                },
                                "kl_estimator": {"enum": ["k1", "k2", "k3", "low-var-k3"]},
                                "count_empty_rows": {"type": "boolean"},
                                "normalizer": {
                                    "type": "object",
                                    "required": ["num_tokens", "num_rows"],
                                    "additionalProperties": False,
                                    "properties": {
                                        "num_tokens": {"type": "number"},
                                        "num_rows": {"type": "number"},
                                    },
                                },
                                "group_size": {"type": "integer", "minimum": 1},
                                "scale": {"enum": ["std", "none"]},
                                "ddof": {"enum": [0, 1]},
                                "tau": {"oneOf": [{"type": "number"}, _VEC]},
                            },
                        },
                        "expected": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "loss": _FLOAT,
                                "grad": _MAT,
                                "grad_ref_logp": _MAT,
                                "metrics": {"type": "object", "additionalProperties": _FLOAT},
                                "advantages": _VEC,
                                "var": _VEC,
                                "gap": _VEC,
                                "bound": _VEC,
                                "mean_log_ratio": _VEC,
                            },
                        },
                    },
                },
            },
        },
    }
)


def encode_float(x: float) -> float | str:
    """A float as strict JSON: itself if finite, else ``"nan"``, ``"inf"`` or ``"-inf"``.

    >>> encode_float(float("-inf")), encode_float(0.5)
    ('-inf', 0.5)
    """
    x = float(x)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


def decode_float(x: float | int | str) -> float:
    """Inverse of :func:`encode_float`.

    >>> decode_float("inf"), decode_float(2)
    (inf, 2.0)
    """
    if isinstance(x, str):
        if x not in ("nan", "inf", "-inf"):
            raise ValueError(
                f"a float in a vector file is a number or 'nan'/'inf'/'-inf'; got {x!r}"
            )
        return float(x)
    return float(x)


def _array(x: Any, dtype: Any = np.float64) -> np.ndarray:
    if dtype is bool:
        return np.array(x, dtype=bool)
    return np.array(_map_floats(x), dtype=np.float64)


def _map_floats(x: Any) -> Any:
    return [_map_floats(v) for v in x] if isinstance(x, list) else decode_float(x)


@dataclass(frozen=True)
class Vector:
    """One golden case.

    ``inputs`` maps names to float64 arrays (``mask`` bool); ``options`` holds exactly the
    keywords the case sets; ``expected`` holds ``loss`` (float), ``grad`` ([N, T] float64),
    ``metrics`` (key -> float) and, with ``ref_logp``, ``grad_ref_logp`` for
    ``kind == "policy_loss"``, and the tool outputs ([N] float64 arrays) otherwise.
    """

    id: str
    kind: str
    clauses: tuple[str, ...]
    description: str
    inputs: Mapping[str, np.ndarray]
    options: Mapping[str, Any]
    expected: Mapping[str, Any]
    group: str

    @property
    def loss(self) -> float:
        """Expected loss (policy_loss cases)."""
        return self.expected["loss"]

    @property
    def grad(self) -> np.ndarray:
        """Expected d loss / d logp (policy_loss cases)."""
        return self.expected["grad"]

    @property
    def grad_ref_logp(self) -> np.ndarray | None:
        """Expected d loss / d ref_logp (clause 10.3), None without ``ref_logp``."""
        return self.expected.get("grad_ref_logp")

    @property
    def metrics(self) -> Mapping[str, float]:
        """Expected clause 7.1 metrics (policy_loss cases)."""
        return self.expected["metrics"]

    def args(self) -> tuple[np.ndarray, ...]:
        """Positional arguments: ``(logp, old_logp, advantages, mask)`` for policy_loss,
        ``(rewards,)`` for group_advantages, ``(logp, old_logp, mask)`` for the diagnostics."""
        names = {
            "policy_loss": ("logp", "old_logp", "advantages", "mask"),
            "group_advantages": ("rewards",),
            "sequence_gate_diagnostics": ("logp", "old_logp", "mask"),
        }[self.kind]
        return tuple(self.inputs[n] for n in names)

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for the call: the options, ``normalizer`` made a
        :class:`sapo_ref.Normalizer`, and the keyword inputs ``weights`` and ``ref_logp``
        (clause 10) when the case has them."""
        out = dict(self.options)
        if self.kind == "policy_loss":
            out.update({k: self.inputs[k] for k in KEYWORD_INPUTS if k in self.inputs})
        if isinstance(out.get("tau"), list):  # per-row temperatures of the diagnostics
            out["tau"] = np.array(out["tau"], dtype=np.float64)
        if "normalizer" in out:
            from sapo_ref import Normalizer  # lazy: sapo_ref imports this package

            out["normalizer"] = Normalizer(
                float(out["normalizer"]["num_tokens"]), float(out["normalizer"]["num_rows"])
            )
        return out


def _decode_case(case: Mapping[str, Any], group: str) -> Vector:
    inputs = {k: _array(v, bool if k == "mask" else np.float64) for k, v in case["inputs"].items()}
    expected: dict[str, Any] = {}
    for k, v in case["expected"].items():
        if k == "loss":
            expected[k] = decode_float(v)
        elif k == "metrics":
            expected[k] = MappingProxyType({m: decode_float(x) for m, x in v.items()})
        else:
            expected[k] = _array(v)
    return Vector(
        id=case["id"],
        kind=case["kind"],
        clauses=tuple(case["clauses"]),
        description=case["description"],
        inputs=MappingProxyType(inputs),
        options=MappingProxyType(dict(case["options"])),
        expected=MappingProxyType(expected),
        group=group,
    )


def vector_files(version: str = VERSION) -> list[Path]:
    """The vector files of a spec version, sorted by name."""
    folder = vectors_dir(version)
    if not folder.is_dir():
        raise FileNotFoundError(f"no golden vectors for spec version {version!r} at {folder}")
    return sorted(folder.glob("*.json"))


def load_vectors(version: str = VERSION, *, kind: str | None = "policy_loss") -> list[Vector]:
    """Every golden vector of a spec version, in file then case order.

    Args:
        version: spec version (folder ``spec/vectors/<version>/``), default the current one.
        kind: keep only this kind (default ``"policy_loss"``); ``None`` keeps every kind.

    Raises:
        FileNotFoundError: no vectors for that version.
        ValueError: a file of another schema or spec version, or a duplicate id.
    """
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS} or None; got {kind!r}")
    out: list[Vector] = []
    seen: set[str] = set()
    for path in vector_files(version):
        doc = json.loads(path.read_text(encoding="utf-8"))
        if doc.get("schema") != SCHEMA_ID or doc.get("spec_version") != version:
            raise ValueError(
                f"{path}: expected schema {SCHEMA_ID!r} and spec_version {version!r}; got "
                f"{doc.get('schema')!r}, {doc.get('spec_version')!r}"
            )
        for case in doc["cases"]:
            if case["id"] in seen:
                raise ValueError(f"{path}: duplicate vector id {case['id']!r}")
            seen.add(case["id"])
            if kind is None or case["kind"] == kind:
                out.append(_decode_case(case, path.stem))
    return out
