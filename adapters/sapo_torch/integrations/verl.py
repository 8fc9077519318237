r"""The canonical losses in verl's policy-loss registry (``actor.policy_loss.loss_mode``).

.. math::

    \mathcal{L}_\text{verl} = k\cdot\mathcal{L}\big(\log\pi_\theta,\log\pi_\text{old},A,m;
    \ \text{method},\ \text{aggregation}(\texttt{loss\_agg\_mode}),\ w = \texttt{rollout\_is\_weights},
    \ \text{Normalizer}(\texttt{global\_batch\_info})\big),\qquad k = \texttt{dp\_size}\ (\cdot\,n_\text{local}
    \text{ for token-sum})

Importing this module registers, once, in ``verl.trainer.ppo.core_algos.POLICY_LOSS_REGISTRY``:

========================  ================  ===================================================
verl ``loss_mode``        ``method``        verl's own counterpart
========================  ================  ===================================================
``sapo_ref_sapo``         ``sapo``          ``sapo`` (which ignores ``loss_agg_mode``)
``sapo_ref_sapo_seq``     ``sapo-seq``      none (verl has no sequence-level SAPO)
``sapo_ref_grpo``         ``grpo``          ``vanilla`` (dual clip ``clip_ratio_c``)
``sapo_ref_gspo_token``   ``gspo-token``    ``gspo`` (verl's GSPO is the token form)
``sapo_ref_gspo``         ``gspo``          ``gspo`` under ``seq-mean-token-mean``
========================  ================  ===================================================

Each function has verl's signature and return contract ``(loss, metrics)``, reads verl's
config fields (``tau_pos``, ``tau_neg``, ``clip_ratio``, ``clip_ratio_low``,
``clip_ratio_high``, ``clip_ratio_c``, ``global_batch_info``), maps ``loss_agg_mode`` and the
global batch counts onto the spec's aggregation and :class:`sapo_ref.Normalizer` (so a
micro-batch's loss is verl's, to rounding), passes ``rollout_is_weights`` as the detached
per-token ``weights``, and returns verl's metric keys plus the spec's under ``actor/sapo_ref/``.
Supported verl versions: :data:`SUPPORTED_VERL` (checked at import).

>>> import sapo_torch.integrations.verl as sv
>>> from verl.trainer.ppo.core_algos import get_policy_loss_fn
>>> get_policy_loss_fn("sapo_ref_sapo") is sv.sapo
True
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

import sapo_ref
import sapo_torch

from ._peer import version_tuple

__all__ = [
    "Aggregation",
    "LOSS_AGG_MODES",
    "LOSS_MODES",
    "SUPPORTED_VERL",
    "VERL_METRIC_KEYS",
    "aggregation",
    "gspo",
    "gspo_token",
    "grpo",
    "loss_options",
    "register",
    "sapo",
    "sapo_seq",
]

#: The verl versions whose registry contract this module is written and tested against.
SUPPORTED_VERL = ">=0.9.1,<0.10"
_LOWEST, _BELOW = (0, 9, 1), (0, 10)

#: verl ``loss_agg_mode`` -> the spec aggregation it is computed with (token-sum is token-mean
#: scaled by the shard's token count: the spec has no unnormalised sum).
LOSS_AGG_MODES: dict[str, str] = {
    "token-mean": "token-mean",
    "token-sum": "token-mean",
    "seq-mean-token-mean": "seq-mean-token-mean",
    "seq-mean-token-sum": "seq-mean-token-sum",
    "seq-mean-token-sum-norm": "seq-mean-token-sum-norm",
}

# The parameters of a registered policy loss, in verl's order (its PolicyLossFn contract).
_VERL_PARAMETERS = (
    "old_log_prob",
    "log_prob",
    "advantages",
    "response_mask",
    "loss_agg_mode",
    "config",
    "rollout_is_weights",
)


def _import_verl() -> Any:
    """verl's ``core_algos``, after checking the installed version and the registry contract."""
    try:
        import verl
        from verl.trainer.ppo import core_algos
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] != "verl":
            raise
        raise ModuleNotFoundError(
            f"sapo_torch.integrations.verl needs verl {SUPPORTED_VERL} "
            '(pip install "verl==0.9.1"); it is not installed',
            name="verl",
        ) from err
    version = str(getattr(verl, "__version__", ""))
    if not _LOWEST <= version_tuple(version) < _BELOW:
        raise ImportError(
            f"sapo_torch.integrations.verl supports verl {SUPPORTED_VERL}; installed: {version!r}"
        )
    params = tuple(inspect.signature(core_algos.get_policy_loss_fn("vanilla")).parameters)
    if params != _VERL_PARAMETERS:
        raise ImportError(
            f"verl {version}: its policy losses take {params}, not {_VERL_PARAMETERS} "
            f"(this module supports verl {SUPPORTED_VERL})"
        )
    return core_algos


