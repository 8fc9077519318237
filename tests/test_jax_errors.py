"""sapo_jax errors mirror the reference (same type, same message) for options, shapes and
dtypes, eagerly and under jit; differentiating in a constant input is an error; float64 input
with x64 off warns (subprocess); importing sapo_jax changes no global JAX configuration;
CAPABILITIES is consistent with the spec.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

import sapo_jax

import sapo_ref
from sapo_ref import spec

pytestmark = pytest.mark.jax

N, T = 3, 4


def valid() -> dict:
    rng = np.random.default_rng(0)
    old = np.log(rng.uniform(0.1, 1.0, (N, T)))
    return {
        "logp": old + rng.normal(0.0, 0.1, (N, T)),
        "old_logp": old,
        "advantages": np.array([1.0, -0.5, 0.25]),
        "mask": np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]], bool),
    }


def edit(**changes):
    return lambda c: {**c, **changes}


CASES = [
    # clause 8.3, 8.4: options (resolve_config)
    ("unknown method", edit(method="ppo")),
    ("unknown loss_agg", edit(loss_agg="mean")),
    ("tau_pos below domain", edit(tau_pos=0.0)),
    ("tau_neg nan", edit(tau_neg=math.nan)),
    ("tau as str", edit(tau_pos="1.0")),
    ("eps_low negative", edit(method="grpo", eps_low=-0.1)),
    ("dual_clip <= 1", edit(method="gspo", dual_clip=1.0)),
    ("tau with grpo", edit(method="grpo", tau_pos=1.0)),
    ("eps with sapo", edit(eps_high=0.2)),
    ("norm_length missing", edit(loss_agg="seq-mean-token-sum-norm")),
    ("norm_length not applicable", edit(norm_length=10.0)),
    ("norm_length zero", edit(loss_agg="seq-mean-token-sum-norm", norm_length=0.0)),
    (
        "count_empty_rows with normalizer",
        edit(count_empty_rows=True, normalizer=sapo_ref.Normalizer(6.0, 3.0)),
    ),
    ("count_empty_rows not bool", edit(count_empty_rows=1)),
    ("normalizer wrong type", edit(normalizer=(6.0, 3.0))),
    # clause 8.1: shapes
    ("logp 1-D", lambda c: {**c, "logp": c["logp"][0]}),
    ("logp 3-D", lambda c: {**c, "logp": c["logp"][None]}),
    ("old_logp shape", lambda c: {**c, "old_logp": c["old_logp"][:, :2]}),
    ("mask shape", lambda c: {**c, "mask": c["mask"][:2]}),
    ("advantages shape", lambda c: {**c, "advantages": c["advantages"][:2]}),
    ("advantages [N, 1]", lambda c: {**c, "advantages": c["advantages"][:, None]}),
    ("N = 0", lambda c: {k: v[:0] for k, v in c.items()}),
    (
        "T = 0",
        lambda c: {
            **{k: v[:, :0] for k, v in c.items() if k != "advantages"},
            "advantages": c["advantages"],
        },
    ),
    # clause 8.2: dtypes
    ("logp int", lambda c: {**c, "logp": c["logp"].astype(np.int32)}),
    ("advantages int", lambda c: {**c, "advantages": np.array([1, 0, -1], np.int32)}),
    ("old_logp bool", lambda c: {**c, "old_logp": c["old_logp"] > -1}),
    ("mask complex", lambda c: {**c, "mask": c["mask"].astype(np.complex64)}),
]


def reference_error(call: dict) -> BaseException:
    arrays = [call[k] for k in ("logp", "old_logp", "advantages", "mask")]
    kw = {k: v for k, v in call.items() if k not in ("logp", "old_logp", "advantages", "mask")}
    with pytest.raises((ValueError, TypeError)) as info:
        sapo_ref.policy_loss(*arrays, **kw)
    return info.value


@pytest.mark.parametrize("name,change", CASES, ids=[c[0] for c in CASES])
def test_errors_mirror_reference(name, change):
    call = change(valid())
    want = reference_error(call)
    arrays = [jnp.asarray(call[k]) for k in ("logp", "old_logp", "advantages", "mask")]
    kw = {k: v for k, v in call.items() if k not in ("logp", "old_logp", "advantages", "mask")}
    with pytest.raises(type(want)) as eager:
        sapo_jax.policy_loss(*arrays, **kw)
    assert str(eager.value) == str(want)
    with pytest.raises(type(want)) as traced:  # the same under jit: shapes and dtypes are static
        jax.jit(lambda *a: sapo_jax.policy_loss(*a, **kw))(*arrays)
    assert str(traced.value) == str(want)


def test_data_checks_are_the_references_only():
    """NaN at a valid token is the reference's ValueError; under JAX it cannot raise (values are
    traced) and shows as NaN rather than being hidden."""
    call = valid()
    call["logp"][0, 0] = np.nan
    with pytest.raises(ValueError, match="logp is NaN at a valid token"):
        sapo_ref.policy_loss(**call)
    loss, _ = sapo_jax.policy_loss(
        *(jnp.asarray(call[k]) for k in ("logp", "old_logp", "advantages", "mask"))
    )
    assert math.isnan(float(loss))


@pytest.mark.parametrize("name", ["old_logp", "advantages"])
def test_differentiating_a_constant_input_is_an_error(name):
    args = {k: jnp.asarray(v) for k, v in valid().items()}

    def f(x):
        return sapo_jax.policy_loss(**{**args, name: x})[0]

    with pytest.raises(TypeError, match=f"differentiable with respect to logp only; {name}"):
        jax.grad(f)(args[name])
    # stop_gradient, as the message says, makes it a constant again
    jax.grad(lambda x: sapo_jax.policy_loss(**{**args, name: jax.lax.stop_gradient(x)})[0])(
        args[name]
    )


def _run(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_ENABLE_X64", "XLA_FLAGS")}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def test_float64_without_x64_warns_subprocess():
    """x64 off: a float64 NumPy input warns Float64TruncationWarning naming it (an error under
    warnings 'error'); float32 input does not warn; importing sapo_jax left x64 off."""
    out = _run(
        """
        import warnings
        import numpy as np, jax
        import sapo_jax
        assert not jax.config.jax_enable_x64, "import turned x64 on"
        rng = np.random.default_rng(0)
        lp = np.log(rng.uniform(0.1, 1, (2, 3))); adv = np.array([1.0, -1.0]); mask = np.ones((2, 3), bool)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            loss, _ = sapo_jax.policy_loss(lp, lp, adv, mask)
        hits = [x for x in w if issubclass(x.category, sapo_jax.Float64TruncationWarning)]
        assert len(hits) == 1, [str(x.message) for x in w]
        msg = str(hits[0].message)
        assert "logp, old_logp, advantages" in msg and "jax_enable_x64" in msg, msg
        assert loss.dtype == np.float32
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            sapo_jax.policy_loss(lp.astype(np.float32), lp.astype(np.float32), adv.astype(np.float32), mask)
        assert not [x for x in w if issubclass(x.category, sapo_jax.Float64TruncationWarning)]
        with warnings.catch_warnings():
            warnings.simplefilter("error", sapo_jax.Float64TruncationWarning)
            try:
                sapo_jax.policy_loss(lp, lp.astype(np.float32), adv.astype(np.float32), mask)
            except sapo_jax.Float64TruncationWarning as e:
                assert str(e).startswith("logp:"), e
            else:
                raise AssertionError("no error")
        print("ok")
        """
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_import_imports_no_other_framework_and_keeps_config():
    out = _run(
        """
        import sys, jax
        before = jax.config.values.copy() if hasattr(jax.config, "values") else None
        import sapo_jax
        assert not any(m in sys.modules for m in ("torch", "mlx")), [m for m in ("torch", "mlx") if m in sys.modules]
        assert not jax.config.jax_enable_x64
        if before is not None:
            assert jax.config.values == before
        print("ok")
        """
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_x64_float64_computes_in_float64():
    """With x64 on (this test process), float64 in means float64 out and float64 accuracy; the
    float32 gradient of float32 input stays float32."""
    call = {k: jnp.asarray(v) for k, v in valid().items()}
    loss, metrics = sapo_jax.policy_loss(**call)
    assert loss.dtype == jnp.float64 and all(v.dtype == jnp.float64 for v in metrics.values())
    f32 = {k: (v.astype(jnp.float32) if k != "mask" else v) for k, v in call.items()}
    g = jax.grad(
        lambda x: sapo_jax.policy_loss(x, *(f32[k] for k in ("old_logp", "advantages", "mask")))[0]
    )(f32["logp"])
    assert g.dtype == jnp.float32
    b16 = {k: (v.astype(jnp.bfloat16) if k != "mask" else v) for k, v in call.items()}
    loss, _ = sapo_jax.policy_loss(**b16)
    g = jax.grad(
        lambda x: sapo_jax.policy_loss(x, *(b16[k] for k in ("old_logp", "advantages", "mask")))[0]
    )(b16["logp"])
    assert loss.dtype == jnp.float32 and g.dtype == jnp.bfloat16


def test_capabilities_agree_with_spec():
    caps = sapo_jax.CAPABILITIES
    assert tuple(caps["methods"]) == tuple(spec.METHODS)
    assert tuple(caps["loss_aggs"]) == tuple(spec.LOSS_AGGS)
    assert set(caps["dtypes"]) <= set(spec.TOLERANCES)
    assert caps["requires"]["float64"] == "jax_enable_x64"
    assert isinstance(caps, dict)  # sapo_conformance reads a plain dict
    for dtype, deviation in caps[
        "tolerance_deviations"
    ].items():  # any declared deviation must say why
        assert dtype in spec.TOLERANCES and deviation.get("reason")
