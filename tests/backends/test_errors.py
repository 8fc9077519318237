"""Bad input: the same error, type and text, from every policy_loss API (clauses 5.5, 8.1-8.8).

One table row per condition: how to break a valid call (on NumPy inputs), the exception type
and a pattern the reference's message must contain (at least the argument's name). The
reference is called on the NumPy inputs; every other backend on its own arrays (NumPy arrays
that no framework holds, such as object or string arrays, and non-arrays, are passed as they
are) and must raise the same type with the same text. Dtype names are the one part of a
message that may be spelt the framework's way (``torch.int64`` for ``int64``).
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import pytest
from backends._inputs import (
    ARRAYS,
    KL_ESTIMATORS,
    Edit,
    N,
    T,
    at,
    both,
    setting,
    then,
    valid_call,
)
from sapo_conformance.compare import compare

import sapo_ref
from sapo_ref import spec


def outside(name: str) -> list[tuple[str, float]]:
    """Values just outside ``name``'s domain and non-finite values, labelled."""
    d = spec.DOMAINS[name]
    below = d.min if d.min_open else (d.min - max(1.0, abs(d.min)) if d.min == 0 else d.min / 2)
    return [
        ("below", below),
        ("above", d.max * 2),
        ("nan", math.nan),
        ("inf", math.inf),
        ("-inf", -math.inf),
    ]


def names(*words: str) -> str:
    return ".*".join(re.escape(w) for w in words)


def norm(*counts: Any) -> Edit:
    return lambda c: {**c, "normalizer": sapo_ref.Normalizer(*counts)}


