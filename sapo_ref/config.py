"""Resolution and validation of a loss configuration (clauses 4, 8.3, 8.4).

Pure Python, no arrays: the reference and every adapter build their configuration here, so
defaults, domains and error messages are the spec's and are written once.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from . import spec

__all__ = ["LossConfig", "resolve_config", "METHOD_NAMES", "LOSS_AGG_NAMES", "PARAM_NAMES"]

METHOD_NAMES: tuple[str, ...] = tuple(spec.METHODS)
LOSS_AGG_NAMES: tuple[str, ...] = tuple(spec.LOSS_AGGS)
#: Every method parameter any method takes (the KL options of clause 10 are not method parameters).
PARAM_NAMES: tuple[str, ...] = ("tau_pos", "tau_neg", "eps_low", "eps_high", "dual_clip")


@dataclass(frozen=True)
class LossConfig:
    """A validated configuration: method, aggregation and every parameter resolved.

    Parameters the method does not take are ``None``. Hashable, so JAX can treat it as static.
    """

    method: str = spec.DATA["defaults"]["method"]
    loss_agg: str = spec.DATA["defaults"]["loss_agg"]
    tau_pos: float | None = None
    tau_neg: float | None = None
    eps_low: float | None = None
    eps_high: float | None = None
    dual_clip: float | None = None
    norm_length: float | None = None
    count_empty_rows: bool = bool(spec.DATA["defaults"]["count_empty_rows"])
    kl_coef: float | None = None  # clause 10.2: None without ref_logp
    kl_estimator: str | None = None

    @property
    def has_kl(self) -> bool:
        """True when the loss has a KL penalty with a non-zero coefficient (clause 10.2).

        A coefficient that is not a Python number (a traced value: JAX traces ``kl_coef`` so that
        one program serves every non-zero beta) counts as non-zero; beta = 0 stays static.
        """
        k = self.kl_coef
        return k is not None and (not isinstance(k, (int, float)) or k != 0.0)

    @property
    def method_spec(self) -> spec.MethodSpec:
        """The clause-2 data of this method."""
        return spec.METHODS[self.method]

    @property
    def is_soft(self) -> bool:
        """True for the SAPO gate, False for the hard clip."""
        return self.method_spec.gate == "soft"

    @property
    def sequence_value(self) -> bool:
        """True when the term is evaluated at the sequence ratio s_i."""
        return self.method_spec.ratio != "token"

    @property
    def spreads_gradient(self) -> bool:
        """True when the gradient flows through s_i to every valid token of a row."""
        return self.method_spec.ratio == "sequence"

    @property
    def per_row_mean(self) -> bool:
        """True when the row weight is 1/L_i (seq-mean-token-mean)."""
        return spec.LOSS_AGGS[self.loss_agg].row_weight == "1/L_i"

    def options(self) -> dict[str, Any]:
        """The keyword arguments that reproduce this configuration (only what it uses)."""
        out: dict[str, Any] = {"method": self.method, "loss_agg": self.loss_agg}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in PARAM_NAMES and f.name in self.method_spec.params and v is not None:
                out[f.name] = v
        if self.norm_length is not None:
            out["norm_length"] = self.norm_length
        if self.kl_coef is not None:
            out["kl_coef"] = self.kl_coef
            out["kl_estimator"] = self.kl_estimator
        return out


def _check_param(name: str, value: Any) -> float:
    domain = spec.DOMAINS[name]
    not_a_number = TypeError(
        f"{name} must be a real number in {domain.describe()} ({domain.meaning}); "
        f"got {type(value).__name__}"
    )
    if isinstance(value, (bool, str, bytes)):  # float() would accept True and "1"
        raise not_a_number
    if not isinstance(value, (int, float)):
        try:
            value = float(value)  # 0-d arrays and numpy scalars
        except (TypeError, ValueError):
            raise not_a_number from None
    value = float(value)
    if not domain.contains(value):
        raise ValueError(
            f"{name} must be finite and in {domain.describe()} ({domain.meaning}); got {value!r}"
        )
    return value


def resolve_config(
    method: str = spec.DATA["defaults"]["method"],
    loss_agg: str = spec.DATA["defaults"]["loss_agg"],
    *,
    tau_pos: float | None = None,
    tau_neg: float | None = None,
    eps_low: float | None = None,
    eps_high: float | None = None,
    dual_clip: float | None = None,
    norm_length: float | None = None,
    count_empty_rows: bool | None = None,
    has_normalizer: bool = False,
    kl_coef: float | None = None,
    kl_estimator: str | None = None,
    has_ref_logp: bool = False,
) -> LossConfig:
    """Validate options and fill the method's defaults from the spec (clause 4.1).

    Raises ``ValueError`` for an unknown method or aggregation (listing the valid ones), a
    parameter outside its domain, a parameter the method does not take, ``norm_length``
    missing for or given to the wrong mode, or ``count_empty_rows`` with a normalizer
    (clause 8.3, 8.4); ``ref_logp`` (``has_ref_logp``) without ``kl_coef``, ``kl_coef`` or
    ``kl_estimator`` without it, an unknown estimator or ``kl_coef`` outside its domain
    (clause 10.4).

    >>> resolve_config("grpo", eps_high=0.28).eps_high
    0.28
    >>> resolve_config("sapo").tau_neg
    1.05
    >>> resolve_config("grpo", tau_pos=1.0)
    Traceback (most recent call last):
    ...
    ValueError: tau_pos does not apply to method 'grpo' (it takes: eps_low, eps_high, dual_clip)
    """
    if not isinstance(method, str) or method not in spec.METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of: {', '.join(METHOD_NAMES)}")
    if not isinstance(loss_agg, str) or loss_agg not in spec.LOSS_AGGS:
        raise ValueError(
            f"unknown loss_agg {loss_agg!r}; expected one of: {', '.join(LOSS_AGG_NAMES)}"
        )
    mspec = spec.METHODS[method]
    given = {
        "tau_pos": tau_pos,
        "tau_neg": tau_neg,
        "eps_low": eps_low,
        "eps_high": eps_high,
        "dual_clip": dual_clip,
    }
    resolved: dict[str, float | None] = {}
    for name, value in given.items():
        if name not in mspec.params:
            if value is not None:
                raise ValueError(
                    f"{name} does not apply to method {method!r} "
                    f"(it takes: {', '.join(mspec.params)})"
                )
            resolved[name] = None
            continue
        if value is None:
            value = mspec.defaults.get(name)
        resolved[name] = None if value is None else _check_param(name, value)

    needs_norm = "norm_length" in spec.LOSS_AGGS[loss_agg].requires
    if needs_norm and norm_length is None:
        raise ValueError(f"loss_agg {loss_agg!r} requires norm_length (a positive constant length)")
    if not needs_norm and norm_length is not None:
        raise ValueError(
            f"norm_length applies only to loss_agg 'seq-mean-token-sum-norm', not {loss_agg!r}"
        )
    norm = None if norm_length is None else _check_param("norm_length", norm_length)

    if count_empty_rows is not None and has_normalizer:
        raise ValueError(
            "count_empty_rows cannot be combined with normalizer: the normalizer already "
            "fixed the row count (pass count_empty_rows to sapo_ref.normalizer instead)"
        )
    if (
        count_empty_rows is not None
        and type(count_empty_rows).__name__ in ("bool_", "bool")
        and not isinstance(count_empty_rows, bool)
    ):
        count_empty_rows = bool(count_empty_rows)  # numpy.bool_: a bool in all but type
    if count_empty_rows is not None and not isinstance(count_empty_rows, bool):
        raise TypeError(
            "count_empty_rows must be True or False; got "
            f"{type(count_empty_rows).__module__}.{type(count_empty_rows).__name__} {count_empty_rows!r}"
        )
    coef, estimator = _kl_options(kl_coef, kl_estimator, has_ref_logp)
    return LossConfig(
        kl_coef=coef,
        kl_estimator=estimator,
        method=method,
        loss_agg=loss_agg,
        norm_length=norm,
        count_empty_rows=bool(spec.DATA["defaults"]["count_empty_rows"])
        if count_empty_rows is None
        else count_empty_rows,
        **resolved,
    )


def _kl_options(
    kl_coef: float | None, kl_estimator: str | None, has_ref_logp: bool
) -> tuple[float | None, str | None]:
    # Clause 10.4: the three KL inputs come together or not at all.
    if not has_ref_logp:
        for name, value in (("kl_coef", kl_coef), ("kl_estimator", kl_estimator)):
            if value is not None:
                raise ValueError(
                    f"{name} requires ref_logp (the reference policy's log-probabilities, [N, T])"
                )
        return None, None
    if kl_coef is None:
        raise ValueError("ref_logp requires kl_coef (the KL penalty's coefficient beta >= 0)")
    if kl_estimator is None:
        kl_estimator = spec.DATA["defaults"]["kl_estimator"]
    if not isinstance(kl_estimator, str) or kl_estimator not in spec.KL_ESTIMATORS:
        raise ValueError(
            f"unknown kl_estimator {kl_estimator!r}; expected one of: "
            f"{', '.join(spec.KL_ESTIMATORS)}"
        )
    return _check_param("kl_coef", kl_coef), kl_estimator
