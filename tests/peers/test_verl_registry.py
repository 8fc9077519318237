"""``sapo_torch.integrations.verl`` against verl's own policy losses, inside verl's registry.

For every registered loss, every ``loss_agg_mode``, with and without rollout IS weights and
with and without global batch info, the loss and its autograd gradient are compared with an
independent computation, in float64, on inputs where verl's own deviations (the +-20 log-ratio
clamp, GSPO's log s <= 10 clamp, NaN padding, empty batches) are not triggered:

- ``sapo_ref_grpo`` with verl's ``vanilla``, ``sapo_ref_gspo_token`` with verl's ``gspo``
  (both honour ``loss_agg_mode``), ``sapo_ref_sapo`` with verl's ``sapo`` under
  ``seq-mean-token-mean`` (the one mode verl's SAPO computes), all called through
  ``get_policy_loss_fn``;
- ``sapo_ref_sapo`` in the other modes: verl's SAPO term aggregated with verl's ``agg_loss``,
  sum_it c_it w_it l_it, where c = d agg_loss / d loss_mat is read from verl's ``agg_loss`` by
  autograd and the per-token terms come from verl's ``sapo`` on the batch reshaped to one
  token per row (its ``rollout_is_weights`` carry c w);
- ``sapo_ref_sapo_seq`` (verl has no sequence SAPO) and ``sapo_ref_gspo`` (verl's GSPO is the
  token form; equal to it only under seq-mean-token-mean, row-constant advantages and no IS
  weights, checked directly): the reference :func:`sapo_ref.policy_loss` (NumPy, closed-form
  gradient) with ``weights`` = c w from verl's ``agg_loss``.

Tolerance: |difference| <= 1e-13 * max(1, |value|) for the value and 1e-13 * max(1, max |grad|)
for every gradient entry: sums of ~50 float64 terms accumulate ~1e-15 of rounding; measured maxima
are printed with ``-s`` and listed in docs/integrations/verl.md.

Also: verl's actor loss ``verl.workers.utils.losses.ppo_loss`` on a packed batch with
``policy_loss.loss_mode`` set to ours vs verl's (loss, gradient, verl's metric values); float32
(1e-6 relative); the config line resolving to our function, in this process and in a fresh one
(``VERL_USE_EXTERNAL_MODULES``); bad config values raising with the field's name; the version
check; idempotent registration; the module's doctests.

Opt-in: ``bash tools/setup_peers.sh`` then ``.venv-peers/bin/python -m pytest -m trainers
tests/peers/test_verl_registry.py``.
"""

from __future__ import annotations

import inspect
import sys
import zlib
from typing import Any

import numpy as np
import pytest
import torch

import sapo_ref

pytestmark = [pytest.mark.trainers]

sv = pytest.importorskip("sapo_torch.integrations.verl", exc_type=ImportError)
from verl.trainer.ppo.core_algos import agg_loss, get_policy_loss_fn  # noqa: E402
from verl.workers.config import ActorConfig, PolicyLossConfig  # noqa: E402

TOL = 1e-13
MODES = list(sv.LOSS_AGG_MODES)
N, T = 6, 9
#: Measured max |difference| per case, printed at the end of the run (for the docs).
MEASURED: dict[str, tuple[float, float]] = {}


def _actor(**fields: Any) -> ActorConfig:
    # The batch-size fields are required by ActorConfig's validation and unused by the losses.
    return ActorConfig(
        strategy="fsdp",
        ppo_mini_batch_size=1,
        ppo_micro_batch_size_per_gpu=1,
        rollout_n=1,
        **fields,
    )


def _batch(seed: int, per_token_advantages: bool) -> dict[str, torch.Tensor]:
    """Random float64 batch: |log r| <= 1.5 (inside every verl clamp; clip and dual clip are
    active on some tokens), ragged rows and one empty row (right padding, as verl's)."""
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    old = -torch.rand(N, T, generator=g, dtype=f64) * 3 - 0.05
    logp = old + (torch.rand(N, T, generator=g, dtype=f64) * 3 - 1.5)
    lengths = torch.tensor([T, 5, 1, 0, 7, 3])
    mask = torch.arange(T)[None, :] < lengths[:, None]
    if per_token_advantages:
        adv = torch.randn(N, T, generator=g, dtype=f64)
    else:
        adv = torch.randn(N, 1, generator=g, dtype=f64).expand(N, T).clone()
    weights = torch.rand(N, T, generator=g, dtype=f64) * 2
    return {"logp": logp, "old": old, "adv": adv, "mask": mask, "weights": weights}