#: (label, edit, exception, pattern, clauses)
CASES: list[tuple[str, Edit, type[Exception], str, tuple[str, ...]]] = [
    # clause 8.1 shapes
    ("logp 1-D", lambda c: {**c, "logp": c["logp"][0]}, ValueError, "logp", ("1.1", "8.1")),
    ("logp 3-D", lambda c: {**c, "logp": c["logp"][None]}, ValueError, "logp", ("1.1", "8.1")),
    (
        "old_logp shape",
        lambda c: {**c, "old_logp": c["old_logp"][:, :2]},
        ValueError,
        "old_logp",
        ("1.1", "8.1"),
    ),
    (
        "old_logp [1, T]",
        lambda c: {**c, "old_logp": c["old_logp"][:1]},
        ValueError,
        "old_logp",
        ("1.1", "8.1"),
    ),
    ("mask shape", lambda c: {**c, "mask": c["mask"][:2]}, ValueError, "mask", ("1.1", "8.1")),
    ("mask [1, T]", lambda c: {**c, "mask": c["mask"][:1]}, ValueError, "mask", ("1.1", "8.1")),
    ("N = 0", lambda c: {k: v[:0] for k, v in c.items()}, ValueError, "logp", ("1.1", "8.1")),
    (
        "T = 0",
        lambda c: {
            **{k: v[:, :0] for k, v in c.items() if v.ndim == 2},
            "advantages": c["advantages"],
        },
        ValueError,
        "logp",
        ("1.1", "8.1"),
    ),
    (
        "advantages length",
        lambda c: {**c, "advantages": c["advantages"][:2]},
        ValueError,
        "advantages",
        ("1.1", "8.1"),
    ),
    (
        "advantages [N, 1]",
        lambda c: {**c, "advantages": c["advantages"][:, None]},
        ValueError,
        "advantages",
        ("1.1", "8.1"),
    ),
    (
        "advantages [T, N]",
        lambda c: {**c, "advantages": np.ones((T, N))},
        ValueError,
        "advantages",
        ("1.1", "8.1"),
    ),
    (
        "advantages 3-D",
        lambda c: {**c, "advantages": np.ones((N, T, 1))},
        ValueError,
        "advantages",
        ("1.1", "8.1"),
    ),
    # clause 8.2 dtypes, and what is not an array at all
    ("integer logp", setting(logp=np.zeros((N, T), dtype=np.int64)), TypeError, "logp", ("8.2",)),
    (
        "integer old_logp",
        setting(old_logp=np.zeros((N, T), dtype=np.int32)),
        TypeError,
        "old_logp",
        ("8.2",),
    ),
    (
        "bool advantages",
        setting(advantages=np.ones(N, dtype=bool)),
        TypeError,
        "advantages",
        ("8.2",),
    ),
    (
        "complex logp",
        lambda c: {**c, "logp": c["logp"].astype(complex)},
        TypeError,
        "logp",
        ("8.2",),
    ),
    ("advantages=1.0", setting(advantages=1.0), TypeError, "advantages", ("8.2",)),
    ("advantages=None", setting(advantages=None), TypeError, "advantages", ("8.2",)),
    ("advantages a str", setting(advantages="1.0"), TypeError, "advantages", ("8.2",)),
    ("logp=None", setting(logp=None), TypeError, "logp", ("8.2",)),
    ("mask=None", setting(mask=None), TypeError, "mask", ("8.2",)),
    (
        "advantages object array",
        setting(advantages=np.array([1.0, 2.0, 3.0], dtype=object)),
        TypeError,
        "advantages",
        ("8.2",),
    ),
    (
        "old_logp string array",
        setting(old_logp=np.full((N, T), "0.5")),
        TypeError,
        "old_logp",
        ("8.2",),
    ),
    ("mask string array", setting(mask=np.full((N, T), "1")), TypeError, "mask", ("8.2",)),
    (
        "mask value 2",
        lambda c: {**c, "mask": c["mask"].astype(np.int64) * 2},
        ValueError,
        "mask",
        ("8.2",),
    ),
    ("mask value 0.5", lambda c: {**c, "mask": c["mask"] * 0.5}, ValueError, "mask", ("8.2",)),
    (
        "mask value -1",
        lambda c: {**c, "mask": -c["mask"].astype(np.int8)},
        ValueError,
        "mask",
        ("8.2",),
    ),
    (
        "mask value NaN",
        lambda c: at("mask", (0, 3), math.nan)({**c, "mask": c["mask"] * 1.0}),
        ValueError,
        "mask",
        ("8.2",),
    ),
    (
        "mask dtype complex",
        lambda c: {**c, "mask": c["mask"].astype(complex)},
        TypeError,
        "mask",
        ("8.2",),
    ),
    # clause 8.3 names
    (
        "unknown method",
        setting(method="ppo"),
        ValueError,
        names("method", "ppo", *sapo_ref.METHOD_NAMES),
        ("8.3",),
    ),
    (
        "method not a str",
        setting(method=None),
        ValueError,
        names("method", *sapo_ref.METHOD_NAMES),
        ("8.3",),
    ),
    (
        "unknown loss_agg",
        setting(loss_agg="mean"),
        ValueError,
        names("loss_agg", "mean", *sapo_ref.LOSS_AGG_NAMES),
        ("8.3",),
    ),
    # clause 8.4 parameters the method does not take
    *[
        (
            f"{p} with {m}",
            setting(method=m, **{p: spec.DOMAINS[p].max}),
            ValueError,
            names(p, m),
            ("8.4",),
        )
        for m, ms in spec.METHODS.items()
        for p in sapo_ref.config.PARAM_NAMES
        if p not in ms.params
    ],
    # clause 8.4 norm_length
    (
        "norm_length missing",
        setting(loss_agg="seq-mean-token-sum-norm"),
        ValueError,
        "norm_length",
        ("8.4",),
    ),
    *[
        (
            f"norm_length given to {a}",
            setting(loss_agg=a, norm_length=8.0),
            ValueError,
            "norm_length",
            ("8.4",),
        )
        for a, s in spec.LOSS_AGGS.items()
        if "norm_length" not in s.requires
    ],
    *[
        (
            f"norm_length {label}",
            setting(loss_agg="seq-mean-token-sum-norm", norm_length=v),
            ValueError,
            names("norm_length", spec.DOMAINS["norm_length"].describe()),
            ("8.4",),
        )
        for label, v in outside("norm_length")
    ],
    (
        "norm_length a str",
        setting(loss_agg="seq-mean-token-sum-norm", norm_length="8"),
        TypeError,
        "norm_length",
        ("8.4",),
    ),
    # clause 8.4 count_empty_rows, clause 8.8 normalizer
    (
        "count_empty_rows with normalizer",
        lambda c: {**c, "count_empty_rows": True, "normalizer": sapo_ref.Normalizer(10.0, 3.0)},
        ValueError,
        names("count_empty_rows", "normalizer"),
        ("8.4",),
    ),
    ("count_empty_rows=1", setting(count_empty_rows=1), TypeError, "count_empty_rows", ("8.4",)),
    (
        "count_empty_rows a str",
        setting(count_empty_rows="yes"),
        TypeError,
        "count_empty_rows",
        ("8.4",),
    ),
    ("normalizer (0, 0)", norm(0.0, 0.0), ValueError, "normalizer", ("8.8",)),
    ("normalizer fewer tokens", norm(1.0, 10.0), ValueError, "normalizer", ("8.8",)),
    ("normalizer fewer rows", norm(100.0, 1.0), ValueError, "normalizer", ("8.8",)),
    ("normalizer negative", norm(-5.0, 3.0), ValueError, "normalizer", ("8.8",)),
    ("normalizer NaN", norm(math.nan, 3.0), ValueError, "normalizer", ("8.8",)),
    ("normalizer inf", norm(math.inf, 3.0), ValueError, "normalizer", ("8.8",)),
    ("normalizer a tuple", setting(normalizer=(6.0, 3.0)), TypeError, "normalizer", ("8.8",)),
    ("normalizer str counts", norm("9", "3"), TypeError, "normalizer", ("8.8",)),
    ("normalizer bool counts", norm(True, 3.0), TypeError, "normalizer", ("8.8",)),
    ("normalizer None counts", norm(None, 3.0), TypeError, "normalizer", ("8.8",)),
    # clause 8.5 advantages at valid tokens
    ("NaN advantage", at("advantages", 0, math.nan), ValueError, "advantages", ("8.5",)),
    ("inf advantage", at("advantages", 1, math.inf), ValueError, "advantages", ("8.5",)),
    (
        "-inf per-token advantage",
        lambda c: at("advantages", (2, 0), -math.inf)({**c, "advantages": np.ones((N, T))}),
        ValueError,
        "advantages",
        ("8.5",),
    ),
    # clause 8.6 undefined log-ratios at valid tokens
    ("NaN logp", at("logp", (0, 1), math.nan), ValueError, "logp", ("8.6",)),
    ("NaN old_logp", at("old_logp", (1, 0), math.nan), ValueError, "old_logp", ("8.6",)),
    ("inf - inf", both((0, 0), math.inf, math.inf), ValueError, "logp - old_logp", ("8.6",)),
    ("-inf - -inf", both((2, 0), -math.inf, -math.inf), ValueError, "logp - old_logp", ("8.6",)),
]


