r"""AReaL's SAPO loss computed by the canonical core, with the stats AReaL's actor reads.

.. math::

    \mathcal{L}_\text{AReaL} = \mathcal{L}\big(\log\pi_\theta, \log\pi_\text{old}, A, m;
    \ \text{method} = \texttt{sapo}\ |\ \texttt{sapo-seq},\ \text{token-mean},
    \ \tau_\text{pos}, \tau_\text{neg}\big)

:func:`sapo_loss_fn` has the signature and return contract of
``areal.utils.functional.sapo_loss_fn``: ``(loss, stat)``, ``loss`` the token mean over the
micro-batch's valid tokens (AReaL's engine then weights micro-batches by their valid-token
counts, ``loss_weight_fn``, which makes it the token mean of the whole batch), and ``stat`` the
per-token tensors ``grpo_loss_fn`` hands to its stats tracker: ``loss`` (the per-token term
:math:`-f A`), ``importance_weight`` (:math:`r`, or :math:`s_i` at sequence level),
``approx_kl`` (:math:`\log\pi_\theta - \log\pi_\text{old}`), ``clip_mask`` and
``dual_clip_mask`` (all False: SAPO does not clip), ``sapo_soft_gate``,
``sapo_scaled_gate_pos`` and ``sapo_scaled_gate_neg`` (:math:`f` with the token's temperature,
with :math:`\tau_\text{pos}`, with :math:`\tau_\text{neg}`), detached, shaped like
``logprobs`` and in float32, the dtype the tracker accepts. Inputs are 2-D padded
``[B, T]`` or 1-D packed ``[n]`` with ``cu_seqlens`` (AReaL's engine packs micro-batches).

Switch on with one call, then AReaL's usual SAPO options (``actor.use_sapo_loss=true``,
``actor.use_decoupled_loss=false``, ``actor.sapo_tau_pos/neg``,
``actor.importance_sampling_level``):

>>> import sapo_torch.integrations.areal as sa
>>> from areal.trainer.ppo import actor
>>> sa.install()
>>> actor.sapo_loss_fn is sa.sapo_loss_fn
True
>>> sa.uninstall()

:func:`install` rebinds the name ``sapo_loss_fn`` in ``areal.trainer.ppo.actor``, which
``grpo_loss_fn`` looks up at each call (AReaL has no loss registry); it must run in every
process that computes the loss (each training worker). Only the SAPO branch is replaced: with
``use_sapo_loss=false`` AReaL's own ``ppo_actor_loss_fn`` runs.

Where the numbers differ from AReaL's own SAPO: at sequence level AReaL averages the
advantages over each row before gating, so its temperature follows the sign of the row's mean
advantage; the canonical ``sapo-seq`` keeps each token's advantage and its sign, so the two
agree when no token's advantage has another sign than its row's mean (GRPO's row-constant
advantages). AReaL's float32
:math:`r = e^\delta` overflows past :math:`\delta \approx 88.7` (NaN gradient); the canonical
core saturates exactly. Supported AReaL versions: :data:`SUPPORTED_AREAL` (checked at import).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

import sapo_torch
from sapo_ref.gates import safe_exp, sapo_parts
from sapo_ref.ratios import sequence_log_ratio

from ._peer import import_framework

__all__ = ["SUPPORTED_AREAL", "install", "sapo_loss_fn", "uninstall"]

#: The AReaL versions whose ``sapo_loss_fn`` contract this module is written and tested against.
SUPPORTED_AREAL = ">=1.0.4,<1.1"

_functional = import_framework(
    "sapo_torch.integrations.areal", "areal.utils.functional", "areal", (1, 0, 4), (1, 1)
)
_AREAL_SAPO = _functional.sapo_loss_fn
_PARAMETERS = (
    "logprobs",
    "old_logprobs",
    "advantages",
    "tau_pos",
    "tau_neg",
    "loss_mask",
    "importance_sampling_level",
    "cu_seqlens",
)
if tuple(inspect.signature(_AREAL_SAPO).parameters) != _PARAMETERS:
    raise ImportError(
        "sapo_torch.integrations.areal: areal.utils.functional.sapo_loss_fn no longer has the "
        f"parameters {_PARAMETERS}; this AReaL is not supported"
    )

_METHODS = {"token": "sapo", "sequence": "sapo-seq"}


def _padded(
    x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, shape: tuple[int, int]
) -> torch.Tensor:
    """A packed [n] tensor laid out as [B, L] (zeros/False at padding), differentiably."""
    return x.new_zeros(shape).index_put((rows, cols), x)


def _layout(
    logprobs: torch.Tensor, cu_seqlens: torch.Tensor | None, level: str
) -> tuple[Any, tuple[int, int]] | None:
    """Row/column of each packed token, or None when the input is already [B, T] (or packed at
    token level, where the token mean needs no rows: it is taken as one row)."""
    if logprobs.ndim == 2 or level == "token":
        return None
    if cu_seqlens is None:
        raise ValueError(
            "cu_seqlens is required for 1-D (packed) logprobs at importance_sampling_level="
            "'sequence'"
        )
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    rows = torch.repeat_interleave(torch.arange(lengths.numel(), device=logprobs.device), lengths)
    cols = torch.arange(logprobs.numel(), device=logprobs.device) - cu_seqlens[:-1].long()[rows]
    width = int(lengths.max().item()) if lengths.numel() else 0
    return (rows, cols), (int(lengths.numel()), width)


def sapo_loss_fn(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    tau_pos: float,
    tau_neg: float,
    loss_mask: torch.Tensor,
    importance_sampling_level: str = "token",
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""AReaL's ``sapo_loss_fn`` contract, computed by :func:`sapo_torch.policy_loss`.

    .. math::

        \mathcal{L} = -\frac{1}{\sum m}\sum_{t} m_t\,A_t\,\tfrac{4}{\tau_t}
        \sigma\big(\tau_t(x_t - 1)\big),\qquad x = r \text{ (token) or } s_i \text{ (sequence)}

    Args:
        logprobs: [B, T] or packed [n] current log-probabilities (the only input differentiated).
        old_logprobs, advantages, loss_mask: same shape (advantages per token, as AReaL keeps them).
        tau_pos, tau_neg: the temperatures (``actor.sapo_tau_pos`` / ``sapo_tau_neg``).
        importance_sampling_level: ``"token"`` (``sapo``) or ``"sequence"`` (``sapo-seq``).
        cu_seqlens: [B + 1] row offsets of packed inputs (needed at sequence level).

    Returns:
        ``(loss, stat)`` as described in the module docstring.

    >>> lp = torch.zeros(2, 3, requires_grad=True)
    >>> loss, stat = sapo_loss_fn(lp, torch.zeros(2, 3), torch.tensor([[1.0] * 3, [-1.0] * 3]),
    ...                           1.0, 1.05, torch.ones(2, 3, dtype=torch.bool))
    >>> round(loss.item(), 6), sorted(stat)[:3]   # -(2/1 - 2/1.05) / 2
    (-0.047619, ['approx_kl', 'clip_mask', 'dual_clip_mask'])
    """
    if importance_sampling_level not in _METHODS:
        raise ValueError(
            f"importance_sampling_level must be 'token' or 'sequence', got "
            f"{importance_sampling_level!r}"
        )
    valid = loss_mask.bool()
    layout = _layout(logprobs, cu_seqlens, importance_sampling_level)
    if layout is not None:
        index, shape = layout
        lp, old, adv, mask = (
            _padded(x, *index, shape) for x in (logprobs, old_logprobs, advantages, valid)
        )
    elif logprobs.ndim == 1:
        lp, old, adv, mask = (x[None] for x in (logprobs, old_logprobs, advantages, valid))
    else:
        lp, old, adv, mask = logprobs, old_logprobs, advantages, valid
    loss, _ = sapo_torch.policy_loss(
        lp,
        old.detach(),
        adv.detach(),
        mask,
        method=_METHODS[importance_sampling_level],
        loss_agg="token-mean",
        tau_pos=tau_pos,
        tau_neg=tau_neg,
    )
    stat = _stats(
        lp.detach(), old.detach(), adv.detach(), mask, tau_pos, tau_neg, importance_sampling_level
    )
    if layout is not None:
        stat = {k: v[index] for k, v in stat.items()}
    elif logprobs.ndim == 1:
        stat = {k: v[0] for k, v in stat.items()}
    return loss, stat


