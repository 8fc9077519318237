"""Inputs of the cross-backend tests, built with the conformance suite's own generators.

A case is a :class:`sapo_conformance.cases.Case` (float64 inputs and options) drawn from a
seeded generator; :func:`materialized` rounds it to a dtype and evaluates the float64
reference on the rounded inputs (clause C.1), or skips the test with the reason it does not
apply in that dtype. The clause 10 terms (per-token weights, the KL penalty) of a case are a
:class:`Terms` (:func:`make_terms`); :func:`materialized_with_terms` evaluates the reference
with them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from sapo_conformance.cases import Case, Materialized, _batch, _opts, materialize, round_to

import sapo_ref
from sapo_ref import spec
from sapo_ref.evaluate import evaluate

METHODS: tuple[str, ...] = sapo_ref.METHOD_NAMES
LOSS_AGGS: tuple[str, ...] = sapo_ref.LOSS_AGG_NAMES
DTYPES: tuple[str, ...] = ("float64", "float32", "bfloat16", "float16")
SEQUENCE_METHODS: tuple[str, ...] = tuple(m for m in METHODS if spec.METHODS[m].is_sequence)


def make_case(
    method: str,
    loss_agg: str,
    *,
    seed: int = 0,
    per_token: bool | None = None,
    empty: bool = True,
    sigma: float = 0.4,
    **options: Any,
) -> Case:
    """A seeded case of ``method`` and ``loss_agg``: ragged mask (an empty row if ``empty``),
    finite garbage at invalid positions, options around the paper's plus ``options``."""
    rng = np.random.default_rng([seed, METHODS.index(method), LOSS_AGGS.index(loss_agg)])
    lp, old, adv, mask = _batch(rng, sigma=sigma, empty=empty, per_token=per_token)
    opts = {**_opts(rng, method, mask.shape[1], loss_agg), **options}
    return Case(f"{method}/{loss_agg}/{seed}", ("C.1",), lp, old, adv, mask, opts)


def materialized(case: Case, dtype: str) -> Materialized:
    """``case`` in ``dtype`` with the reference on the rounded inputs; skip if it does not apply."""
    m = materialize(case, dtype)
    if isinstance(m, str):
        pytest.skip(m)
    return m


def with_inputs(case: Case, **arrays: np.ndarray) -> Case:
    """``case`` with some of its input arrays replaced."""
    fields = {k: getattr(case, k) for k in ("logp", "old_logp", "advantages", "mask")}
    fields.update(arrays)
    return Case(case.id, case.clauses, options=dict(case.options), fd=False, **fields)


# ----------------------------------------------------------------------------- one small call
#: The small valid call the error and tracing tests break one way at a time.
N, T = 3, 4
Edit = Callable[[dict[str, Any]], dict[str, Any]]
ARRAYS = ("logp", "old_logp", "advantages", "mask")


def valid_call() -> dict[str, Any]:
    rng = np.random.default_rng(0)
    old = np.log(rng.uniform(0.1, 1.0, size=(N, T)))
    return {
        "logp": old + rng.normal(scale=0.1, size=(N, T)),
        "old_logp": old,
        "advantages": np.array([1.0, -0.5, 0.25]),
        "mask": np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=bool),
    }


def setting(**kw: Any) -> Edit:
    return lambda c: {**c, **kw}


def at(name: str, index: Any, value: float) -> Edit:
    def edit(c):
        x = np.array(c[name], dtype=float if name != "mask" else c[name].dtype)
        x[index] = value
        return {**c, name: x}

    return edit


def both(index: Any, logp: float, old_logp: float) -> Edit:
    return lambda c: at("old_logp", index, old_logp)(at("logp", index, logp)(c))


def then(*edits: Edit) -> Edit:
    def edit(c):
        for e in edits:
            c = e(c)
        return c

    return edit


# ----------------------------------------------------------------------------- clause 10 terms
KL_ESTIMATORS: tuple[str, ...] = sapo_ref.KL_ESTIMATOR_NAMES
#: The options that come with ref_logp (clause 10.2).
KL_OPTIONS = ("kl_coef", "kl_estimator")


@dataclass(frozen=True)
class Terms:
    """The clause 10 inputs of a call, as NumPy arrays (float64, bool or int64) and options.

    ``weights`` [N] or [N, T] (clause 10.1) and ``ref_logp`` [N, T] (clause 10.2) may hold
    anything at invalid positions; ``kl`` holds ``kl_coef`` and ``kl_estimator`` (empty
    without ``ref_logp``).
    """

    weights: np.ndarray | None = None
    ref_logp: np.ndarray | None = None
    kl: dict[str, Any] = field(default_factory=dict)

    def rounded(self, dtype: str) -> Terms:
        """Floating arrays rounded to ``dtype`` (bool and integer weights kept as they are)."""
        w = self.weights
        if w is not None and w.dtype.kind == "f":
            w = round_to(w, dtype)
        ref = None if self.ref_logp is None else round_to(self.ref_logp, dtype)
        return Terms(w, ref, dict(self.kl))

    def numpy_options(self) -> dict[str, Any]:
        """The keywords of a ``sapo_ref.policy_loss`` call on NumPy arrays."""
        out: dict[str, Any] = dict(self.kl)
        if self.weights is not None:
            out["weights"] = self.weights
        if self.ref_logp is not None:
            out["ref_logp"] = self.ref_logp
        return out

    def options(self, backend: Any, dtype: str) -> dict[str, Any]:
        """The same keywords with the arrays as ``backend``'s: float weights and ``ref_logp`` in
        ``dtype``, bool and integer weights in their own dtype."""
        out: dict[str, Any] = dict(self.kl)
        if self.weights is not None:
            w = self.weights
            out["weights"] = (
                backend.to_array(w, dtype) if w.dtype.kind == "f" else backend.native(w)
            )
        if self.ref_logp is not None:
            out["ref_logp"] = backend.to_array(self.ref_logp, dtype)
        return out


