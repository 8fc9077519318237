"""Eager sapo_torch raises the reference's errors (clause 8.7), including through its fast path.

Token SAPO runs its data checks only when the fused pass's loss is not finite (every data fault
makes it so), a non-bool mask has a one-read 0/1 check, and a normalizer is checked against the
shard's counts: each of those shortcuts is checked here against ``sapo_ref.policy_loss`` on the
same input (same type, same message). Issue 11's regression cases are listed by name. The
cross-backend error table is tests/backends/test_errors.py.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import sapo_torch  # noqa: E402 (after the torch skip)
from sapo_torch.distributed import global_normalizer, local_counts  # noqa: E402 (after the torch skip)

import sapo_ref  # noqa: E402 (after the torch skip)
from sapo_ref import Normalizer  # noqa: E402 (after the torch skip)

pytestmark = pytest.mark.torch


def valid_call() -> dict[str, Any]:
    rng = np.random.default_rng(0)
    old = rng.normal(-1.5, 0.5, (3, 4))
    return {
        "logp": old + rng.normal(0, 0.2, (3, 4)),
        "old_logp": old,
        "advantages": np.array([1.0, -0.5, 0.0]),
        "mask": np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], bool),
    }


def put(call: dict[str, Any], key: str, index: Any, value: Any) -> dict[str, Any]:
    a = np.array(call[key], dtype=np.float64 if key != "mask" else None)
    a[index] = value
    return {**call, key: a}


def int_mask(call: dict[str, Any], value: float, dtype: Any = np.int64) -> dict[str, Any]:
    m = call["mask"].astype(dtype)
    m[0, 1] = value
    return {**call, "mask": m}


METHODS_NAN = ("sapo", "grpo", "gspo", "gspo-token")
CASES = {
    # issue 11: NaN logp at a valid token (also where A = 0, which hides it from the loss)
    **{f"nan logp {m}": (m, lambda c: put(c, "logp", (0, 1), math.nan), {}) for m in METHODS_NAN},
    **{
        f"nan logp at A=0 {m}": (m, lambda c: put(c, "logp", (2, 0), math.nan), {})
        for m in METHODS_NAN
    },
    "nan old_logp sapo": ("sapo", lambda c: put(c, "old_logp", (1, 1), math.nan), {}),
    "inf - inf sapo": (
        "sapo",
        lambda c: put(put(c, "logp", (0, 0), math.inf), "old_logp", (0, 0), math.inf),
        {},
    ),
    "inf advantage sapo": ("sapo", lambda c: put(c, "advantages", 1, math.inf), {}),
    "nan advantage sapo": ("sapo", lambda c: put(c, "advantages", 0, math.nan), {}),
    # issue 11: a gspo row holding +inf and -inf log-ratios (clause 5.5)
    "gspo row +inf and -inf": (
        "gspo",
        lambda c: put(put(c, "logp", (0, 0), math.inf), "logp", (0, 2), -math.inf),
        {},
    ),
    "gspo finite inputs overflowing": (
        "gspo",
        lambda c: put(
            put(
                put(put(c, "logp", (0, 0), 1.7e308), "old_logp", (0, 0), -1.7e308),
                "logp",
                (0, 2),
                -1.7e308,
            ),
            "old_logp",
            (0, 2),
            1.7e308,
        ),
        {"float64_only": True},
    ),
    # issue 11: mask values other than 0/1, through the one-read check
    **{f"mask {v} sapo": ("sapo", lambda c, v=v: int_mask(c, v), {}) for v in (2, -1)},
    **{
        f"float mask {v} sapo": ("sapo", lambda c, v=v: int_mask(c, v, np.float32), {})
        for v in (2.0, 0.5, math.nan)
    },
    "mask 2 grpo": ("grpo", lambda c: int_mask(c, 2), {}),
    # issue 11 / clause 8.8: normalizers the reference rejects
    **{
        f"normalizer {n}": ("sapo", lambda c: c, {"normalizer": n})
        for n in (
            Normalizer(0, 0),
            Normalizer(8.0, 2.0),  # below the shard's 9 tokens
            Normalizer(-5.0, 3.0),
            Normalizer(math.nan, 3.0),
            Normalizer(math.inf, 3.0),
        )
    },
    "normalizer 0,0 gspo": ("gspo", lambda c: c, {"normalizer": Normalizer(0, 0)}),
}


def as_torch(call: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    return {
        k: torch.from_numpy(np.asarray(v)).to(dtype)
        if v.dtype == np.float64
        else torch.from_numpy(v)
        for k, v in call.items()
    }


@pytest.mark.clause("5.5", "8.2", "8.5", "8.6", "8.7", "8.8")
@pytest.mark.parametrize("dtype", ("float64", "float32"))
@pytest.mark.parametrize("case", list(CASES))
def test_eager_data_errors_are_the_references(case: str, dtype: str) -> None:
    method, edit, extra = CASES[case]
    extra = dict(extra)
    if extra.pop("float64_only", False) and dtype != "float64":
        pytest.skip("the overflow needs float64 inputs")
    call = edit(valid_call())
    with pytest.raises(ValueError) as ref_err:
        sapo_ref.policy_loss(**call, method=method, **extra)
    t = as_torch(call, getattr(torch, dtype))
    for tensor_counts in (False, True) if "normalizer" in extra else (False,):
        kw = dict(extra)
        if tensor_counts:
            n = kw["normalizer"]
            kw["normalizer"] = Normalizer(
                torch.tensor(float(n.num_tokens)), torch.tensor(float(n.num_rows))
            )
        with pytest.raises(ValueError) as err:
            sapo_torch.policy_loss(**t, method=method, **kw)
        assert str(err.value) == str(ref_err.value)


@pytest.mark.clause("8.8")
def test_normalizer_types_raise_type_errors_naming_it() -> None:
    t = as_torch(valid_call(), torch.float32)
    for bad in (
        Normalizer(np.array("9"), np.array("3")),  # issue 11: was "invalid data type 'str'"
        Normalizer(torch.tensor(True), torch.tensor(3.0)),
        Normalizer(torch.tensor(9 + 0j), torch.tensor(3.0)),
        (9.0, 3.0),
    ):
        with pytest.raises(TypeError, match="normalizer"):
            sapo_torch.policy_loss(**t, normalizer=bad)


def test_non_tensor_input_and_metrics_type_are_refused() -> None:
    t = as_torch(valid_call(), torch.float32)
    with pytest.raises(TypeError, match=r"old_logp must be a torch\.Tensor"):
        sapo_torch.policy_loss(t["logp"], np.zeros((3, 4)), t["advantages"], t["mask"])
    with pytest.raises(TypeError, match="metrics must be a bool"):
        sapo_torch.policy_loss(**t, metrics=1)


@pytest.mark.clause("5.4", "8.7")
def test_an_overflowing_valid_loss_is_returned_not_raised() -> None:
    """The fast path checks data when the loss is not finite; valid data may overflow (5.4)."""
    lp = torch.zeros(2, 3, requires_grad=True)
    adv = torch.tensor([3e38, 3e38])
    loss, _ = sapo_torch.policy_loss(
        lp,
        torch.zeros(2, 3),
        adv,
        torch.ones(2, 3, dtype=torch.bool),
        loss_agg="seq-mean-token-sum",
    )
    ref = sapo_ref.policy_loss(
        np.zeros((2, 3)),
        np.zeros((2, 3)),
        np.array([3e38, 3e38]),
        np.ones((2, 3), bool),
        loss_agg="seq-mean-token-sum",
    )
    assert loss.item() == -math.inf and ref.loss < -float(np.finfo(np.float32).max)


@pytest.mark.clause("3.8", "8.1")
def test_local_counts_and_global_normalizer_validate_masks() -> None:
    """Issue 11: a 1-D mask gave IndexError; a mask holding 2 was counted."""
    with pytest.raises(ValueError, match=r"mask must be 2-D \[N, T\]; got shape \(3,\)"):
        local_counts(torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask\[1\] must be 2-D"):
        global_normalizer([torch.ones(2, 2), torch.ones(2, 2, 2)])
    with pytest.raises(ValueError, match=r"mask must hold only 0 and 1 .* at \(0, 1\)"):
        local_counts(torch.tensor([[1, 2], [0, 1]]))
    with pytest.raises(TypeError, match=r"mask must be a torch\.Tensor or a sequence"):
        local_counts(np.ones((2, 2)))
    with pytest.raises(TypeError, match="count_empty_rows must be a bool"):
        local_counts(torch.ones(2, 2), count_empty_rows=1)
    got = local_counts(torch.tensor([[1, 0], [0, 0]]), count_empty_rows=True)
    assert isinstance(got, Normalizer) and got.num_tokens.dtype == torch.float64
    assert (float(got.num_tokens), float(got.num_rows)) == (1.0, 2.0)