def _stats(
    lp: torch.Tensor,
    old: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    tau_pos: float,
    tau_neg: float,
    level: str,
) -> dict[str, torch.Tensor]:
    """The per-token tensors AReaL's actor logs, [B, T], 0 (False) at padding, float32."""
    zero = torch.zeros_like(lp)
    delta = torch.where(mask, lp, zero) - torch.where(mask, old, zero)
    x = delta if level == "token" else sequence_log_ratio(lp, old, mask)[:, None].expand_as(lp)
    # The canonical gate (exact, saturating) rather than AReaL's sigmoid(tau (e^x - 1)).
    gate_pos, gate_neg = sapo_parts(x, tau_pos).f, sapo_parts(x, tau_neg).f
    gate = torch.where(adv > 0, gate_pos, gate_neg)

    def valid(t: torch.Tensor) -> torch.Tensor:
        return torch.where(mask, t, zero).float()

    no_clip = torch.zeros_like(mask)
    return {
        "loss": valid(-gate * torch.where(mask, adv, zero)),
        "importance_weight": valid(safe_exp(x)),
        "approx_kl": valid(delta),
        "clip_mask": no_clip,
        "dual_clip_mask": no_clip.clone(),
        "sapo_soft_gate": valid(gate),
        "sapo_scaled_gate_pos": valid(gate_pos),
        "sapo_scaled_gate_neg": valid(gate_neg),
    }


def install() -> None:
    """Make AReaL's actor (``grpo_loss_fn`` with ``use_sapo_loss=True``) call
    :func:`sapo_loss_fn`. Idempotent; :func:`uninstall` restores AReaL's own."""
    from areal.trainer.ppo import actor

    actor.sapo_loss_fn = sapo_loss_fn


def uninstall() -> None:
    """Give AReaL's actor back its own ``sapo_loss_fn``."""
    from areal.trainer.ppo import actor

    actor.sapo_loss_fn = _AREAL_SAPO