INFOS = {
    "local": {},  # verl's default without the engine: local counts, dp_size 1
    "global": {
        "dp_size": 2,
        "batch_num_tokens": 61,
        "global_batch_size": 15,
        "loss_scale_factor": 11,
    },
    "global3": {
        "dp_size": 3,
        "batch_num_tokens": 40,
        "global_batch_size": 9,
        "loss_scale_factor": None,
    },
}
CONFIG = {
    "clip_ratio_low": 0.2,
    "clip_ratio_high": 0.28,
    "clip_ratio_c": 1.6,
    "tau_pos": 1.3,
    "tau_neg": 2.1,
}


def _coefficients(mode: str, mask: torch.Tensor, info: dict) -> torch.Tensor:
    """c_it = d agg_loss / d loss_mat_it: verl's own aggregation weights (agg_loss is linear)."""
    x = torch.zeros(mask.shape, dtype=torch.float64, requires_grad=True)
    agg_loss(x, mask, mode, **info).backward()
    return x.grad


def _verl_sapo_terms(batch, weights: torch.Tensor) -> torch.Tensor:
    """sum_it weights_it l_it with verl's own SAPO term: one token per row, global batch size 1."""
    one = _actor(
        **{k: CONFIG[k] for k in ("tau_pos", "tau_neg")}, global_batch_info={"global_batch_size": 1}
    )
    loss, _ = get_policy_loss_fn("sapo")(
        old_log_prob=batch["old"].reshape(-1, 1),
        log_prob=batch["logp"].reshape(-1, 1),
        advantages=batch["adv"].reshape(-1, 1),
        response_mask=batch["mask"].reshape(-1, 1),
        loss_agg_mode="seq-mean-token-mean",
        config=one,
        rollout_is_weights=weights.reshape(-1, 1),
    )
    return loss


def _reference(method: str, batch, weights: torch.Tensor) -> tuple[float, np.ndarray]:
    """sum_it weights_it l_it by the reference: seq-mean-token-sum over the local non-empty rows
    R, times R."""
    mask = batch["mask"].numpy()
    rows = float(mask.any(axis=1).sum())
    res = sapo_ref.policy_loss(
        batch["logp"].detach().numpy(),
        batch["old"].numpy(),
        batch["adv"].numpy(),
        mask,
        method=method,
        loss_agg="seq-mean-token-sum",
        **sv.loss_options(method, _actor(**CONFIG)),
        weights=weights.numpy(),
    )
    return res.loss * rows, np.asarray(res.grad) * rows


def _loss_and_grad(name: str, batch, mode: str, cfg, weights):
    """``get_policy_loss_fn(name)`` called as verl's actor calls it: (loss, d loss/d logp, metrics)."""
    logp = batch["logp"].clone().requires_grad_()
    loss, metrics = get_policy_loss_fn(name)(
        old_log_prob=batch["old"],
        log_prob=logp,
        advantages=batch["adv"],
        response_mask=batch["mask"],
        loss_agg_mode=mode,
        config=cfg,
        rollout_is_weights=weights,
    )
    (grad,) = torch.autograd.grad(loss, logp)
    return loss, grad, metrics


CASES = [
    pytest.param(name, mode, is_w, info, per_token, id=f"{name}-{mode}-{is_w}-{info}-{adv}-adv")
    for name in sv.LOSS_MODES
    for mode in MODES
    for is_w in ("no-is", "is")
    for info in INFOS
    for per_token, adv in ((False, "row"), (True, "token"))
    # Sequence methods take GRPO's row-constant advantages (a sequence has one advantage).
    if not (per_token and name in ("sapo_ref_sapo_seq", "sapo_ref_gspo"))
]