def terms(**kw: Any) -> Edit:
    """The valid call with [N, T] weights and a KL term (clause 10), then ``kw``."""

    def edit(c):
        out = {**c, "weights": np.ones((N, T)), "ref_logp": c["logp"] - 0.25, "kl_coef": 0.1}
        out.update(kw)
        return {k: v for k, v in out.items() if v is not None}

    return edit


# clause 10.4: the added terms' shapes, dtypes, values at valid tokens and options
CASES += [
    ("weights [T]", terms(weights=np.ones(T)), ValueError, "weights", ("10.4",)),
    ("weights [N, 1]", terms(weights=np.ones((N, 1))), ValueError, "weights", ("10.4",)),
    ("weights 3-D", terms(weights=np.ones((N, T, 1))), ValueError, "weights", ("10.4",)),
    ("weights complex", terms(weights=np.ones((N, T), complex)), TypeError, "weights", ("10.4",)),
    ("weights string array", terms(weights=np.full(N, "1")), TypeError, "weights", ("10.4",)),
    ("weights=1.0", terms(weights=1.0), TypeError, "weights", ("10.4",)),
    *[
        (
            f"weights {label} at a valid token",
            then(terms(), at("weights", (1, 1), v)),
            ValueError,
            names("weights must be finite and >= 0 at valid tokens; first bad at (1, 1)"),
            ("10.4",),
        )
        for label, v in (("NaN", math.nan), ("inf", math.inf), ("-1e-300", -1e-300))
    ],
    (
        "[N] weights negative",
        then(terms(weights=np.ones(N)), at("weights", 2, -1.0)),
        ValueError,
        names("weights must be finite and >= 0 at valid tokens; first bad at (2, 0)"),
        ("10.4",),
    ),
    (
        "negative weight and a NaN logp: the reference's first fault",
        then(terms(), at("weights", (0, 0), -1.0), at("logp", (2, 0), math.nan)),
        ValueError,
        names("logp is NaN at a valid token; first at (2, 0)"),
        ("10.4", "8.6"),
    ),
    (
        "ref_logp NaN at a valid token, kl_coef 0",
        then(terms(kl_coef=0.0), at("ref_logp", (1, 1), math.nan)),
        ValueError,
        names("ref_logp is NaN at a valid token; first at (1, 1)"),
        ("10.4",),
    ),
    ("ref_logp [N]", terms(ref_logp=np.zeros(N)), ValueError, "ref_logp", ("10.4",)),
    ("ref_logp [1, T]", terms(ref_logp=np.zeros((1, T))), ValueError, "ref_logp", ("10.4",)),
    (
        "integer ref_logp",
        terms(ref_logp=np.zeros((N, T), np.int64)),
        TypeError,
        "ref_logp",
        ("10.4",),
    ),
    ("ref_logp=0.0", terms(ref_logp=0.0), TypeError, "ref_logp", ("10.4",)),
    (
        "ref_logp NaN at a valid token",
        then(terms(), at("ref_logp", (0, 2), math.nan)),
        ValueError,
        names("ref_logp is NaN at a valid token; first at (0, 2)"),
        ("10.4",),
    ),
    (
        "logp - ref_logp = inf - inf",
        then(terms(), at("ref_logp", (1, 0), -math.inf), at("logp", (1, 0), -math.inf)),
        ValueError,
        names("log-ratio logp - ref_logp is undefined"),
        ("10.4",),
    ),
    (
        "ref_logp without kl_coef",
        terms(kl_coef=None),
        ValueError,
        names("ref_logp requires kl_coef"),
        ("10.4",),
    ),
    (
        "kl_coef without ref_logp",
        terms(ref_logp=None),
        ValueError,
        names("kl_coef requires ref_logp"),
        ("10.4",),
    ),
    (
        "kl_estimator without ref_logp",
        terms(ref_logp=None, kl_coef=None, kl_estimator="k3"),
        ValueError,
        names("kl_estimator requires ref_logp"),
        ("10.4",),
    ),
    (
        "unknown kl_estimator",
        terms(kl_estimator="low_var_kl"),
        ValueError,
        names("kl_estimator", "low_var_kl", *KL_ESTIMATORS),
        ("10.4",),
    ),
    (
        "kl_estimator not a str",
        terms(kl_estimator=3),
        ValueError,
        names("kl_estimator", *KL_ESTIMATORS),
        ("10.4",),
    ),
    *[
        (
            f"kl_coef {label}",
            terms(kl_coef=v),
            ValueError,
            names("kl_coef", spec.DOMAINS["kl_coef"].describe()),
            ("10.4",),
        )
        for label, v in outside("kl_coef")
    ],
    *[
        (f"kl_coef {label}", terms(kl_coef=v), TypeError, "kl_coef", ("10.4",))
        for label, v in (("str", "0.1"), ("bool", True), ("list", [0.1]))
    ],
]

