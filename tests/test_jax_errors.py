"""What sapo_jax does with bad input, where JAX differs from an eager library (clause 8.7-8.9).

Eagerly (concrete inputs, outside ``jax.jit``, also under an eager ``jax.grad``) it raises the
reference's own errors; under ``jax.jit``/``jax.vmap`` shape, dtype and option errors still raise
at trace time and invalid data makes the loss and every gradient entry NaN. Also: float64 input
with x64 off warns (subprocess), importing sapo_jax changes no global JAX configuration, and
CAPABILITIES agrees with the spec. (Error messages shared by every backend: tests/backends.)
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

import sapo_ref
from sapo_ref import spec

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

import sapo_jax  # noqa: E402

pytestmark = pytest.mark.jax

N, T = 3, 4
ARRAYS = ("logp", "old_logp", "advantages", "mask")


def valid() -> dict:
    rng = np.random.default_rng(0)
    old = np.log(rng.uniform(0.1, 1.0, (N, T)))
    return {
        "logp": old + rng.normal(0.0, 0.1, (N, T)),
        "old_logp": old,
        "advantages": np.array([1.0, -0.5, 0.25]),
        "mask": np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]], np.float64),
    }


def with_value(name: str, pos: tuple[int, ...], value: float, **options) -> dict:
    call = valid()
    call[name] = call[name].copy()
    call[name][pos] = value
    return {**call, **options}


#: Inputs whose data the reference rejects (clauses 5.5, 8.2, 8.5, 8.6, 8.8).
BAD_DATA = {
    "mask 2": with_value("mask", (1, 2), 2.0),
    "mask -1": with_value("mask", (0, 0), -1.0),
    "mask 0.5": with_value("mask", (2, 0), 0.5),
    "mask nan": with_value("mask", (2, 3), math.nan),
    "logp nan": with_value("logp", (0, 1), math.nan),
    "old_logp nan": with_value("old_logp", (1, 0), math.nan),
    "logp inf - inf": {
        **with_value("logp", (0, 0), math.inf),
        "old_logp": np.full((N, T), math.inf),
    },
    "advantages inf": with_value("advantages", (1,), math.inf),
    "advantages nan": with_value("advantages", (0,), math.nan),
    "gspo +inf and -inf in a row": {
        **with_value("logp", (0, 0), math.inf),
        "old_logp": np.where(np.arange(T) == 1, math.inf, valid()["old_logp"]),
        "method": "gspo",
    },
    "normalizer 0, 0": {**valid(), "normalizer": sapo_ref.Normalizer(0, 0)},
    "normalizer below the shard's": {**valid(), "normalizer": sapo_ref.Normalizer(5.0, 3.0)},
    "normalizer -5": {**valid(), "normalizer": sapo_ref.Normalizer(-5.0, 3.0)},
    "normalizer nan": {**valid(), "normalizer": sapo_ref.Normalizer(math.nan, 3.0)},
    "normalizer inf": {**valid(), "normalizer": sapo_ref.Normalizer(math.inf, 3.0)},
}


def split(call: dict) -> tuple[list, dict]:
    return [call[k] for k in ARRAYS], {k: v for k, v in call.items() if k not in ARRAYS}


def reference_error(call: dict) -> BaseException:
    arrays, kw = split(call)
    with pytest.raises((ValueError, TypeError)) as info:
        sapo_ref.policy_loss(*arrays, **kw)
    return info.value


@pytest.mark.clause("8.2", "8.5", "8.6", "8.7", "8.8", "5.5")
@pytest.mark.parametrize("name", BAD_DATA)
def test_eager_bad_data_raises_the_references_error(name):
    """Concrete inputs: the reference's exception, same type and text, also when the eager call
    is differentiated (jax.grad hands custom_vjp concrete primal values)."""
    want = reference_error(BAD_DATA[name])
    arrays, kw = split(BAD_DATA[name])
    lp, old, adv, mask = (jnp.asarray(x) for x in arrays)
    with pytest.raises(type(want)) as eager:
        sapo_jax.policy_loss(lp, old, adv, mask, **kw)
    assert str(eager.value) == str(want)
    with pytest.raises(type(want)) as differentiated:
        jax.grad(lambda x: sapo_jax.policy_loss(x, old, adv, mask, **kw)[0])(lp)
    assert str(differentiated.value) == str(want)


@pytest.mark.clause("8.7")
@pytest.mark.parametrize("name", BAD_DATA)
def test_traced_bad_data_poisons_loss_and_every_gradient_entry(name):
    """Under jax.jit values cannot raise: loss, d/dlogp and d/dold_logp are NaN everywhere."""
    arrays, kw = split(BAD_DATA[name])
    norm = kw.pop("normalizer", None)
    counts = None if norm is None else (jnp.asarray(norm.num_tokens), jnp.asarray(norm.num_rows))

    @jax.jit
    def step(lp, old, adv, mask, counts):
        normalizer = None if counts is None else sapo_ref.Normalizer(*counts)
        f = lambda x, o: sapo_jax.policy_loss(x, o, adv, mask, normalizer=normalizer, **kw)[0]
        return jax.value_and_grad(f, argnums=(0, 1))(lp, old)

    loss, (g, g_old) = step(*(jnp.asarray(x) for x in arrays), counts)
    assert math.isnan(float(loss))
    assert np.all(np.isnan(np.asarray(g))) and np.all(np.isnan(np.asarray(g_old)))


@pytest.mark.clause("8.5", "8.7")
def test_eager_large_input_raises_too():
    """Past the small-input shape buckets (the exact-shape program): the same eager error."""
    rng = np.random.default_rng(1)
    logp = -np.abs(rng.normal(1.0, 0.5, (2, 9000)))
    adv = np.array([1.0, np.inf])
    mask = np.ones((2, 9000), bool)
    want = reference_error({"logp": logp, "old_logp": logp, "advantages": adv, "mask": mask})
    with pytest.raises(ValueError) as got:
        sapo_jax.policy_loss(*(jnp.asarray(x) for x in (logp, logp, adv, mask)))
    assert str(got.value) == str(want)


@pytest.mark.clause("8.7")
def test_vmap_poisons_only_the_bad_problem():
    good, bad = valid(), BAD_DATA["mask 2"]
    stacked = [jnp.stack([jnp.asarray(good[k]), jnp.asarray(bad[k])]) for k in ARRAYS]
    f = jax.value_and_grad(lambda x, o, a, m: sapo_jax.policy_loss(x, o, a, m)[0])
    loss, grad = jax.vmap(f)(*stacked)
    ref = sapo_ref.policy_loss(*(good[k] for k in ARRAYS))
    assert float(loss[0]) == pytest.approx(ref.loss, rel=1e-12)
    assert math.isnan(float(loss[1])) and np.all(np.isnan(np.asarray(grad[1])))
    assert np.all(np.isfinite(np.asarray(grad[0])))


STATIC_ERRORS = {
    "unknown method": lambda c: {**c, "method": "ppo"},
    "tau with grpo": lambda c: {**c, "method": "grpo", "tau_pos": 1.0},
    "count_empty_rows not bool": lambda c: {**c, "count_empty_rows": 1},
    "normalizer wrong type": lambda c: {**c, "normalizer": (6.0, 3.0)},
    "logp 1-D": lambda c: {**c, "logp": c["logp"][0]},
    "mask shape": lambda c: {**c, "mask": c["mask"][:2]},
    "advantages [N, 1]": lambda c: {**c, "advantages": c["advantages"][:, None]},
    "logp int": lambda c: {**c, "logp": c["logp"].astype(np.int32)},
    "mask complex": lambda c: {**c, "mask": c["mask"].astype(np.complex64)},
}


@pytest.mark.clause("8.1", "8.2", "8.3", "8.4", "8.7")
@pytest.mark.parametrize("name", STATIC_ERRORS)
def test_static_errors_raise_at_trace_time(name):
    """Shapes, dtypes and options are static under jit and vmap: the reference's error there."""
    call = STATIC_ERRORS[name](valid())
    want = reference_error(call)
    arrays, kw = split(call)
    arrays = [jnp.asarray(x) for x in arrays]
    with pytest.raises(type(want)) as traced:
        jax.jit(lambda *a: sapo_jax.policy_loss(*a, **kw))(*arrays)
    assert str(traced.value) == str(want)
    if name in ("logp 1-D", "mask shape", "advantages [N, 1]"):
        return  # a leading vmap axis changes these shapes
    stacked = [jnp.stack([x, x]) for x in arrays]
    with pytest.raises(type(want)) as vmapped:
        jax.vmap(lambda *a: sapo_jax.policy_loss(*a, **kw)[0])(*stacked)
    assert str(vmapped.value) == str(want)


