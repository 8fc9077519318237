"""The porting guide's shims for AReaL, Trinity-RFT, Liger-Kernel, torchforge and ms-swift
(``sapo_torch.integrations.{areal,trinity,liger,torchforge,swift}``) run through each
framework's real code, compared with the reference and with the framework's own SAPO.

- AReaL: the shim installed into AReaL's actor; AReaL's ``grpo_loss_fn`` (its proximal-logp
  resolution, stats tracker and logging) runs on padded and packed micro-batches; the loss and
  gradient against :func:`sapo_ref.policy_loss` (NumPy float64), the logged per-token stats
  against values computed from :mod:`sapo_ref.gates`, and against AReaL's own ``sapo_loss_fn``
  where they mean the same (advantages constant along a row).
- Trinity-RFT: the class found in Trinity's registry (by name and by path), built from
  ``default_args()``, called with the verl backend's key names; every ``loss_agg_mode`` and
  both levels against the reference (Trinity's meaning of the modes); Trinity's own
  ``SAPOPolicyLossFn`` differs exactly by its known deviation (``detached-gate``: gradient
  :math:`A f` instead of :math:`A w r`).
- Liger-Kernel: the gradient reaches the hidden states, the LM-head weight and bias through
  Liger's chunked log-prob function and matches autograd through ``log_softmax`` of logits
  computed directly; the loss and gradients match Liger's own ``LigerFusedLinearGRPOLoss``
  for sapo, grpo, bnpo and dr_grpo.
- torchforge (not installable here: untested against torchforge) and ms-swift (installable in
  a separate venv only: ms-swift 4.6 needs ``trl<1``) are skipped where they do not import,
  with the reason; what needs no framework is checked (torchforge's loss terms against the
  reference; its call raising a clear error without torchforge).

Tolerances: float64 paths 1e-12 (sums of ~50 terms of order 1); float32 paths (AReaL's stats
tracker takes float32 only; Liger's log-probs are float32) 2e-6 relative to the largest
entry. Opt-in: ``.venv-peers/bin/python -m pytest -m peers tests/peers/test_shims.py``.
"""

from __future__ import annotations

import importlib
import inspect

import numpy as np
import pytest
import sapo_torch
import torch

import sapo_ref
from sapo_ref.gates import sapo_parts, sapo_parts_signed

pytestmark = [pytest.mark.peers]

F64 = 1e-12
F32 = 2e-6
HAS_TERMS = all(
    k in inspect.signature(sapo_torch.policy_loss).parameters for k in ("weights", "ref_logp")
)


#: Largest relative difference per test and comparison, printed at the end (``-s``) for the docs.
MEASURED: dict[str, float] = {}
_CURRENT = ["?"]


@pytest.fixture(autouse=True)
def _record_test_name(request):
    _CURRENT[0] = request.node.name
    yield


@pytest.fixture(scope="module", autouse=True)
def _print_measured():
    yield
    if MEASURED:
        print("\nmeasured max |difference| / max(1, max |reference|):")
        for key, err in sorted(MEASURED.items()):
            print(f"  {err:9.2e}  {key}")


def _integration(name: str):
    try:
        return importlib.import_module(f"sapo_torch.integrations.{name}")
    except ImportError as err:  # the framework (or one of its imports) is not installed
        pytest.skip(f"{name}: {type(err).__name__}: {err}")


def _batch(seed: int, n: int = 5, t: int = 7, dtype=torch.float64, per_row: bool = True):
    """A ragged batch (one empty row), |log-ratio| < 1, advantages of both signs."""
    g = torch.Generator().manual_seed(seed)
    logp = (-0.2 - torch.rand(n, t, generator=g, dtype=torch.float64) * 2).to(dtype)
    old = (logp.double() + 0.4 * torch.randn(n, t, generator=g, dtype=torch.float64)).to(dtype)
    lengths = torch.randint(1, t + 1, (n,), generator=g)
    lengths[1] = 0
    mask = torch.arange(t)[None, :] < lengths[:, None]
    adv = torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
    adv = adv[:, None].expand(n, t).contiguous() if per_row else torch.randn(n, t, generator=g)
    return logp, old, adv.to(dtype), mask


def _reference(logp, old, adv, mask, **options):
    """sapo_ref (NumPy float64): (loss, dL/dlogp)."""
    res = sapo_ref.policy_loss(
        *(x.detach().double().numpy() for x in (logp, old, adv)), mask.numpy(), **options
    )
    return float(res.loss), np.asarray(res.grad)


