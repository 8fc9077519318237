"""sapo_torch's autograd node: what it differentiates, what it saves, how it composes.

Torch-specific behaviour only (the cross-backend concerns are in tests/backends/): finite
differences (``torch.autograd.gradcheck``) for ``logp`` and ``old_logp``, ``torch.func``
transforms, the one saved buffer, mixed input dtypes (clause 8.9) and untouched inputs. Expected
values come from ``sapo_ref`` (float64) or from finite differences, compared with the suite's
one comparison helper at the spec's tolerance.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import _distributed_batches as db  # noqa: E402 (after the torch skip)
import sapo_torch  # noqa: E402 (after the torch skip)
from sapo_conformance.compare import compare  # noqa: E402 (after the torch skip)

import sapo_ref  # noqa: E402 (after the torch skip)
from sapo_ref import spec  # noqa: E402 (after the torch skip)

pytestmark = pytest.mark.torch

SMOOTH = ("sapo", "sapo-seq", "grpo", "gspo")  # differentiable values (gspo-token: clause 2.8)


def check(name: str, got: Any, want: Any, dtype: str, kind: str) -> None:
    if isinstance(got, torch.Tensor):
        got = got.detach().double().numpy()
    c = compare(name, got, want, spec.TOLERANCES[dtype][kind])
    assert c.ok, c.message


def batch(seed: int, per_token: bool = False, n: int = 5, t: int = 6) -> dict[str, torch.Tensor]:
    b = db.ragged_batch(np.random.default_rng(seed), n, t, empty_rows=1, per_token=per_token)
    out = {k: torch.from_numpy(b[k]) for k in ("logp", "old_logp", "advantages")}
    out["mask"] = torch.from_numpy(b["mask"])
    return out


def reference(b: dict[str, torch.Tensor], **opts: Any) -> sapo_ref.PolicyLossResult:
    return sapo_ref.policy_loss(
        *(b[k].detach().double().numpy() for k in ("logp", "old_logp", "advantages")),
        b["mask"].numpy(),
        **opts,
    )


def clean(b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Padding set to 0 (finite differences perturb every entry)."""
    m = b["mask"]
    out = {k: torch.where(m, v, 0.0) for k, v in b.items() if k in ("logp", "old_logp")}
    adv = b["advantages"]
    out["advantages"] = torch.where(m, adv, 0.0) if adv.dim() == 2 else adv
    out["mask"] = m
    return out


