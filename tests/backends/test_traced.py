"""Checks where values cannot be read: under jax.jit, torch.compile and mx.compile (clause 8.7).

Shape, dtype and option errors (clauses 8.1, 8.2, 8.3, 8.4) still raise at trace time, with the
reference's type and text. Invalid data that raises eagerly (clauses 5.5, 8.2 values, 8.5, 8.6,
8.8, and 10.4 for the weights and ref_logp) makes the loss and every gradient entry NaN; the same call on valid data gives the
reference's loss and gradient, so a backend that always returned NaN would fail.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import pytest
from backends._inputs import ARRAYS, Edit, N, T, at, both, setting, then, valid_call
from sapo_conformance.compare import compare

import sapo_ref

BACKENDS = ("torch", "jax", "mlx")


def _split(call: dict[str, Any]) -> tuple[list[np.ndarray], dict[str, Any]]:
    call = dict(call)
    return [call.pop(k) for k in ARRAYS], call


def _arrays(backend, arrays: list[np.ndarray]) -> list[Any]:
    return [
        backend.to_array(a, "float64") if a.dtype.kind == "f" else backend.native(a) for a in arrays
    ]


def _chain(err: BaseException):
    while err is not None:
        yield err
        err = err.__cause__ or err.__context__


TRACE_ERRORS: list[tuple[str, Edit]] = [
    ("old_logp [1, T]", lambda c: {**c, "old_logp": c["old_logp"][:1]}),
    ("mask [1, T]", lambda c: {**c, "mask": c["mask"][:1]}),
    ("advantages [N, 1]", lambda c: {**c, "advantages": c["advantages"][:, None]}),
    ("advantages [T]", setting(advantages=np.ones(T))),
    ("logp 3-D", lambda c: {**c, "logp": c["logp"][None]}),
    ("integer logp", setting(logp=np.zeros((N, T), np.int32))),
    ("bool advantages", setting(advantages=np.ones(N, bool))),
    ("unknown method", setting(method="ppo")),
    ("tau_pos out of its domain", setting(tau_pos=0.0)),
    ("norm_length missing", setting(loss_agg="seq-mean-token-sum-norm")),
]


@pytest.mark.clause("8.7", "8.1", "8.2", "8.3", "8.4")
@pytest.mark.parametrize("edit", [e for _, e in TRACE_ERRORS], ids=[n for n, _ in TRACE_ERRORS])
def test_shape_dtype_and_option_errors_raise_under_tracing(backend, edit):
    arrays, opts = _split(edit(valid_call()))
    _assert_traced_error_is_the_references(backend, arrays, opts, opts)


def _assert_traced_error_is_the_references(backend, arrays, opts, backend_opts) -> None:
    """The reference's error on ``arrays`` and ``opts`` (NumPy) is raised, same type and text,
    while the backend traces the call with ``backend_opts`` (its own arrays for the terms)."""
    with pytest.raises(Exception) as want:
        sapo_ref.policy_loss(*arrays, **opts)
    traced = backend.traced(
        lambda lp, old, adv, mask: backend.loss(lp, old, adv, mask, **backend_opts)
    )
    with pytest.raises(Exception) as got:
        traced(*_arrays(backend, arrays))
    found = [e for e in _chain(got.value) if type(e) is type(want.value)]
    assert found, f"{backend.name} raised {got.value!r} under tracing; reference {want.value!r}"
    drop = r"\b(?:torch|mlx\.core|jax\.numpy|numpy)\.(?=[a-z])"
    assert re.sub(drop, "", str(found[0])) == re.sub(drop, "", str(want.value))


def _int_mask(c):
    return {**c, "mask": c["mask"].astype(np.int64)}


def _float_mask(c):
    return {**c, "mask": c["mask"].astype(np.float64)}


def _per_token(c):
    return {**c, "advantages": np.repeat(c["advantages"][:, None], T, axis=1)}


def _method(name):
    return setting(method=name)


#: (label, prepare the valid call, spoil it); the spoiled value sits at a valid token.
POISON: list[tuple[str, Edit, Edit]] = [
    ("mask value 2", _int_mask, at("mask", (0, 1), 2)),
    ("mask value -1", _int_mask, at("mask", (2, 3), -1)),
    ("mask value 0.5", _float_mask, at("mask", (1, 1), 0.5)),
    ("mask value NaN", _float_mask, at("mask", (0, 3), math.nan)),
    ("NaN advantage", lambda c: c, at("advantages", 1, math.nan)),
    ("inf per-token advantage", _per_token, at("advantages", (2, 0), math.inf)),
    ("NaN logp", lambda c: c, at("logp", (0, 2), math.nan)),
    ("NaN old_logp", _method("grpo"), at("old_logp", (1, 0), math.nan)),
    ("inf - inf", _method("gspo-token"), both((0, 0), math.inf, math.inf)),
    (
        "gspo row with +inf and -inf",
        _method("gspo"),
        then(at("logp", (0, 0), math.inf), at("logp", (0, 1), -math.inf)),
    ),
    (
        "sapo-seq row whose differences overflow both ways",
        _method("sapo-seq"),
        then(both((0, 0), 1.7e308, -1.7e308), both((0, 1), -1.7e308, 1.7e308)),
    ),
]


def _check_clean(backend, loss, grad, arrays, opts, normalizer=None) -> None:
    want = sapo_ref.policy_loss(
        *arrays, **opts, **({"normalizer": normalizer} if normalizer else {})
    )
    checks = [
        compare("loss", backend.to_numpy(loss), want.loss, backend.tolerance("float64", "value")),
        compare("grad", backend.to_numpy(grad), want.grad, backend.tolerance("float64", "grad")),
    ]
    bad = [c.message for c in checks if not c.ok]
    assert not bad, f"{backend.name} traced, valid data: " + "; ".join(bad)


def _assert_poisoned(backend, loss, grad) -> None:
    loss, grad = backend.to_numpy(loss), backend.to_numpy(grad)
    assert np.isnan(loss), f"{backend.name}: loss {loss} from invalid data under tracing"
    assert np.all(np.isnan(grad)), f"{backend.name}: gradient not all NaN: {grad}"


@pytest.mark.clause("8.7", "8.2", "8.5", "8.6", "5.5")
@pytest.mark.parametrize("prepare,spoil", [p[1:] for p in POISON], ids=[p[0] for p in POISON])
def test_invalid_data_poisons_loss_and_gradient_under_tracing(backend, prepare, spoil):
    clean = prepare(valid_call())
    arrays, opts = _split(clean)
    step = backend.traced_value_and_grad(
        lambda lp, old, adv, mask: backend.loss(lp, old, adv, mask, **opts)
    )
    _check_clean(backend, *step(*_arrays(backend, arrays)), arrays, opts)
    dirty, _ = _split(spoil(clean))
    _assert_poisoned(backend, *step(*_arrays(backend, dirty)))


#: Normalizer counts (n, R) for the valid call's shard: 6 tokens in 3 rows.
BAD_COUNTS = {
    "(0, 0)": (0.0, 0.0),
    "fewer tokens": (1.0, 10.0),
    "fewer rows": (100.0, 1.0),
    "negative": (-5.0, 3.0),
    "NaN": (math.nan, 3.0),
    "inf": (math.inf, 3.0),
}


@pytest.mark.clause("8.7", "8.8")
@pytest.mark.parametrize("counts", list(BAD_COUNTS.values()), ids=list(BAD_COUNTS))
def test_bad_normalizer_poisons_under_tracing(backend, counts):
    arrays, opts = _split(valid_call())

    def f(lp, old, adv, mask, n, r):
        return backend.loss(lp, old, adv, mask, **opts, normalizer=sapo_ref.Normalizer(n, r))

    step = backend.traced_value_and_grad(f)
    good = sapo_ref.Normalizer(10.0, 5.0)
    scalars = [backend.to_array(np.array(v), "float64") for v in (good.num_tokens, good.num_rows)]
    _check_clean(backend, *step(*_arrays(backend, arrays), *scalars), arrays, opts, good)
    scalars = [backend.to_array(np.array(v), "float64") for v in counts]
    _assert_poisoned(backend, *step(*_arrays(backend, arrays), *scalars))


# ----------------------------------------------------------------------------- clause 10 terms
def _with_terms(c: dict[str, Any]) -> dict[str, Any]:
    return {**c, "weights": np.ones((N, T)), "ref_logp": c["logp"] - 0.3, "kl_coef": 0.2}


def _term_arrays(backend, call: dict[str, Any]) -> dict[str, Any]:
    """``call`` with its clause 10 arrays as the backend's (float64 or their own dtype)."""
    return {
        k: (backend.to_array(v, "float64") if v.dtype.kind == "f" else backend.native(v))
        if isinstance(v, np.ndarray)
        else v
        for k, v in call.items()
    }