@pytest.mark.clause("3.2", "3.3", "3.4", "3.5", "3.6", "3.8", "10.1")
@pytest.mark.filterwarnings("ignore:sapo_ref_sapo honours loss_agg_mode")
@pytest.mark.parametrize(("name", "mode", "is_weights", "info", "per_token"), CASES)
def test_against_verl(name, mode, is_weights, info, per_token):
    batch = _batch(zlib.crc32(f"{name}{mode}{is_weights}{info}{per_token}".encode()), per_token)
    cfg = _actor(**CONFIG, global_batch_info=dict(INFOS[info]))
    w = batch["weights"] if is_weights == "is" else None
    ours, grad, metrics = _loss_and_grad(name, batch, mode, cfg, w)  # through verl's registry
    # The independent computation.
    direct = {"sapo_ref_grpo": "vanilla", "sapo_ref_gspo_token": "gspo"}.get(name)
    if name == "sapo_ref_sapo" and mode == "seq-mean-token-mean":
        direct = "sapo"
    if name == "sapo_ref_gspo" and mode == "seq-mean-token-mean" and w is None:
        direct = "gspo"
    if direct is not None:
        expected, expected_grad, _ = _loss_and_grad(direct, batch, mode, cfg, w)
        expected = expected.item()
    else:
        c = _coefficients(mode, batch["mask"], INFOS[info])
        cw = c if w is None else c * w
        if name == "sapo_ref_sapo":
            logp_v = batch["logp"].clone().requires_grad_()
            loss_v = _verl_sapo_terms({**batch, "logp": logp_v}, cw)
            (expected_grad,) = torch.autograd.grad(loss_v, logp_v)
            expected = loss_v.item()
        else:
            method = sv.LOSS_MODES[name].sapo_method
            expected, g = _reference(method, batch, cw)
            expected_grad = torch.from_numpy(g)
    dv = abs(ours.item() - expected)
    dg = (grad - expected_grad).abs().max().item()
    MEASURED[f"{name} {mode} {is_weights} {info} {'token' if per_token else 'row'}-adv"] = (dv, dg)
    assert dv <= TOL * max(1.0, abs(expected)), (ours.item(), expected)
    assert dg <= TOL * max(1.0, expected_grad.abs().max().item())
    assert set(sv.VERL_METRIC_KEYS) <= set(metrics)


def test_print_measured(capsys):
    """Runs after the comparisons: max |difference| (loss, gradient entry) per registered loss
    and loss_agg_mode, without and with IS weights, as a Markdown table for the docs."""
    if not MEASURED:
        pytest.skip("no comparison ran")
    table: dict[tuple[str, str, str], list[float]] = {}
    for key, (dv, dg) in MEASURED.items():
        name, mode, is_w = key.split()[:3]
        cell = table.setdefault((name, mode, is_w), [0.0, 0.0])
        cell[0], cell[1] = max(cell[0], dv), max(cell[1], dg)
    with capsys.disabled():
        print("\n| loss_mode | loss_agg_mode | no IS: loss, grad | IS: loss, grad |")
        print("|---|---|---|---|")
        for name in sv.LOSS_MODES:
            for mode in MODES:
                cells = [table.get((name, mode, w)) for w in ("no-is", "is")]
                text = [f"{c[0]:.1e}, {c[1]:.1e}" if c else "-" for c in cells]
                print(f"| `{name}` | `{mode}` | {text[0]} | {text[1]} |")


# -- Through verl's actor loss: the config selects our function --------------------------------

P = 2  # prompt length of the packed batch


def _actor_data(batch, weights: torch.Tensor | None, info: dict):
    """The TensorDict verl's engine hands ``ppo_loss``: packed (prompt + response) log-probs of
    the current policy, padded old log-probs, advantages and mask, and the global counts."""
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu

    mask = batch["mask"]
    lengths = mask.sum(-1)
    starts = torch.cumsum(torch.cat([torch.zeros(1, dtype=torch.long), (P + lengths)[:-1]]), 0)
    # verl reads the log-prob of response token j of row i at start_i + P - 1 + j (shifted by one).
    index = (starts[:, None] + P - 1 + torch.arange(T)[None, :])[mask]
    logp = batch["logp"].clone().requires_grad_()
    flat = torch.zeros(int((P + lengths).sum()), dtype=logp.dtype).index_put((index,), logp[mask])
    fields = {
        "prompts": torch.ones(N, P, dtype=torch.long),
        "responses": torch.ones(N, T, dtype=torch.long),
        "attention_mask": torch.cat([torch.ones(N, P, dtype=torch.long), mask.long()], 1),
        "response_mask": mask.long(),
        "old_log_probs": batch["old"],
        "advantages": batch["adv"],
    }
    if weights is not None:
        fields["rollout_is_weights"] = weights
    data = TensorDict(fields, batch_size=[N])
    tu.assign_non_tensor(data, **info)
    return logp, {"log_probs": flat}, data


