"""Bad input raises the spec's exception, naming the argument (clauses 5.5, 8.1-8.6, 9.1).

One table row per condition: how to break a valid call, the exception type, and a pattern the
message must contain (at least the argument's name). Domains come from ``spec.DOMAINS``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import sapo_ref
from sapo_ref import spec

N, T = 3, 4


def valid_call() -> dict[str, Any]:
    rng = np.random.default_rng(0)
    old = np.log(rng.uniform(0.1, 1.0, size=(N, T)))
    return {
        "logp": old + rng.normal(scale=0.1, size=(N, T)),
        "old_logp": old,
        "advantages": np.array([1.0, -0.5, 0.25]),
        "mask": np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=bool),
    }


def run(call: dict[str, Any]) -> sapo_ref.PolicyLossResult:
    call = dict(call)
    arrays = [call.pop(k) for k in ("logp", "old_logp", "advantages", "mask")]
    return sapo_ref.policy_loss(*arrays, **call)


def setting(**kw) -> Callable[[dict], dict]:
    return lambda c: {**c, **kw}


def at(name: str, index, value) -> Callable[[dict], dict]:
    def edit(c):
        x = np.array(c[name], dtype=float if name != "mask" else c[name].dtype)
        x[index] = value
        return {**c, name: x}

    return edit


def both(index, logp: float, old_logp: float) -> Callable[[dict], dict]:
    return lambda c: at("old_logp", index, old_logp)(at("logp", index, logp)(c))


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


def name_pattern(*words: str) -> str:
    return ".*".join(re.escape(w) for w in words)


CASES: list[tuple[str, Callable[[dict], dict], type[Exception], str]] = [
    # clause 8.1 shapes
    ("logp 1-D", lambda c: {**c, "logp": c["logp"][0]}, ValueError, "logp"),
    ("logp 3-D", lambda c: {**c, "logp": c["logp"][None]}, ValueError, "logp"),
    ("old_logp shape", lambda c: {**c, "old_logp": c["old_logp"][:, :2]}, ValueError, "old_logp"),
    ("mask shape", lambda c: {**c, "mask": c["mask"][:2]}, ValueError, "mask"),
    ("N = 0", lambda c: {k: v[:0] for k, v in c.items()}, ValueError, "logp"),
    (
        "T = 0",
        lambda c: {
            **{k: v[:, :0] for k, v in c.items() if v.ndim == 2},
            "advantages": c["advantages"],
        },
        ValueError,
        "logp",
    ),
    (
        "advantages length",
        lambda c: {**c, "advantages": c["advantages"][:2]},
        ValueError,
        "advantages",
    ),
    ("advantages [T, N]", lambda c: {**c, "advantages": np.ones((T, N))}, ValueError, "advantages"),
    ("advantages 3-D", lambda c: {**c, "advantages": np.ones((N, T, 1))}, ValueError, "advantages"),
    # clause 8.2 dtypes
    ("integer logp", lambda c: {**c, "logp": np.zeros((N, T), dtype=np.int64)}, TypeError, "logp"),
    (
        "integer old_logp",
        lambda c: {**c, "old_logp": np.zeros((N, T), dtype=np.int32)},
        TypeError,
        "old_logp",
    ),
    (
        "bool advantages",
        lambda c: {**c, "advantages": np.ones(N, dtype=bool)},
        TypeError,
        "advantages",
    ),
    ("complex logp", lambda c: {**c, "logp": c["logp"].astype(complex)}, TypeError, "logp"),
    ("mask value 2", lambda c: {**c, "mask": c["mask"].astype(np.int64) * 2}, ValueError, "mask"),
    ("mask value 0.5", lambda c: {**c, "mask": c["mask"] * 0.5}, ValueError, "mask"),
    ("mask value -1", lambda c: {**c, "mask": -c["mask"].astype(np.int8)}, ValueError, "mask"),
    ("mask dtype complex", lambda c: {**c, "mask": c["mask"].astype(complex)}, TypeError, "mask"),
    # clause 8.3 names
    (
        "unknown method",
        setting(method="ppo"),
        ValueError,
        name_pattern("method", "ppo", *sapo_ref.METHOD_NAMES),
    ),
    (
        "method not a str",
        setting(method=None),
        ValueError,
        name_pattern("method", *sapo_ref.METHOD_NAMES),
    ),
    (
        "unknown loss_agg",
        setting(loss_agg="mean"),
        ValueError,
        name_pattern("loss_agg", "mean", *sapo_ref.LOSS_AGG_NAMES),
    ),
    # clause 8.4 parameters the method does not take
    *[
        (
            f"{p} with {m}",
            setting(method=m, **{p: spec.DOMAINS[p].max}),
            ValueError,
            name_pattern(p, m),
        )
        for m, ms in spec.METHODS.items()
        for p in sapo_ref.config.PARAM_NAMES
        if p not in ms.params
    ],
    # clause 8.4 norm_length
    ("norm_length missing", setting(loss_agg="seq-mean-token-sum-norm"), ValueError, "norm_length"),
    *[
        (
            f"norm_length given to {a}",
            setting(loss_agg=a, norm_length=8.0),
            ValueError,
            "norm_length",
        )
        for a, s in spec.LOSS_AGGS.items()
        if "norm_length" not in s.requires
    ],
    *[
        (
            f"norm_length {label}",
            setting(loss_agg="seq-mean-token-sum-norm", norm_length=v),
            ValueError,
            name_pattern("norm_length", spec.DOMAINS["norm_length"].describe()),
        )
        for label, v in outside("norm_length")
    ],
    (
        "norm_length not a number",
        setting(loss_agg="seq-mean-token-sum-norm", norm_length="8"),
        TypeError,
        "norm_length",
    ),
    # clause 8.4 normalizer / count_empty_rows
    (
        "count_empty_rows with normalizer",
        lambda c: {**c, "count_empty_rows": True, "normalizer": sapo_ref.normalizer(c["mask"])},
        ValueError,
        name_pattern("count_empty_rows", "normalizer"),
    ),
    ("count_empty_rows not a bool", setting(count_empty_rows=1), TypeError, "count_empty_rows"),
    (
        "normalizer with fewer tokens",
        lambda c: {**c, "normalizer": sapo_ref.Normalizer(1.0, 10.0)},
        ValueError,
        "normalizer",
    ),
    (
        "normalizer with fewer rows",
        lambda c: {**c, "normalizer": sapo_ref.Normalizer(100.0, 1.0)},
        ValueError,
        "normalizer",
    ),
    (
        "normalizer negative",
        lambda c: {**c, "normalizer": sapo_ref.Normalizer(-1.0, 3.0)},
        ValueError,
        "normalizer",
    ),
    (
        "normalizer nan",
        lambda c: {**c, "normalizer": sapo_ref.Normalizer(math.nan, 3.0)},
        ValueError,
        "normalizer",
    ),
    ("normalizer wrong type", lambda c: {**c, "normalizer": (6.0, 3.0)}, TypeError, "normalizer"),
    # clause 8.5 advantages at valid tokens
    ("NaN advantage", at("advantages", 0, math.nan), ValueError, "advantages"),
    ("inf advantage", at("advantages", 1, math.inf), ValueError, "advantages"),
    (
        "-inf per-token advantage",
        lambda c: at("advantages", (2, 0), -math.inf)({**c, "advantages": np.ones((N, T))}),
        ValueError,
        "advantages",
    ),
    # clause 8.6 undefined log-ratios at valid tokens
    ("NaN logp", at("logp", (0, 1), math.nan), ValueError, "logp"),
    ("NaN old_logp", at("old_logp", (1, 0), math.nan), ValueError, "old_logp"),
    ("inf - inf", both((0, 0), math.inf, math.inf), ValueError, "logp - old_logp"),
    ("-inf - -inf", both((2, 0), -math.inf, -math.inf), ValueError, "logp - old_logp"),
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
                    name_pattern(_p, spec.DOMAINS[_p].describe()),
                )
            )
        CASES.append((f"{_method} {_p} str", setting(method=_method, **{_p: "2"}), TypeError, _p))
        CASES.append((f"{_method} {_p} bool", setting(method=_method, **{_p: True}), TypeError, _p))
        CASES.append(
            (f"{_method} {_p} list", setting(method=_method, **{_p: [2.0]}), TypeError, _p)
        )


# clause 5.5: +inf and -inf log-ratios in one row, for every sequence method
def mixed_row(c: dict) -> dict:
    return at("logp", (0, 1), -math.inf)(at("logp", (0, 0), math.inf)(c))


def mixed_row_via_old(c: dict) -> dict:
    return at("old_logp", (0, 1), math.inf)(at("logp", (0, 0), math.inf)(c))


for _method, _ms in spec.METHODS.items():
    if _ms.is_sequence:
        CASES.append(
            (
                f"{_method} row with +inf and -inf",
                lambda c, m=_method: {**mixed_row(c), "method": m},
                ValueError,
                r"row 0",
            )
        )
        CASES.append(
            (
                f"{_method} row with +inf and -inf (old_logp)",
                lambda c, m=_method: {**mixed_row_via_old(c), "method": m},
                ValueError,
                r"row 0",
            )
        )


@pytest.mark.parametrize("edit,exc,pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises(edit, exc, pattern):
    call = edit(valid_call())
    with pytest.raises(exc, match=pattern) as info:
        run(call)
    assert type(info.value) is exc  # not a subclass of another kind


def test_cases_start_from_a_valid_call():
    """The table is meaningful only if the unedited call succeeds."""
    res = run(valid_call())
    assert math.isfinite(res.loss)


@pytest.mark.parametrize("method", [m for m, s in spec.METHODS.items() if not s.is_sequence])
def test_token_methods_accept_rows_with_both_infinities(method):
    """Clause 5.5: token methods are unaffected by a row holding +inf and -inf log-ratios."""
    res = run({**mixed_row(valid_call()), "method": method})
    assert not math.isnan(res.loss)


@pytest.mark.parametrize("name", list(spec.DOMAINS))
def test_domain_edges_are_accepted(name):
    """The domain bounds themselves are valid values (inclusive unless *_open)."""
    d = spec.DOMAINS[name]
    for value in ([] if d.min_open else [d.min]) + [d.max]:
        if name == "norm_length":
            call = setting(loss_agg="seq-mean-token-sum-norm", norm_length=value)(valid_call())
        else:
            method = next(m for m, s in spec.METHODS.items() if name in s.params)
            call = setting(method=method, **{name: value})(valid_call())
        run(call)


# ------------------------------------------------------------------ group_advantages (clause 9.1)
REWARDS = np.array([1.0, 0.0, 2.0, 3.0])

GROUP_CASES: list[tuple[str, Callable[[], Any], type[Exception], str]] = [
    (
        "rewards 2-D",
        lambda: sapo_ref.group_advantages(REWARDS.reshape(2, 2), 2),
        ValueError,
        "rewards",
    ),
    ("rewards 0-D", lambda: sapo_ref.group_advantages(np.asarray(1.0), 1), ValueError, "rewards"),
    ("integer rewards", lambda: sapo_ref.group_advantages(np.arange(4), 2), TypeError, "rewards"),
    (
        "NaN reward",
        lambda: sapo_ref.group_advantages(np.array([1.0, math.nan]), 2),
        ValueError,
        "rewards",
    ),
    (
        "inf reward",
        lambda: sapo_ref.group_advantages(np.array([1.0, math.inf]), 2),
        ValueError,
        "rewards",
    ),
    ("group_size 0", lambda: sapo_ref.group_advantages(REWARDS, 0), ValueError, "group_size"),
    ("group_size float", lambda: sapo_ref.group_advantages(REWARDS, 2.0), ValueError, "group_size"),
    ("group_size bool", lambda: sapo_ref.group_advantages(REWARDS, True), ValueError, "group_size"),
    (
        "group_size not dividing",
        lambda: sapo_ref.group_advantages(REWARDS, 3),
        ValueError,
        "group_size",
    ),
    (
        "scale unknown",
        lambda: sapo_ref.group_advantages(REWARDS, 2, scale="mad"),
        ValueError,
        "scale",
    ),
    ("ddof 2", lambda: sapo_ref.group_advantages(REWARDS, 2, ddof=2), ValueError, "ddof"),
    ("eps negative", lambda: sapo_ref.group_advantages(REWARDS, 2, eps=-1e-6), ValueError, "eps"),
    ("eps nan", lambda: sapo_ref.group_advantages(REWARDS, 2, eps=math.nan), ValueError, "eps"),
    ("eps inf", lambda: sapo_ref.group_advantages(REWARDS, 2, eps=math.inf), ValueError, "eps"),
    ("eps not a number", lambda: sapo_ref.group_advantages(REWARDS, 2, eps="0"), ValueError, "eps"),
]


@pytest.mark.parametrize(
    "thunk,exc,pattern", [c[1:] for c in GROUP_CASES], ids=[c[0] for c in GROUP_CASES]
)
def test_group_advantages_bad_input(thunk, exc, pattern):
    with pytest.raises(exc, match=pattern) as info:
        thunk()
    assert type(info.value) is exc