def _close(got, want, tol, what):
    got = np.asarray(got.detach().double() if torch.is_tensor(got) else got, dtype=float)
    want = np.asarray(want, dtype=float)
    scale = max(1.0, float(np.max(np.abs(want)))) if want.size else 1.0
    err = float(np.max(np.abs(got - want))) if want.size else 0.0
    key = f"{_CURRENT[0]}: {what}"
    MEASURED[key] = max(MEASURED.get(key, 0.0), err / scale)
    assert err <= tol * scale, f"{what}: max |difference| {err:.3g} > {tol * scale:.3g}"
    return err


def _loss_and_grad(fn, logp):
    logp = logp.detach().clone().requires_grad_(True)
    loss = fn(logp)
    (grad,) = torch.autograd.grad(loss, logp)
    return loss.detach(), grad


# --------------------------------------------------------------------------------------------
# AReaL
# --------------------------------------------------------------------------------------------


@pytest.fixture
def areal_actor():
    sa = _integration("areal")
    try:
        actor = importlib.import_module("areal.trainer.ppo.actor")
    except ImportError as err:
        pytest.skip(f"areal.trainer.ppo.actor does not import: {type(err).__name__}: {err}")
    from areal.utils import stats_tracker

    stats_tracker.export()  # start from an empty tracker
    sa.install()
    yield sa, actor, stats_tracker
    sa.uninstall()
    stats_tracker.export()


def _pack(x, mask):
    """[B, T] -> packed [n] of each row's first L_i entries, and cu_seqlens."""
    lengths = mask.sum(1)
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    return torch.cat([x[i, : lengths[i]] for i in range(len(lengths))]), cu


def _areal_call(actor, logp, old, adv, mask, level, cu=None):
    data = {"logprobs": old, "prox_logp": old, "advantages": adv, "loss_mask": mask.int()}
    if cu is None:
        data["attention_mask"] = torch.ones_like(mask, dtype=torch.int)
    else:
        data["cu_seqlens"] = cu.int()

    def fn(lp):
        return actor.grpo_loss_fn(
            lp,
            torch.zeros_like(lp),
            data,
            eps_clip=0.2,
            eps_clip_higher=None,
            c_clip=None,
            importance_sampling_level=level,
            use_sapo_loss=True,
            sapo_tau_pos=1.0,
            sapo_tau_neg=1.05,
        )

    return fn


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_areal_actor_with_shim(areal_actor, level, packed):
    """AReaL's grpo_loss_fn runs with the shim (the stats it reads exist, with the right shapes
    and dtype); loss, gradient and logged stats match the reference and AReaL's own SAPO."""
    sa, actor, tracker = areal_actor
    logp, old, adv, mask = _batch(1, dtype=torch.float32)
    # AReaL's stats tracker takes float32 only; packed rows must be non-empty for cu_seqlens.
    mask[1, 0] = True
    method = {"token": "sapo", "sequence": "sapo-seq"}[level]
    want_loss, want_grad = _reference(logp, old, adv, mask, method=method, loss_agg="token-mean")
    if packed:
        (lp1, cu), (old1, _), (adv1, _), (m1, _) = (_pack(x, mask) for x in (logp, old, adv, mask))
        loss, grad = _loss_and_grad(_areal_call(actor, lp1, old1, adv1, m1, level, cu), lp1)
        grad = torch.zeros_like(logp).masked_scatter(mask, grad)
    else:
        loss, grad = _loss_and_grad(_areal_call(actor, logp, old, adv, mask, level), logp)
    _close(loss, want_loss, F32, "loss")
    _close(grad, want_grad, F32, "gradient")
    stats = tracker.export()
    # actor_loss/avg: the mean over valid tokens of -f A, f from sapo_ref's gates.
    x = torch.where(mask, logp.double() - old.double(), 0.0)
    if level == "sequence":
        x = (x.sum(1) / mask.sum(1).clamp(min=1))[:, None].expand_as(x)
    f = sapo_parts_signed(x.numpy(), adv.double().numpy() > 0, 1.0, 1.05).f
    want_actor_loss = float((-f * adv.double().numpy())[mask.numpy()].mean())
    _close(stats["actor_loss/avg"], want_actor_loss, F32, "actor_loss/avg")
    _close(stats["sapo_soft_gate/avg"], float(f[mask.numpy()].mean()), F32, "sapo_soft_gate/avg")
    assert stats["clip_ratio/avg"] == 0.0 and stats["dual_clip_ratio/avg"] == 0.0
    assert stats["n_valid_tokens"] == float(mask.sum())
    # AReaL's own SAPO on the same micro-batch (advantages constant along each row).
    sa.uninstall()
    try:
        if packed:
            own_loss, own_grad = _loss_and_grad(
                _areal_call(actor, lp1, old1, adv1, m1, level, cu), lp1
            )
            own_grad = torch.zeros_like(logp).masked_scatter(mask, own_grad)
        else:
            own_loss, own_grad = _loss_and_grad(
                _areal_call(actor, logp, old, adv, mask, level), logp
            )
    finally:
        sa.install()
    _close(loss, float(own_loss), F32, "loss vs AReaL's sapo_loss_fn")
    _close(grad, own_grad.double().numpy(), F32, "gradient vs AReaL's sapo_loss_fn")


