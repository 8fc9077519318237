r"""Token and sequence ratios (paper eq. 2, 4, 11; spec clauses 1.3, 1.4), masked by selection."""

from __future__ import annotations

from typing import Any

from ._xp import namespace
from .aggregation import row_lengths
from .gates import safe_exp

__all__ = ["token_log_ratio", "token_ratio", "sequence_log_ratio", "sequence_ratio"]


def _valid(xp: Any, mask: Any) -> Any:
    return mask if mask.dtype == xp.bool else mask != 0


def token_log_ratio(logp: Any, old_logp: Any, mask: Any) -> Any:
    r""":math:`\delta_{it} = \log\pi_\theta(y_{it}) - \log\pi_\text{old}(y_{it})` at valid tokens, 0 elsewhere.

    >>> import numpy as np
    >>> token_log_ratio(np.array([[-1.0, np.nan]]), np.array([[-2.0, 0.0]]),
    ...                 np.array([[True, False]])).tolist()
    [[1.0, 0.0]]
    """
    xp = namespace(logp, old_logp)
    valid = _valid(xp, mask)
    zero = xp.zeros_like(logp)
    return xp.where(valid, logp, zero) - xp.where(valid, old_logp, zero)


def token_ratio(logp: Any, old_logp: Any, mask: Any) -> Any:
    r""":math:`r_{it} = e^{\delta_{it}}` at valid tokens (``+inf`` past overflow), 1 elsewhere.

    >>> import numpy as np
    >>> token_ratio(np.array([[0.0, 800.0]]), np.zeros((1, 2)), np.ones((1, 2), bool)).tolist()
    [[1.0, inf]]
    """
    return safe_exp(token_log_ratio(logp, old_logp, mask))


def sequence_log_ratio(logp: Any, old_logp: Any, mask: Any) -> Any:
    r""":math:`\mu_i = \frac{1}{L_i}\sum_t m_{it}\delta_{it} = \log s_i`, [N]; 0 for an empty row.

    >>> import numpy as np
    >>> sequence_log_ratio(np.array([[0.2, 0.4, 9.0]]), np.zeros((1, 3)),
    ...                    np.array([[1, 1, 0]])).round(12).tolist()
    [0.3]
    """
    xp = namespace(logp, old_logp)
    valid = _valid(xp, mask)
    delta = token_log_ratio(logp, old_logp, valid)
    lengths = row_lengths(valid, delta.dtype)
    return xp.sum(delta, axis=1) / xp.where(lengths > 0, lengths, xp.ones_like(lengths))


def sequence_ratio(logp: Any, old_logp: Any, mask: Any) -> Any:
    r""":math:`s_i = \exp(\mu_i)`, the geometric mean of the valid token ratios (eq. 4), [N].

    >>> import numpy as np
    >>> sequence_ratio(np.log(np.array([[2.0, 8.0]])), np.zeros((1, 2)),
    ...                np.ones((1, 2), bool)).round(12).tolist()
    [4.0]
    """
    return safe_exp(sequence_log_ratio(logp, old_logp, mask))