_core_algos = _import_verl()


def _field(config: Any, name: str, default: Any = None) -> Any:
    """A field of verl's ``ActorConfig`` or an OmegaConf ``DictConfig`` (both have ``get``)."""
    getter = getattr(config, "get", None)
    return getter(name, default) if callable(getter) else getattr(config, name, default)


def loss_options(method: str, config: Any) -> dict[str, float | None]:
    r"""The spec options of ``method`` read from verl's actor config (fields named as verl's).

    ``tau_pos``, ``tau_neg`` -> ``tau_pos``, ``tau_neg``; ``clip_ratio_low`` / ``clip_ratio_high``
    (each falling back to ``clip_ratio`` when None, as verl does) -> ``eps_low`` / ``eps_high``;
    ``clip_ratio_c`` -> ``dual_clip`` for ``grpo`` only (verl's ``vanilla`` always dual-clips,
    default 3.0; None here turns it off; verl's ``gspo`` and ``sapo`` ignore it). A value
    outside the spec's domain raises ``ValueError`` naming the verl field.

    >>> from verl.workers.config import ActorConfig
    >>> cfg = ActorConfig(strategy="fsdp", ppo_micro_batch_size_per_gpu=1, rollout_n=1,
    ...                   clip_ratio_high=0.28)
    >>> loss_options("grpo", cfg)
    {'eps_low': 0.2, 'eps_high': 0.28, 'dual_clip': 3.0}
    >>> loss_options("sapo", cfg)
    {'tau_pos': 1.0, 'tau_neg': 1.05}
    """
    if config is None:
        raise ValueError("config must be verl's actor config (ActorConfig or DictConfig); got None")
    fields: dict[str, tuple[str, Any]] = {}  # spec option -> (verl field, value)
    if method in ("sapo", "sapo-seq"):
        fields["tau_pos"] = ("tau_pos", _field(config, "tau_pos"))
        fields["tau_neg"] = ("tau_neg", _field(config, "tau_neg"))
    else:
        ratio = _field(config, "clip_ratio")
        for option, name in (("eps_low", "clip_ratio_low"), ("eps_high", "clip_ratio_high")):
            value = _field(config, name)
            fields[option] = (name, value) if value is not None else ("clip_ratio", ratio)
        if method == "grpo":
            fields["dual_clip"] = ("clip_ratio_c", _field(config, "clip_ratio_c", 3.0))
    for option, (name, value) in fields.items():
        _check_field(method, option, name, value)
    return {option: value for option, (_, value) in fields.items()}


def _check_field(method: str, option: str, name: str, value: Any) -> None:
    if value is None and option == "dual_clip":
        return
    try:
        _validated(method, option, value)
    except (TypeError, ValueError) as err:
        raise type(err)(f"verl actor config field {name}={value!r}: {err}") from None