def test_areal_float64_and_per_token_advantages():
    """Float64 direct call against the reference to 1e-12; at sequence level with per-token
    advantages the shim is the spec's sapo-seq, AReaL's own averages them (documented)."""
    sa = _integration("areal")
    logp, old, adv, mask = _batch(2, per_row=False)
    for level, method in (("token", "sapo"), ("sequence", "sapo-seq")):
        loss, grad = _loss_and_grad(
            lambda lp, level=level: sa.sapo_loss_fn(lp, old, adv, 1.0, 1.05, mask, level)[0], logp
        )
        want_loss, want_grad = _reference(
            logp, old, adv, mask, method=method, loss_agg="token-mean"
        )
        _close(loss, want_loss, F64, f"{level} loss")
        _close(grad, want_grad, F64, f"{level} gradient")
    own = sa._AREAL_SAPO(logp, old, adv, 1.0, 1.05, mask, "sequence")[0]
    # AReaL's gate takes the temperature from the sign of the row's mean advantage.
    assert abs(float(own) - want_loss) > 1e-6


def test_areal_install_is_reversible():
    sa = _integration("areal")
    try:
        actor = importlib.import_module("areal.trainer.ppo.actor")
    except ImportError as err:
        pytest.skip(f"areal.trainer.ppo.actor does not import: {err}")
    from areal.utils.functional import sapo_loss_fn as own

    sa.install()
    assert actor.sapo_loss_fn is sa.sapo_loss_fn
    sa.uninstall()
    assert actor.sapo_loss_fn is own


# --------------------------------------------------------------------------------------------
# Trinity-RFT
# --------------------------------------------------------------------------------------------

TRINITY_MODES = [
    "token-mean",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
]


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("mode", TRINITY_MODES)
def test_trinity_registry_instantiate_call(mode, level):
    """Looked up in Trinity's registry (name and dotted path), built with default_args the way
    Trinity's config validator and loss wrapper do, called with verl's key names."""
    st = _integration("trinity")
    from trinity.algorithm import POLICY_LOSS_FN

    cls = POLICY_LOSS_FN.get("sapo_ref")
    assert cls is st.SapoRefPolicyLossFn
    assert POLICY_LOSS_FN.get("sapo_torch.integrations.trinity.SapoRefPolicyLossFn") is cls
    args = {**cls.default_args(), "loss_agg_mode": mode, "importance_sampling_level": level}
    fn = cls(backend="verl", **args)
    assert sorted(fn.select_keys) == ["advantages", "old_log_probs", "response_mask"]
    logp, old, adv, mask = _batch(3, per_row=False)

    def call(lp):
        loss, metrics = fn(
            logprob=lp,
            old_log_probs=old,
            response_mask=mask.long(),
            advantages=adv,
            ref_log_prob=old,
            unrelated=1,
        )
        assert all(isinstance(v, float) for v in metrics.values())
        return loss

    loss, grad = _loss_and_grad(call, logp)
    method = {"token": "sapo", "sequence": "sapo-seq"}[level]
    options = {"method": method, "loss_agg": mode}
    if mode != "token-mean":
        options["count_empty_rows"] = True
    scale = 1.0
    if mode == "seq-mean-token-sum-norm":
        options["norm_length"] = float(mask.shape[1])
        scale = float(mask.shape[0])  # Trinity: token sum / T, the spec's clause 3.5 times R
    want_loss, want_grad = _reference(logp, old, adv, mask, **options)
    _close(loss, scale * want_loss, F64, "loss")
    _close(grad, scale * want_grad, F64, "gradient")


