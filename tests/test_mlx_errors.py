"""How sapo_mlx reports bad input in each MLX mode (clause 8.7): eagerly, also inside
``mx.grad`` (which MLX runs eagerly), it raises the reference's error; under ``mx.compile`` and
``mx.vmap`` shape, dtype and option errors still raise while invalid data make the loss and every
gradient entry NaN. And the helpers of :mod:`sapo_mlx.distributed` validate their input. The
message-by-message comparison for every API is tests/backends'."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("mlx.core")

import mlx.core as mx
import sapo_mlx
from backends._inputs import ARRAYS, N, T, at, both, setting, then, valid_call
from sapo_mlx.distributed import global_normalizer, local_counts

import sapo_ref
from sapo_ref import Normalizer
from sapo_ref.sharding import global_normalizer as sapo_ref_global_normalizer

pytestmark = pytest.mark.mlx

#: A 0/1 float mask, so that its values can be broken (the shared call's mask is boolean).
FLOAT_MASK = setting(mask=valid_call()["mask"].astype(np.float32))
DATA_ERRORS = {
    "mask value 2": then(FLOAT_MASK, at("mask", (0, 0), 2.0)),
    "mask value -1": then(FLOAT_MASK, at("mask", (0, 0), -1.0)),
    "mask value 0.5": then(FLOAT_MASK, at("mask", (1, 3), 0.5)),
    "mask value NaN": then(FLOAT_MASK, at("mask", (2, 3), math.nan)),
    "NaN advantage": at("advantages", 0, math.nan),
    "inf advantage": at("advantages", 1, -math.inf),
    "NaN logp": at("logp", (0, 1), math.nan),
    "NaN old_logp": at("old_logp", (1, 0), math.nan),
    "inf - inf": both((0, 0), math.inf, math.inf),
    "gspo row with +inf and -inf": then(
        at("logp", (0, 0), math.inf), at("logp", (0, 1), -math.inf), setting(method="gspo")
    ),
    "sapo-seq difference overflows both ways": then(
        both((0, 0), 1.7e308, -1.7e308), both((0, 1), -1.7e308, 1.7e308), setting(method="sapo-seq")
    ),
    "normalizer (0, 0)": setting(normalizer=Normalizer(0.0, 0.0)),
    "normalizer below the shard": setting(normalizer=Normalizer(5.0, 3.0)),
    "normalizer -5": setting(normalizer=Normalizer(-5.0, 3.0)),
    "normalizer NaN": setting(normalizer=Normalizer(10.0, math.nan)),
    "normalizer inf": setting(normalizer=Normalizer(math.inf, 3.0)),
}


def _split(call: dict) -> tuple[list, dict]:
    c = dict(call)
    return [c.pop(k) for k in ARRAYS], c


def _reference_error(call: dict) -> BaseException:
    arrays, options = _split(call)
    with pytest.raises((ValueError, TypeError)) as info:
        sapo_ref.policy_loss(*arrays, **options)
    return info.value


def _mx_call(call: dict) -> tuple[list, dict]:
    arrays, options = _split(call)
    if isinstance(options.get("normalizer"), Normalizer):  # counts as 0-d arrays, as on device
        n = options["normalizer"]
        options["normalizer"] = Normalizer(
            mx.array(n.num_tokens, mx.float64), mx.array(n.num_rows, mx.float64)
        )
    return [sapo_mlx.to_mx(a) for a in arrays], options


@pytest.mark.clause("8.2", "8.5", "8.6", "8.7", "8.8", "5.5")
@pytest.mark.parametrize("edit", DATA_ERRORS.values(), ids=DATA_ERRORS.keys())
def test_eager_and_under_grad_raise_the_references_error(edit):
    """Eager MLX, including mx.value_and_grad (MLX evaluates eagerly there), raises what the
    reference raises, same type and message."""
    call = edit(valid_call())
    want = _reference_error(call)
    arrays, options = _mx_call(call)
    with pytest.raises(type(want)) as info:
        sapo_mlx.policy_loss(*arrays, **options)
    assert str(info.value) == str(want)
    f = lambda x: sapo_mlx.policy_loss(x, *arrays[1:], **options)[0]
    with pytest.raises(type(want)) as info:
        mx.value_and_grad(f)(arrays[0])
    assert str(info.value) == str(want)


@pytest.mark.clause("8.7", "8.9")
@pytest.mark.parametrize("edit", DATA_ERRORS.values(), ids=DATA_ERRORS.keys())
def test_compiled_invalid_data_poisons_loss_and_every_gradient(edit):
    """Under mx.compile the same inputs give a NaN loss and NaN d/d logp and d/d old_logp
    everywhere (also for gspo-token, whose old_logp derivative is otherwise 0)."""
    arrays, options = _mx_call(edit(valid_call()))
    for method in {options.pop("method", "sapo"), "gspo-token"}:

        def f(x, o, a, m, method=method):
            return sapo_mlx.policy_loss(x, o, a, m, method=method, **options)[0]

        v, (g, g_old) = mx.compile(mx.value_and_grad(f, (0, 1)))(*arrays)
        assert math.isnan(v.item()), method
        assert np.all(np.isnan(np.array(g))) and np.all(np.isnan(np.array(g_old))), method


@pytest.mark.clause("8.7")
def test_vmapped_invalid_data_poisons_only_its_item():
    call = valid_call()
    arrays, _ = _mx_call(call)
    bad = np.array(call["logp"])
    bad[0, 0] = math.nan
    x = mx.stack([arrays[0], sapo_mlx.to_mx(bad)])
    losses = mx.vmap(lambda x: sapo_mlx.policy_loss(x, *arrays[1:])[0])(x)
    ok, nan = np.array(losses).tolist()
    assert math.isfinite(ok) and math.isnan(nan)
    assert abs(ok - sapo_ref.policy_loss(*_split(call)[0]).loss) < 1e-12


SHAPE_ERRORS = {
    "old_logp [1, T]": lambda c: {**c, "old_logp": c["old_logp"][:1]},
    "mask [1, T]": lambda c: {**c, "mask": c["mask"][:1]},
    "advantages [N, 1]": lambda c: {**c, "advantages": c["advantages"][:, None]},
    "integer logp": lambda c: {**c, "logp": np.zeros((N, T), np.int32)},
    "unknown method": lambda c: {**c, "method": "ppo"},
    "tau_pos with grpo": lambda c: {**c, "method": "grpo", "tau_pos": 1.0},
}


@pytest.mark.clause("8.1", "8.2", "8.3", "8.7")
@pytest.mark.parametrize("edit", SHAPE_ERRORS.values(), ids=SHAPE_ERRORS.keys())
def test_compiled_shape_dtype_and_option_errors_still_raise(edit):
    call = edit(valid_call())
    want = _reference_error(call)
    arrays, options = _mx_call(call)
    f = mx.compile(
        mx.value_and_grad(lambda x, o, a, m: sapo_mlx.policy_loss(x, o, a, m, **options)[0])
    )
    with pytest.raises(type(want)) as info:
        f(*arrays)
    assert str(info.value) == str(want)


@pytest.mark.clause("8.2")
@pytest.mark.parametrize("name", ARRAYS)
@pytest.mark.parametrize("kind", ["object", "str", "list of str"])
def test_object_and_string_arrays_name_the_argument(name, kind):
    """Arrays MLX cannot hold give the reference's TypeError naming the argument (not MLX's
    "cannot convert dtype object")."""
    call = valid_call()
    shape = np.shape(call[name])
    bad = {
        "object": np.full(shape, 1.0, dtype=object),
        "str": np.full(shape, "a"),
        "list of str": np.full(shape, "a").tolist(),
    }[kind]
    call[name] = bad
    want = _reference_error(call)
    arrays, options = _split(call)
    arrays = [a if k == name else sapo_mlx.to_mx(a) for k, a in zip(ARRAYS, arrays)]
    with pytest.raises(TypeError, match=name) as info:
        sapo_mlx.policy_loss(*arrays, **options)
    assert type(info.value) is type(want) and str(info.value) == str(want)


@pytest.mark.clause("3.1", "3.6")
def test_local_counts_are_the_references():
    mask = np.array([[1, 1, 0], [0, 0, 0], [1, 0, 0]], np.int32)
    for count_empty_rows in (False, True):
        got = local_counts(mx.array(mask), count_empty_rows=count_empty_rows)
        want = sapo_ref.normalizer(mask, count_empty_rows=count_empty_rows)
        for g, w in ((got.num_tokens, want.num_tokens), (got.num_rows, want.num_rows)):
            assert isinstance(g, mx.array) and g.dtype == mx.float64 and g.shape == ()
            assert g.item() == w
    total = global_normalizer([mx.array(mask), mx.array(mask[:, :2])])
    want = sapo_ref_global_normalizer([mask, mask[:, :2]])
    assert (total.num_tokens.item(), total.num_rows.item()) == (want.num_tokens, want.num_rows)


@pytest.mark.clause("8.1", "8.2")
def test_distributed_helpers_name_the_mask():
    with pytest.raises(ValueError, match="mask must be 2-D"):
        local_counts(mx.array([1, 0, 1]))
    with pytest.raises(ValueError, match="mask must be 2-D"):
        global_normalizer([mx.ones((2, 3)), mx.ones((1, 2, 3))])
    with pytest.raises(TypeError, match="mask"):
        local_counts(x for x in [[1, 0]])
    with pytest.raises(TypeError, match="mask"):
        local_counts(np.array([["a", "b"]]))
    with pytest.raises(ValueError, match="mask must hold only 0 and 1"):
        local_counts(mx.array([[1.0, 2.0]]))
    with pytest.raises(ValueError, match="mask must hold only 0 and 1"):
        global_normalizer([mx.array([[1.0, math.nan]])])
    with pytest.raises(ValueError, match="mask"):
        global_normalizer([])
    with pytest.raises(TypeError, match="count_empty_rows"):
        local_counts(mx.ones((2, 2)), count_empty_rows="yes")