@pytest.mark.clause("2.2", "2.5", "8.9")
@pytest.mark.parametrize("method", SMOOTH)
def test_gradients_of_logp_and_old_logp_match_finite_differences(method: str) -> None:
    """The closed-form backward for both log-probability inputs, float64, central differences."""
    b = clean(batch(11, per_token=True, n=3, t=4))

    def fn(lp: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        return sapo_torch.policy_loss(lp, old, b["advantages"], b["mask"], method=method)[0]

    # Ratios within e^{+-0.8} of 1 and the clip band 0.8..1.2 (GSPO: 0.9997..1.0004): keep
    # the clipped methods away from their kinks by a wide clip.
    if method in ("grpo", "gspo"):
        fn = lambda lp, old: sapo_torch.policy_loss(
            lp, old, b["advantages"], b["mask"], method=method, eps_low=0.9, eps_high=5.0
        )[0]
    args = (b["logp"].clone().requires_grad_(), b["old_logp"].clone().requires_grad_())
    assert torch.autograd.gradcheck(fn, args, eps=1e-7, atol=1e-7)


@pytest.mark.clause("8.9", "2.8")
@pytest.mark.parametrize("method", sapo_ref.METHOD_NAMES)
def test_old_logp_gradient_is_minus_the_logp_gradient(method: str) -> None:
    """d loss / d old_logp = -d loss / d logp, and 0 for gspo-token (sg[s_i])."""
    b = batch(3, per_token=False)
    lp = b["logp"].clone().requires_grad_()
    old = b["old_logp"].clone().requires_grad_()
    loss, _ = sapo_torch.policy_loss(lp, old, b["advantages"], b["mask"], method=method)
    loss.backward(torch.tensor(0.7, dtype=torch.float64))
    ref = reference(b, method=method)
    want_old = np.zeros_like(ref.grad) if method == "gspo-token" else -0.7 * ref.grad
    check("d/d logp", lp.grad, 0.7 * ref.grad, "float64", "grad")
    check("d/d old_logp", old.grad, want_old, "float64", "grad")
    assert b["advantages"].grad is None


@pytest.mark.clause("8.9")
@pytest.mark.parametrize("method", ("sapo", "grpo"))
def test_mixed_dtypes_promote(method: str) -> None:
    """float32 logp with float64 old_logp: computed and returned in float64, d/d logp in float32,
    d/d old_logp in float64 to float64 accuracy."""
    b = batch(9, per_token=True)
    lp = b["logp"].float().requires_grad_(True)
    old = b["old_logp"].clone().requires_grad_(True)
    adv = b["advantages"].half()
    loss, _ = sapo_torch.policy_loss(lp, old, adv, b["mask"], method=method)
    loss.backward()
    assert loss.dtype == torch.float64
    assert lp.grad.dtype == torch.float32 and old.grad.dtype == torch.float64
    ref = reference({**b, "logp": lp, "advantages": adv}, method=method)
    check("loss", loss, ref.loss, "float64", "value")
    check("d/d logp", lp.grad, ref.grad, "float32", "grad")
    check("d/d old_logp", old.grad, -ref.grad, "float64", "grad")


@pytest.mark.parametrize("method", ("sapo", "gspo"))
def test_torch_func_grad_and_vmap(method: str) -> None:
    b = batch(5)

    def fn(lp: torch.Tensor) -> torch.Tensor:
        return sapo_torch.policy_loss(lp, b["old_logp"], b["advantages"], b["mask"], method=method)[
            0
        ]

    check(
        "func.grad",
        torch.func.grad(fn)(b["logp"]),
        reference(b, method=method).grad,
        "float64",
        "grad",
    )
    logps = torch.stack([b["logp"], b["logp"] + 0.1])
    grads = torch.func.vmap(torch.func.grad(fn))(logps)
    for i in range(2):
        want = reference({**b, "logp": logps[i]}, method=method).grad
        check(f"vmap sample {i}", grads[i], want, "float64", "grad")


@pytest.mark.parametrize("method", sapo_ref.METHOD_NAMES)
@pytest.mark.parametrize("dtype", ("float64", "float32", "bfloat16"))
def test_saves_one_gradient_buffer(method: str, dtype: str) -> None:
    """Forward keeps exactly one [N, T] tensor, in logp's dtype, for backward (with metrics too)."""
    b = batch(2, n=6, t=9)
    dt = getattr(torch, dtype)
    saved: list[Any] = []
    logp = b["logp"].to(dt).requires_grad_(True)
    old, adv = b["old_logp"].to(dt), b["advantages"].to(dt)
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        loss, _ = sapo_torch.policy_loss(logp, old, adv, b["mask"], method=method, metrics=True)
    assert [(tuple(s.shape), s.dtype) for s in saved] == [(tuple(logp.shape), dt)]
    assert not any(s.data_ptr() == logp.data_ptr() for s in saved)
    loss.backward()
    assert logp.grad is not None and logp.grad.dtype == dt


@pytest.mark.clause("6.5")
def test_inputs_are_not_modified() -> None:
    """Clause 6.5, including inputs already in the computation dtype (no copy is needed)."""
    for method in ("sapo", "gspo"):
        for dtype in ("float64", "float32", "bfloat16"):
            b = {
                k: (v.to(getattr(torch, dtype)) if v.is_floating_point() else v)
                for k, v in batch(1, True).items()
            }
            before = {k: (v.clone(), v._version) for k, v in b.items()}
            sapo_torch.policy_loss(
                b["logp"], b["old_logp"], b["advantages"], b["mask"], method=method, metrics=True
            )
            for k, (copy, version) in before.items():
                assert torch.equal(
                    b[k].nan_to_num(0.0, 1.0, -1.0), copy.nan_to_num(0.0, 1.0, -1.0)
                ), k
                assert b[k]._version == version, k


# ----------------------------------------------------------------------------- clause 10 terms
def terms(b: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """[N, T] weights and ref_logp beside batch ``b`` (finite, also where masked)."""
    g = torch.Generator().manual_seed(seed)
    shape = b["logp"].shape
    w = torch.rand(shape, generator=g, dtype=torch.float64) * 2.0
    ref = torch.where(b["mask"], b["logp"], 0.0) + 0.3 * torch.randn(
        shape, generator=g, dtype=torch.float64
    )
    return {"weights": w, "ref_logp": ref}


#: Which inputs require a gradient -> the [N, T] buffers saved for backward (clause 10.3).
NEEDS = {
    ("logp",): 1,
    ("logp", "ref_logp"): 2,
    ("logp", "old_logp"): 2,
    ("logp", "old_logp", "ref_logp"): 3,
    ("ref_logp",): 1,
}


@pytest.mark.clause("10.3")
@pytest.mark.parametrize("method", ("sapo", "gspo", "gspo-token"))
@pytest.mark.parametrize("needs", list(NEEDS), ids=["+".join(n) for n in NEEDS])
def test_saves_only_the_buffers_the_requested_gradients_need(method: str, needs: tuple) -> None:
    """With a KL term: logp's gradient alone keeps one buffer (the usual training call); each
    other requested gradient one more (old_logp: the policy part; none for gspo-token, whose
    zero gradient needs only a shape); every gradient is the reference's."""
    b = batch(4, n=5, t=7)
    t = terms(b)
    x = {**b, **t}
    x = {k: v.clone().requires_grad_(k in needs) for k, v in x.items()}
    saved: list[Any] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda s: saved.append(s) or s, lambda s: s):
        loss, _ = sapo_torch.policy_loss(
            x["logp"],
            x["old_logp"],
            x["advantages"],
            x["mask"],
            method=method,
            weights=x["weights"],
            ref_logp=x["ref_logp"],
            kl_coef=0.4,
            metrics=True,
        )
    # gspo-token: old_logp's zero gradient has no buffer of its own
    want = NEEDS[needs] - (method == "gspo-token" and "old_logp" in needs)
    assert len(saved) == want, [tuple(s.shape) for s in saved]
    assert all(tuple(s.shape) == tuple(b["logp"].shape) for s in saved)
    loss.backward()
    opts = {"method": method, "kl_coef": 0.4}
    full = reference(b, **opts, weights=t["weights"].numpy(), ref_logp=t["ref_logp"].numpy())
    policy = reference(b, method=method, weights=t["weights"].numpy())
    if "logp" in needs:
        check("d/d logp", x["logp"].grad, full.grad, "float64", "grad")
    if "old_logp" in needs:
        want_old = 0.0 * policy.grad if method == "gspo-token" else -policy.grad
        check("d/d old_logp", x["old_logp"].grad, want_old, "float64", "grad")
    if "ref_logp" in needs:
        check("d/d ref_logp", x["ref_logp"].grad, policy.grad - full.grad, "float64", "grad")
    assert x["weights"].grad is None and x["advantages"].grad is None


@pytest.mark.clause("10.3")
@pytest.mark.parametrize("method", ("sapo", "grpo"))
def test_torch_func_grad_and_vmap_with_terms(method: str) -> None:
    """torch.func.grad over (logp, ref_logp) and vmap over a batch of logp, with the terms."""
    b = batch(6)
    t = terms(b, seed=1)
    opts = {"method": method, "kl_coef": 0.25, "kl_estimator": "k2"}

    def fn(lp: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        args = (b["old_logp"], b["advantages"], b["mask"])
        return sapo_torch.policy_loss(lp, *args, **opts, weights=t["weights"], ref_logp=ref)[0]

    g_lp, g_ref = torch.func.grad(fn, argnums=(0, 1))(b["logp"], t["ref_logp"])
    full = reference(b, **opts, weights=t["weights"].numpy(), ref_logp=t["ref_logp"].numpy())
    policy = reference(b, method=method, weights=t["weights"].numpy())
    check("func.grad logp", g_lp, full.grad, "float64", "grad")
    check("func.grad ref_logp", g_ref, policy.grad - full.grad, "float64", "grad")
    logps = torch.stack([b["logp"], b["logp"] - 0.2])
    grads = torch.func.vmap(torch.func.grad(fn), in_dims=(0, None))(logps, t["ref_logp"])
    for i in range(2):
        want = reference(
            {**b, "logp": logps[i]},
            **opts,
            weights=t["weights"].numpy(),
            ref_logp=t["ref_logp"].numpy(),
        ).grad
        check(f"vmap sample {i}", grads[i], want, "float64", "grad")
