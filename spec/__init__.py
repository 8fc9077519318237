"""The normative specification, loaded from ``clauses.toml`` (import name ``sapo_ref.spec``).

The repository folder ``spec/`` is installed as the subpackage ``sapo_ref.spec`` so that code,
tests and the conformance suite read the same clause data the document is rendered from.

>>> from sapo_ref import spec
>>> spec.METHODS["sapo"].defaults["tau_neg"]
1.05
>>> spec.clause("2.1").title
'SAPO token gate (method `sapo`)'
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

__all__ = [
    "VERSION",
    "DATA",
    "METHODS",
    "LOSS_AGGS",
    "DOMAINS",
    "METRICS",
    "TOLERANCES",
    "CLAUSES",
    "MethodSpec",
    "LossAggSpec",
    "Domain",
    "Clause",
    "Tolerance",
    "clause",
    "vectors_dir",
    "method_metrics",
    "KL_ESTIMATORS",
    "KL_CLIP",
    "K3_SERIES_BELOW",
    "CHANGELOG",
]


def _load() -> dict[str, Any]:
    text = resources.files(__name__).joinpath("clauses.toml").read_text(encoding="utf-8")
    return tomllib.loads(text)


DATA: Mapping[str, Any] = MappingProxyType(_load())
VERSION: str = DATA["meta"]["version"]


def _none(value: Any) -> Any:
    # TOML has no null: the spec writes a disabled option as the string "none".
    return None if value == "none" else value


@dataclass(frozen=True)
class MethodSpec:
    """One method of clause 2: its ratio kind, gate kind, parameters and defaults."""

    name: str
    clause: str
    ratio: str  # "token" | "sequence" | "sequence-token"
    gate: str  # "soft" | "clip"
    params: tuple[str, ...]
    defaults: Mapping[str, float | None]
    paper_eq: str
    summary: str

    @property
    def is_sequence(self) -> bool:
        """True when the method's ratio is the sequence ratio s_i (value-wise)."""
        return self.ratio != "token"


@dataclass(frozen=True)
class LossAggSpec:
    """One aggregation of clause 3."""

    name: str
    clause: str
    row_weight: str
    denominator: str
    formula: str
    requires: tuple[str, ...] = ()


@dataclass(frozen=True)
class Domain:
    """Allowed range of a scalar parameter (clause 8.4)."""

    name: str
    min: float
    max: float
    min_open: bool
    meaning: str

    def contains(self, value: float) -> bool:
        """Whether ``value`` is a finite number inside the domain."""
        if value != value or value in (float("inf"), float("-inf")):
            return False
        above = value > self.min if self.min_open else value >= self.min
        return above and value <= self.max

    def describe(self) -> str:
        """The domain as an interval, e.g. ``[1e-06, 1000000.0]``."""
        return f"{'(' if self.min_open else '['}{self.min:g}, {self.max:g}]"


@dataclass(frozen=True)
class Clause:
    """A numbered clause: id, kind, title, text (Markdown + TeX) and the paper's equation."""

    id: str
    kind: str
    title: str
    text: str
    eq: str | None = None
    since: str = "0.1.0"  # the spec version that introduced the clause


@dataclass(frozen=True)
class Tolerance:
    """rtol and atol, always together (clause C.1)."""

    rtol: float
    atol: float


METHODS: Mapping[str, MethodSpec] = MappingProxyType(
    {
        name: MethodSpec(
            name=name,
            clause=m["clause"],
            ratio=m["ratio"],
            gate=m["gate"],
            params=tuple(m["params"]),
            defaults=MappingProxyType({k: _none(v) for k, v in m["defaults"].items()}),
            paper_eq=m["paper_eq"],
            summary=m["summary"],
        )
        for name, m in DATA["methods"].items()
    }
)

LOSS_AGGS: Mapping[str, LossAggSpec] = MappingProxyType(
    {
        name: LossAggSpec(
            name=name,
            clause=a["clause"],
            row_weight=a["row_weight"],
            denominator=a["denominator"],
            formula=a["formula"],
            requires=tuple(a.get("requires", ())),
        )
        for name, a in DATA["loss_aggs"].items()
    }
)

DOMAINS: Mapping[str, Domain] = MappingProxyType(
    {
        name: Domain(
            name=name,
            min=float(d["min"]),
            max=float(d["max"]),
            min_open=bool(d.get("min_open", False)),
            meaning=d["meaning"],
        )
        for name, d in DATA["domains"].items()
    }
)

METRICS: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {k: MappingProxyType(dict(v)) for k, v in DATA["metrics"].items()}
)

TOLERANCES: Mapping[str, Mapping[str, Tolerance]] = MappingProxyType(
    {
        dtype: MappingProxyType({kind: Tolerance(**tol) for kind, tol in table.items()})
        for dtype, table in DATA["tolerances"].items()
    }
)

CLAUSES: tuple[Clause, ...] = tuple(
    Clause(
        id=c["id"],
        kind=c["kind"],
        title=c["title"],
        text=c["text"].strip(),
        eq=c.get("eq"),
        since=c.get("since", "0.1.0"),
    )
    for c in DATA["clauses"]
)
_BY_ID = {c.id: c for c in CLAUSES}

X_SATURATION: float = float(DATA["numerics"]["x_saturation"])
#: The KL-penalty estimators of clause 10.2 (name -> value, dlogp, summary), in spec order.
KL_ESTIMATORS: Mapping[str, Mapping[str, str]] = MappingProxyType(
    {k: MappingProxyType(dict(v)) for k, v in DATA["kl_estimators"].items()}
)
KL_CLIP: float = float(DATA["numerics"]["kl_clip"])
K3_SERIES_BELOW: float = float(DATA["numerics"]["k3_series_below"])
#: What each spec version added and changed, newest first.
CHANGELOG: tuple[Mapping[str, Any], ...] = tuple(
    MappingProxyType(dict(entry)) for entry in DATA["changelog"]
)


def clause(clause_id: str) -> Clause:
    """The clause with this id; ``KeyError`` naming the known ids otherwise."""
    try:
        return _BY_ID[clause_id]
    except KeyError:
        raise KeyError(f"unknown clause {clause_id!r}; known: {', '.join(_BY_ID)}") from None


def method_metrics(method: str, *, kl: bool = False, weights: bool = False) -> tuple[str, ...]:
    """The metric keys clause 7.1 defines for ``method``, in spec order.

    ``kl`` and ``weights`` say whether the loss has a KL penalty (``ref_logp``) and per-token
    weights (clause 10): their metrics exist only then.

    >>> method_metrics("grpo", kl=True)[-1]
    'clip/frac'
    >>> "kl_ref/mean" in method_metrics("sapo"), "kl_ref/mean" in method_metrics("sapo", kl=True)
    (False, True)
    """
    present = {"ref_logp": kl, "weights": weights}
    return tuple(
        key
        for key, m in METRICS.items()
        if (m["methods"] == "all" or method in m["methods"])
        and present.get(m.get("requires", ""), True)
    )


def vectors_dir(version: str = VERSION) -> Path:
    """Folder of the golden vectors of a spec version (``spec/vectors/<version>/``)."""
    return Path(str(resources.files(__name__).joinpath("vectors", version)))
