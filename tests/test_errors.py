"""Bad input to the reference's helpers raises a clear error naming the argument (clauses 3.8,
3.11, 8.2, 8.4, 8.8, 9.1); valid edge values are accepted.

The bad-input table of ``policy_loss`` itself runs on every backend, the reference included:
``tests/backends/test_errors.py``. Here: the domain edges, clause 5.5 for token methods,
``group_advantages``, the sharding helpers (``global_normalizer``, ``combine_metrics``,
``split_rows``) and the messages issue 11 found naming nothing.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from backends._inputs import ARRAYS, at, setting, then, valid_call

import sapo_ref
from sapo_ref import spec
from sapo_ref.sharding import combine_metrics, global_normalizer, split_rows


def run(call: dict[str, Any]) -> sapo_ref.PolicyLossResult:
    call = dict(call)
    arrays = [call.pop(k) for k in ARRAYS]
    return sapo_ref.policy_loss(*arrays, **call)


@pytest.mark.clause("5.5")
@pytest.mark.parametrize("method", [m for m, s in spec.METHODS.items() if not s.is_sequence])
def test_token_methods_accept_rows_with_both_infinities(method):
    """Clause 5.5: token methods are unaffected by a row holding +inf and -inf log-ratios."""
    mixed = then(at("logp", (0, 0), math.inf), at("logp", (0, 1), -math.inf))
    res = run({**mixed(valid_call()), "method": method})
    assert not math.isnan(res.loss)


@pytest.mark.clause("8.4", "10.4")
@pytest.mark.parametrize("name", list(spec.DOMAINS))
def test_domain_edges_are_accepted(name):
    """The domain bounds themselves are valid values (inclusive unless *_open)."""
    d = spec.DOMAINS[name]
    for value in ([] if d.min_open else [d.min]) + [d.max]:
        if name == "norm_length":
            call = setting(loss_agg="seq-mean-token-sum-norm", norm_length=value)(valid_call())
        elif name == "kl_coef":  # clause 10.2: not a method parameter, it comes with ref_logp
            base = valid_call()
            call = setting(ref_logp=base["logp"] - 0.5, kl_coef=value)(base)
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


@pytest.mark.clause("9.1")
@pytest.mark.parametrize(
    "thunk,exc,pattern", [c[1:] for c in GROUP_CASES], ids=[c[0] for c in GROUP_CASES]
)
def test_group_advantages_bad_input(thunk, exc, pattern):
    with pytest.raises(exc, match=pattern) as info:
        thunk()
    assert type(info.value) is exc


# ------------------------------------------------------------------ sharding helpers (issue 11)
MASK = np.array([[1, 1, 0], [1, 0, 0]], dtype=bool)
SHARD_METRICS = sapo_ref.policy_loss(
    np.zeros((2, 3)), np.zeros((2, 3)), np.ones(2), MASK, method="sapo"
).metrics
GRPO_METRICS = sapo_ref.policy_loss(
    np.zeros((2, 3)), np.zeros((2, 3)), np.ones(2), MASK, method="grpo"
).metrics


def _policy_loss_mask_error(mask: np.ndarray) -> str:
    """The message policy_loss gives for this (2-D) mask."""
    z = np.zeros(mask.shape)
    with pytest.raises((TypeError, ValueError)) as err:
        sapo_ref.policy_loss(z, z, np.ones(mask.shape[0]), mask)
    return str(err.value)


SHARDING_CASES: list[tuple[str, Callable[[], Any], type[Exception], str]] = [
    (
        "masks a bare array",
        lambda: global_normalizer(MASK),
        TypeError,
        r"masks .*single array.*\[mask\]",
    ),
    ("masks None", lambda: global_normalizer(None), TypeError, "masks"),
    ("masks a dict", lambda: global_normalizer({"a": MASK}), TypeError, "masks"),
    ("masks empty", lambda: global_normalizer([]), ValueError, "masks"),
    ("mask 1-D", lambda: global_normalizer([MASK[0]]), ValueError, r"masks\[0\]: mask must be 2-D"),
    (
        "mask 3-D",
        lambda: global_normalizer([MASK, MASK[None]]),
        ValueError,
        r"masks\[1\]: mask must be 2-D",
    ),
    (
        "mask a list",
        lambda: global_normalizer([[[1, 0]]]),
        TypeError,
        r"masks\[0\]: mask must be an array",
    ),
    (
        "mask string dtype",
        lambda: global_normalizer([np.full((1, 2), "1")]),
        TypeError,
        r"masks\[0\]: mask",
    ),
    (
        "count_empty_rows not a bool",
        lambda: global_normalizer([MASK], count_empty_rows=1),
        TypeError,
        "count_empty_rows",
    ),
    (
        "metrics of two methods",
        lambda: combine_metrics([SHARD_METRICS, GRPO_METRICS]),
        ValueError,
        r"shards must all hold the metrics of one method.*shards\[1\]",
    ),
    (
        "shards a bare dict",
        lambda: combine_metrics(SHARD_METRICS),
        TypeError,
        r"shards .*\[metrics\]",
    ),
    ("shards empty", lambda: combine_metrics([]), ValueError, "shards"),
    ("shard not a dict", lambda: combine_metrics([SHARD_METRICS, 3.0]), TypeError, r"shards\[1\]"),
    (
        "companion count missing",
        lambda: combine_metrics([{"ratio/mean": 1.0}]),
        ValueError,
        r"shards .*tokens",
    ),
    ("sizes a str", lambda: split_rows(5, "2"), TypeError, "sizes"),
    ("sizes a float", lambda: split_rows(5, 2.0), TypeError, "sizes"),
    ("sizes holding a float", lambda: split_rows(5, [2.0, 3]), TypeError, "sizes"),
    ("sizes a bool", lambda: split_rows(5, True), TypeError, "sizes"),
    ("sizes not summing", lambda: split_rows(5, [2, 2]), ValueError, "sizes"),
    ("too many shards", lambda: split_rows(5, 6), ValueError, "number of shards"),
    ("num_rows a str", lambda: split_rows("5", 2), TypeError, "num_rows"),
    ("num_rows 0", lambda: split_rows(0, 1), ValueError, "num_rows"),
    ("rng a seed", lambda: split_rows(5, 2, rng=3), TypeError, "rng"),
]


@pytest.mark.clause("3.8", "3.11")
@pytest.mark.parametrize(
    "thunk,exc,pattern", [c[1:] for c in SHARDING_CASES], ids=[c[0] for c in SHARDING_CASES]
)
def test_sharding_helpers_bad_input(thunk, exc, pattern):
    with pytest.raises(exc, match=pattern) as info:
        thunk()
    assert type(info.value) is exc


@pytest.mark.clause("3.8", "8.2")
@pytest.mark.parametrize(
    "mask",
    [
        np.array([[1, 2, 0], [1, 0, 0]]),
        np.array([[1.0, math.nan, 0.0], [1.0, 0.0, 0.0]]),
        np.array([[1, -1, 0], [1, 0, 0]], dtype=np.int8),
        np.array([[1, 0.5, 0], [1, 0, 0]]),
        MASK.astype(complex),
    ],
    ids=["value 2", "NaN", "value -1", "value 0.5", "complex"],
)
def test_global_normalizer_rejects_the_masks_policy_loss_rejects(mask):
    """Same type and text as policy_loss, prefixed with the shard."""
    want = _policy_loss_mask_error(mask)
    with pytest.raises((TypeError, ValueError)) as got:
        global_normalizer([MASK, mask])
    assert str(got.value) == f"masks[1]: {want}"


@pytest.mark.clause("3.8")
def test_sharding_helpers_take_numpy_integers_and_generators():
    """NumPy integers are integers; any iterable of masks is a list of shards."""
    assert [s.tolist() for s in split_rows(np.int64(5), np.int64(2))] == [[0, 1, 2], [3, 4]]
    assert [s.tolist() for s in split_rows(5, np.array([1, 4]))] == [[0], [1, 2, 3, 4]]
    got = global_normalizer(m for m in (MASK, MASK[:1]))
    assert (got.num_tokens, got.num_rows) == (5.0, 3.0)
    assert global_normalizer([MASK], count_empty_rows=np.bool_(True)).num_rows == 2.0


# ------------------------------------------------------------------ messages naming nothing (issue 11)
NAMELESS: list[tuple[str, Callable[[dict], dict], type[Exception], str]] = [
    ("advantages=1.0", setting(advantages=1.0), TypeError, "advantages"),
    ("advantages=None", setting(advantages=None), TypeError, "advantages"),
    (
        "object advantages",
        setting(advantages=np.array([1.0, 2.0, 3.0], dtype=object)),
        TypeError,
        "advantages",
    ),
    ("string logp", lambda c: {**c, "logp": c["logp"].astype(str)}, TypeError, "logp"),
    (
        "Normalizer of strings",
        lambda c: {**c, "normalizer": sapo_ref.Normalizer("9", "3")},
        TypeError,
        "normalizer",
    ),
]


@pytest.mark.clause("8.2", "8.8")
@pytest.mark.parametrize(
    "edit,exc,pattern", [c[1:] for c in NAMELESS], ids=[c[0] for c in NAMELESS]
)
def test_messages_name_the_argument(edit, exc, pattern):
    with pytest.raises(exc, match=pattern) as info:
        run(edit(valid_call()))
    assert type(info.value) is exc
    assert not re.search(r"got bool$|invalid data type", str(info.value))


@pytest.mark.clause("8.4")
def test_count_empty_rows_numpy_bool_is_a_bool():
    """``count_empty_rows=np.bool_(True)`` was refused with "must be a bool; got bool"."""
    want = run({**valid_call(), "count_empty_rows": True}).loss
    assert run({**valid_call(), "count_empty_rows": np.bool_(True)}).loss == want


# ------------------------------------------------------------------ added terms (clause 10.4)
def _terms(**kw: Any) -> dict[str, Any]:
    base = valid_call()
    n, t = base["logp"].shape
    return {
        **base,
        "weights": np.ones((n, t)),
        "ref_logp": base["logp"] - 0.25,
        "kl_coef": 0.1,
        **kw,
    }


def _bad_at_valid(name: str, value: float) -> dict[str, Any]:
    call = _terms()
    x = np.array(call[name], dtype=float)
    i, t = np.argwhere(np.asarray(call["mask"]) != 0)[0]
    x[i, t] = value
    return {**call, name: x}


TERM_CASES: list[tuple[str, Callable[[], dict[str, Any]], type[Exception], str]] = [
    (
        "weights 3-D",
        lambda: _terms(weights=np.ones((1, 1, 1))),
        ValueError,
        r"^weights must have shape",
    ),
    (
        "weights complex",
        lambda: _terms(weights=np.ones(valid_call()["logp"].shape, complex)),
        TypeError,
        r"^weights must be real floating, boolean or integer",
    ),
    (
        "weights negative",
        lambda: _bad_at_valid("weights", -1e-300),
        ValueError,
        r"^weights must be finite and >= 0 at valid tokens; first bad at \(",
    ),
    (
        "weights NaN",
        lambda: _bad_at_valid("weights", math.nan),
        ValueError,
        r"^weights must be finite",
    ),
    (
        "weights inf",
        lambda: _bad_at_valid("weights", math.inf),
        ValueError,
        r"^weights must be finite",
    ),
    (
        "ref_logp [N]",
        lambda: _terms(ref_logp=np.zeros(valid_call()["logp"].shape[0])),
        ValueError,
        r"^ref_logp must have the shape of logp",
    ),
    (
        "ref_logp integer",
        lambda: _terms(ref_logp=np.zeros(valid_call()["logp"].shape, int)),
        TypeError,
        r"^ref_logp must be a real floating array",
    ),
    (
        "ref_logp NaN",
        lambda: _bad_at_valid("ref_logp", math.nan),
        ValueError,
        r"^ref_logp is NaN at a valid token; first at \(",
    ),
    (
        "logp - ref_logp = inf - inf",
        lambda: {
            **_bad_at_valid("ref_logp", -math.inf),
            **{"logp": _bad_at_valid("logp", -math.inf)["logp"]},
        },
        ValueError,
        r"^log-ratio logp - ref_logp is undefined",
    ),
    (
        "ref_logp without kl_coef",
        lambda: _terms(kl_coef=None),
        ValueError,
        r"^ref_logp requires kl_coef",
    ),
    (
        "kl_coef without ref_logp",
        lambda: _terms(ref_logp=None),
        ValueError,
        r"^kl_coef requires ref_logp",
    ),
    (
        "kl_estimator without ref_logp",
        lambda: _terms(ref_logp=None, kl_coef=None, kl_estimator="k3"),
        ValueError,
        r"^kl_estimator requires ref_logp",
    ),
    (
        "unknown kl_estimator",
        lambda: _terms(kl_estimator="low_var_kl"),
        ValueError,
        r"^unknown kl_estimator 'low_var_kl'; expected one of: k1, k2, k3, low-var-k3$",
    ),
    (
        "kl_coef negative",
        lambda: _terms(kl_coef=-0.1),
        ValueError,
        r"^kl_coef must be finite and in \[0, 1e\+06\]",
    ),
    ("kl_coef inf", lambda: _terms(kl_coef=math.inf), ValueError, r"^kl_coef must be finite"),
    ("kl_coef string", lambda: _terms(kl_coef="0.1"), TypeError, r"^kl_coef must be a real number"),
]


@pytest.mark.clause("10.4")
@pytest.mark.parametrize(
    ("build", "exc", "pattern"), [c[1:] for c in TERM_CASES], ids=[c[0] for c in TERM_CASES]
)
def test_added_terms_bad_input(build, exc, pattern):
    with pytest.raises(exc, match=pattern):
        run(build())


@pytest.mark.clause("10.1", "10.4")
def test_added_terms_ignore_invalid_positions():
    """Garbage (NaN, -inf, negative) in weights and ref_logp where the mask is 0 is ignored."""
    call = _terms()
    invalid = np.asarray(call["mask"]) == 0
    assert invalid.any()
    w, ref = call["weights"].copy(), call["ref_logp"].copy()
    w[invalid], ref[invalid] = -math.nan, -math.inf
    got, want = run({**call, "weights": w, "ref_logp": ref}), run(call)
    assert got.loss == want.loss
    np.testing.assert_array_equal(got.grad, want.grad)
