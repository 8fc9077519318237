"""sapo_torch under ``torch.compile``: no graph break, same numbers as eager, checks kept.

Few cases on purpose (compilation is slow on 2 shared cores): the default call in float32, a
sequence method with per-token advantages, and bfloat16 with a tensor normalizer. Agreement is
judged with the spec's tolerance of the dtype, eager being the reference of the compiled path,
and both against ``sapo_ref``. Clause 8.7 (issue 11): shape checks raise at trace time, and data
that raises eagerly makes the compiled loss and every gradient entry NaN.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import sapo_torch  # noqa: E402 (after the torch skip)

import sapo_ref  # noqa: E402 (after the torch skip)
from sapo_ref import Normalizer, spec  # noqa: E402 (after the torch skip)

pytestmark = [pytest.mark.torch, pytest.mark.slow]


def _close(got: torch.Tensor, want: np.ndarray, dtype: str, kind: str) -> None:
    tol = spec.TOLERANCES[dtype][kind]
    got64 = got.detach().double().numpy()
    scale = max(1.0, float(np.max(np.abs(want))))
    assert np.all(np.abs(got64 - want) <= tol.atol * scale + tol.rtol * np.abs(want)), (got64, want)


def _batch(dtype: torch.dtype, per_token: bool) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    n, t = 6, 11
    old = torch.randn(n, t, generator=g, dtype=torch.float64) - 1.5
    logp = old + 0.3 * torch.randn(n, t, generator=g, dtype=torch.float64)
    mask = torch.rand(n, t, generator=g) < 0.7
    mask[2] = False
    logp = torch.where(mask, logp, torch.nan)  # garbage where masked
    adv = torch.randn((n, t) if per_token else (n,), generator=g, dtype=torch.float64)
    return logp.to(dtype), old.to(dtype), adv.to(dtype), mask


CASES = [
    ("float32", {}, False, False),
    ("float32", {"tau_pos": 2.0, "loss_agg": "token-mean"}, True, True),  # fused, per token
    ("float32", {"method": "gspo", "loss_agg": "token-mean"}, True, False),
    (
        "bfloat16",
        {"method": "grpo", "loss_agg": "seq-mean-token-sum", "dual_clip": 3.0},
        False,
        True,
    ),
]


@pytest.mark.parametrize("dtype,opts,per_token,with_normalizer", CASES)
def test_compiled_matches_eager_and_reference(
    dtype: str, opts: dict, per_token: bool, with_normalizer: bool
) -> None:
    torch._dynamo.reset()
    logp, old, adv, mask = _batch(getattr(torch, dtype), per_token)
    norm = (
        sapo_ref.Normalizer(mask.sum().double(), (mask.sum(1) > 0).sum().double())
        if with_normalizer
        else None
    )

    def step(lp: torch.Tensor) -> torch.Tensor:
        return sapo_torch.policy_loss(lp, old, adv, mask, normalizer=norm, **opts)[0]

    compiled = torch.compile(step, fullgraph=True)  # fullgraph: a graph break is an error
    lp_c = logp.clone().requires_grad_(True)
    lp_e = logp.clone().requires_grad_(True)
    loss_c, loss_e = compiled(lp_c), step(lp_e)
    loss_c.backward(torch.tensor(0.5, dtype=loss_c.dtype))
    loss_e.backward(torch.tensor(0.5, dtype=loss_e.dtype))
    assert lp_c.grad.dtype == lp_e.grad.dtype == logp.dtype
    _close(loss_c, loss_e.detach().double().numpy(), dtype, "value")
    _close(lp_c.grad, lp_e.grad.double().numpy(), dtype, "grad")

    ref = sapo_ref.policy_loss(
        logp.double().numpy(),
        old.double().numpy(),
        adv.double().numpy(),
        mask.numpy(),
        normalizer=norm and sapo_ref.Normalizer(float(norm.num_tokens), float(norm.num_rows)),
        **opts,
    )
    _close(loss_c, np.asarray(ref.loss), dtype, "value")
    _close(lp_c.grad, 0.5 * ref.grad, dtype, "grad")


@pytest.mark.parametrize("method", ("sapo", "sapo-seq"))
def test_compiled_keeps_expm1_precision_at_large_tau(method: str) -> None:
    """tau = 1e6 and log-ratios ~1e-7: x = tau expm1(delta) needs expm1's relative precision,
    which a compiled exp(delta) - 1 would lose (float32, judged against sapo_ref)."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(1)
    n, t = 4, 16
    old = -torch.rand(n, t, generator=g) - 0.5
    logp = old + 1e-7 * torch.randn(n, t, generator=g)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    mask = torch.ones(n, t, dtype=torch.bool)
    opts = {"method": method, "tau_pos": 1e6, "tau_neg": 1e6}

    def step(lp: torch.Tensor) -> torch.Tensor:
        return sapo_torch.policy_loss(lp, old, adv, mask, **opts)[0]

    lp = logp.clone().requires_grad_(True)
    loss = torch.compile(step, fullgraph=True)(lp)
    loss.backward()
    ref = sapo_ref.policy_loss(
        logp.double().numpy(), old.double().numpy(), adv.double().numpy(), mask.numpy(), **opts
    )
    _close(loss, np.asarray(ref.loss), "float32", "value")
    _close(lp.grad, ref.grad, "float32", "grad")