TERM_TRACE_ERRORS: list[tuple[str, Edit]] = [
    ("weights [T]", then(_with_terms, setting(weights=np.ones(T)))),
    ("weights complex", then(_with_terms, setting(weights=np.ones((N, T), np.complex64)))),
    ("ref_logp [1, T]", then(_with_terms, setting(ref_logp=np.zeros((1, T))))),
    ("integer ref_logp", then(_with_terms, setting(ref_logp=np.zeros((N, T), np.int32)))),
    ("ref_logp without kl_coef", then(_with_terms, setting(kl_coef=None))),
    ("unknown kl_estimator", then(_with_terms, setting(kl_estimator="k4"))),
    ("kl_coef out of its domain", then(_with_terms, setting(kl_coef=-1.0))),
]


@pytest.mark.clause("8.7", "10.4")
@pytest.mark.parametrize(
    "edit", [e for _, e in TERM_TRACE_ERRORS], ids=[n for n, _ in TERM_TRACE_ERRORS]
)
def test_term_shape_dtype_and_option_errors_raise_under_tracing(backend, edit):
    call = {k: v for k, v in edit(valid_call()).items() if v is not None}
    arrays, opts = _split(call)
    _assert_traced_error_is_the_references(backend, arrays, opts, _term_arrays(backend, opts))