# clause 8.4 domains, read from the spec
for _method, _ms in spec.METHODS.items():
    for _p in _ms.params:
        for _label, _v in outside(_p):
            CASES.append(
                (
                    f"{_method} {_p} {_label}",
                    setting(method=_method, **{_p: _v}),
                    ValueError,
                    names(_p, spec.DOMAINS[_p].describe()),
                    ("8.4",),
                )
            )
        for _label, _v in (("str", "2"), ("bool", True), ("list", [2.0])):
            CASES.append(
                (
                    f"{_method} {_p} {_label}",
                    setting(method=_method, **{_p: _v}),
                    TypeError,
                    _p,
                    ("8.4",),
                )
            )

# clause 5.5: +inf and -inf log-ratios in one row, for every sequence method; raw infinities,
# through old_logp, and finite log-probabilities whose difference overflows
_MIXED = {
    "": then(at("logp", (0, 0), math.inf), at("logp", (0, 1), -math.inf)),
    " (old_logp)": then(at("logp", (0, 0), math.inf), at("old_logp", (0, 1), math.inf)),
    " (overflowing differences)": then(
        both((0, 0), 1.7e308, -1.7e308), both((0, 1), -1.7e308, 1.7e308)
    ),
}
for _method, _ms in spec.METHODS.items():
    if _ms.is_sequence:
        for _how, _edit in _MIXED.items():
            CASES.append(
                (
                    f"{_method} row with +inf and -inf{_how}",
                    lambda c, m=_method, e=_edit: {**e(c), "method": m},
                    ValueError,
                    r"row 0",
                    ("5.5", "8.6"),
                )
            )