def _valid() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    old = -torch.rand(3, 5, generator=g) - 0.5
    return {
        "logp": old + 0.2 * torch.randn(3, 5, generator=g),
        "old_logp": old,
        "advantages": torch.tensor([1.0, -0.5, 0.0]),
        "mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]).bool(),
    }


SHAPE_ERRORS = {
    # issue 11: [1, T] broadcast silently to a wrong loss; [N, 1] gave a fake-tensor RuntimeError
    "old_logp [1, T]": ("old_logp", lambda x: x[:1], "old_logp must have the shape of logp"),
    "mask [1, T]": ("mask", lambda x: x[:1], "mask must have the shape of logp"),
    "advantages [N, 1]": ("advantages", lambda x: x[:, None], "advantages must have shape"),
}


@pytest.mark.clause("8.1", "8.7")
@pytest.mark.parametrize("case", list(SHAPE_ERRORS))
def test_shapes_are_checked_at_trace_time(case: str) -> None:
    """A ValueError with the reference's message; under fullgraph=True Dynamo reports it as an
    'Observed exception' whose text holds the same message (PyTorch's behaviour)."""
    key, edit, message = SHAPE_ERRORS[case]
    x = _valid()
    x[key] = edit(x[key])

    def step(logp, old_logp, advantages, mask):
        return sapo_torch.policy_loss(logp, old_logp, advantages, mask)[0]

    torch._dynamo.reset()
    with pytest.raises(ValueError, match=message):
        torch.compile(step)(**x)
    with pytest.raises(Exception, match=message):
        torch.compile(step, fullgraph=True)(**x)


def _edit(x: dict, key: str, index: tuple, value: float) -> dict:
    x = dict(x)
    x[key] = x[key].clone()
    x[key][index] = value
    return x


def _int_mask(x: dict) -> dict:
    m = x["mask"].to(torch.int64)
    m[0, 4] = 2
    return {**x, "mask": m}


POISON = {
    "mask holding 2": ("sapo", _int_mask, None),
    "NaN logp at a valid token, A = 0": (
        "sapo",
        lambda x: _edit(x, "logp", (2, 1), math.nan),
        None,
    ),
    "NaN old_logp, grpo": ("grpo", lambda x: _edit(x, "old_logp", (1, 3), math.nan), None),
    "inf advantage": ("sapo", lambda x: _edit(x, "advantages", (1,), math.inf), None),
    "gspo row with +inf and -inf": (
        "gspo",
        lambda x: _edit(_edit(x, "logp", (1, 0), math.inf), "logp", (1, 2), -math.inf),
        None,
    ),
    "normalizer (0, 0)": ("sapo", lambda x: x, (0.0, 0.0)),
    "normalizer below the shard's counts": ("sapo", lambda x: x, (9.0, 2.0)),
    "normalizer NaN": ("sapo", lambda x: x, (math.nan, 3.0)),
}


@pytest.mark.clause("8.2", "8.5", "8.6", "5.5", "8.7", "8.8")
@pytest.mark.parametrize("case", list(POISON))
def test_invalid_data_poisons_loss_and_gradient_when_compiled(case: str) -> None:
    method, edit, counts = POISON[case]
    x = edit(_valid())

    def step(logp, old_logp, advantages, mask, n, r):
        norm = None if n is None else Normalizer(n, r)
        return sapo_torch.policy_loss(
            logp, old_logp, advantages, mask, method=method, normalizer=norm
        )[0]

    n, r = (None, None) if counts is None else (torch.tensor(c) for c in counts)
    with pytest.raises(ValueError):  # eagerly: the reference's error
        step(**x, n=n, r=r)
    lp = x["logp"].clone().requires_grad_(True)
    loss = torch.compile(step, fullgraph=True)(lp, x["old_logp"], x["advantages"], x["mask"], n, r)
    loss.backward()
    assert torch.isnan(loss) and torch.isnan(lp.grad).all(), (loss, lp.grad)