@pytest.mark.parametrize("mode", TRINITY_MODES[:3])
def test_trinity_own_sapo_is_the_detached_gate(mode):
    """Trinity's own SAPOPolicyLossFn has gradient -c A f where the shim's is -c A w r: the
    two gradients differ exactly by the factor f / (w r) per token (sapo_ref's gates)."""
    st = _integration("trinity")
    from trinity.algorithm.policy_loss_fn.sapo_policy_loss import SAPOPolicyLossFn

    logp, old, adv, mask = _batch(4, per_row=False)
    kw = {"backend": "verl", "tau_pos": 1.0, "tau_neg": 1.05, "loss_agg_mode": mode}
    keys = {"old_log_probs": old, "response_mask": mask.long(), "advantages": adv}
    _, ours = _loss_and_grad(lambda lp: st.SapoRefPolicyLossFn(**kw)(logprob=lp, **keys)[0], logp)
    _, theirs = _loss_and_grad(lambda lp: SAPOPolicyLossFn(**kw)(logprob=lp, **keys)[0], logp)
    delta = torch.where(mask, logp - old, 0.0).numpy()
    parts = sapo_parts_signed(delta, adv.numpy() > 0, 1.0, 1.05)
    _close(
        theirs,
        np.where(mask.numpy(), ours.numpy() * parts.f / parts.dlog, 0.0),
        F64,
        "Trinity's gradient = shim's * f / (w r)",
    )


# --------------------------------------------------------------------------------------------
# Liger-Kernel
# --------------------------------------------------------------------------------------------


def _liger_inputs(seed: int, b=4, t=6, h=8, v=13):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=g)
    weight = 0.5 * torch.randn(v, h, generator=g)
    bias = 0.1 * torch.randn(v, generator=g)
    ids = torch.randint(0, v, (b, t), generator=g)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    lengths[2] = 0
    mask = (torch.arange(t)[None] < lengths[:, None]).int()
    adv = torch.randn(b, generator=g)
    with torch.no_grad():
        logp = torch.log_softmax(hidden @ weight.T + bias, -1).gather(-1, ids[..., None])[..., 0]
    old = logp + 0.3 * torch.randn(b, t, generator=g)
    return hidden, weight, bias, ids, mask, adv, old


def _grads(loss, *xs):
    return torch.autograd.grad(loss, xs)


LIGER_TYPES = {
    "sapo": {"method": "sapo", "loss_agg": "seq-mean-token-mean", "count_empty_rows": True},
    "grpo": {"method": "grpo", "loss_agg": "seq-mean-token-mean", "count_empty_rows": True},
    "bnpo": {"method": "grpo", "loss_agg": "token-mean"},
    "dr_grpo": {
        "method": "grpo",
        "loss_agg": "seq-mean-token-sum-norm",
        "norm_length": 6.0,
        "count_empty_rows": True,
    },
}


@pytest.mark.parametrize("loss_type", list(LIGER_TYPES))
def test_liger_gradient_reaches_head_and_hidden(loss_type):
    """Through Liger's chunked log-probs the gradient reaches hidden states, head weight and
    bias, and equals autograd through log_softmax of logits computed directly in float64 and
    the reference's loss; Liger's own fused GRPO loss gives the same numbers."""
    sl = _integration("liger")
    from liger_kernel.chunked_loss.grpo_loss import LigerFusedLinearGRPOLoss

    hidden, weight, bias, ids, mask, adv, old = _liger_inputs(5)
    xs = [x.clone().requires_grad_(True) for x in (hidden, weight, bias)]
    kw = {"beta": 0.0, "use_ref_model": False, "loss_type": loss_type, "max_completion_length": 6}
    loss, metrics = sl.SapoFusedLinearLoss(**kw)(
        *xs[:2], ids, mask, adv, bias=xs[2], old_per_token_logps=old
    )
    got = _grads(loss, *xs)
    assert len(metrics) == 1 and metrics[0].ndim == 0
    assert all(float(g.abs().sum()) > 0 for g in got)
    # Direct: float64 logits, log_softmax, canonical loss, autograd.
    ys = [x.double().requires_grad_(True) for x in (hidden, weight, bias)]
    logp = torch.log_softmax(ys[0] @ ys[1].T + ys[2], -1).gather(-1, ids[..., None])[..., 0]
    opts = LIGER_TYPES[loss_type]
    direct, _ = sapo_torch.policy_loss(logp, old.double(), adv.double(), mask.bool(), **opts)
    want = _grads(direct, *ys)
    _close(loss, float(direct.detach()), F32, "loss vs direct")
    for name, a, b in zip(("hidden", "weight", "bias"), got, want):
        _close(a, b.numpy(), F32, f"d loss / d {name} vs direct")
    # The reference on the same log-probabilities.
    ref_loss, _ = _reference(logp.detach(), old, adv, mask.bool(), **opts)
    _close(loss, ref_loss, F32, "loss vs sapo_ref")
    # Liger's own fused path (its analytic backward).
    zs = [x.clone().requires_grad_(True) for x in (hidden, weight, bias)]
    own, _ = LigerFusedLinearGRPOLoss(compiled=False, **kw)(
        *zs[:2], ids, mask, adv, bias=zs[2], old_per_token_logps=old
    )
    _close(loss, float(own), F32, "loss vs Liger")
    for name, a, b in zip(("hidden", "weight", "bias"), got, _grads(own, *zs)):
        _close(a, b.numpy(), F32, f"d loss / d {name} vs Liger")