@pytest.mark.clause("8.2")
@pytest.mark.parametrize("name", ARRAYS)
@pytest.mark.parametrize("kind", [object, str])
def test_object_and_string_arrays_name_the_argument(name, kind):
    call = valid()
    call[name] = call[name].astype(kind)
    want = reference_error(call)
    arrays, kw = split(call)
    with pytest.raises(TypeError) as got:
        sapo_jax.policy_loss(*arrays, **kw)
    assert str(got.value) == str(want) and name in str(got.value)


@pytest.mark.clause("8.9")
@pytest.mark.parametrize("method", sapo_ref.METHOD_NAMES)
def test_old_logp_gradient_is_the_true_derivative(method):
    """d loss/d old_logp = -d loss/d logp where the loss depends on logp - old_logp only; 0 for
    gspo-token (old_logp only inside sg[s_i]); advantages and mask get zeros. Checked against
    central finite differences of the reference."""
    call = valid()
    lp, old, adv, mask = (jnp.asarray(call[k]) for k in ARRAYS)
    f = lambda x, o, a: sapo_jax.policy_loss(x, o, a, mask, method=method)[0]
    g, g_old, g_adv = jax.grad(f, argnums=(0, 1, 2))(lp, old, adv)
    assert np.all(np.asarray(g_adv) == 0.0)
    h = 1e-6
    fd = np.zeros((N, T))
    for i, t in np.ndindex(N, T):
        e = np.zeros((N, T))
        e[i, t] = h
        up = sapo_ref.policy_loss(
            call["logp"], call["old_logp"] + e, call["advantages"], call["mask"], method=method
        )
        down = sapo_ref.policy_loss(
            call["logp"], call["old_logp"] - e, call["advantages"], call["mask"], method=method
        )
        fd[i, t] = (up.loss - down.loss) / (2 * h)
    if method == "gspo-token":
        assert np.all(np.asarray(g_old) == 0.0)
    else:
        np.testing.assert_allclose(np.asarray(g_old), -np.asarray(g), rtol=0, atol=0)
        np.testing.assert_allclose(np.asarray(g_old), fd, rtol=1e-6, atol=1e-9)