VERL_FLOAT32 = ("actor/pg_clipfrac", "actor/pg_clipfrac_lower")
ACTOR_PAIRS = [
    ("sapo_ref_sapo", "sapo", ["seq-mean-token-mean"]),
    ("sapo_ref_grpo", "vanilla", MODES),
    ("sapo_ref_gspo_token", "gspo", MODES),
]


@pytest.mark.clause("3.8", "7.1", "10.1")
@pytest.mark.parametrize("is_weights", ["no-is", "is"])
@pytest.mark.parametrize(
    ("ours", "theirs", "mode"),
    [pytest.param(o, t, m, id=f"{o}-{m}") for o, t, modes in ACTOR_PAIRS for m in modes],
)
def test_actor_ppo_loss(ours, theirs, mode, is_weights):
    """verl's ``ppo_loss`` (what its engine workers run per micro-batch) with
    ``policy_loss.loss_mode`` set to our name, against the same call with verl's own loss:
    loss, gradient and verl's metric values."""
    from verl.workers.utils.losses import ppo_loss

    batch = _batch(zlib.crc32(f"actor{ours}{mode}{is_weights}".encode()), False)
    w = batch["weights"] if is_weights == "is" else None
    info = {"dp_size": 2, "batch_num_tokens": 50, "global_batch_size": 10}
    results = []
    for loss_mode in (ours, theirs):
        cfg = _actor(
            **CONFIG,
            loss_agg_mode=mode,
            loss_scale_factor=12,
            policy_loss=PolicyLossConfig(loss_mode=loss_mode),
        )
        logp, output, data = _actor_data(batch, w, info)
        loss, metrics = ppo_loss(cfg, output, data)
        (grad,) = torch.autograd.grad(loss, logp)
        results.append((loss.item(), grad, {k: v.aggregate() for k, v in metrics.items()}))
    (ours_loss, ours_grad, ours_m), (loss, grad, m) = results
    assert abs(ours_loss - loss) <= TOL * max(1.0, abs(loss))
    assert (ours_grad - grad).abs().max().item() <= TOL * max(1.0, grad.abs().max().item())
    # verl computes its clip fractions in float32 (``.float()``, then / (count + 1e-8)): 1e-6.
    for key, tol in (
        *((k, 1e-6) for k in VERL_FLOAT32),
        ("actor/ppo_kl", TOL),
        ("actor/pg_loss", TOL),
    ):
        assert abs(ours_m[key] - m[key]) <= tol, key
    method = sv.LOSS_MODES[ours].sapo_method
    spec_keys = {k for k in ours_m if k.startswith("actor/sapo_ref/")}
    assert {"actor/sapo_ref/" + k for k in sapo_ref.metric_keys(method)} <= spec_keys


@pytest.mark.parametrize("name", list(sv.LOSS_MODES))
def test_config_selects_our_function(name):
    """One line of verl config, ``actor.policy_loss.loss_mode``, is what verl looks up."""
    cfg = _actor(policy_loss=PolicyLossConfig(loss_mode=name))
    assert get_policy_loss_fn(cfg.policy_loss.get("loss_mode", "vanilla")) is sv.LOSS_MODES[name]


@pytest.mark.parametrize("name", list(sv.LOSS_MODES))
def test_signature_is_verls(name):
    theirs = inspect.signature(get_policy_loss_fn("vanilla")).parameters
    ours = inspect.signature(sv.LOSS_MODES[name]).parameters
    assert [(p.name, p.kind) for p in ours.values()] == [(p.name, p.kind) for p in theirs.values()]
    assert ours["config"].default is None and ours["rollout_is_weights"].default is None


# -- Errors -----------------------------------------------------------------------------------

