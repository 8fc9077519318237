"""What is differentiated, and in which dtype (clause 8.9), through each framework's autodiff.

``old_logp`` has its true derivative: the negative of the gradient with respect to ``logp``
for sapo, sapo-seq, grpo and gspo (the loss depends on their difference only) and 0 for
gspo-token; ``advantages`` and ``mask`` are constants. Mixed input dtypes compute in the
promoted dtype, return the loss in it and the gradient in ``logp``'s dtype, without a warning,
and agree with the reference on the same rounded inputs (clause C.1). With the clause 10 terms:
``ref_logp`` gets minus the KL part of the gradient and promotes with the others, ``old_logp``
minus the policy part, and the weights are constants that do not promote.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from backends._inputs import (
    KL_ESTIMATORS,
    LOSS_AGGS,
    METHODS,
    Terms,
    make_case,
    make_terms,
    materialized_with_terms,
    reference_parts,
)
from sapo_conformance.cases import round_to
from sapo_conformance.compare import compare

import sapo_ref

BACKENDS = ("torch", "jax", "mlx")


def _inputs(backend, case, dtypes):
    rounded = [
        round_to(getattr(case, k), d) for k, d in zip(("logp", "old_logp", "advantages"), dtypes)
    ]
    arrays = [backend.to_array(a, d) for a, d in zip(rounded, dtypes)]
    return rounded, arrays + [backend.to_array(case.mask)]


@pytest.mark.clause("8.9")
@pytest.mark.parametrize("dtype", ("float64", "float32"))
@pytest.mark.parametrize("method", METHODS)
def test_old_logp_has_its_true_derivative(backend, method, dtype):
    backend.require_dtype(dtype)
    case = make_case(method, LOSS_AGGS[METHODS.index(method) % 4], seed=3)
    (lp, old, adv), (x_lp, x_old, x_adv, x_mask) = _inputs(backend, case, (dtype,) * 3)
    opts = case.options
    ref = sapo_ref.policy_loss(lp, old, adv, case.mask, **opts)
    _, g_old = backend.value_and_vjp(
        lambda o: backend.loss(x_lp, o, x_adv, x_mask, **opts), x_old, 1.5
    )
    assert g_old is not None, f"{backend.name}: no gradient for old_logp"
    got = backend.to_numpy(g_old) / 1.5
    if method == "gspo-token":  # old_logp enters only inside the stop-gradient sg[s_i]
        assert np.all(got == 0.0), f"{backend.name}: gspo-token d/d old_logp = {got}"
        return
    c = compare("d loss / d old_logp", got, -np.asarray(ref.grad), backend.tolerance(dtype, "grad"))
    assert c.ok, f"{backend.name} {method}: {c.message}"


@pytest.mark.clause("8.9")
@pytest.mark.parametrize("argument", ("advantages", "mask"))
def test_advantages_and_mask_are_constants(backend, argument):
    case = make_case("sapo", "token-mean", seed=4)
    _, arrays = _inputs(backend, case, ("float64",) * 3)
    index = 2 if argument == "advantages" else 3
    if argument == "mask":  # a float mask: a differentiable dtype
        arrays[3] = backend.to_array(case.mask.astype(np.float64), "float64")

    def f(x):
        args = list(arrays)
        args[index] = x
        return backend.loss(*args, method="sapo", loss_agg="token-mean")

    try:
        _, g = backend.value_and_vjp(f, arrays[index], 1.0)
    except TypeError as err:  # a framework that refuses to differentiate a constant
        pytest.fail(f"{backend.name} raised {err!r}: {argument} must get a zero (or no) gradient")
    assert g is None or np.all(backend.to_numpy(g) == 0.0), f"{backend.name}: d/d {argument} != 0"


#: (logp, old_logp, advantages) dtypes -> (loss dtype, gradient dtype)
MIXED = {
    ("float32", "float64", "float32"): ("float64", "float32"),
    ("float64", "float32", "float32"): ("float64", "float64"),
    ("float32", "float32", "float64"): ("float64", "float32"),
    ("bfloat16", "float32", "float32"): ("float32", "bfloat16"),
    ("float16", "float32", "bfloat16"): ("float32", "float16"),
    # all low precision: computed in float32 inside (clause 6.4), returned in the promoted dtype
    ("bfloat16", "bfloat16", "bfloat16"): ("bfloat16", "bfloat16"),
    ("float16", "float16", "float16"): ("float16", "float16"),
}


@pytest.mark.clause("8.9", "6.4")
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtypes", list(MIXED), ids=["/".join(k) for k in MIXED])
def test_mixed_dtypes_promote_the_same_way(backend, dtypes, method):
    for d in set(dtypes):
        backend.require_dtype(d)
    loss_dtype, grad_dtype = MIXED[dtypes]
    case = make_case(method, LOSS_AGGS[METHODS.index(method) % 4], seed=5)
    (lp, old, adv), (x_lp, x_old, x_adv, x_mask) = _inputs(backend, case, dtypes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning for a mixed call
        loss, g = backend.value_and_vjp(
            lambda x: backend.loss(x, x_old, x_adv, x_mask, **case.options), x_lp, 1.0
        )
    assert (backend.dtype_name(loss), backend.dtype_name(g)) == (loss_dtype, grad_dtype)
    ref = sapo_ref.policy_loss(lp, old, adv, case.mask, **case.options)
    checks = [
        compare("loss", backend.to_numpy(loss), ref.loss, backend.tolerance(loss_dtype, "value")),
        compare("grad", backend.to_numpy(g), ref.grad, backend.tolerance(grad_dtype, "grad")),
    ]
    bad = [c.message for c in checks if not c.ok]
    assert not bad, f"{backend.name} {dtypes}: " + "; ".join(bad)


# ----------------------------------------------------------------------------- clause 10 terms


def _term_call(backend, method: str, estimator: str, dtype: str, seed: int):
    """A case with [N, T] weights and a KL term; the reference's rounded inputs, the backend's
    arrays and the options."""
    case = make_case(method, LOSS_AGGS[METHODS.index(method) % 4], seed=seed)
    terms = make_terms(case, seed=seed, weights="token", kl_estimator=estimator, kl_coef=0.3)
    m, rounded = materialized_with_terms(case, dtype, terms)
    x = [backend.to_array(a, dtype) for a in (m.logp, m.old_logp, m.advantages)]
    x.append(backend.to_array(m.mask))
    return m, rounded, x, rounded.options(backend, dtype)


@pytest.mark.clause("10.3", "8.9")
@pytest.mark.parametrize("dtype", ("float64", "float32"))
@pytest.mark.parametrize("estimator", KL_ESTIMATORS)
@pytest.mark.parametrize("method", METHODS)
def test_ref_logp_gets_minus_the_kl_part_and_old_logp_the_policy_part(
    backend, method, estimator, dtype
):
    """d loss / d ref_logp = -(the KL part of d loss / d logp) (clause 10.3); d loss / d old_logp
    = -(its policy part), 0 for gspo-token (clause 8.9): the KL term holds no old_logp."""
    backend.require_dtype(dtype)
    m, rounded, (lp, old, adv, mask), opts = _term_call(
        backend, method, estimator, dtype, seed=METHODS.index(method)
    )
    options = {**m.case.options}
    policy, kl = reference_parts(m, options, rounded)
    tol = backend.tolerance(dtype, "grad")
    kw = {k: v for k, v in opts.items() if k != "ref_logp"}
    _, g_ref = backend.value_and_vjp(
        lambda r: backend.loss(lp, old, adv, mask, **options, **kw, ref_logp=r),
        opts["ref_logp"],
        -0.75,
    )
    assert g_ref is not None, f"{backend.name}: no gradient for ref_logp"
    c = compare("d loss / d ref_logp", backend.to_numpy(g_ref) / -0.75, -kl, tol)
    assert c.ok, f"{backend.name} {method} {estimator}: {c.message}"
    _, g_old = backend.value_and_vjp(
        lambda o: backend.loss(lp, o, adv, mask, **options, **opts), old, 1.5
    )
    got = backend.to_numpy(g_old) / 1.5
    if method == "gspo-token":
        assert np.all(got == 0.0), f"{backend.name}: gspo-token d/d old_logp = {got}"
        return
    c = compare("d loss / d old_logp", got, -np.asarray(policy), tol)
    assert c.ok, f"{backend.name} {method} {estimator}: {c.message}"


@pytest.mark.clause("10.1", "10.3")
@pytest.mark.parametrize("layout", ("token", "row"))
def test_weights_are_detached(backend, layout):
    """Float weights get a zero (or no) gradient, also when the framework tracks them."""
    case = make_case("grpo", "token-mean", seed=6)
    terms = make_terms(case, seed=2, weights=layout, kl_estimator="k2", garbage=False)
    m, rounded = materialized_with_terms(case, "float64", terms)
    x = [backend.to_array(a, "float64") for a in (m.logp, m.old_logp, m.advantages)]
    x.append(backend.to_array(m.mask))
    opts = rounded.options(backend, "float64")
    w = opts.pop("weights")
    loss, g = backend.value_and_vjp(
        lambda v: backend.loss(*x, **case.options, **opts, weights=v), w, 1.0
    )
    assert g is None or np.all(backend.to_numpy(g) == 0.0), f"{backend.name}: d/d weights != 0"
    c = compare("loss", backend.to_numpy(loss), m.want_loss, backend.tolerance("float64", "value"))
    assert c.ok, c.message


#: (logp, old_logp, advantages, ref_logp, weights) dtypes -> (loss dtype, gradient dtypes of
#: logp and ref_logp): ref_logp promotes with the others, the weights do not (clause 8.9, 10).
MIXED_TERMS = {
    ("float32", "float32", "float32", "float64", "float64"): ("float64", "float32", "float64"),
    ("float32", "float32", "float32", "float32", "float64"): ("float32", "float32", "float32"),
    ("bfloat16", "bfloat16", "bfloat16", "float32", "bfloat16"): ("float32", "bfloat16", "float32"),
    ("float64", "float32", "float32", "bfloat16", "float32"): ("float64", "float64", "bfloat16"),
    ("float16", "float16", "float16", "float16", "float32"): ("float16", "float16", "float16"),
}


@pytest.mark.clause("8.9", "10.1", "10.2")
@pytest.mark.parametrize("dtypes", list(MIXED_TERMS), ids=["/".join(k) for k in MIXED_TERMS])
def test_ref_logp_promotes_and_weights_do_not(backend, dtypes):
    for d in set(dtypes):
        backend.require_dtype(d)
    loss_dtype, grad_dtype, ref_dtype = MIXED_TERMS[dtypes]
    case = make_case("sapo", "seq-mean-token-mean", seed=9)
    terms = make_terms(case, seed=3, weights="token", kl_estimator="k3", garbage=False)
    rounded = [
        round_to(getattr(case, k), d)
        for k, d in zip(("logp", "old_logp", "advantages"), dtypes[:3])
    ]
    ref, w = round_to(terms.ref_logp, dtypes[3]), round_to(terms.weights, dtypes[4])
    x_lp, x_old, x_adv = (backend.to_array(a, d) for a, d in zip(rounded, dtypes[:3]))
    x_mask = backend.to_array(case.mask)
    kw = {**case.options, **terms.kl, "weights": backend.to_array(w, dtypes[4])}
    x_ref = backend.to_array(ref, dtypes[3])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning for a mixed call
        loss, g = backend.value_and_vjp(
            lambda v: backend.loss(v, x_old, x_adv, x_mask, **kw, ref_logp=x_ref), x_lp, 1.0
        )
        _, g_ref = backend.value_and_vjp(
            lambda r: backend.loss(x_lp, x_old, x_adv, x_mask, **kw, ref_logp=r), x_ref, 1.0
        )
    got = (backend.dtype_name(loss), backend.dtype_name(g), backend.dtype_name(g_ref))
    assert got == (loss_dtype, grad_dtype, ref_dtype)
    want = sapo_ref.policy_loss(
        *rounded, case.mask, **case.options, **terms.kl, weights=w, ref_logp=ref
    )
    checks = [
        compare("loss", backend.to_numpy(loss), want.loss, backend.tolerance(loss_dtype, "value")),
        compare("grad", backend.to_numpy(g), want.grad, backend.tolerance(grad_dtype, "grad")),
    ]
    bad = [c.message for c in checks if not c.ok]
    assert not bad, f"{backend.name} {dtypes}: " + "; ".join(bad)


@pytest.mark.clause("8.9", "10.3")
@pytest.mark.parametrize("method", ("sapo", "grpo", "gspo"))
def test_old_logp_gradient_is_exact_beside_a_far_reference_policy(backend, method):
    """|KL part| >> |policy part| (u = log pi_ref - log pi_theta near 30, k3 ~ e^30): the
    old_logp gradient is still the policy part to the tolerance of its own size (not G - K,
    which keeps only |G|'s digits)."""
    case = make_case(method, "token-mean", seed=11, empty=False)
    terms = make_terms(case, seed=4, weights=None, kl_estimator="k3", kl_coef=1.0, garbage=False)
    terms = Terms(None, terms.ref_logp + 30.0, terms.kl)
    m, rounded = materialized_with_terms(case, "float64", terms)
    policy, _ = reference_parts(m, dict(case.options), rounded)
    lp, old, adv = (backend.to_array(a, "float64") for a in (m.logp, m.old_logp, m.advantages))
    mask, opts = backend.to_array(m.mask), rounded.options(backend, "float64")
    _, g_old = backend.value_and_vjp(
        lambda o: backend.loss(lp, o, adv, mask, **case.options, **opts), old, 1.0
    )
    tol = backend.tolerance("float64", "grad")
    c = compare("d loss / d old_logp", backend.to_numpy(g_old), -np.asarray(policy), tol)
    assert c.ok, f"{backend.name} {method}: {c.message}"