@pytest.mark.clause("8.9")
def test_mixed_dtypes_are_promoted():
    """float32 logp with float64 old_logp: computed and returned in float64 (the promoted dtype),
    gradients in each input's own dtype, no warning; bfloat16 with float16: float32."""
    call = valid()
    lp32 = jnp.asarray(call["logp"], jnp.float32)
    old64 = jnp.asarray(call["old_logp"], jnp.float64)
    adv, mask = jnp.asarray(call["advantages"], jnp.float32), jnp.asarray(call["mask"])
    f = lambda x, o: sapo_jax.policy_loss(x, o, adv, mask)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning for a mixed call
        loss, (g, g_old) = jax.value_and_grad(f, argnums=(0, 1))(lp32, old64)
    assert loss.dtype == jnp.float64 and g.dtype == jnp.float32 and g_old.dtype == jnp.float64
    want = sapo_ref.policy_loss(
        np.asarray(lp32, np.float64), call["old_logp"], np.asarray(adv, np.float64), call["mask"]
    )
    assert float(loss) == pytest.approx(want.loss, rel=1e-13)
    loss16, _ = sapo_jax.policy_loss(
        lp32.astype(jnp.bfloat16), old64.astype(jnp.float16), adv, mask
    )
    assert loss16.dtype == jnp.float32


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
        assert not [x for x in w if not issubclass(x.category, sapo_jax.Float64TruncationWarning)], [str(x.message) for x in w]
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            sapo_jax.policy_loss(lp.astype(np.float32), lp.astype(np.float32), adv.astype(np.float32), mask)
        assert not w, [str(x.message) for x in w]
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


def test_capabilities_agree_with_spec():
    caps = sapo_jax.CAPABILITIES
    assert tuple(caps["methods"]) == tuple(spec.METHODS)
    assert tuple(caps["loss_aggs"]) == tuple(spec.LOSS_AGGS)
    assert set(caps["dtypes"]) <= set(spec.TOLERANCES)
    assert caps["requires"]["float64"] == "jax_enable_x64"
    assert isinstance(caps, dict)  # sapo_conformance reads a plain dict
    for dtype, deviation in caps["tolerance_deviations"].items():
        assert dtype in spec.TOLERANCES and deviation.get("reason")