def make_terms(
    case: Case,
    *,
    seed: int = 0,
    weights: str | None = "token",
    weights_kind: str = "float",
    kl_estimator: str | None = "k3",
    kl_coef: float = 0.1,
    sigma: float = 0.3,
    garbage: bool = True,
) -> Terms:
    """Seeded clause 10 inputs for ``case``: ``weights`` laid out per ``"token"`` ([N, T]),
    per ``"row"`` ([N]) or absent (None), of kind float (a zero and a large value among them),
    bool or int; ``ref_logp = logp + N(0, sigma)`` at valid tokens with ``kl_estimator``
    (None: no KL term); NaN, inf and negative garbage at invalid positions if ``garbage``."""
    rng = np.random.default_rng([seed, 10])
    mask = case.mask
    n, t = mask.shape
    w = None
    if weights is not None:
        shape = (n, t) if weights == "token" else (n,)
        if weights_kind == "bool":
            w = rng.random(shape) < 0.7
        elif weights_kind == "int":
            w = rng.integers(0, 4, size=shape).astype(np.int64)
        else:
            w = rng.uniform(0.1, 2.0, size=shape)
            w.flat[0] = 0.0  # a token whose policy term goes, its count stays
            w.flat[-1] = 50.0
        if garbage and w.dtype.kind == "f" and weights == "token":
            w = np.where(mask, w, rng.choice([np.nan, np.inf, -np.inf, -1.0], size=shape))
    ref, kl = None, {}
    if kl_estimator is not None:
        lp = np.where(mask, case.logp, 0.0)
        ref = lp + rng.normal(0.0, sigma, size=(n, t))
        if garbage:
            ref = np.where(mask, ref, rng.choice([np.nan, np.inf, -np.inf, 1e30], size=(n, t)))
        kl = {"kl_coef": kl_coef, "kl_estimator": kl_estimator}
    return Terms(w, ref, kl)


def materialized_with_terms(case: Case, dtype: str, terms: Terms) -> tuple[Materialized, Terms]:
    """``case`` in ``dtype`` with the float64 reference re-evaluated with ``terms`` on the
    rounded inputs (``terms`` rounded too), or skip the test with the reason it does not apply."""
    m = materialized(case, dtype)
    rounded = terms.rounded(dtype)
    for name in ("weights", "ref_logp"):
        a, orig = getattr(rounded, name), getattr(terms, name)
        if a is None or a.dtype.kind != "f":
            continue
        valid = np.broadcast_to(m.mask if a.ndim == 2 else m.mask.any(axis=1), a.shape)
        if np.any(valid & np.isfinite(orig) & ~np.isfinite(a)):
            pytest.skip(f"{name} is out of the range of {dtype}")
    with np.errstate(all="ignore"):
        res = sapo_ref.policy_loss(
            m.logp, m.old_logp, m.advantages, m.mask, **case.options, **rounded.numpy_options()
        )
    outs = np.concatenate([[res.loss], np.asarray(res.grad).ravel()])
    top = float(np.finfo(np.float32 if dtype == "bfloat16" else dtype).max)
    if np.any(np.isfinite(outs) & (np.abs(outs) > top)):
        pytest.skip(f"the reference's outputs exceed the range of {dtype}")
    want = dataclasses.replace(
        m,
        want_loss=float(res.loss),
        want_grad=np.asarray(res.grad, np.float64),
        want_metrics=dict(res.metrics),
    )
    return want, rounded


def reference_parts(m: Materialized, options: dict[str, Any], terms: Terms) -> tuple[Any, Any]:
    """The reference's two gradient parts on ``m``'s inputs: ``(policy, kl)`` with
    ``d loss / d old_logp = -policy`` (clause 8.9; 0 for gspo-token) and ``d loss / d ref_logp =
    -kl`` (clause 10.3). ``policy`` is the gradient of the same call without the KL term."""
    without = Terms(terms.weights, None, {}).numpy_options()
    arrays = (m.logp, m.old_logp, m.advantages, m.mask)
    with np.errstate(all="ignore"):
        policy = sapo_ref.policy_loss(*arrays, **options, **without).grad
        if terms.ref_logp is None:
            return policy, None
        opts = {k: v for k, v in options.items() if k not in ("normalizer", "count_empty_rows")}
        config = sapo_ref.resolve_config(
            **opts,
            count_empty_rows=options.get("count_empty_rows"),
            has_normalizer="normalizer" in options,
            has_ref_logp=True,
            **terms.kl,
        )
        valid = m.mask.astype(bool)
        norm = options.get("normalizer") or sapo_ref.normalizer(
            valid, count_empty_rows=config.count_empty_rows
        )
        ev = evaluate(
            *(np.asarray(a, np.float64) for a in arrays[:3]),
            valid,
            config,
            sapo_ref.Normalizer(float(norm.num_tokens), float(norm.num_rows)),
            weights=None if terms.weights is None else terms.weights.astype(np.float64),
            ref_logp=terms.ref_logp.astype(np.float64),
        )
    kl = np.zeros(m.mask.shape) if ev.kl_grad is None else np.asarray(ev.kl_grad)
    return policy, kl