BAD = [
    ("sapo_ref_sapo", {"tau_pos": 0.0}, {}, "token-mean", ValueError, r"field tau_pos=0\.0"),
    ("sapo_ref_sapo_seq", {"tau_neg": float("nan")}, {}, "token-mean", ValueError, "tau_neg"),
    ("sapo_ref_grpo", {"clip_ratio_high": -0.1}, {}, "token-mean", ValueError, "clip_ratio_high"),
    (
        "sapo_ref_grpo",
        {"clip_ratio_low": None, "clip_ratio": -1.0},
        {},
        "token-mean",
        ValueError,
        r"field clip_ratio=-1\.0",
    ),
    ("sapo_ref_grpo", {"clip_ratio_c": 1.0}, {}, "token-mean", ValueError, "clip_ratio_c"),
    ("sapo_ref_gspo", {"clip_ratio_low": "0.2"}, {}, "token-mean", TypeError, "clip_ratio_low"),
    ("sapo_ref_grpo", {}, {}, "mean", ValueError, "loss_agg_mode must be one of"),
    ("sapo_ref_grpo", {}, {"dp_size": 2}, "token-mean", ValueError, "batch_num_tokens"),
    ("sapo_ref_sapo", {}, {"dp_size": 2}, "seq-mean-token-mean", ValueError, "global_batch_size"),
    ("sapo_ref_grpo", {}, {"dp_size": 0}, "token-mean", ValueError, "dp_size"),
    (
        "sapo_ref_grpo",
        {},
        {"loss_scale_factor": 0},
        "seq-mean-token-sum-norm",
        ValueError,
        "loss_scale_factor",
    ),
    ("sapo_ref_grpo", {}, {"batch_num_tokens": "61"}, "token-mean", TypeError, "batch_num_tokens"),
    (
        "sapo_ref_grpo",
        {},
        {"batch_num_tokens": 3},
        "token-mean",
        ValueError,
        r"global_batch_info \{'batch_num_tokens': 3\} does not fit this batch: .*fewer tokens",
    ),
]


@pytest.mark.clause("8.4")
@pytest.mark.parametrize(("name", "fields", "info", "mode", "error", "match"), BAD)
def test_bad_config_names_the_field(name, fields, info, mode, error, match):
    batch = _batch(1, False)
    cfg = _actor(**fields, global_batch_info=info)
    with pytest.raises(error, match=match):
        get_policy_loss_fn(name)(
            batch["old"], batch["logp"], batch["adv"], batch["mask"], mode, cfg
        )


def test_config_none():
    batch = _batch(1, False)
    with pytest.raises(ValueError, match="config must be verl's actor config"):
        sv.grpo(batch["old"], batch["logp"], batch["adv"], batch["mask"], "token-mean", None)


@pytest.mark.parametrize("version", ["0.8.3", "0.9.0", "0.10.0", "1.0.0", "unknown"])
def test_unsupported_verl_version(monkeypatch, version):
    import verl

    monkeypatch.setattr(verl, "__version__", version)
    with pytest.raises(
        ImportError, match=rf"supports verl >=0\.9\.1,<0\.10; installed: '{version}'"
    ):
        sv._import_verl()


