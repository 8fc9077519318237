"""``SapoGRPOTrainer`` against TRL's own ``GRPOTrainer``, inside the real trainer (issue 13).

Both trainers run from the same saved tiny model (``trl_tiny``), the same seed and the same
options for a few optimizer steps; every number TRL logs (loss, grad norm, reward, entropy, kl,
clip ratios, evaluation loss, ...) must agree step by step to float32 rounding, and ours must
log the spec's metrics under ``sapo/`` on top. Options that need vLLM or tool calls are checked
on the loss method itself (ours against TRL's ``_compute_loss`` on the same inputs, loss and
every parameter gradient). Every option the canonical loss cannot reproduce must raise at
construction.

Tolerance. Everything is float32. A logged loss is a sum of at most N * T * K = 4 * 8 * 2 = 64
per-token terms (rows, completion length, accumulation steps); two correct float32 evaluations
that sum in different orders differ by at most about 64 * eps32 = 7.6e-6 relative to the sum of
magnitudes, which is O(1) here. Gradients and their norm inherit the same relative error through
the backward pass, and after a step the weights differ by the learning rate times that error,
so the next step's numbers start from a perturbation of the same size. Hence
``|ours - trl| <= 64 * eps32 * max(1, |trl|)`` for every logged number. SGD (not Adam) keeps the
steps linear in the gradient: Adam's first update is lr * sign(g), which turns a rounding-level
difference of a near-zero gradient component into a full-size one.

Opt-in (marker ``trainers``): ``.venv-peers/bin/python -m pytest -m trainers
tests/peers/test_trl_trainer.py``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = [pytest.mark.trainers]

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")

import sapo_torch  # noqa: E402
from sapo_torch.integrations import trl as integration  # noqa: E402
from sapo_torch.integrations.trl import SapoGRPOTrainer  # noqa: E402
from trl import GRPOTrainer  # noqa: E402

import sapo_ref  # noqa: E402
from peers import trl_tiny  # noqa: E402

EPS32 = float(np.finfo(np.float32).eps)
TOL = 64 * EPS32  # see the module docstring
LOSS_TYPES = ("sapo", "grpo", "bnpo", "dr_grpo", "dapo", "luspo")
LEVELS = ("token", "sequence")
# Wall-clock and throughput logs: not numbers of the loss.
TIMING = ("step_time", "_runtime", "_per_second")

# Max relative difference per compared case, written to $SAPO_TRL_DIFFS when set (report).
DIFFS: dict[str, dict[str, float]] = {}


@pytest.fixture(scope="module", autouse=True)
def _write_diffs():
    yield
    path = os.environ.get("SAPO_TRL_DIFFS")
    if path:
        Path(path).write_text(json.dumps(DIFFS, indent=1, sort_keys=True))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return trl_tiny.save_tiny(tmp_path_factory.mktemp("tiny"))


def _close(got: Any, want: Any) -> float | None:
    """Relative difference, or None when both are the same non-number (None, NaN)."""
    if want is None or got is None:
        assert got is want, (got, want)
        return None
    if math.isnan(want) or math.isnan(got):
        assert math.isnan(want) and math.isnan(got), (got, want)
        return None
    return abs(got - want) / max(1.0, abs(want))


def _compare(name: str, ours: list[dict], theirs: list[dict]) -> dict[str, float]:
    """Every number TRL logs, step by step; ours adds only ``sapo/`` keys."""
    assert len(ours) == len(theirs)
    worst: dict[str, float] = {}
    for step, (mine, ref) in enumerate(zip(ours, theirs)):
        missing = set(ref) - set(mine)
        assert not missing, f"step {step}: TRL logs {sorted(missing)}, SapoGRPOTrainer does not"
        added = {k for k in set(mine) - set(ref) if not k.removeprefix("eval_").startswith("sapo/")}
        assert not added, f"step {step}: unexpected keys {sorted(added)}"
        for key, want in ref.items():
            if any(t in key for t in TIMING) or not isinstance(want, (int, float, type(None))):
                continue
            diff = _close(mine[key], want)
            if diff is None:
                continue
            assert diff <= TOL, f"step {step} {key}: ours {mine[key]!r}, TRL {want!r}"
            worst[key] = max(worst.get(key, 0.0), diff)
    DIFFS[name] = worst
    return worst


def _run_both(tiny: Path, tmp_path: Path, name: str, **options: Any) -> list[dict]:
    theirs = trl_tiny.history(GRPOTrainer, tiny, tmp_path, **options)
    ours = trl_tiny.history(SapoGRPOTrainer, tiny, tmp_path, **options)
    _compare(name, ours, theirs)
    assert any("loss" in e for e in theirs) and any("grad_norm" in e for e in theirs)
    return ours


# Four variants per loss type and level: the axes of the brief (beta, entropy mask, gradient
# accumulation, num_iterations), plus steps_per_generation != accumulation (dapo's normaliser),
# truncated completions masked (empty rows), a dual clip and an evaluation pass.
VARIANTS = {
    "plain-ga2-iter2": dict(gradient_accumulation_steps=2, num_iterations=2),
    "beta-spg2-iter2": dict(
        beta=0.04, use_bias_correction_kl=False, steps_per_generation=2, num_iterations=2
    ),
    "entropy-ga2-emptyrows": dict(
        top_entropy_quantile=0.5, gradient_accumulation_steps=2, mask_truncated_completions=True
    ),
    "beta-entropy-ga2-iter2-delta-eval": dict(
        beta=0.04,
        use_bias_correction_kl=False,
        top_entropy_quantile=0.5,
        gradient_accumulation_steps=2,
        num_iterations=2,
        delta=1.5,
        eval_strategy="steps",
        eval_steps=2,
        per_device_eval_batch_size=4,
    ),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_steps_match_trl(tiny, tmp_path, loss_type, level, variant):
    options = VARIANTS[variant]
    ours = _run_both(
        tiny,
        tmp_path,
        f"{loss_type}/{level}/{variant}",
        loss_type=loss_type,
        importance_sampling_level=level,
        **options,
    )
    logged = {k for e in ours for k in e}
    method = integration.canonical_options(
        trl_tiny.config(tmp_path, loss_type=loss_type, importance_sampling_level=level)
    ).method
    for key in sapo_ref.metric_keys(method):
        assert "sapo/" + key in logged, key
    if options.get("eval_strategy"):
        assert "eval_loss" in logged and "eval_sapo/tokens" in logged


@pytest.mark.parametrize(
    "name, options",
    [
        ("entropy-bonus", dict(loss_type="sapo", entropy_coef=0.01, gradient_accumulation_steps=2)),
        (
            "adaptive-entropy",
            dict(
                loss_type="grpo",
                use_adaptive_entropy=True,
                entropy_coef=0.02,
                entropy_target=2.47,  # between the tiny model's entropies: the gate switches
                entropy_coef_delta=0.01,
                max_steps=4,
            ),
        ),
        ("clip-higher", dict(loss_type="dapo", epsilon_high=0.28, num_iterations=2)),
    ],
)
def test_trainer_terms_match_trl(tiny, tmp_path, name, options):
    ours = _run_both(tiny, tmp_path, name, **options)
    if options.get("entropy_coef"):
        assert any("policy_loss" in e for e in ours) and any("entropy_coef" in e for e in ours)


def test_off_policy_mask_matches_trl(tiny, tmp_path):
    _run_both(
        tiny,
        tmp_path,
        "off-policy-mask",
        loss_type="sapo",
        off_policy_mask_threshold=0.01,
        num_iterations=2,
        gradient_accumulation_steps=2,
    )


def test_moe_aux_loss_matches_trl(tmp_path):
    moe = trl_tiny.save_tiny(tmp_path / "moe", moe=True)
    ours = _run_both(moe, tmp_path, "moe-aux-loss", loss_type="grpo", gradient_accumulation_steps=2)
    assert any("aux_loss" in e for e in ours)


# -- two processes (gloo on CPU): dapo's process factor, the cross-process masks and metrics ----

DISTRIBUTED = {
    "dapo-entropy-kl": dict(
        loss_type="dapo",
        top_entropy_quantile=0.5,  # TRL's quantile is over the tokens of every process
        beta=0.04,
        use_bias_correction_kl=False,
        gradient_accumulation_steps=2,
        num_iterations=2,
    ),
    "sapo-seq-off-policy-entropy-bonus": dict(
        loss_type="sapo",
        importance_sampling_level="sequence",
        off_policy_mask_threshold=0.01,
        entropy_coef=0.01,
        gradient_accumulation_steps=2,
        num_iterations=2,
    ),
}


@pytest.mark.parametrize("name", list(DISTRIBUTED))
def test_two_processes_match_trl(tiny, tmp_path, name):
    out = tmp_path / "histories.json"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "peers.trl_tiny",
        str(tiny),
        str(out),
        json.dumps(DISTRIBUTED[name]),
    ]
    tests = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = json.loads(out.read_text())
    _compare(f"2-processes/{name}", runs["ours"], runs["trl"])
    # Our metrics reduced over both processes agree with TRL's own cross-process reductions.
    for step in runs["ours"]:
        if "sapo/rows" in step:
            assert step["sapo/rows"] == 8.0  # 4 rows on each process, none empty
        if "kl" in step:
            assert step["sapo/kl_ref/mean"] == pytest.approx(step["kl"], rel=TOL)


# -- options that need vLLM or tool calls: the loss method itself, on built inputs -----------


def _inputs(trainer: Any, level: str, seed: int = 3) -> dict[str, Any]:
    """A batch as TRL's generation step leaves it, with a vLLM ratio, sampling log-probs and a
    tool mask (0 on 'tool result' tokens): random, seeded, padded like TRL pads."""
    g = torch.Generator().manual_seed(seed)
    n, p, t = 4, 3, 6
    completion_ids = torch.randint(4, 12, (n, t), generator=g)
    completion_mask = torch.ones(n, t, dtype=torch.long)
    completion_mask[1, 4:] = 0
    completion_mask[2, 2:] = 0
    tool_mask = torch.ones(n, t, dtype=torch.long)
    tool_mask[0, 2:4] = 0
    tool_mask[3, 1] = 0
    with torch.no_grad():
        trainer.model.eval()
        ids = torch.cat([torch.full((n, p), 5), completion_ids], dim=1)
        att = torch.cat([torch.ones(n, p, dtype=torch.long), completion_mask], dim=1)
        logp, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, att, t)
    shape = (n, t) if level == "token" else (n, 1)
    return {
        "prompt_ids": torch.full((n, p), 5),
        "prompt_mask": torch.ones(n, p, dtype=torch.long),
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "tool_mask": tool_mask,
        "advantages": torch.tensor([1.0, -0.5, 0.75, -1.25]),
        "old_per_token_logps": logp + 0.3 * torch.randn(n, t, generator=g),
        "sampling_per_token_logps": logp + 0.3 * torch.randn(n, t, generator=g),
        "ref_per_token_logps": logp + 0.2 * torch.randn(n, t, generator=g),
        "importance_sampling_ratio": torch.rand(shape, generator=g) * 2.0,
        "num_items_in_batch": (completion_mask * tool_mask).sum(),
    }


def _loss_and_grads(trainer: Any, inputs: dict[str, Any], mode: str) -> tuple[float, list]:
    trainer.use_vllm = True  # what GRPOTrainer sets from args.use_vllm (vLLM is not installed)
    trainer.vllm_importance_sampling_correction = True
    trainer.current_gradient_accumulation_steps = 2
    trainer.model.train(mode == "train")
    trainer.model.zero_grad()
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    grads = [p.grad.clone() for p in trainer.model.parameters() if p.grad is not None]
    return loss.item(), grads


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_vllm_correction_and_tool_mask_match_trl(tiny, tmp_path, loss_type, level, mode):
    options = dict(
        loss_type=loss_type,
        importance_sampling_level=level,
        beta=0.04,
        use_bias_correction_kl=False,
        top_entropy_quantile=0.5,
        off_policy_mask_threshold=0.05,
        entropy_coef=0.01,
        steps_per_generation=2,
        gradient_accumulation_steps=2,
    )
    theirs = trl_tiny.trainer(GRPOTrainer, tiny, tmp_path / "trl", **options)
    ours = trl_tiny.trainer(SapoGRPOTrainer, tiny, tmp_path / "ours", **options)
    inputs = _inputs(theirs, level)
    want, want_grads = _loss_and_grads(theirs, inputs, mode)
    got, got_grads = _loss_and_grads(ours, inputs, mode)
    scale = max(1.0, abs(want))
    assert abs(got - want) <= TOL * scale, (got, want)
    worst = abs(got - want) / scale
    for g, w in zip(got_grads, want_grads, strict=True):
        gscale = max(1.0, w.abs().max().item())
        torch.testing.assert_close(g, w, rtol=0.0, atol=TOL * gscale)
        worst = max(worst, (g - w).abs().max().item() / gscale)
    DIFFS[f"direct/{loss_type}/{level}/{mode}"] = {"loss+grads": worst}
    for key in ("sapo/weights/mean", "sapo/kl_ref/mean", "kl", "entropy"):
        assert ours._metrics[mode][key], key
    # TRL's kl log and the spec's kl_ref/mean are the same mean of k3 over valid tokens.
    assert ours._metrics[mode]["sapo/kl_ref/mean"][-1] == pytest.approx(
        ours._metrics[mode]["kl"][-1], rel=TOL
    )


# -- options the canonical loss cannot reproduce: a clear error at construction ---------------


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(loss_type="cispo"), "loss_type='cispo'"),
        (dict(loss_type="vespo"), "loss_type='vespo'"),
        (dict(loss_type="sapo", beta=0.04), "use_bias_correction_kl"),
        (dict(loss_type="grpo", delta=1.1), "delta=1.1"),
        (dict(loss_type="dapo", delta=1.28, epsilon_high=0.28), "delta=1.28"),
        (dict(loss_type="grpo", importance_sampling_level="sequence_token"), "importance_sampling"),
    ],
)
def test_unsupported_options_raise_at_construction(tiny, tmp_path, options, match):
    # The options are checked before the model is touched: a stand-in model is never used.
    with pytest.raises(ValueError, match=match):
        trl_tiny.trainer(SapoGRPOTrainer, tiny, tmp_path / "ours", model=object(), **options)
    if options.get("importance_sampling_level") != "sequence_token":
        # TRL itself accepts these options (and computes a loss we cannot): the error is ours.
        trl_tiny.trainer(GRPOTrainer, tiny, tmp_path / "trl", **options)


def test_bias_correction_is_irrelevant_without_kl(tmp_path):
    # use_bias_correction_kl (TRL's default True) changes nothing when beta = 0: accepted.
    opts = integration.canonical_options(trl_tiny.config(tmp_path, loss_type="grpo", beta=0.0))
    assert (opts.method, opts.loss_agg) == ("grpo", "seq-mean-token-mean")


def test_metrics_can_be_switched_off(tiny, tmp_path):
    trainer = SapoGRPOTrainer(
        model=trl_tiny.load_model(tiny),
        reward_funcs=trl_tiny.reward,
        args=trl_tiny.config(tmp_path, loss_type="sapo", max_steps=1),
        train_dataset=trl_tiny.prompts(),
        processing_class=trl_tiny.build_tokenizer(),
        sapo_metrics=False,
    )
    trainer.train()
    logged = {k for e in trainer.state.log_history for k in e}
    assert "loss" in logged and "entropy" in logged
    assert not [k for k in logged if k.startswith("sapo/")]
    with pytest.raises(TypeError, match="sapo_metrics must be a bool"):
        SapoGRPOTrainer(model=object(), args=trl_tiny.config(tmp_path), sapo_metrics="yes")


def test_version_check(monkeypatch):
    monkeypatch.setattr(integration.metadata, "version", lambda name: "1.17.0")
    with pytest.raises(ImportError, match=r"supports TRL >=1.16,<1.17.*found trl 1.17.0"):
        integration._check_trl_version()
    monkeypatch.setattr(integration.metadata, "version", lambda name: "1.16.3")
    integration._check_trl_version()


# -- the metrics reduction across ranks (clause 3.11) -----------------------------------------


@pytest.mark.parametrize("method", ["sapo", "gspo"])
def test_reduce_metrics_across_ranks_equals_whole_batch(method):
    """Two shards' metrics, gathered as accelerate gathers ([P * K]), reduce to the reference's
    metrics of the whole batch (sapo_ref in float64: independent of sapo_torch)."""
    rng = np.random.default_rng(0)
    n, t = 6, 5
    logp = rng.normal(-1.0, 0.3, (n, t))
    old = logp + rng.normal(0.0, 0.2, (n, t))
    adv = rng.normal(0.0, 1.0, n)
    mask = rng.random((n, t)) < 0.7
    mask[2] = False  # an empty row in the first shard
    want = sapo_ref.policy_loss(logp, old, adv, mask, method=method).metrics
    shards = []
    for rows in (slice(0, 4), slice(4, 6)):
        _, m = sapo_torch.policy_loss(
            *(torch.as_tensor(x[rows]) for x in (logp, old, adv, mask)),
            method=method,
            metrics=True,
        )
        shards.append(m)
    keys = list(shards[0])

    def gather(local: torch.Tensor) -> torch.Tensor:  # rank 0's view of an all-gather
        assert local.shape == (len(keys),)
        return torch.cat([torch.stack([s[k].to(torch.float64) for k in keys]) for s in shards])

    got = integration.reduce_metrics(shards[0], gather)
    assert set(got) == set(want)
    for key in want:
        assert got[key] == pytest.approx(float(want[key]), rel=1e-12, abs=1e-12), key
