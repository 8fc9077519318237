"""sapo_torch against the reference: every method x aggregation x dtype, autograd, numerics, errors.

Every expected number comes from ``sapo_ref`` (float64, on the same rounded inputs), from
``torch.autograd.gradcheck`` (finite differences) or from a mathematical limit; tolerances come
only from ``spec.TOLERANCES``.
"""

from __future__ import annotations

import itertools
import math
import zlib
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import sapo_torch

import sapo_ref
from sapo_ref import spec

pytestmark = pytest.mark.torch

DTYPES = ("float64", "float32", "bfloat16", "float16")
GARBAGE = (math.nan, math.inf, -math.inf, 1e30)
COTANGENT = 0.73  # a non-unit upstream gradient


# ----------------------------------------------------------------------------- helpers


def options(method: str, loss_agg: str, **extra: Any) -> dict[str, Any]:
    opts: dict[str, Any] = {"method": method, "loss_agg": loss_agg, **extra}
    if "norm_length" in spec.LOSS_AGGS[loss_agg].requires:
        opts["norm_length"] = 9.0
    return opts


def kink_distance(x: np.ndarray, config: sapo_ref.LossConfig) -> float:
    """Smallest relative distance of ratios ``x`` to a clip kink (clause 2.5); inf for SAPO."""
    if config.is_soft or x.size == 0:
        return math.inf
    kinks = [1.0 + config.eps_high, 1.0 - config.eps_low] + (
        [config.dual_clip] if config.dual_clip else []
    )
    return min(float(np.min(np.abs(x / k - 1.0))) for k in kinks if k > 0)


def make_batch(
    seed: int,
    config: sapo_ref.LossConfig,
    *,
    per_token: bool,
    n: int = 5,
    t: int = 7,
    scale: float = 0.4,
) -> dict[str, np.ndarray]:
    """A ragged batch (one empty row, garbage at invalid slots, some A = 0) away from clip kinks."""
    for attempt in range(200):
        rng = np.random.default_rng(seed * 1000 + attempt)
        old = rng.normal(-1.5, 0.7, (n, t))
        logp = old + rng.normal(0.0, scale, (n, t))
        mask = rng.random((n, t)) < 0.75
        mask[1] = False
        mask[0, 0] = True
        adv = rng.normal(size=(n, t) if per_token else n)
        adv[..., 2] = 0.0 if per_token else adv[..., 2]
        if not per_token:
            adv[n - 1] = 0.0
        delta = np.where(mask, logp - old, 0.0)
        if config.sequence_value:
            lengths = mask.sum(1)
            x = np.exp(delta.sum(1)[lengths > 0] / lengths[lengths > 0])
        else:
            x = np.exp(delta[mask])
        if kink_distance(x, config) > 2e-3:
            break
    else:  # pragma: no cover
        raise AssertionError("no batch away from the kinks")
    garbage = np.array(GARBAGE)[rng.integers(0, len(GARBAGE), (n, t))]
    logp = np.where(mask, logp, garbage)
    old = np.where(mask, old, garbage[::-1, ::-1])
    if per_token:
        adv = np.where(mask, adv, np.nan)
    else:
        adv[1] = np.nan  # the empty row's advantage is masked too
    return {"logp": logp, "old_logp": old, "advantages": adv, "mask": mask}


def to_torch(batch: dict[str, np.ndarray], dtype: str) -> dict[str, Any]:
    dt = getattr(torch, dtype)
    out = {k: torch.from_numpy(np.array(v)).to(dt) for k, v in batch.items() if k != "mask"}
    out["mask"] = torch.from_numpy(batch["mask"].copy())
    return out


def rounded_numpy(tensors: dict[str, Any]) -> dict[str, np.ndarray]:
    """The float64 values the low-precision tensors hold: what the reference is run on."""
    return {
        k: (v.detach().double().numpy() if k != "mask" else v.numpy()) for k, v in tensors.items()
    }