@pytest.mark.parametrize("num_items", [None, 30.0])
def test_liger_dapo(num_items):
    """DAPO's denominator (the batch's tokens, or num_items_in_batch) against Liger's own."""
    sl = _integration("liger")
    from liger_kernel.chunked_loss.grpo_loss import LigerFusedLinearGRPOLoss

    hidden, weight, _, ids, mask, adv, old = _liger_inputs(16)
    kw = {"beta": 0.0, "use_ref_model": False, "loss_type": "dapo"}
    xs = [x.clone().requires_grad_(True) for x in (hidden, weight)]
    loss, _ = sl.SapoFusedLinearLoss(**kw)(
        *xs, ids, mask, adv, old_per_token_logps=old, num_items_in_batch=num_items
    )
    zs = [x.clone().requires_grad_(True) for x in (hidden, weight)]
    own, _ = LigerFusedLinearGRPOLoss(compiled=False, **kw)(
        *zs, ids, mask, adv, old_per_token_logps=old, num_items_in_batch=num_items
    )
    _close(loss, float(own), F32, "loss vs Liger")
    for a, b in zip(_grads(loss, *xs), _grads(own, *zs)):
        _close(a, b.numpy(), F32, "gradient vs Liger")


def test_liger_refuses_what_it_cannot_reproduce():
    sl = _integration("liger")
    for kw, what in (
        ({"loss_type": "cispo"}, "cispo"),
        ({"loss_type": "vespo"}, "vespo"),
        ({"importance_sampling_level": "sequence"}, "sequence-level"),
        ({"loss_type": "dr_grpo"}, "max_completion_length"),
        ({"use_bias_correction_kl": True}, "use_bias_correction_kl"),
    ):
        with pytest.raises(ValueError, match=what):
            sl.SapoFusedLinearLoss(**kw)


@pytest.mark.skipif(not HAS_TERMS, reason="sapo_torch has no weights/ref_logp yet (spec 0.2.0)")
@pytest.mark.parametrize("loss_type", ["sapo", "grpo"])
def test_liger_kl_and_vllm_ratio(loss_type):
    """beta > 0 (k3 against given reference log-probs) and the vLLM IS ratio as weights,
    against Liger's own fused loss."""
    sl = _integration("liger")
    from liger_kernel.chunked_loss.grpo_loss import LigerFusedLinearGRPOLoss

    hidden, weight, bias, ids, mask, adv, old = _liger_inputs(6)
    g = torch.Generator().manual_seed(7)
    ref = old + 0.2 * torch.randn(old.shape, generator=g)
    ratio = 0.5 + torch.rand(old.shape, generator=g)
    kw = {"beta": 0.04, "loss_type": loss_type}
    args = {
        "bias": bias,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
        "vllm_is_ratio": ratio,
    }
    xs = [x.clone().requires_grad_(True) for x in (hidden, weight)]
    loss, (kl, _) = sl.SapoFusedLinearLoss(**kw)(*xs, ids, mask, adv, **args)
    zs = [x.clone().requires_grad_(True) for x in (hidden, weight)]
    own, (own_kl, _) = LigerFusedLinearGRPOLoss(compiled=False, **kw)(*zs, ids, mask, adv, **args)
    _close(loss, float(own), F32, "loss vs Liger")
    _close(kl, float(own_kl), F32, "mean KL vs Liger")
    for a, b in zip(_grads(loss, *xs), _grads(own, *zs)):
        _close(a, b.numpy(), F32, "gradient vs Liger")


# --------------------------------------------------------------------------------------------
# torchforge (not installable here: only what needs no torchforge)
# --------------------------------------------------------------------------------------------

FORGE_AGG = {
    "sequence_mean": {"loss_agg": "seq-mean-token-mean", "count_empty_rows": True},
    "token_mean": {"loss_agg": "token-mean"},
    "fixed_horizon": {
        "loss_agg": "seq-mean-token-sum-norm",
        "norm_length": 7.0,
        "count_empty_rows": True,
    },
}