#: (label, the terms' estimator and kl_coef, spoil the valid call with terms) at a valid token.
TERM_POISON: list[tuple[str, dict[str, Any], Edit]] = [
    ("NaN weight", {"kl_estimator": "k3"}, at("weights", (0, 1), math.nan)),
    ("inf weight", {"kl_estimator": "k1"}, at("weights", (1, 0), math.inf)),
    ("negative weight", {"kl_estimator": "k2"}, at("weights", (2, 0), -0.5)),
    ("NaN ref_logp", {"kl_estimator": "low-var-k3"}, at("ref_logp", (0, 0), math.nan)),
    ("NaN ref_logp, kl_coef 0", {"kl_coef": 0.0}, at("ref_logp", (1, 1), math.nan)),
    (
        "logp - ref_logp = inf - inf",
        {"kl_estimator": "k3"},
        then(at("ref_logp", (0, 2), math.inf), at("logp", (0, 2), math.inf)),
    ),
]


@pytest.mark.clause("8.7", "10.4")
@pytest.mark.parametrize(
    "options,spoil", [p[1:] for p in TERM_POISON], ids=[p[0] for p in TERM_POISON]
)
def test_invalid_terms_poison_loss_and_gradient_under_tracing(backend, options, spoil):
    """The weights and ref_logp are traced arguments: a bad value at a valid token makes the
    loss and every gradient entry NaN; the same program on valid terms gives the reference's."""
    clean = _with_terms(valid_call())
    clean.update(options)
    arrays, opts = _split(clean)
    w, ref = opts.pop("weights"), opts.pop("ref_logp")

    def f(lp, old, adv, mask, weights, ref_logp):
        return backend.loss(lp, old, adv, mask, **opts, weights=weights, ref_logp=ref_logp)

    step = backend.traced_value_and_grad(f)
    terms = [backend.to_array(a, "float64") for a in (w, ref)]
    _check_clean(
        backend,
        *step(*_arrays(backend, arrays), *terms),
        arrays,
        {**opts, **{"weights": w, "ref_logp": ref}},
    )
    dirty = spoil({**dict(zip(ARRAYS, arrays)), "weights": w, "ref_logp": ref})
    bad_arrays = [dirty[k] for k in ARRAYS]
    bad_terms = [backend.to_array(dirty[k], "float64") for k in ("weights", "ref_logp")]
    _assert_poisoned(backend, *step(*_arrays(backend, bad_arrays), *bad_terms))
