"""sapo_mlx raises what the reference raises, with the same message (clauses 5.5, 8.1-8.6).

Configuration, shape and dtype errors come from ``policy_loss`` itself (no host sync: they
need no values). Errors about values at valid tokens need the data on the host and come from
``sapo_mlx.check_inputs``, which must agree with the reference just as well.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

import sapo_mlx

import sapo_ref
from sapo_ref import spec

N, T = 3, 4


def valid_call() -> dict:
    rng = np.random.default_rng(0)
    old = np.log(rng.uniform(0.1, 1.0, size=(N, T)))
    return {
        "logp": old + rng.normal(scale=0.1, size=(N, T)),
        "old_logp": old,
        "advantages": np.array([1.0, -0.5, 0.25]),
        "mask": np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=bool),
    }


def _edit(**kw):
    return lambda c: {**c, **kw}


def _at(name, index, value):
    def edit(c):
        x = np.array(c[name], dtype=float if name != "mask" else c[name].dtype)
        x[index] = value
        return {**c, name: x}

    return edit


ARRAYS = ("logp", "old_logp", "advantages", "mask")

CALL_ERRORS = {
    "logp 1-D": lambda c: {**c, "logp": c["logp"][0]},
    "logp 3-D": lambda c: {**c, "logp": c["logp"][None]},
    "old_logp shape": lambda c: {**c, "old_logp": c["old_logp"][:, :2]},
    "mask shape": lambda c: {**c, "mask": c["mask"][:2]},
    "N = 0": lambda c: {k: v[:0] for k, v in c.items()},
    "advantages length": lambda c: {**c, "advantages": c["advantages"][:2]},
    "advantages 3-D": lambda c: {**c, "advantages": np.ones((N, T, 1))},
    "integer logp": lambda c: {**c, "logp": np.zeros((N, T), dtype=np.int64)},
    "integer old_logp": lambda c: {**c, "old_logp": np.zeros((N, T), dtype=np.int32)},
    "bool advantages": lambda c: {**c, "advantages": np.ones(N, dtype=bool)},
    "complex logp": lambda c: {**c, "logp": c["logp"].astype(np.complex64)},
    "unknown method": _edit(method="ppo"),
    "method not a str": _edit(method=None),
    "unknown loss_agg": _edit(loss_agg="mean"),
    "tau_pos with grpo": _edit(method="grpo", tau_pos=1.0),
    "dual_clip with sapo": _edit(dual_clip=3.0),
    "norm_length missing": _edit(loss_agg="seq-mean-token-sum-norm"),
    "norm_length given to token-mean": _edit(loss_agg="token-mean", norm_length=8.0),
    "norm_length 0": _edit(loss_agg="seq-mean-token-sum-norm", norm_length=0.0),
    "norm_length str": _edit(loss_agg="seq-mean-token-sum-norm", norm_length="8"),
    "count_empty_rows not a bool": _edit(count_empty_rows=1),
    "count_empty_rows with normalizer": lambda c: {
        **c, "count_empty_rows": True, "normalizer": sapo_ref.normalizer(c["mask"])},
    "normalizer wrong type": _edit(normalizer=(6.0, 3.0)),
    **{f"{m} {p} out of domain": _edit(method=m, **{p: spec.DOMAINS[p].max * 2})
       for m, ms in spec.METHODS.items() for p in ms.params},
    **{f"{m} {p} nan": _edit(method=m, **{p: math.nan})
       for m, ms in spec.METHODS.items() for p in ms.params},
    **{f"{m} {p} bool": _edit(method=m, **{p: True})
       for m, ms in spec.METHODS.items() for p in ms.params},
}

_MIXED = lambda c: _at("logp", (0, 1), -math.inf)(_at("logp", (0, 0), math.inf)(c))
DATA_ERRORS = {
    "mask value 2": lambda c: {**c, "mask": c["mask"].astype(np.int64) * 2},
    "mask value 0.5": lambda c: {**c, "mask": c["mask"] * 0.5},
    "NaN advantage": _at("advantages", 0, math.nan),
    "inf advantage": _at("advantages", 1, math.inf),
    "NaN logp": _at("logp", (0, 1), math.nan),
    "NaN old_logp": _at("old_logp", (1, 0), math.nan),
    "inf - inf": lambda c: _at("old_logp", (0, 0), math.inf)(_at("logp", (0, 0), math.inf)(c)),
    **{f"{m} row with +inf and -inf": lambda c, m=m: {**_MIXED(c), "method": m}
       for m, ms in spec.METHODS.items() if ms.is_sequence},
}


def _reference_error(call: dict) -> BaseException:
    c = dict(call)
    with pytest.raises((ValueError, TypeError)) as info:
        arrays = [c.pop(k) for k in ARRAYS]
        sapo_ref.policy_loss(*arrays, **c)
    return info.value


def _same(got: BaseException, want: BaseException) -> None:
    assert type(got) is type(want)
    assert str(got) == str(want)


@pytest.mark.parametrize("edit", CALL_ERRORS.values(), ids=CALL_ERRORS.keys())
def test_policy_loss_errors_mirror_the_reference(edit):
    call = edit(valid_call())
    want = _reference_error(call)
    c = dict(call)
    arrays = [sapo_mlx.to_mx(c.pop(k)) for k in ARRAYS]
    with pytest.raises((ValueError, TypeError)) as info:
        sapo_mlx.policy_loss(*arrays, **c)
    _same(info.value, want)


@pytest.mark.parametrize("edit", DATA_ERRORS.values(), ids=DATA_ERRORS.keys())
def test_check_inputs_errors_mirror_the_reference(edit):
    call = edit(valid_call())
    want = _reference_error(call)
    c = dict(call)
    arrays = [sapo_mlx.to_mx(c.pop(k)) for k in ARRAYS]
    with pytest.raises((ValueError, TypeError)) as info:
        sapo_mlx.check_inputs(*arrays, **c)
    _same(info.value, want)


def test_valid_call_passes_both():
    c = valid_call()
    arrays = [sapo_mlx.to_mx(c[k]) for k in ARRAYS]
    sapo_mlx.check_inputs(*arrays)
    loss, _ = sapo_mlx.policy_loss(*arrays)
    assert math.isfinite(loss.item())


def test_check_inputs_accepts_bfloat16():
    c = valid_call()
    arrays = [sapo_mlx.to_mx(c[k], "bfloat16") for k in ARRAYS[:3]] + [mx.array(c["mask"])]
    sapo_mlx.check_inputs(*arrays, method="gspo")
