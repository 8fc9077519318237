"""What is differentiated, and in which dtype (clause 8.9), through each framework's autodiff.

``old_logp`` has its true derivative: the negative of the gradient with respect to ``logp``
for sapo, sapo-seq, grpo and gspo (the loss depends on their difference only) and 0 for
gspo-token; ``advantages`` and ``mask`` are constants. Mixed input dtypes compute in the
promoted dtype, return the loss in it and the gradient in ``logp``'s dtype, without a warning,
and agree with the reference on the same rounded inputs (clause C.1).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from backends._inputs import LOSS_AGGS, METHODS, make_case
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
