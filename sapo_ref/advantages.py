r"""Group-normalised advantages (paper eq. 2; spec clause 9.1)."""

from __future__ import annotations

from typing import Any, Literal

from ._xp import namespace

__all__ = ["group_advantages"]


def group_advantages(
    rewards: Any,
    group_size: int,
    *,
    scale: Literal["std", "none"] = "std",
    ddof: Literal[0, 1] = 1,
    eps: float = 1e-6,
) -> Any:
    r"""Advantages of contiguous groups of ``group_size`` responses (eq. 2).

    .. math::

        A_i = \frac{R_i - \bar R_{g(i)}}{\operatorname{std}_{g(i)} + \varepsilon}, \qquad
        \operatorname{std}_g = \sqrt{\tfrac{1}{G - \text{ddof}}\textstyle\sum_{j\in g}(R_j - \bar R_g)^2}

    Rows :math:`gG, \dots, gG + G - 1` form group :math:`g`. The paper names neither
    :math:`\varepsilon` nor the Bessel choice; both are explicit here. A group of one or of equal
    rewards gives exactly 0.

    Args:
        rewards: [N] rewards, N a multiple of ``group_size``; any real floating dtype (computed
            in that dtype; pass float64 for the golden configuration).
        group_size: G >= 1.
        scale: ``"std"`` divides by the group's std plus ``eps``; ``"none"`` only centres
            (Dr. GRPO).
        ddof: 1 for Bessel's correction (verl, TRL: ``torch.std``), 0 for the population std.
        eps: added to the std, >= 0 (verl 1e-6, TRL 1e-4).

    Returns:
        [N] advantages in the dtype of ``rewards``.

    >>> import numpy as np
    >>> group_advantages(np.array([1.0, 0.0, 0.0, 1.0, 2.0, 2.0]), 3).round(4).tolist()
    [1.1547, -0.5773, -0.5773, -1.1547, 0.5773, 0.5773]
    >>> group_advantages(np.array([3.0, 3.0]), 2).tolist()  # equal rewards
    [0.0, 0.0]
    """
    xp = namespace(rewards)
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be 1-D [N]; got shape {tuple(rewards.shape)}")
    if not xp.isdtype(rewards.dtype, "real floating"):
        raise TypeError(f"rewards must be a real floating array; got dtype {rewards.dtype}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be an integer >= 1; got {group_size!r}")
    n = int(rewards.shape[0])
    if n % group_size != 0:
        raise ValueError(f"rewards length {n} is not a multiple of group_size {group_size}")
    if scale not in ("std", "none"):
        raise ValueError(f"scale must be 'std' or 'none'; got {scale!r}")
    if ddof not in (0, 1):
        raise ValueError(f"ddof must be 0 (population) or 1 (Bessel); got {ddof!r}")
    if not (isinstance(eps, (int, float)) and eps >= 0 and eps == eps and eps != float("inf")):
        raise ValueError(f"eps must be a finite number >= 0; got {eps!r}")
    if not bool(xp.all(xp.isfinite(rewards))):
        raise ValueError("rewards must be finite")

    g = xp.reshape(rewards, (n // group_size, group_size))
    mean = xp.mean(g, axis=1, keepdims=True)
    centred = g - mean
    flat = xp.max(g, axis=1, keepdims=True) == xp.min(g, axis=1, keepdims=True)
    zero = xp.zeros_like(g)
    if scale == "none":
        adv = xp.where(flat, zero, centred)
    else:
        dof = group_size - ddof
        var = xp.sum(centred * centred, axis=1, keepdims=True) / (dof if dof > 0 else 1)
        den = xp.sqrt(var) + eps
        # A flat group (or a group of one) is exactly 0 whatever eps is; den > 0 elsewhere.
        den = xp.where(flat, xp.ones_like(den), den)
        adv = xp.where(flat, zero, centred / den)
    return xp.reshape(adv, (n,))