@pytest.mark.parametrize("agg_type", list(FORGE_AGG))
def test_torchforge_terms_against_reference(agg_type):
    """The shim's loss and its gradient w.r.t. the logits: the reference's dL/dlogp pulled back
    through log_softmax by hand (float64), for each of torchforge's aggregations."""
    tf = _integration("torchforge")
    g = torch.Generator().manual_seed(8)
    _, old, adv, mask = _batch(9)
    logits = torch.randn(5, 7, 11, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 11, (5, 7), generator=g)
    ids[~mask] = -100  # torchforge's ignore index at padding
    logits32 = logits.float().requires_grad_(True)
    loss, metrics = tf.sapo_loss_terms(
        logits32, ids, adv.float(), old.float(), mask.int(), agg_type=agg_type
    )
    (dlogits,) = torch.autograd.grad(loss, logits32)
    lsm = torch.log_softmax(logits32.detach().double(), -1)
    logp = torch.where(ids == -100, 0.0, lsm.gather(-1, ids.clamp(min=0)[..., None])[..., 0])
    want_loss, dlogp = _reference(
        logp, old.float(), adv.float(), mask, method="sapo", **FORGE_AGG[agg_type]
    )
    onehot = torch.nn.functional.one_hot(ids.clamp(min=0), 11).double()
    want = torch.from_numpy(dlogp)[..., None] * (onehot - lsm.exp())
    _close(loss, want_loss, F32, "loss")
    _close(dlogits, want.numpy(), F32, "d loss / d logits")
    keys = dict(metrics)
    assert {"loss/ratio/mean", "loss/kl_policy/mean", "loss/soft_gate/gate/mean"} <= set(keys)
    assert all(torch.is_tensor(v) and v.ndim == 0 for v in keys.values())


def test_torchforge_loss_scale_and_interface():
    """token_mean with loss_scale divides the token sum by it; the call signature is
    SAPOLoss.__call__'s; without torchforge the call raises a clear ModuleNotFoundError."""
    tf = _integration("torchforge")
    _, old, adv, mask = _batch(10)
    logits = torch.randn(5, 7, 11, generator=torch.Generator().manual_seed(11))
    ids = torch.randint(0, 11, (5, 7), generator=torch.Generator().manual_seed(12))
    mean, _ = tf.sapo_loss_terms(logits, ids, adv, old, mask, agg_type="token_mean")
    scaled, _ = tf.sapo_loss_terms(
        logits, ids, adv, old, mask, torch.tensor(40.0), agg_type="token_mean"
    )
    _close(scaled, float(mean) * float(mask.sum()) / 40.0, F32, "loss_scale")
    params = list(inspect.signature(tf.SapoRefLoss.__call__).parameters)[1:]
    assert params == [
        "logits",
        "target_ids",
        "advantages",
        "generator_logprobs",
        "loss_mask",
        "loss_scale",
    ]
    try:
        importlib.import_module("forge.rl.loss.types")
    except ImportError:
        with pytest.raises(ModuleNotFoundError, match="torchforge"):
            tf.SapoRefLoss()(logits, ids, adv, old, mask)
    else:  # torchforge present: the object torchforge's trainer reads
        out = tf.SapoRefLoss()(logits, ids, adv, old, mask)
        from forge.rl.loss.types import LossOutput

        assert isinstance(out, LossOutput) and out.loss.ndim == 0


# --------------------------------------------------------------------------------------------
# ms-swift
# --------------------------------------------------------------------------------------------


def _swift_trainer(ss, **options):
    """A stand-in ms-swift GRPOTrainer: ms-swift's own loss-path methods (``_compute_loss``,
    ``_compute_loss_single``, ``_update_metrics``, ...) on an object holding only the attributes
    they read; the log-prob provider returns the given log-probabilities."""
    from collections import defaultdict
    from types import SimpleNamespace

    from accelerate import Accelerator

    own = ss._grpo.GRPOTrainer
    names = (
        "_compute_rollout_offpolicy_metrics",
        "_compute_is_correction_metrics",
        "_apply_rollout_importance_sampling",
        "_compute_sequence_level_ratios",
        "_compute_loss",
        "_compute_loss_single",
        "_update_metrics",
        "_undo_gradient_accumulation_scaling",
        "_get_rollout_is_correction",
    )
    body = {n: getattr(own, n) for n in names}
    body["_get_per_token_logps_and_entropies"] = (
        lambda self, model, inputs, batch, compute_entropy: (inputs["logp"], inputs.get("entropy"))
    )
    stand = type("Stand", (ss.SapoRefLossMixin,), body)()
    defaults = dict(
        model=SimpleNamespace(training=True),
        template=SimpleNamespace(padding_free=False),
        args=SimpleNamespace(
            per_device_train_batch_size=5,
            per_device_eval_batch_size=5,
            delta=None,
            gradient_accumulation_steps=1,
            log_entropy=False,
            top_entropy_quantile=1.0,
        ),
        dynamic_num_samples=False,
        compute_entropy=False,
        beta=0.0,
        kl_in_reward=False,
        loss_type="sapo",
        importance_sampling_level="token",
        tau_pos=1.0,
        tau_neg=1.05,
        epsilon_low=0.2,
        epsilon_high=0.28,
        max_completion_length=7,
        overlong_filter=False,
        top_entropy_quantile=1.0,
        rollout_importance_sampling_mode=None,
        log_rollout_offpolicy_metrics=False,
        disable_rollout_importance_sampling=False,
        off_policy_sequence_mask_delta=None,
        _has_teacher=False,
        sdar_loss_coef=0.0,
        chord_sft_iterator=None,
        use_liger_loss=False,
        accelerator=Accelerator(cpu=True),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _logs={"entropy": []},
        model_accepts_loss_kwargs=False,
        compute_loss_func=None,
        real_tau=1.0,
        rollout_importance_sampling_threshold=2.0,
        current_gradient_accumulation_steps=1,
        num_generations=5,
    )
    for k, v in {**defaults, **options}.items():
        setattr(stand, k, v)
    return stand