@lru_cache(maxsize=256)
def _validated(method: str, option: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{option} must be a real number; got {type(value).__name__}")
    loss_agg = "seq-mean-token-sum-norm" if option == "norm_length" else "token-mean"
    sapo_ref.resolve_config(method, loss_agg, **{option: float(value)})


@dataclass(frozen=True)
class Aggregation:
    """How one verl ``loss_agg_mode`` call is computed: the spec ``loss_agg``, its
    ``norm_length``, the ``normalizer`` (global counts, or the shard's own), and the ``scale``
    verl multiplies by (``dp_size``; for token-sum also the shard's token count)."""

    loss_agg: str
    norm_length: float | None
    normalizer: sapo_ref.Normalizer
    scale: Any


def _count(info: Mapping[str, Any], key: str, *, positive: bool = False) -> Any:
    value = info.get(key)
    if value is None:
        return None
    if isinstance(value, torch.Tensor) and value.ndim == 0:  # e.g. an all-reduced count
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise TypeError(f"global_batch_info[{key!r}] must be a number; got {value!r}")
    if value < (1 if positive else 0) or value == float("inf"):
        bound = ">= 1" if positive else ">= 0"
        raise ValueError(f"global_batch_info[{key!r}] must be finite and {bound}; got {value!r}")
    return value


def aggregation(
    loss_agg_mode: str, response_mask: torch.Tensor, global_batch_info: Mapping[str, Any] | None
) -> Aggregation:
    r"""verl's ``agg_loss`` for ``loss_agg_mode`` as the spec's aggregation (clause 3).

    With :math:`k` = ``dp_size``, :math:`n_g` = ``batch_num_tokens`` and :math:`B_g` =
    ``global_batch_size`` (each the shard's own count when absent, which verl allows only for
    ``dp_size`` 1), :math:`L` = ``loss_scale_factor`` (default: the padded length :math:`T`):

    =========================  =========================================================
    ``token-mean``             :math:`k\,\sum m\ell / n_g`: token-mean, ``num_tokens`` = :math:`n_g`
    ``token-sum``              :math:`k\,\sum m\ell`: token-mean over the shard, times :math:`k\,n`
    ``seq-mean-token-mean``    :math:`k\sum_i \bar\ell_i / B_g`: ``num_rows`` = :math:`B_g`
    ``seq-mean-token-sum``     :math:`k\sum_i \sum_t m\ell / B_g`
    ``seq-mean-token-sum-norm``  the above over :math:`L`: ``norm_length`` = :math:`L`
    =========================  =========================================================

    Without ``global_batch_size`` the rows counted are the non-empty ones (verl's and the
    spec's default); verl's actor passes its mini-batch size, which counts every row.

    >>> agg = aggregation("token-mean", torch.tensor([[1, 1, 0]]).bool(),
    ...                   {"dp_size": 2, "batch_num_tokens": 10})
    >>> agg.loss_agg, float(agg.normalizer.num_tokens), agg.scale
    ('token-mean', 10.0, 2)
    """
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(
            f"loss_agg_mode must be one of {', '.join(LOSS_AGG_MODES)}; got {loss_agg_mode!r}"
        )
    info = global_batch_info or {}
    if not isinstance(info, Mapping):
        raise TypeError(f"config.global_batch_info must be a mapping; got {type(info).__name__}")
    dp = _count(info, "dp_size", positive=True) or 1
    valid = response_mask if response_mask.dtype == torch.bool else response_mask != 0
    tokens = valid.sum()
    rows = valid.any(dim=-1).sum()
    norm_length = None
    if loss_agg_mode == "token-sum":
        return Aggregation("token-mean", None, sapo_ref.Normalizer(tokens, rows), dp * tokens)
    if loss_agg_mode == "token-mean":
        global_tokens = _count(info, "batch_num_tokens")
        if global_tokens is None and dp > 1:
            raise ValueError(
                "global_batch_info['batch_num_tokens'] is required with dp_size > 1 "
                "(loss_agg_mode='token-mean'), as in verl's agg_loss"
            )
        counts = sapo_ref.Normalizer(tokens if global_tokens is None else global_tokens, rows)
    else:
        global_rows = _count(info, "global_batch_size")
        if global_rows is None and dp > 1:
            raise ValueError(
                f"global_batch_info['global_batch_size'] is required with dp_size > 1 "
                f"(loss_agg_mode={loss_agg_mode!r}), as in verl's agg_loss"
            )
        counts = sapo_ref.Normalizer(tokens, rows if global_rows is None else global_rows)
        if loss_agg_mode == "seq-mean-token-sum-norm":
            factor = _count(info, "loss_scale_factor")
            norm_length = float(response_mask.shape[-1] if factor is None else factor)
            _check_field("grpo", "norm_length", "loss_scale_factor", norm_length)
    return Aggregation(LOSS_AGG_MODES[loss_agg_mode], norm_length, counts, dp)


#: The metric keys verl's actor logs from a policy loss (every one of verl's losses returns them).
VERL_METRIC_KEYS = ("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower")
_PREFIX = "actor/sapo_ref/"


def _metrics(method: str, spec_metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    """verl's three keys (as verl defines them) and the spec's clause 7.1 metrics, prefixed."""
    keys = list(spec_metrics)
    # One device-to-host copy; Python floats hold float32 and float64 values exactly.
    values = torch.stack([spec_metrics[k].detach() for k in keys]).cpu().tolist()
    m = dict(zip(keys, values, strict=True))
    clipped = m.get("clip/low_frac", 0.0) + m.get("clip/high_frac", 0.0)
    out = {
        "actor/pg_clipfrac": clipped,  # verl: -A clip(r) > -A r, i.e. the low or high side
        "actor/ppo_kl": m["kl/k1"],  # verl: masked mean of log(pi_old / pi)
        "actor/pg_clipfrac_lower": m.get("clip/dual_frac", 0.0),  # verl: dual clip active
    }
    out.update({_PREFIX + k: v for k, v in m.items()})
    return out


_WARNED_SAPO_MODES: set[str] = set()


def _compute(
    method: str,
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str,
    config: Any,
    rollout_is_weights: torch.Tensor | None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    options = loss_options(method, config)
    agg = aggregation(loss_agg_mode, response_mask, _field(config, "global_batch_info"))
    if method == "sapo" and loss_agg_mode != "seq-mean-token-mean":
        if loss_agg_mode not in _WARNED_SAPO_MODES:
            _WARNED_SAPO_MODES.add(loss_agg_mode)
            warnings.warn(
                f"sapo_ref_sapo honours loss_agg_mode={loss_agg_mode!r}; verl's own 'sapo' "
                "ignores it and always uses seq-mean-token-mean (set that to get its numbers)",
                UserWarning,
                stacklevel=3,
            )
    weights = None if rollout_is_weights is None else rollout_is_weights.detach()
    try:
        loss, spec_metrics = sapo_torch.policy_loss(
            log_prob,
            old_log_prob,
            advantages,
            response_mask,
            method=method,
            loss_agg=agg.loss_agg,
            norm_length=agg.norm_length,
            normalizer=agg.normalizer,
            weights=weights,
            metrics=True,
            **options,
        )
    except ValueError as err:
        if not str(err).startswith("normalizer"):
            raise
        info = dict(_field(config, "global_batch_info") or {})
        raise ValueError(
            f"config.global_batch_info {info} does not fit this batch: {err}"
        ) from None
    scale = agg.scale.to(loss.dtype) if isinstance(agg.scale, torch.Tensor) else agg.scale
    return loss * scale, _metrics(method, spec_metrics)


def _policy_loss(method: str, name: str, default_mode: str, counterpart: str) -> Callable[..., Any]:
    soft = method in ("sapo", "sapo-seq")
    # The documented example's value: -A f(1), f(1) = 2 / tau_pos (verl's default 1) or 1.
    on_policy = "-(4 / tau_pos) sigmoid(0) = -2 / tau_pos" if soft else "-A r = -1"
    on_policy_value = -2.0 if soft else -1.0

    def policy_loss(
        old_log_prob: torch.Tensor,
        log_prob: torch.Tensor,
        advantages: torch.Tensor,
        response_mask: torch.Tensor,
        loss_agg_mode: str = default_mode,
        config: Any = None,
        rollout_is_weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        return _compute(
            method,
            old_log_prob,
            log_prob,
            advantages,
            response_mask,
            loss_agg_mode,
            config,
            rollout_is_weights,
        )

    policy_loss.__name__ = policy_loss.__qualname__ = name.removeprefix("sapo_ref_")
    policy_loss.__doc__ = (
        f"verl ``loss_mode={name!r}``: ``sapo_torch.policy_loss(method={method!r})`` with verl's\n"
        f"signature, ``loss_agg_mode``, global batch counts, rollout IS weights and config\n"
        f"fields. verl's own counterpart: {counterpart}.\n\n"
        f"Returns ``(loss, metrics)``: ``loss`` a 0-d tensor (verl's scale: ``dp_size`` included),\n"
        f"``metrics`` floats under {', '.join(VERL_METRIC_KEYS)} and ``{_PREFIX}<clause 7.1 key>``.\n\n"
        f">>> import torch\n"
        f">>> from verl.workers.config import ActorConfig\n"
        f">>> cfg = ActorConfig(strategy='fsdp', ppo_micro_batch_size_per_gpu=1, rollout_n=1)\n"
        f">>> loss, m = {policy_loss.__name__}(torch.zeros(1, 2), torch.zeros(1, 2),\n"
        f"...     torch.ones(1, 2), torch.ones(1, 2).bool(), config=cfg)\n"
        f">>> loss.item()  # on policy, A = 1: {on_policy}\n"
        f"{on_policy_value!r}\n"
        f">>> m['actor/ppo_kl'] == 0\n"
        f"True\n"
    )
    policy_loss.sapo_method = method  # type: ignore[attr-defined]
    return policy_loss


sapo = _policy_loss("sapo", "sapo_ref_sapo", "seq-mean-token-mean", "'sapo'")
sapo_seq = _policy_loss("sapo-seq", "sapo_ref_sapo_seq", "seq-mean-token-mean", "none")
grpo = _policy_loss("grpo", "sapo_ref_grpo", "token-mean", "'vanilla'")
gspo_token = _policy_loss("gspo-token", "sapo_ref_gspo_token", "seq-mean-token-mean", "'gspo'")
gspo = _policy_loss(
    "gspo", "sapo_ref_gspo", "seq-mean-token-mean", "'gspo' under seq-mean-token-mean"
)

#: verl ``loss_mode`` name -> registered function.
LOSS_MODES: dict[str, Callable[..., Any]] = {
    "sapo_ref_sapo": sapo,
    "sapo_ref_sapo_seq": sapo_seq,
    "sapo_ref_grpo": grpo,
    "sapo_ref_gspo": gspo,
    "sapo_ref_gspo_token": gspo_token,
}


def register() -> tuple[str, ...]:
    """Put :data:`LOSS_MODES` in verl's policy-loss registry (idempotent; done at import).

    Raises ``ValueError`` if one of the names is already taken by a function not from here.

    >>> register()
    ('sapo_ref_sapo', 'sapo_ref_sapo_seq', 'sapo_ref_grpo', 'sapo_ref_gspo', 'sapo_ref_gspo_token')
    """
    registry = _core_algos.POLICY_LOSS_REGISTRY
    for name, fn in LOSS_MODES.items():
        present = registry.get(name)
        if present is not None and present is not fn and present.__module__ != __name__:
            raise ValueError(
                f"verl policy loss {name!r} is already registered by {present.__module__}"
            )
        _core_algos.register_policy_loss(name)(fn)
    return tuple(LOSS_MODES)


register()