#: The keyword arrays of clause 10.
TERM_ARRAYS = ("weights", "ref_logp")


def call_reference(call: dict[str, Any]) -> Any:
    call = dict(call)
    arrays = [call.pop(k) for k in ARRAYS]
    return sapo_ref.policy_loss(*arrays, **call)


def _to_backend(backend, x: Any) -> Any:
    """A NumPy array of a kind the framework holds becomes its array; the rest is passed as is."""
    if not isinstance(x, np.ndarray) or x.dtype.kind not in "biufc":
        return x
    if x.dtype.kind == "f":
        return backend.to_array(x, x.dtype.name)
    return backend.native(x)


def _same_text(message: str) -> str:
    """The message with dtype names unqualified (``torch.int64``, ``mlx.core.int64`` -> ``int64``)."""
    return re.sub(
        r"\b(?:torch|mlx\.core|array_api_strict|jax\.numpy|numpy)\.(?=[a-z])", "", message
    )


def _marks(clauses: tuple[str, ...]) -> list[Any]:
    return [pytest.mark.clause(*clauses)]


@pytest.mark.clause("8.7")
@pytest.mark.parametrize(
    "edit,exc,pattern",
    [pytest.param(*c[1:4], marks=_marks(c[4]), id=c[0]) for c in CASES],
)
def test_bad_input_raises_the_references_error(backend, edit, exc, pattern):
    try:
        call = edit(valid_call())
    except exc as err:  # a Normalizer that cannot even be built: the same for every backend
        assert re.search(pattern, str(err)), str(err)
        return
    with pytest.raises(exc, match=pattern) as want:
        call_reference(call)
    assert type(want.value) is exc  # not a subclass of another kind
    if backend.name == "reference":
        return
    given = [call.pop(k) for k in ARRAYS]
    arrays = [_to_backend(backend, x) for x in given]
    pairs = list(zip(given, arrays))
    for name in TERM_ARRAYS:  # the clause 10 arrays, as the backend's too
        if name in call:
            x = call[name]
            call[name] = _to_backend(backend, x)
            pairs.append((x, call[name]))
    expected = _same_text(str(want.value))
    for x, a in pairs:  # a dtype the framework lacks (MLX: complex64 only)
        if a is not x and isinstance(x, np.ndarray) and backend.dtype_name(a) != x.dtype.name:
            expected = expected.replace(f"dtype {x.dtype.name}", f"dtype {backend.dtype_name(a)}")
    with pytest.raises(Exception) as got:
        backend.api(*arrays, **call)
    assert type(got.value) is exc, f"{backend.name} raised {got.value!r}; reference {want.value!r}"
    assert _same_text(str(got.value)) == expected