SWIFT_CASES = {
    ("sapo", "token"): {
        "method": "sapo",
        "loss_agg": "seq-mean-token-mean",
        "count_empty_rows": True,
    },
    ("sapo", "sequence"): {
        "method": "sapo-seq",
        "loss_agg": "seq-mean-token-mean",
        "count_empty_rows": True,
    },
    ("grpo", "token"): {
        "method": "grpo",
        "loss_agg": "seq-mean-token-mean",
        "count_empty_rows": True,
    },
    ("grpo", "sequence"): {
        "method": "gspo",
        "loss_agg": "seq-mean-token-mean",
        "count_empty_rows": True,
    },
    ("grpo", "sequence_token"): {
        "method": "gspo-token",
        "loss_agg": "seq-mean-token-mean",
        "count_empty_rows": True,
    },
    ("bnpo", "token"): {"method": "grpo", "loss_agg": "token-mean"},
    ("dr_grpo", "token"): {
        "method": "grpo",
        "loss_agg": "seq-mean-token-sum-norm",
        "norm_length": 7.0,
        "count_empty_rows": True,
    },
}


@pytest.mark.parametrize("case", list(SWIFT_CASES), ids=lambda c: "-".join(c))
def test_swift_compute_loss(case):
    """ms-swift's ``_compute_loss(model, model_inputs, grpo_batch, origin_data)`` with the
    shim's ``_compute_loss_and_metrics``: loss and gradient against the reference and against
    ms-swift's own loss method on the same stand-in; ms-swift's metric consumer reads ours."""
    ss = _integration("swift")
    from swift.rl_core.data import GRPOBatch

    loss_type, level = case
    logp, old, adv, mask = _batch(12, per_row=False)
    opts = {"loss_type": loss_type, "importance_sampling_level": level}
    if loss_type != "sapo":
        opts["epsilon_high"] = 0.2 if level != "token" else 0.28
    batch = GRPOBatch(
        completion_mask=mask,
        truncated_mask=torch.zeros(5, dtype=torch.bool),
        seq_lengths=mask.sum(1),
        old_per_token_logps=old,
        advantages=adv,
    )
    stand = _swift_trainer(ss, **opts)
    loss, grad = _loss_and_grad(
        lambda lp: stand._compute_loss(None, {"logp": lp, "input_ids": mask.long()}, batch), logp
    )
    ref_opts = dict(SWIFT_CASES[case])
    if loss_type != "sapo":
        ref_opts.update(eps_low=0.2, eps_high=opts["epsilon_high"])
    want_loss, want_grad = _reference(logp, old, adv, mask, **ref_opts)
    _close(loss, want_loss, F64, "loss vs sapo_ref")
    _close(grad, want_grad, F64, "gradient vs sapo_ref")
    metrics = stand._metrics["train"]
    assert "sapo_ref/ratio/mean" in metrics
    if loss_type != "sapo":
        assert {"clip_ratio/low_mean", "clip_ratio/region_mean"} <= set(metrics)
    # ms-swift's own loss on the same stand-in (agrees where its per-token advantages are the
    # spec's: always here, no clamp triggered at |log-ratio| < 2).
    own = ss._grpo.GRPOTrainer._compute_loss_and_metrics
    own_loss, own_grad = _loss_and_grad(
        lambda lp: own(stand, None, {"logp": lp, "input_ids": mask.long()}, batch)[0], logp
    )
    _close(loss, float(own_loss), F64, "loss vs ms-swift")
    _close(grad, own_grad.numpy(), F64, "gradient vs ms-swift")