def assert_within(got: Any, want: Any, dtype: str, kind: str, what: str) -> None:
    """clause C.1: |got - want| <= atol * scale + rtol * |want|, scale = max(1, max |want|)."""
    tol = spec.TOLERANCES[dtype][kind]
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    fin = np.isfinite(want)
    assert np.array_equal(np.isfinite(got), fin), f"{what}: finiteness differs\n{got}\n{want}"
    assert np.array_equal(got[~fin], want[~fin]), f"{what}: non-finite values differ"
    if not fin.any():
        return
    scale = max(1.0, float(np.max(np.abs(want[fin]))))
    err = np.abs(got[fin] - want[fin])
    bound = tol.atol * scale + tol.rtol * np.abs(want[fin])
    worst = int(np.argmax(err - bound))
    assert np.all(err <= bound), (
        f"{what} ({dtype} {kind}): {int(np.sum(err > bound))} of {err.size} outside "
        f"rtol={tol.rtol} atol={tol.atol}; worst got {got[fin][worst]!r} want {want[fin][worst]!r}"
    )


def run_torch(t: dict[str, Any], opts: dict[str, Any], cotangent: float = COTANGENT, **kw: Any):
    logp = t["logp"].clone().requires_grad_(True)
    loss, metrics = sapo_torch.policy_loss(
        logp, t["old_logp"], t["advantages"], t["mask"], **opts, **kw
    )
    loss.backward(torch.tensor(cotangent, dtype=loss.dtype))
    return loss, logp.grad, metrics


GRID = [
    (m, a, pt, dt)
    for m, a, pt, dt in itertools.product(
        sapo_ref.METHOD_NAMES, sapo_ref.LOSS_AGG_NAMES, (False, True), DTYPES
    )
]


# ----------------------------------------------------------------------------- vs the reference


@pytest.mark.parametrize("method,loss_agg,per_token,dtype", GRID)
def test_matches_reference(method: str, loss_agg: str, per_token: bool, dtype: str) -> None:
    opts = options(method, loss_agg)
    config = sapo_ref.resolve_config(**opts)
    seed = zlib.crc32(f"{method}/{loss_agg}/{per_token}".encode()) % 997
    t = to_torch(make_batch(seed, config, per_token=per_token), dtype)
    ref = sapo_ref.policy_loss(**rounded_numpy(t), **opts)
    loss, grad, metrics = run_torch(t, opts)
    assert metrics == {}
    assert loss.dtype == (torch.float64 if dtype == "float64" else torch.float32)
    assert loss.shape == ()
    assert grad.dtype == getattr(torch, dtype)
    assert_within(loss.detach().numpy(), ref.loss, dtype, "value", "loss")
    assert_within(grad.double().numpy(), ref.grad * COTANGENT, dtype, "grad", "grad")


@pytest.mark.parametrize("method", sapo_ref.METHOD_NAMES)
@pytest.mark.parametrize("dtype", ("float64", "float32", "bfloat16"))
def test_metrics_match_reference(method: str, dtype: str) -> None:
    opts = options(method, "token-mean")
    t = to_torch(make_batch(7, sapo_ref.resolve_config(**opts), per_token=True), dtype)
    ref = sapo_ref.policy_loss(**rounded_numpy(t), **opts)
    _, _, metrics = run_torch(t, opts, metrics=True)
    assert list(metrics) == list(sapo_ref.metric_keys(method))
    for key, value in metrics.items():
        assert isinstance(value, torch.Tensor) and value.shape == () and not value.requires_grad
        assert_within(value.numpy(), ref.metrics[key], dtype, "value", key)


@pytest.mark.parametrize("method", sapo_ref.METHOD_NAMES)
@pytest.mark.parametrize("tensor_counts", (False, True))
def test_normalizer_shards_sum_to_the_batch(method: str, tensor_counts: bool) -> None:
    """Clause 3.8: shards evaluated with the global counts sum to the unsplit batch."""
    opts = options(method, "seq-mean-token-mean")
    batch = make_batch(3, sapo_ref.resolve_config(**opts), per_token=False, n=6)
    t = to_torch(batch, "float64")
    norm = sapo_ref.normalizer(batch["mask"])
    if tensor_counts:
        norm = sapo_ref.Normalizer(
            torch.tensor(norm.num_tokens, dtype=torch.float64),
            torch.tensor(norm.num_rows, dtype=torch.float64),
        )
    ref = sapo_ref.policy_loss(**batch, **opts)
    total, grads = 0.0, []
    for rows in (slice(0, 2), slice(2, 6)):
        part = {k: v[rows] for k, v in t.items()}
        loss, grad, _ = run_torch(part, opts, cotangent=1.0, normalizer=norm)
        total = total + loss.detach()
        grads.append(grad)
    assert_within(total.numpy(), ref.loss, "float64", "value", "sum of shard losses")
    assert_within(torch.cat(grads).numpy(), ref.grad, "float64", "grad", "shard gradients")