@pytest.mark.clause("7.1")
def test_compiled_metrics_match_eager() -> None:
    """The fused metrics traced (selections instead of eager branches), a ratio beyond float32
    included (e^90: ratio/max is +inf, ratio/mean and kl/k3 still fit)."""
    x = _valid()
    x["logp"] = x["logp"].clone()
    x["logp"][1, 2] = x["old_logp"][1, 2] + 90.0
    x["logp"][0, 4] = math.nan  # masked

    def step(logp, old_logp, advantages, mask):
        return sapo_torch.policy_loss(logp, old_logp, advantages, mask, metrics=True)[1]

    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True)(**x)
    want = step(**x)
    ref = sapo_ref.policy_loss(*(x[k].double().numpy() for k in x))
    big = float(np.finfo(np.float32).max)
    for key, value in want.items():
        if abs(ref.metrics[key]) > big:  # ratio/max = e^90: +inf in float32
            assert float(got[key]) == float(value) == math.inf, key
            continue
        _close(got[key], np.asarray(ref.metrics[key]), "float32", "value")
        _close(value, np.asarray(ref.metrics[key]), "float32", "value")


#: (dtype, options, per_token, weights layout): the fused pass (token SAPO) and the generic one.
TERM_CASES = [
    ("float32", {"kl_estimator": "low-var-k3"}, False, "token"),
    ("bfloat16", {"method": "gspo", "loss_agg": "token-mean", "kl_estimator": "k1"}, True, "row"),
]


@pytest.mark.clause("10.1", "10.2", "10.3", "7.1")
@pytest.mark.parametrize("dtype,opts,per_token,layout", TERM_CASES)
def test_compiled_with_terms_matches_eager_and_reference(
    dtype: str, opts: dict, per_token: bool, layout: str
) -> None:
    """fullgraph=True with weights and a KL term (ref_logp traced, differentiated too): the
    loss, both gradients and the metrics are eager's and the reference's; garbage where masked."""
    torch._dynamo.reset()
    dt = getattr(torch, dtype)
    logp, old, adv, mask = _batch(dt, per_token)
    g = torch.Generator().manual_seed(5)
    w = torch.rand(logp.shape if layout == "token" else logp.shape[:1], generator=g) * 2.0
    if layout == "token":
        w = torch.where(mask, w, -torch.inf)  # garbage where masked
    ref = torch.where(mask, old + 0.4 * torch.randn(logp.shape, generator=g), torch.nan).to(dt)
    kw = {**opts, "kl_coef": 0.3}

    def step(lp: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, dict]:
        return sapo_torch.policy_loss(lp, old, adv, mask, weights=w, ref_logp=r, **kw, metrics=True)

    compiled = torch.compile(step, fullgraph=True)
    runs = []
    for fn in (compiled, step):
        lp, r = logp.clone().requires_grad_(True), ref.clone().requires_grad_(True)
        loss, metrics = fn(lp, r)
        loss.backward()
        runs.append((loss, lp.grad, r.grad, metrics))
    (loss_c, g_c, r_c, m_c), (loss_e, g_e, r_e, m_e) = runs
    _close(loss_c, loss_e.detach().double().numpy(), dtype, "value")
    _close(g_c, g_e.double().numpy(), dtype, "grad")
    _close(r_c, r_e.double().numpy(), dtype, "grad")
    assert list(m_c) == list(m_e)
    for key in m_c:
        _close(m_c[key], m_e[key].double().numpy(), dtype, "value")
    arrays = [x.double().numpy() for x in (logp, old, adv)]
    want = sapo_ref.policy_loss(
        *arrays, mask.numpy(), **kw, weights=w.double().numpy(), ref_logp=ref.double().numpy()
    )
    _close(loss_c, np.asarray(want.loss), dtype, "value")
    _close(g_c, want.grad, dtype, "grad")
    for key, value in want.metrics.items():
        _close(m_c[key], np.asarray(value), dtype, "value")


@pytest.mark.clause("8.7", "10.4")
def test_invalid_weights_poison_loss_and_gradient_when_compiled() -> None:
    """A negative weight leaves the fused loss finite: the checks run before the pass."""
    x = _valid()
    w = torch.ones(3, 5)
    w[1, 1] = -1.0

    def step(logp, old_logp, advantages, mask, weights):
        return sapo_torch.policy_loss(logp, old_logp, advantages, mask, weights=weights)[0]

    with pytest.raises(ValueError, match="weights must be finite and >= 0"):
        step(**x, weights=w)
    torch._dynamo.reset()
    lp = x["logp"].clone().requires_grad_(True)
    loss = torch.compile(step, fullgraph=True)(lp, x["old_logp"], x["advantages"], x["mask"], w)
    loss.backward()
    assert torch.isnan(loss) and torch.isnan(lp.grad).all(), (loss, lp.grad)