SWIFT_OPTIONS = {
    "kl-entropy-mask-overlong": dict(
        beta=0.04,
        compute_entropy=True,
        top_entropy_quantile=0.6,
        overlong_filter=True,
        log_entropy=True,
    ),
    "dapo-accumulation": dict(loss_type="dapo", current_gradient_accumulation_steps=3),
    "rollout-is-token-truncate": dict(rollout_importance_sampling_mode="token_truncate"),
    "rollout-is-sequence-mask-grpo": dict(
        loss_type="grpo", rollout_importance_sampling_mode="sequence_mask"
    ),
}


@pytest.mark.skipif(not HAS_TERMS, reason="sapo_torch has no weights/ref_logp yet (spec 0.2.0)")
@pytest.mark.parametrize("name", list(SWIFT_OPTIONS))
def test_swift_loss_shaping_options(name):
    """The options that shape ms-swift's loss beyond the policy term (KL to the reference,
    entropy mask, overlong filter, DAPO's window normaliser under accumulation, rollout IS
    weights) against ms-swift's own loss on the same stand-in; ms-swift's logs kept."""
    ss = _integration("swift")
    from swift.rl_core.data import GRPOBatch

    opts = dict(SWIFT_OPTIONS[name])
    log_entropy = opts.pop("log_entropy", False)
    logp, old, adv, mask = _batch(14, per_row=False)
    g = torch.Generator().manual_seed(15)
    batch = GRPOBatch(
        completion_mask=mask,
        truncated_mask=torch.tensor([False, False, True, False, False]),
        seq_lengths=mask.sum(1),
        old_per_token_logps=old,
        ref_per_token_logps=old + 0.3 * torch.randn(old.shape, generator=g, dtype=old.dtype),
        rollout_per_token_logps=old + 0.2 * torch.randn(old.shape, generator=g, dtype=old.dtype),
        advantages=adv,
        num_items_in_batch=torch.tensor(2.5 * float(mask.sum()), dtype=torch.float64),
    )
    entropy = torch.rand(mask.shape, generator=g, dtype=torch.float64)
    inputs = {"input_ids": mask.long(), "entropy": entropy}
    stand = _swift_trainer(ss, **opts)
    stand.args.log_entropy = log_entropy
    stand.args.top_entropy_quantile = stand.top_entropy_quantile

    def ours(lp):
        return stand._compute_loss(None, {**inputs, "logp": lp}, batch)

    def theirs(lp):
        own = ss._grpo.GRPOTrainer._compute_loss_and_metrics
        return own(stand, None, {**inputs, "logp": lp}, batch)[0]

    loss, grad = _loss_and_grad(ours, logp)
    own_loss, own_grad = _loss_and_grad(theirs, logp)
    _close(loss, float(own_loss), F64, "loss vs ms-swift")
    _close(grad, own_grad.numpy(), F64, "gradient vs ms-swift")
    logged = set(stand._metrics["train"])
    if "beta" in opts:
        assert {"kl", "entropy/mean", "entropy/threshold", "sapo_ref/kl_ref/mean"} <= logged
        assert "sapo_ref/weights/mean" in logged
    if "rollout_importance_sampling_mode" in opts:
        assert any(k.startswith("rollout_correction/") for k in logged)
        assert "sapo_ref/weights/mean" in logged


def test_swift_refuses_what_it_cannot_reproduce():
    ss = _integration("swift")
    logp, old, adv, mask = _batch(13, per_row=False)
    from swift.rl_core.data import GRPOBatch

    batch = GRPOBatch(
        completion_mask=mask,
        truncated_mask=torch.zeros(5, dtype=torch.bool),
        seq_lengths=mask.sum(1),
        old_per_token_logps=old,
        ref_per_token_logps=old,
        rollout_per_token_logps=old,
        advantages=adv,
    )
    for opts, what in (
        ({"loss_type": "cispo"}, "cispo"),
        ({"importance_sampling_level": "sequence_token"}, "sequence_token"),
        ({"off_policy_sequence_mask_delta": 0.1}, "off_policy"),
        ({"use_liger_loss": True}, "Liger"),
        ({"beta": 0.04, "rollout_importance_sampling_mode": "token_truncate"}, "beta"),
    ):
        with pytest.raises(ValueError, match=what):
            _swift_trainer(ss, **opts)._compute_loss(
                None, {"logp": logp, "input_ids": mask.long()}, batch
            )


def test_gates_reference_is_independent_of_the_shims():
    """Sanity of the oracle used above: sapo_ref's gate at r = 1 is 2/tau with w = 1."""
    p = sapo_parts(np.zeros(2), 1.05)
    assert np.allclose(p.f, 2 / 1.05) and np.allclose(p.w, 1.0)