def test_inputs_are_not_modified() -> None:
    """Clause 6.5, including float64 inputs that the forward pass does not need to copy."""
    opts = options("sapo", "token-mean")
    for dtype in ("float64", "float32", "bfloat16"):
        t = to_torch(make_batch(1, sapo_ref.resolve_config(**opts), per_token=True), dtype)
        before = {k: v.clone() for k, v in t.items()}
        versions = {k: v._version for k, v in t.items()}
        run_torch(t, opts, metrics=True)
        for k in t:
            assert torch.equal(
                t[k].nan_to_num(0.0, 1.0, -1.0), before[k].nan_to_num(0.0, 1.0, -1.0)
            ), k
            assert t[k]._version == versions[k], k


# ----------------------------------------------------------------------------- autograd


def test_gradcheck_against_finite_differences() -> None:
    """The closed-form backward against torch's central differences, float64.

    Not gspo-token: its gradient is defined through stop-gradients (clause 2.8), not as the
    derivative of its value.
    """
    for method in ("sapo", "sapo-seq", "grpo", "gspo"):
        opts = options(method, "seq-mean-token-mean")
        b = make_batch(11, sapo_ref.resolve_config(**opts), per_token=True, n=3, t=4, scale=0.3)
        b = {k: np.where(b["mask"], v, 0.0) if k != "mask" else v for k, v in b.items()}
        t = to_torch(b, "float64")

        def fn(lp, t=t, opts=opts):
            return sapo_torch.policy_loss(lp, t["old_logp"], t["advantages"], t["mask"], **opts)[0]

        assert torch.autograd.gradcheck(
            fn, (t["logp"].clone().requires_grad_(),), eps=1e-7, atol=1e-7
        ), method


@pytest.mark.parametrize("method", ("sapo", "gspo"))
def test_torch_func_grad_and_vmap(method: str) -> None:
    opts = options(method, "token-mean")
    t = to_torch(make_batch(5, sapo_ref.resolve_config(**opts), per_token=False), "float64")
    fn = lambda lp: sapo_torch.policy_loss(lp, t["old_logp"], t["advantages"], t["mask"], **opts)[0]
    ref = sapo_ref.policy_loss(**rounded_numpy(t), **opts)
    assert_within(torch.func.grad(fn)(t["logp"]).numpy(), ref.grad, "float64", "grad", "func.grad")
    logps = torch.stack([t["logp"], t["logp"] + 0.1])
    grads = torch.func.vmap(torch.func.grad(fn))(logps)
    ref2 = sapo_ref.policy_loss(**{**rounded_numpy(t), "logp": logps[1].numpy()}, **opts)
    assert_within(grads[0].numpy(), ref.grad, "float64", "grad", "vmap row 0")
    assert_within(grads[1].numpy(), ref2.grad, "float64", "grad", "vmap row 1")


