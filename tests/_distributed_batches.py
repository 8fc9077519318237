"""Shared by tests/test_distributed_*.py and their worker processes (not a test module).

Ragged float64 batches with empty rows and garbage in the padding, shards trimmed to their own
padded length, the spec's float64 comparison, and the tiny model whose parameter gradient the
data-parallel tests check. Imported by name: the test modules put their folder on ``sys.path``
(pytest's importlib mode does not), and worker scripts run from it.
"""

from __future__ import annotations

import numpy as np

from sapo_ref import spec

CONFIGS = [
    (method, loss_agg, count_empty_rows)
    for method in spec.METHODS
    for loss_agg in spec.LOSS_AGGS
    for count_empty_rows in (False, True)
]
NORM_LENGTH = 7.0


def options(method: str, loss_agg: str) -> dict:
    """Keyword arguments of policy_loss for a config (norm_length only where required)."""
    out = {"method": method, "loss_agg": loss_agg}
    if loss_agg == "seq-mean-token-sum-norm":
        out["norm_length"] = NORM_LENGTH
    return out


def ragged_batch(
    rng: np.random.Generator,
    n_rows: int,
    t_max: int,
    *,
    empty_rows: int = 2,
    per_token: bool = False,
) -> dict[str, np.ndarray]:
    """A batch with prefix masks of random lengths, ``empty_rows`` empty rows and garbage padding.

    Ratios stay within e^{+-0.8} so every gate (soft and clipped, both sides) is exercised.
    """
    lengths = rng.integers(1, t_max + 1, size=n_rows)
    lengths[rng.choice(n_rows, size=empty_rows, replace=False)] = 0
    mask = np.arange(t_max)[None, :] < lengths[:, None]
    logp = np.log(rng.uniform(0.05, 1.0, size=(n_rows, t_max)))
    old_logp = logp + rng.uniform(-0.8, 0.8, size=(n_rows, t_max))
    adv = rng.normal(size=(n_rows, t_max) if per_token else n_rows)
    garbage = rng.choice(np.array([np.nan, np.inf, -np.inf, 1e30]), size=(n_rows, t_max))
    logp = np.where(mask, logp, garbage)
    old_logp = np.where(mask, old_logp, garbage[::-1])
    if per_token:
        adv = np.where(mask, adv, np.nan)
    features = rng.normal(size=(n_rows, t_max, 3))
    return {
        "logp": logp,
        "old_logp": old_logp,
        "advantages": adv,
        "mask": mask,
        "features": features,
    }


def shard(
    batch: dict[str, np.ndarray], rows: np.ndarray, *, trim: bool = True
) -> dict[str, np.ndarray]:
    """The rows ``rows`` of a batch, padded to their own longest row (at least one column), or
    to the batch's width with ``trim=False`` (static shapes, as JAX trainers use)."""
    t = max(1, int(batch["mask"][rows].sum(axis=1).max())) if trim else batch["mask"].shape[1]
    out = {}
    for k, v in batch.items():
        v = v[rows]
        out[k] = v[:, :t] if v.ndim >= 2 else v
    return out


def scatter_rows(parts: list[tuple[np.ndarray, np.ndarray]], shape: tuple[int, int]) -> np.ndarray:
    """Assemble [rows_k, T_k] shard arrays into a zero [N, T] array at their row indices."""
    out = np.zeros(shape)
    for rows, values in parts:
        out[rows, : values.shape[1]] = values
    return out


def assert_close(got, want, dtype: str, kind: str, what: str = "") -> None:
    """Clause C.1: |got - want| <= atol * max(1, max|want|) + rtol * |want|, from spec tolerances."""
    tol = spec.TOLERANCES[dtype][kind]
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    scale = max(1.0, float(np.max(np.abs(want), initial=0.0)))
    bound = tol.atol * scale + tol.rtol * np.abs(want)
    err = np.abs(got - want)
    assert np.all(np.isfinite(got)), f"{what}: non-finite result"
    assert np.all(err <= bound), (
        f"{what}: max error {err.max():.3e} exceeds {dtype} {kind} tolerance"
    )


def model_logp(features: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The test model, logp = log sigmoid(x . w), and d logp / dw = sigmoid(-x . w) x (analytic)."""
    z = features @ weights
    logp = -np.logaddexp(0.0, -z)
    dlogp_dw = (1.0 / (1.0 + np.exp(z)))[..., None] * features
    return logp, dlogp_dw
