"""Wrappers giving other projects' installed policy losses the suite's calling contract.

Each module imports one peer's installed package (nothing of it is copied here) and exposes
functions ``fn(logp, old_logp, advantages, mask, **options) -> loss`` with the options of
``sapo_ref.policy_loss``, mapped onto the peer's own arguments, and an honest
``fn.sapo_capabilities``. Run one with
``PYTHONPATH=tests sapo-conformance --impl peers.wrappers.verl:sapo --framework torch``.
"""

from __future__ import annotations

from typing import Any

import torch

import sapo_ref

__all__ = ["config", "per_token", "require"]


def config(
    options: dict[str, Any],
    methods: tuple[str, ...],
    empty_rows: str | None = None,
    has_ref_logp: bool = False,
) -> sapo_ref.LossConfig:
    """The resolved options (spec defaults filled in), refusing a method the wrapper lacks and,
    for the row-averaging aggregations, the other empty-row convention than the peer's
    (``empty_rows`` = "counted" or "excluded"; None when the peer only has token-mean).

    >>> config({"method": "grpo"}, ("grpo",), "excluded").eps_low
    0.2
    >>> config({"method": "grpo"}, ("grpo",), "counted")
    Traceback (most recent call last):
    ...
    ValueError: not supported by this peer: count_empty_rows=False (the peer's empty rows are counted)
    """
    cfg = sapo_ref.resolve_config(**options, has_ref_logp=has_ref_logp)
    require(cfg.method in methods, f"method {cfg.method!r} (this wrapper maps {methods})")
    if empty_rows is not None and cfg.loss_agg != "token-mean":
        counted = empty_rows == "counted"
        require(
            bool(cfg.count_empty_rows) == counted,
            f"count_empty_rows={bool(cfg.count_empty_rows)} (the peer's empty rows are {empty_rows})",
        )
    return cfg


def per_token(advantages: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A [N] advantage broadcast to [N, T], the layout the peers' token losses take.

    >>> per_token(torch.tensor([1.0, 2.0]), torch.zeros(2, 3)).shape
    torch.Size([2, 3])
    """
    return advantages[:, None].expand_as(like) if advantages.ndim == 1 else advantages


def require(ok: bool, what: str) -> None:
    """Raise ``ValueError`` naming an option the peer cannot take (never a silent change)."""
    if not ok:
        raise ValueError(f"not supported by this peer: {what}")