def test_cases_start_from_a_valid_call(backend):
    """The table is meaningful only if the unedited call succeeds on every backend."""
    call = valid_call()
    loss = backend.loss(*(backend.to_array(call[k]) for k in ARRAYS))
    assert math.isfinite(float(backend.to_numpy(loss)))


ACCEPTED: list[tuple[str, Edit]] = [
    ("count_empty_rows numpy bool", setting(count_empty_rows=np.bool_(True))),
    ("tau_pos numpy float", setting(tau_pos=np.float64(2.0))),
    ("tau_neg 0-d array", setting(tau_neg=np.array(0.5))),
    ("normalizer numpy counts", norm(np.float64(12.0), np.int64(5))),
    ("integer mask", lambda c: {**c, "mask": c["mask"].astype(np.int64)}),
    ("float mask", lambda c: {**c, "mask": c["mask"].astype(np.float64)}),
    (
        "NaN and inf at invalid positions",
        then(at("logp", (0, 3), math.nan), at("old_logp", (1, 3), math.inf)),
    ),
    # clause 10: the terms' valid spellings
    ("bool weights", terms(weights=np.array([[1, 0, 1, 1]] * N, bool))),
    ("integer [N] weights", terms(weights=np.array([2, 0, 1], np.int32))),
    ("float32 weights", terms(weights=np.full((N, T), 0.5, np.float32))),
    ("zero weights everywhere", terms(weights=np.zeros((N, T)))),
    ("weights garbage where masked", then(terms(), at("weights", (2, 3), -math.inf))),
    ("ref_logp garbage where masked", then(terms(), at("ref_logp", (0, 3), math.nan))),
    ("kl_coef 0 beside a far ref_logp", terms(kl_coef=0.0, ref_logp=np.full((N, T), -700.0))),
    ("kl_coef numpy float", terms(kl_coef=np.float32(0.5))),
    ("kl_coef 0-d array and integer", terms(kl_coef=np.array(2))),
    *[(f"kl_estimator {e}", terms(kl_estimator=e)) for e in KL_ESTIMATORS],
]


@pytest.mark.clause("8.2", "8.4", "8.8", "10.1", "10.2")
@pytest.mark.parametrize("edit", [e for _, e in ACCEPTED], ids=[n for n, _ in ACCEPTED])
def test_valid_spellings_are_accepted(backend, edit):
    """NumPy scalars, 0-d arrays and 0/1 masks of any real dtype are valid input everywhere; so
    are bool, integer and float32 weights, and garbage in the terms where the mask is 0."""
    call = edit(valid_call())
    want = call_reference(dict(call)).loss
    arrays = [_to_backend(backend, call.pop(k)) for k in ARRAYS]
    call.update({k: _to_backend(backend, call[k]) for k in TERM_ARRAYS if k in call})
    got = float(backend.to_numpy(backend.loss(*arrays, **call)))
    c = compare("loss", got, want, backend.tolerance("float64", "value"))
    assert c.ok, c.message


@pytest.mark.clause("8.8")
def test_normalizer_counts_may_be_the_backends_0d_arrays(backend):
    """Clause 8.8: a normalizer's counts may be 0-d real arrays (here the backend's own)."""
    call = valid_call()
    want = call_reference({**call, "normalizer": sapo_ref.Normalizer(12.0, 5.0)}).loss
    counts = [backend.to_array(np.array(v), "float64") for v in (12.0, 5.0)]
    arrays = [_to_backend(backend, call[k]) for k in ARRAYS]
    got = backend.loss(*arrays, normalizer=sapo_ref.Normalizer(*counts))
    c = compare("loss", float(backend.to_numpy(got)), want, backend.tolerance("float64", "value"))
    assert c.ok, c.message