def test_missing_verl(monkeypatch):
    for name in [m for m in sys.modules if m == "verl" or m.startswith("verl.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "verl", None)
    with pytest.raises(ModuleNotFoundError, match=r"needs verl >=0\.9\.1,<0\.10") as info:
        sv._import_verl()
    assert info.value.name == "verl"


def test_register_is_idempotent_and_guards_names():
    from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY

    assert sv.register() == sv.register() == tuple(sv.LOSS_MODES)
    assert all(POLICY_LOSS_REGISTRY[n] is f for n, f in sv.LOSS_MODES.items())
    POLICY_LOSS_REGISTRY["sapo_ref_grpo"] = get_policy_loss_fn("vanilla")
    try:
        with pytest.raises(ValueError, match="'sapo_ref_grpo' is already registered by verl"):
            sv.register()
    finally:
        POLICY_LOSS_REGISTRY["sapo_ref_grpo"] = sv.grpo


def test_sapo_warns_that_verls_sapo_ignores_the_mode():
    batch = _batch(2, False)
    sv._WARNED_SAPO_MODES.discard("seq-mean-token-sum")
    with pytest.warns(UserWarning, match="verl's own 'sapo' ignores it"):
        sv.sapo(
            batch["old"], batch["logp"], batch["adv"], batch["mask"], "seq-mean-token-sum", _actor()
        )


def test_enabled_in_a_fresh_verl_process():
    """What a verl worker process does: ``import verl`` imports the modules named in
    ``VERL_USE_EXTERNAL_MODULES`` (``model.external_lib`` goes through the same
    ``import_external_libs``), after which the config's loss_mode resolves to ours."""
    import os
    import subprocess

    code = (
        "from verl.trainer.ppo.core_algos import get_policy_loss_fn as g\n"
        "print(g('sapo_ref_sapo').__module__, g('sapo_ref_grpo').__name__)"
    )
    env = {
        **os.environ,
        "VERL_USE_EXTERNAL_MODULES": "sapo_torch.integrations.verl",
        "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
    }
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["sapo_torch.integrations.verl", "grpo"]


@pytest.mark.parametrize("policy", ["auto", "sapo_ref", "none"])
def test_installed_plugin_registers_on_import_verl(policy):
    """The one-line switch: sapo-ref declares the ``verl.plugins`` entry point ``sapo_ref``, which
    ``import verl`` loads (``VERL_USE_EXTERNAL_PLUGINS`` "auto" or naming it), so the config's
    loss_mode alone resolves to ours; "none" turns plugins off and the name is then unknown."""
    import os
    import subprocess

    code = (
        "import verl\n"
        "from verl.trainer.ppo.core_algos import get_policy_loss_fn as g\n"
        "try:\n    print(g('sapo_ref_sapo').__module__)\n"
        "except Exception as err:\n    print(type(err).__name__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "VERL_USE_EXTERNAL_MODULES"}
    env["VERL_USE_EXTERNAL_PLUGINS"] = policy
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    want = "sapo_torch.integrations.verl" if policy != "none" else "ValueError"
    assert out.stdout.split()[-1:] == [want], out.stdout + out.stderr


def test_dictconfig_actor_config():
    """verl's contract allows an OmegaConf DictConfig as ``config`` (its vanilla loss takes one)."""
    from omegaconf import OmegaConf

    batch = _batch(3, False)
    fields = {k: CONFIG[k] for k in ("clip_ratio_low", "clip_ratio_high", "clip_ratio_c")}
    info = {"dp_size": 2, "batch_num_tokens": 40, "global_batch_size": 9}
    dict_cfg = OmegaConf.create({"clip_ratio": 0.2, **fields, "global_batch_info": info})
    actor = _actor(**fields, global_batch_info=info)
    args = (batch["old"], batch["logp"], batch["adv"], batch["mask"], "seq-mean-token-sum")
    assert sv.grpo(*args, dict_cfg)[0].item() == sv.grpo(*args, actor)[0].item()
    expected = get_policy_loss_fn("vanilla")(*args, actor)[0].item()
    assert abs(sv.grpo(*args, dict_cfg)[0].item() - expected) <= TOL * max(1.0, abs(expected))


@pytest.mark.parametrize(
    ("ours", "theirs", "mode"),
    [pytest.param(o, t, m, id=f"{o}-{m}") for o, t, modes in ACTOR_PAIRS for m in modes],
)
def test_float32_against_verl(ours, theirs, mode):
    """float32, as verl's actor runs (log-probs in float32), with IS weights and global counts:
    1e-6 relative (~8 float32 ulps; measured up to 2.6e-7 for loss, 1.2e-7 for gradients)."""
    for seed in range(3):
        batch = {
            k: v.float() if v.is_floating_point() else v for k, v in _batch(seed, False).items()
        }
        cfg = _actor(**CONFIG, global_batch_info=dict(INFOS["global"]))
        (loss, grad, _), (expected, expected_grad, _) = (
            _loss_and_grad(name, batch, mode, cfg, batch["weights"]) for name in (ours, theirs)
        )
        assert loss.dtype == expected.dtype == torch.float32
        loss, expected = loss.item(), expected.item()
        assert abs(loss - expected) <= 1e-6 * max(1.0, abs(expected))
        scale = max(1.0, expected_grad.abs().max().item())
        assert (grad - expected_grad).abs().max().item() <= 1e-6 * scale


def test_module_examples():
    """The module's doctests (the main suite's doctest run skips it: verl is not installed there)."""
    import doctest

    result = doctest.testmod(sv, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