@pytest.mark.parametrize("method", sapo_ref.METHOD_NAMES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_saves_one_gradient_buffer(method: str, dtype: str) -> None:
    """Forward keeps exactly one [N, T] tensor, in the input dtype, for backward."""
    opts = options(method, "seq-mean-token-mean")
    t = to_torch(make_batch(2, sapo_ref.resolve_config(**opts), per_token=False, n=6, t=9), dtype)
    saved: list[Any] = []
    logp = t["logp"].clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        loss, _ = sapo_torch.policy_loss(logp, t["old_logp"], t["advantages"], t["mask"], **opts)
    assert [(tuple(s.shape), s.dtype) for s in saved] == [(tuple(logp.shape), logp.dtype)]
    assert not any(s.data_ptr() == logp.data_ptr() for s in saved)
    loss.backward()
    assert logp.grad is not None and logp.grad.dtype == logp.dtype


# ----------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("method", sapo_ref.METHOD_NAMES)
def test_masked_garbage_changes_no_bit(method: str) -> None:
    """Clause 6.1: NaN/inf/1e30 at invalid slots give the same bits as zeros there."""
    opts = options(method, "seq-mean-token-mean")
    batch = make_batch(4, sapo_ref.resolve_config(**opts), per_token=True)
    clean = {k: (np.where(batch["mask"], v, 0.0) if k != "mask" else v) for k, v in batch.items()}
    for dtype in ("float32", "bfloat16"):
        lg, gg, _ = run_torch(to_torch(batch, dtype), opts)
        lc, gc, _ = run_torch(to_torch(clean, dtype), opts)
        assert torch.isfinite(lg) and torch.isfinite(gg).all()
        assert torch.equal(lg, lc) and torch.equal(gg, gc)


EXTREME = (-math.inf, -1e30, -200.0, -88.0, 88.0, 89.0, 200.0, 1e30, math.inf)


@pytest.mark.parametrize("method", ("sapo", "sapo-seq", "grpo", "gspo", "gspo-token"))
@pytest.mark.parametrize("dtype", ("float32", "bfloat16", "float64"))
def test_extreme_log_ratios_give_the_limits(method: str, dtype: str) -> None:
    """Clauses 5.3, 5.4, 6.3: valid log-ratios up to +-inf give the reference's limits, no NaN."""
    opts = options(method, "token-mean", **({"dual_clip": 3.0} if method == "grpo" else {}))
    n = len(EXTREME)
    old = np.zeros((n, 2))
    logp = np.stack([np.array(EXTREME), np.zeros(n)], axis=1)  # one extreme + one on-policy token
    if method != "sapo" and method != "grpo":
        logp[:, 1] = logp[:, 0]  # sequence methods: a row of equal extremes (clause 5.5 excluded)
    adv = np.where(np.arange(n) % 2 == 0, 1.0, -0.5)
    mask = np.ones((n, 2), bool)
    t = to_torch({"logp": logp, "old_logp": old, "advantages": adv, "mask": mask}, dtype)
    ref = sapo_ref.policy_loss(**rounded_numpy(t), **opts)
    loss, grad, _ = run_torch(t, opts, cotangent=1.0)
    assert not torch.isnan(loss) and not torch.isnan(grad).any()
    assert_within(loss.detach().numpy(), ref.loss, dtype, "value", "loss")
    assert_within(grad.double().numpy(), ref.grad, dtype, "grad", "grad")


def test_sapo_limits_are_exact_in_float32() -> None:
    """delta = +inf: f = 4/tau, w r = 0; delta = -inf: f = (4/tau) sigma(-tau), w r = 0 (clause 5.3)."""
    tau = 1.0
    logp = torch.tensor([[math.inf], [-math.inf], [1e30], [-1e30]], requires_grad=True)
    loss, _ = sapo_torch.policy_loss(
        logp,
        torch.zeros(4, 1),
        torch.ones(4),
        torch.ones(4, 1, dtype=torch.bool),
        loss_agg="seq-mean-token-sum",
        tau_pos=tau,
    )
    loss.backward()
    sig = 1.0 / (1.0 + math.exp(tau))
    want = -(4 / tau + 4 / tau * sig + 4 / tau + 4 / tau * sig) / 4
    assert_within(loss.detach().numpy(), want, "float32", "value", "loss")
    assert torch.equal(logp.grad, torch.zeros(4, 1))


# ----------------------------------------------------------------------------- errors


def _valid_call() -> dict[str, Any]:
    b = make_batch(0, sapo_ref.resolve_config(), per_token=False, n=3, t=4)
    b["advantages"][1] = 0.5
    return b


BAD_CALLS = {
    "method": lambda c: ({**c}, {"method": "ppo"}),
    "loss_agg": lambda c: ({**c}, {"loss_agg": "mean"}),
    "tau_pos domain": lambda c: ({**c}, {"tau_pos": -1.0}),
    "tau_neg nan": lambda c: ({**c}, {"tau_neg": math.nan}),
    "param of another method": lambda c: ({**c}, {"eps_low": 0.1}),
    "dual_clip domain": lambda c: ({**c}, {"method": "grpo", "dual_clip": 1.0}),
    "norm_length missing": lambda c: ({**c}, {"loss_agg": "seq-mean-token-sum-norm"}),
    "norm_length not taken": lambda c: ({**c}, {"norm_length": 4.0}),
    "count_empty_rows with normalizer": lambda c: (
        {**c},
        {"count_empty_rows": True, "normalizer": sapo_ref.Normalizer(9.0, 3.0)},
    ),
    "count_empty_rows type": lambda c: ({**c}, {"count_empty_rows": 1}),
    "normalizer type": lambda c: ({**c}, {"normalizer": (9.0, 3.0)}),
    "normalizer negative": lambda c: ({**c}, {"normalizer": sapo_ref.Normalizer(-1.0, 3.0)}),
    "logp 1-D": lambda c: ({**c, "logp": c["logp"][0]}, {}),
    "old_logp shape": lambda c: ({**c, "old_logp": c["old_logp"][:, :2]}, {}),
    "advantages shape": lambda c: ({**c, "advantages": c["advantages"][:2]}, {}),
    "mask shape": lambda c: ({**c, "mask": c["mask"][:2]}, {}),
    "logp integer": lambda c: ({**c, "logp": np.zeros((3, 4), np.int64)}, {}),
    "advantages integer": lambda c: ({**c, "advantages": np.ones(3, np.int64)}, {}),
    "mask values": lambda c: ({**c, "mask": c["mask"].astype(np.int64) * 2}, {}),
    "empty batch": lambda c: ({k: v[:0] for k, v in c.items()}, {}),
}


def _torch_args(call: dict[str, np.ndarray]) -> dict[str, Any]:
    out = {}
    for k, v in call.items():
        v = np.array(v)
        out[k] = torch.from_numpy(v.astype(np.float32) if v.dtype == np.float64 else v)
    return out


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_errors_mirror_the_reference(case: str) -> None:
    call, kw = BAD_CALLS[case](_valid_call())
    with pytest.raises((ValueError, TypeError)) as ref_err:
        sapo_ref.policy_loss(**call, **kw)
    with pytest.raises(ref_err.type) as err:
        sapo_torch.policy_loss(**_torch_args(call), **kw)
    # The same message; a dtype prints as the framework names it (torch.int64 vs int64).
    assert str(err.value).replace("torch.", "") == str(ref_err.value)


def test_non_tensor_input_is_refused() -> None:
    c = _torch_args(_valid_call())
    with pytest.raises(TypeError, match="old_logp must be a torch.Tensor"):
        sapo_torch.policy_loss(c["logp"], np.zeros((3, 4)), c["advantages"], c["mask"])


def test_capabilities_are_the_spec_names() -> None:
    caps = sapo_torch.CAPABILITIES
    assert isinstance(caps, dict)
    assert tuple(caps["methods"]) == sapo_ref.METHOD_NAMES
    assert tuple(caps["loss_aggs"]) == sapo_ref.LOSS_AGG_NAMES
    assert set(caps["dtypes"]) <= set(spec.TOLERANCES)
    assert caps["tolerance_deviations"] == {}


@pytest.mark.parametrize("taus", ((1e-6, 1e6), (1e6, 1e-6), (0.5, 2.0)))
@pytest.mark.parametrize("method", ("sapo", "sapo-seq"))
def test_saturation_with_far_apart_temperatures(taus: tuple[float, float], method: str) -> None:
    """Clause 6.3 with the domain's extreme temperatures: the limits, in float32, no NaN."""
    opts = options(method, "token-mean", tau_pos=taus[0], tau_neg=taus[1])
    logp = np.array([[v, v] for v in (*EXTREME, 30.0, 60.0, 70.0, 80.0, -30.0)])
    n = len(logp)
    adv = np.where(np.arange(n) % 2 == 0, 1.0, -0.5)
    t = to_torch(
        {
            "logp": logp,
            "old_logp": np.zeros((n, 2)),
            "advantages": adv,
            "mask": np.ones((n, 2), bool),
        },
        "float32",
    )
    ref = sapo_ref.policy_loss(**rounded_numpy(t), **opts)
    loss, grad, _ = run_torch(t, opts, cotangent=1.0)
    assert_within(loss.detach().numpy(), ref.loss, "float32", "value", "loss")
    assert_within(grad.double().numpy(), ref.grad, "float32", "grad", "grad")


def test_mixed_input_dtypes() -> None:
    """logp float32 with float64 old_logp and float16 advantages: computed in float32."""
    opts = options("grpo", "token-mean")
    b = make_batch(9, sapo_ref.resolve_config(**opts), per_token=True)
    lp = torch.from_numpy(b["logp"]).float().requires_grad_(True)
    old = torch.from_numpy(b["old_logp"])
    adv = torch.from_numpy(b["advantages"]).half()
    mask = torch.from_numpy(b["mask"])
    ref = sapo_ref.policy_loss(
        lp.detach().double().numpy(), old.numpy(), adv.double().numpy(), b["mask"], **opts
    )
    loss, _ = sapo_torch.policy_loss(lp, old, adv, mask, **opts)
    loss.backward()
    assert loss.dtype == torch.float32 and lp.grad.dtype == torch.float32
    assert_within(loss.detach().numpy(), ref.loss, "float32", "value", "loss")
    assert_within(lp.grad.double().numpy(), ref.grad, "float32", "grad", "grad")
