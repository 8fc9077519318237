r"""TRL's ``GRPOTrainer`` with its policy loss computed by :func:`sapo_torch.policy_loss`.

The switch is one line: ``GRPOTrainer(...)`` becomes ``SapoGRPOTrainer(...)``, same arguments.

.. math::

    \mathcal{L} = -\sum_{it} c_{it}\, m_{it}\, w_{it}\, A_{it}\, f_{it}(x_{it})
    \;+\; \beta \sum_{it} c_{it}\, m_{it}\, k_3(u_{it}),\qquad u = \log\pi_\text{ref} - \log\pi_\theta

with the method :math:`f` and the aggregation weights :math:`c` chosen from TRL's ``loss_type``
and ``importance_sampling_level`` (:func:`canonical_options`), :math:`w` the product of the
detached per-token factors TRL multiplies into the policy term (entropy mask, off-policy mask,
vLLM importance-sampling ratio) and the second sum TRL's ``beta`` KL term. Then, as TRL does:
the division by the accumulation steps in training, the entropy bonus and the MoE auxiliary
loss.
Every TRL option that shapes the loss either maps to the same numbers or raises at construction
(:data:`UNSUPPORTED`); the spec's metrics (clause 7.1) are logged under ``sapo/`` next to TRL's
own logs, reduced across processes as clause 3.11 says.

>>> from trl import GRPOConfig
>>> from sapo_torch.integrations.trl import canonical_options
>>> args = GRPOConfig("out", loss_type="sapo", use_cpu=True, bf16=False, report_to="none")
>>> canonical_options(args)  # doctest: +NORMALIZE_WHITESPACE
LossOptions(method='sapo', loss_agg='seq-mean-token-mean',
            options={'tau_pos': 1.0, 'tau_neg': 1.05, 'count_empty_rows': True},
            global_tokens=False)
>>> canonical_options(GRPOConfig("out", loss_type="cispo", use_cpu=True, bf16=False))
Traceback (most recent call last):
...
ValueError: SapoGRPOTrainer cannot reproduce TRL's loss_type='cispo': ...

Importing this module imports TRL and checks its version against :data:`SUPPORTED_TRL`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import torch
from packaging.specifiers import SpecifierSet
from packaging.version import Version

import sapo_torch
from sapo_ref.aggregation import Normalizer
from sapo_ref.sharding import combine_metrics

__all__ = [
    "SUPPORTED_TRL",
    "UNSUPPORTED",
    "LossOptions",
    "SapoGRPOTrainer",
    "canonical_options",
    "reduce_metrics",
]

#: The TRL versions this integration reproduces (``GRPOTrainer._compute_loss`` is private API,
#: so the range is the one checked by ``tests/peers/test_trl_trainer.py``).
SUPPORTED_TRL = ">=1.16,<1.17"


def _check_trl_version() -> None:
    try:
        found = metadata.version("trl")
    except metadata.PackageNotFoundError:
        raise ModuleNotFoundError(
            f"sapo_torch.integrations.trl needs TRL {SUPPORTED_TRL}; TRL is not installed "
            f'(pip install "trl{SUPPORTED_TRL}")',
            name="trl",
        ) from None
    if Version(found) not in SpecifierSet(SUPPORTED_TRL):
        raise ImportError(
            f"sapo_torch.integrations.trl supports TRL {SUPPORTED_TRL} (its GRPOTrainer loss was "
            f"checked step by step against those versions); found trl {found}. Install a "
            f'supported version (pip install "trl{SUPPORTED_TRL}") or use GRPOTrainer itself.'
        )


_check_trl_version()

from trl import GRPOConfig, GRPOTrainer  # noqa: E402  (after the version check, on purpose)

#: TRL options the canonical loss cannot reproduce, and why (each raises at construction).
UNSUPPORTED: dict[str, str] = {
    "loss_type='cispo'": "its term -clamp(r, max=epsilon_high).detach() * A * logp is not a "
    "SAPO-family gate",
    "loss_type='vespo'": "its gamma weighting of the sequence ratio is not a SAPO-family gate",
    "use_bias_correction_kl=True (with beta != 0)": "TRL multiplies the KL term by the "
    "differentiable ratio; the canonical KL term is not weighted (set use_bias_correction_kl=False)",
    "delta <= 1 + epsilon_high": "TRL's cap then changes the positive-advantage term too; the "
    "canonical dual clip is c > 1 + eps_high on negative advantages only",
}

# Inputs TRL passes on to the model's forward (multimodal batches); we pass what it passes.
_FORWARD_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "num_images",
    "pixel_attention_mask",
    "spatial_shapes",
    "num_tiles",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)
_CLIPPED = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")


@dataclass(frozen=True)
class LossOptions:
    """The canonical setting of one TRL configuration.

    ``options`` are keywords of :func:`sapo_torch.policy_loss`; ``global_tokens`` marks
    ``loss_type="dapo"``, normalised by the token count of the generation batch.
    """

    method: str
    loss_agg: str
    options: dict[str, Any] = field(default_factory=dict)
    global_tokens: bool = False


def _unsupported(option: str) -> ValueError:
    return ValueError(
        f"SapoGRPOTrainer cannot reproduce TRL's {option}: {UNSUPPORTED[option]}. "
        "Use trl.GRPOTrainer for it, or change the option."
    )


def canonical_options(args: GRPOConfig) -> LossOptions:
    r"""TRL's loss options as the canonical method, aggregation and keywords.

    ============================  ===========================================================
    TRL ``loss_type``             canonical (``importance_sampling_level`` token / sequence)
    ============================  ===========================================================
    ``sapo``                      ``sapo`` / ``sapo-seq``, seq-mean-token-mean, rows counted
    ``grpo``                      ``grpo`` / ``gspo``, seq-mean-token-mean, rows counted
    ``bnpo``                      ``grpo`` / ``gspo``, token-mean
    ``dr_grpo``                   ``grpo`` / ``gspo``, seq-mean-token-sum-norm,
                                  ``norm_length = max_completion_length``, rows counted
    ``dapo``                      ``grpo`` / ``gspo``, token-mean over the generation batch
    ``luspo``                     ``grpo`` / ``gspo``, seq-mean-token-sum, rows counted
    ============================  ===========================================================

    Empty rows are counted because TRL divides by the micro-batch's row count (its row length
    is clamped at 1). ``epsilon``/``epsilon_high`` are ``eps_low``/``eps_high``; ``delta`` is
    ``dual_clip`` (TRL caps the unclipped ratio at ``delta`` for both signs, which equals the
    dual clip when ``delta > 1 + epsilon_high``). The temperatures are
    ``sapo_temperature_pos``/``_neg``.

    Raises:
        ValueError: an option of :data:`UNSUPPORTED`, or an unknown ``loss_type`` or
            ``importance_sampling_level``, naming the option.
    """
    loss_type = args.loss_type
    level = args.importance_sampling_level
    if level not in ("token", "sequence"):
        raise ValueError(f"importance_sampling_level must be 'token' or 'sequence'; got {level!r}")
    sequence = level == "sequence"
    if loss_type in ("cispo", "vespo"):
        raise _unsupported(f"loss_type={loss_type!r}")
    if args.beta != 0.0 and args.use_bias_correction_kl:
        raise _unsupported("use_bias_correction_kl=True (with beta != 0)")
    if loss_type == "sapo":
        return LossOptions(
            "sapo-seq" if sequence else "sapo",
            "seq-mean-token-mean",
            {
                "tau_pos": args.sapo_temperature_pos,
                "tau_neg": args.sapo_temperature_neg,
                "count_empty_rows": True,
            },
        )
    if loss_type not in _CLIPPED:
        raise ValueError(
            f"unknown loss_type {loss_type!r}; SapoGRPOTrainer supports: sapo, "
            f"{', '.join(_CLIPPED)}"
        )
    eps_low = args.epsilon
    eps_high = args.epsilon if args.epsilon_high is None else args.epsilon_high
    options: dict[str, Any] = {"eps_low": eps_low, "eps_high": eps_high}
    if args.delta is not None:
        if not args.delta > 1.0 + eps_high:
            raise ValueError(
                f"SapoGRPOTrainer cannot reproduce TRL's delta={args.delta!r} with "
                f"epsilon_high={eps_high!r}: {UNSUPPORTED['delta <= 1 + epsilon_high']}."
            )
        options["dual_clip"] = args.delta
    method = "gspo" if sequence else "grpo"
    if loss_type == "grpo":
        return LossOptions(method, "seq-mean-token-mean", {**options, "count_empty_rows": True})
    if loss_type == "bnpo":
        return LossOptions(method, "token-mean", options)
    if loss_type == "dr_grpo":
        norm = {"norm_length": args.max_completion_length, "count_empty_rows": True}
        return LossOptions(method, "seq-mean-token-sum-norm", {**options, **norm})
    if loss_type == "luspo":
        return LossOptions(method, "seq-mean-token-sum", {**options, "count_empty_rows": True})
    return LossOptions(method, "token-mean", options, global_tokens=True)  # dapo


def reduce_metrics(metrics: dict[str, torch.Tensor], gather: Any) -> dict[str, float]:
    """One rank's clause-7.1 metrics reduced over all ranks (clause 3.11).

    ``gather`` maps a [K] tensor to the [P * K] concatenation over the P ranks (e.g.
    ``accelerator.gather``); counts add, means are weighted by their companion counts, minima
    and maxima are taken over ranks with a non-zero count (:func:`sapo_ref.combine_metrics`).

    >>> import torch
    >>> reduce_metrics({"tokens": torch.tensor(3.0), "ratio/mean": torch.tensor(2.0)},
    ...                lambda x: torch.cat([x, torch.tensor([1.0, 6.0])]))
    {'tokens': 4.0, 'ratio/mean': 3.0}
    """
    keys = list(metrics)
    stacked = torch.stack([metrics[k].detach().to(torch.float64) for k in keys])
    rows = gather(stacked).reshape(-1, len(keys)).tolist()
    return combine_metrics([dict(zip(keys, row)) for row in rows])


class SapoGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` whose policy loss is :func:`sapo_torch.policy_loss`.

    Same arguments as ``GRPOTrainer``, plus ``sapo_metrics`` (default ``True``): log the spec's
    metrics (clause 7.1) under ``metrics_prefix`` (``"sapo/"``) in TRL's metrics, next to
    TRL's own (``entropy``, ``kl``, ``clip_ratio/*``, ...), which are kept.

    Raises:
        ValueError: at construction, for a TRL option the canonical loss cannot reproduce
            (:data:`UNSUPPORTED`), naming it.
    """

    metrics_prefix = "sapo/"

    def __init__(self, *args: Any, sapo_metrics: bool = True, **kwargs: Any) -> None:
        if not isinstance(sapo_metrics, bool):
            raise TypeError(f"sapo_metrics must be a bool; got {type(sapo_metrics).__name__}")
        bound = inspect.signature(GRPOTrainer.__init__).bind(None, *args, **kwargs)
        config = bound.arguments.get("args")
        if config is not None:  # fail before the models are built
            canonical_options(config)
        super().__init__(*args, **kwargs)
        self.sapo_metrics = sapo_metrics
        self.sapo_options = canonical_options(self.args)

    # -- the loss --------------------------------------------------------------------------
    def _compute_loss(self, model: Any, inputs: dict[str, Any]) -> torch.Tensor:
        prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
        completion_mask = inputs["completion_mask"]
        mask = (
            completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        )
        logp, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model,
            torch.cat([prompt_ids, completion_ids], dim=1),
            torch.cat([inputs["prompt_mask"], completion_mask], dim=1),
            completion_ids.size(1),
            compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled,
            **{k: inputs.get(k) for k in _FORWARD_KEYS},
        )
        old_logp = inputs.get("old_per_token_logps")
        old_logp = logp.detach() if old_logp is None else old_logp
        advantages = inputs["advantages"]
        entropy_mask = (
            self.get_high_entropy_mask(entropies, mask, 1 - self.top_entropy_quantile)
            if self.top_entropy_quantile < 1.0
            else None
        )
        weights = self._weights(logp, old_logp, advantages, mask, entropy_mask, inputs)
        extra: dict[str, Any] = {}
        if weights is not None:
            extra["weights"] = weights
        if self.beta != 0.0:
            extra.update(
                ref_logp=inputs["ref_per_token_logps"], kl_coef=self.beta, kl_estimator="k3"
            )
        mode = "train" if self.model.training else "eval"
        steps = self.current_gradient_accumulation_steps if mode == "train" else 1
        opts = self.sapo_options
        options = dict(opts.options)
        scale = None
        if opts.global_tokens:
            options["normalizer"], scale = self._global_normalizer(inputs, mask, mode)
        loss, metrics = sapo_torch.policy_loss(
            logp,
            old_logp,
            advantages,
            mask.bool(),
            method=opts.method,
            loss_agg=opts.loss_agg,
            metrics=self.sapo_metrics,
            **options,
            **extra,
        )
        # TRL logs the micro-batch's policy loss before the division by the accumulation steps;
        # dapo's normaliser already holds them.
        unscaled = loss.detach()
        loss = loss / steps if scale is None else loss * scale
        policy_loss = unscaled if scale is None else loss.detach()
        loss = self._entropy_bonus(loss, policy_loss, entropies, mask, entropy_mask, mode)
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss / steps
            self._metrics[mode]["aux_loss"].append(
                self.accelerator.gather_for_metrics(aux_loss).mean().item()
            )
        self._log_trl_metrics(logp, old_logp, advantages, mask, entropies, inputs, mode)
        if metrics:
            for key, value in reduce_metrics(metrics, self.accelerator.gather).items():
                self._metrics[mode][self.metrics_prefix + key].append(value)
        return loss

    def _weights(
        self,
        logp: torch.Tensor,
        old_logp: torch.Tensor,
        advantages: torch.Tensor,
        mask: torch.Tensor,
        entropy_mask: torch.Tensor | None,
        inputs: dict[str, Any],
    ) -> torch.Tensor | None:
        """The detached factors TRL multiplies into the policy term only, as one [N, T] tensor."""
        factors = []
        if self.off_policy_mask_threshold is not None:
            factors.append(
                self.get_off_policy_mask(
                    advantages=advantages.unsqueeze(1) if advantages.dim() == 1 else advantages,
                    per_token_logps=logp,
                    sampling_per_token_logps=inputs.get("sampling_per_token_logps", old_logp),
                    mask=mask,
                    off_policy_threshold=self.off_policy_mask_threshold,
                )
            )
        if entropy_mask is not None:
            factors.append(entropy_mask)
        if self.use_vllm and self.vllm_importance_sampling_correction:
            factors.append(inputs["importance_sampling_ratio"])
        if not factors:
            return None
        weights = torch.ones_like(logp)
        for f in factors:
            weights = weights * f.detach().to(logp.dtype)  # [N, 1] factors broadcast over tokens
        return weights

    def _global_normalizer(
        self, inputs: dict[str, Any], mask: torch.Tensor, mode: str
    ) -> tuple[Normalizer, float]:
        r"""``loss_type="dapo"``: TRL divides the micro-batch's token sum by
        :math:`\max(n, 1)\,K/(P\,S)` in training (:math:`n` the generation batch's token count
        over all :math:`P` processes, :math:`K` accumulation steps, :math:`S` steps per
        generation) and by :math:`\max(n, 1)/P` in evaluation: the canonical token mean over
        :math:`n` tokens, times :math:`P S/K` (or :math:`P`)."""
        processes = self.accelerator.num_processes
        tokens = max(float(inputs["num_items_in_batch"]), 1.0)
        if mode == "train":
            per_process = self.args.steps_per_generation
            scale = processes * per_process / self.current_gradient_accumulation_steps
        else:
            per_process = 1
            scale = float(processes)
        rows = float(mask.shape[0] * per_process * processes)  # the generation batch's rows
        return Normalizer(tokens, rows), scale

    def _entropy_bonus(
        self,
        loss: torch.Tensor,
        policy_loss: torch.Tensor,
        entropies: torch.Tensor,
        mask: torch.Tensor,
        entropy_mask: torch.Tensor | None,
        mode: str,
    ) -> torch.Tensor:
        """TRL's entropy bonus: minus the coefficient times the mean entropy of the tokens the
        policy term acts on (divided by the accumulation steps in training), with its
        adaptive coefficient (Skywork-OR1) updated once per optimizer step from the window's
        token-weighted mean entropy over all processes."""
        if not self._entropy_bonus_enabled:
            return loss
        acting = mask if entropy_mask is None else mask * entropy_mask
        steps = self.current_gradient_accumulation_steps if mode == "train" else 1
        mean_entropy = (entropies * acting).sum() / acting.sum().clamp(min=1.0) / steps
        coef = self.entropy_coef
        if self.use_adaptive_entropy and self._last_world_entropy > self.args.entropy_target:
            coef = 0.0  # the coefficient of the previous step's boundary: no bonus above target
        loss = loss - coef * mean_entropy
        self._metrics[mode]["policy_loss"].append(
            self.accelerator.gather(policy_loss).nanmean().item()
        )
        if self.use_adaptive_entropy and mode == "train":
            window = torch.stack([(entropies * acting).sum(), acting.sum()]).detach()
            if self._entropy_window_stats is not None:
                window = window + self._entropy_window_stats
            self._entropy_window_stats = window
            if self.accelerator.sync_gradients:
                total = self.accelerator.reduce(window, reduction="sum")
                world = (total[0] / total[1].clamp(min=1.0)).item()
                a = self.args
                if world <= a.entropy_target:
                    self.entropy_coef = min(
                        self.entropy_coef + a.entropy_coef_delta, a.entropy_coef_max
                    )
                else:
                    self.entropy_coef = max(
                        self.entropy_coef - a.entropy_coef_delta, a.entropy_coef_min
                    )
                self._last_world_entropy = world
                self._entropy_window_stats = None
        if mode == "train" and self.accelerator.sync_gradients:
            self._metrics[mode]["entropy_coef"].append(self.entropy_coef)
        return loss

    def _log_trl_metrics(
        self,
        logp: torch.Tensor,
        old_logp: torch.Tensor,
        advantages: torch.Tensor,
        mask: torch.Tensor,
        entropies: torch.Tensor,
        inputs: dict[str, Any],
        mode: str,
    ) -> None:
        """TRL's own logs with TRL's definitions: ``kl`` (k3 against the reference), ``entropy``
        and, for the clipped loss types, ``clip_ratio/*`` of its ratio (the token ratio, or the
        sequence ratio averaged over all rows)."""
        logp = logp.detach()
        valid = mask.to(logp.dtype)

        def global_mean(x: torch.Tensor) -> float:
            if x.shape[1] == 1:  # one value per row: TRL averages over every row
                local = torch.stack([x.sum(), torch.tensor(float(x.shape[0]), device=x.device)])
            else:
                local = torch.stack([(x * valid).sum(), valid.sum()])
            total = self.accelerator.reduce(local, reduction="sum")
            return (total[0] / total[1].clamp(min=1.0)).item()

        def row_means(x: torch.Tensor) -> torch.Tensor:
            return x.squeeze(1) if x.shape[1] == 1 else (x * valid).sum(-1) / valid.sum(-1)

        if self.beta != 0.0:
            u = inputs["ref_per_token_logps"] - logp
            self._metrics[mode]["kl"].append(global_mean(torch.exp(u) - u - 1))
        self._metrics[mode]["entropy"].append(global_mean(entropies.detach()))
        if self.loss_type not in _CLIPPED:
            return
        delta = logp - old_logp
        if self.importance_sampling_level == "sequence":
            delta = ((delta * valid).sum(-1) / valid.sum(-1).clamp(min=1.0)).unsqueeze(-1)
        ratio = torch.exp(delta)
        adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
        low = ((ratio < 1 - self.epsilon_low) & (adv < 0)).to(logp.dtype)
        high = ((ratio > 1 + self.epsilon_high) & (adv > 0)).to(logp.dtype)
        metrics = self._metrics[mode]
        metrics["clip_ratio/low_mean"].append(global_mean(low))
        metrics["clip_ratio/high_mean"].append(global_mean(high))
        metrics["clip_ratio/region_mean"].append(global_mean(torch.maximum(low, high)))
        low_rows = self.accelerator.gather(row_means(low))
        high_rows = self.accelerator.gather(row_means(high))
        metrics["clip_ratio/low_min"].append(_nan_extreme(low_rows, largest=False))
        metrics["clip_ratio/high_max"].append(_nan_extreme(high_rows, largest=True))


def _nan_extreme(x: torch.Tensor, largest: bool) -> float:
    """Min or max ignoring NaN (empty rows), NaN when every entry is NaN (as TRL logs it)."""
    kept = x[~torch.isnan(x)]
    if kept.numel() == 0:
        return float("nan")
    return (kept.max() if largest else kept.min()).item()
