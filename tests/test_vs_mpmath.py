"""The reference against the independent mpmath implementation on seeded random batches.

``tools/mpmath_reference.py`` evaluates the clause text at 60 digits with exact inputs; the
reference must agree within the spec's ``[tolerances.golden]`` (clause C.1 comparison) on
loss, gradient and every metric. Batches are generated vectorised with NumPy (one seed), with
ragged masks, empty rows, garbage at invalid positions, per-token advantages with zeros and
sign changes, random temperatures / clip widths / dual clip / count_empty_rows / normalizers,
and, in some batches, infinite log-ratios and (token methods) exact log-ratios in the hundreds.
Clip-method batches keep the ratios that matter 2e-3 (relative) away from the kinks.
"""

from __future__ import annotations

import math

import mpmath_reference as M
import numpy as np
import pytest
from sapo_conformance.compare import compare

import sapo_ref
from sapo_ref import spec

TOL = spec.TOLERANCES["golden"]
METHODS = tuple(spec.METHODS)
AGGS = tuple(spec.LOSS_AGGS)
CASES_PER_METHOD = 120
SEED = 20251122
KINK_MARGIN = 2e-3
GARBAGE = np.array([np.nan, np.inf, -np.inf, 1e30, -1e30])


def _f64(x):
    if isinstance(x, list):
        return np.array([_f64(v) for v in x], dtype=np.float64)
    return M.to_float64(x)


def _batches(method: str, count: int, rng: np.random.Generator):
    """``count`` random cases for ``method``: (logp, old_logp, advantages, mask, options)."""
    n_max, t_max = 4, 6
    k = 4 * count  # candidates; clip methods reject those near a kink
    shape = (k, n_max, t_max)
    n = rng.integers(1, n_max + 1, k)
    t = rng.integers(1, t_max + 1, k)
    length = rng.integers(0, t_max + 1, (k, n_max))
    length = np.where(rng.random((k, n_max)) < 0.1, 0, np.maximum(length, 1))  # empty rows
    cols = np.arange(t_max)
    mask = cols[None, None, :] < length[:, :, None]
    mask &= rng.random(shape) > 0.15  # holes
    scale = np.exp(rng.uniform(np.log(1e-3), np.log(2.0), (k, 1, 1)))
    logp = -rng.uniform(0.02, 4.0, shape)
    old = logp - rng.normal(0.0, 1.0, shape) * scale
    # Extreme log-ratios in a quarter of the batches: +-inf (one sign per row, clause 5.5) and,
    # for token methods, exact integers up to 300 (exact differences from logp = -0.25).
    extreme = (rng.random((k, 1, 1)) < 0.25) & (rng.random(shape) < 0.2)
    sign = np.where(rng.random((k, n_max, 1)) < 0.5, 1.0, -1.0)
    big = np.where(rng.random(shape) < 0.5, np.inf, rng.integers(30, 301, shape).astype(float))
    if spec.METHODS[method].ratio != "token":
        big = np.full(shape, np.inf)
    d_ext = sign * big
    logp = np.where(extreme, np.where(d_ext > 0, -0.25, -0.25 + d_ext), logp)
    old = np.where(extreme, np.where(d_ext > 0, -0.25 - d_ext, -0.25), old)
    adv_tok = np.round(rng.normal(0.0, 1.0, shape), 3)
    adv_tok = np.where(rng.random(shape) < 0.1, 0.0, adv_tok)
    adv_seq = adv_tok[:, :, 0]
    per_token = rng.random(k) < 0.5
    junk = GARBAGE[rng.integers(0, len(GARBAGE), (3,) + shape)]
    logp = np.where(mask, logp, junk[0])
    old = np.where(mask, old, junk[1])
    adv_tok = np.where(mask, adv_tok, junk[2])

    out = []
    for j in range(k):
        if len(out) == count:
            break
        nj, tj = n[j], t[j]
        m = mask[j, :nj, :tj]
        opts = _options(method, j, rng, m)
        adv = adv_tok[j, :nj, :tj] if per_token[j] else adv_seq[j, :nj]
        if _near_kink(method, (logp[j, :nj, :tj], old[j, :nj, :tj], adv, m, opts)):
            continue
        if j % 3 == 0:  # a 0/1 integer mask (clause 1.1)
            m = m.astype(np.int8)
        out.append((logp[j, :nj, :tj], old[j, :nj, :tj], adv, m, opts))
    assert len(out) == count
    return out


def _options(method: str, j: int, rng: np.random.Generator, mask: np.ndarray) -> dict:
    agg = AGGS[j % len(AGGS)]
    opts: dict = {"method": method, "loss_agg": agg}
    if agg == "seq-mean-token-sum-norm":
        opts["norm_length"] = float(rng.integers(1, 12))
    if spec.METHODS[method].gate == "soft":
        if rng.random() < 0.6:
            opts["tau_pos"], opts["tau_neg"] = np.exp(rng.uniform(-2.3, 2.3, 2)).round(3).tolist()
    else:
        if rng.random() < 0.6:
            # eps_low >= 1 (no lower bound) included.
            opts["eps_low"], opts["eps_high"] = rng.uniform(0.0, [1.5, 0.5]).round(3).tolist()
        if rng.random() < 0.3:
            opts["dual_clip"] = round(float(rng.uniform(1.5, 5.0)), 2)
    if rng.random() < 0.15:  # a shard of a larger batch (clause 3.8)
        valid = int(mask.sum())
        rows = int(mask.any(axis=1).sum())
        opts["normalizer"] = sapo_ref.Normalizer(
            float(valid + rng.integers(0, 5)), float(rows + rng.integers(0, 3))
        )
    elif rng.random() < 0.5:
        opts["count_empty_rows"] = bool(rng.random() < 0.5)
    return opts


def _near_kink(method: str, case) -> bool:
    logp, old, adv, mask, opts = case
    if spec.METHODS[method].gate != "clip":
        return False
    p = dict(spec.METHODS[method].defaults)
    p.update({k: opts[k] for k in ("eps_low", "eps_high", "dual_clip") if k in opts})
    with np.errstate(all="ignore"):
        delta = np.where(mask, logp - old, 0.0)
        if spec.METHODS[method].ratio != "token":
            lengths = mask.sum(axis=1, keepdims=True)
            mu = delta.sum(axis=1, keepdims=True) / np.maximum(lengths, 1)
            delta = np.broadcast_to(mu, delta.shape)
        x = np.exp(delta)
    a = adv if adv.ndim == 2 else np.broadcast_to(adv[:, None], mask.shape)
    near = np.zeros(mask.shape, bool)
    with np.errstate(all="ignore"):
        near |= (a > 0) & (np.abs(x / (1 + p["eps_high"]) - 1) < KINK_MARGIN)
        if 1 - p["eps_low"] > 0:
            near |= (a < 0) & (np.abs(x / (1 - p["eps_low"]) - 1) < KINK_MARGIN)
        if p["dual_clip"] is not None:
            near |= (a < 0) & (np.abs(x / p["dual_clip"] - 1) < KINK_MARGIN)
    return bool((near & mask).any())


def _mp_kwargs(opts: dict) -> dict:
    kw = dict(opts)
    if "normalizer" in kw:
        kw["normalizer"] = (kw["normalizer"].num_tokens, kw["normalizer"].num_rows)
    return kw


def _repro(case) -> str:
    logp, old, adv, mask, opts = case
    arr = lambda x: f"np.array({np.asarray(x).tolist()!r})".replace("nan", "np.nan").replace(
        "inf", "np.inf"
    )
    return (f"sapo_ref.policy_loss({arr(logp)}, {arr(old)}, {arr(adv)}, {arr(mask)}, "
            f"**{opts!r})")  # fmt: skip


@pytest.mark.clause("C.1", "1.7", "7.1", *(s.clause for s in spec.LOSS_AGGS.values()))
@pytest.mark.parametrize(
    "method", [pytest.param(m, marks=pytest.mark.clause(spec.METHODS[m].clause)) for m in METHODS]
)
def test_reference_matches_mpmath_on_random_batches(method: str) -> None:
    rng = np.random.default_rng([SEED, METHODS.index(method)])
    failures = []
    for case in _batches(method, CASES_PER_METHOD, rng):
        logp, old, adv, mask, opts = case
        res = sapo_ref.policy_loss(logp, old, adv, mask, **opts)
        want = M.policy_loss(logp, old, adv, mask, **_mp_kwargs(opts))
        checks = [
            compare("loss", res.loss, _f64(want.loss), TOL["value"]),
            compare("grad", res.grad, _f64(want.grad), TOL["grad"]),
        ] + [
            compare(f"metrics[{k!r}]", res.metrics[k], _f64(v), TOL["value"])
            for k, v in want.metrics.items()
        ]
        assert list(res.metrics) == list(want.metrics)
        bad = [c.message for c in checks if not c.ok]
        if bad:
            failures.append("; ".join(bad) + "\n  repro: " + _repro(case))
    assert not failures, f"{len(failures)} mismatches, first:\n" + "\n".join(failures[:3])


def test_random_batches_exercise_the_edge_cases() -> None:
    """The generator really produces what the docstring promises (so the test above means it)."""
    rng = np.random.default_rng([SEED, 0])
    cases = _batches("gspo", CASES_PER_METHOD, rng)
    assert any((~c[3].astype(bool).any(axis=1)).any() for c in cases)  # empty rows
    assert any(c[3].dtype == np.int8 for c in cases)
    with np.errstate(invalid="ignore"):
        assert any(np.isinf(c[0] - c[1])[c[3] != 0].any() for c in cases)  # infinite ratios
    assert any(c[2].ndim == 2 and (c[2][c[3] != 0] == 0).any() for c in cases)  # A = 0
    assert any("dual_clip" in c[4] for c in cases) and any("normalizer" in c[4] for c in cases)
    assert len({c[4]["loss_agg"] for c in cases}) == len(AGGS)


@pytest.mark.clause("9.1")
def test_group_advantages_match_mpmath() -> None:
    rng = np.random.default_rng([SEED, 100])
    for j in range(60):
        g = int(rng.integers(1, 7))
        groups = int(rng.integers(1, 5))
        binary = rng.random() < 0.5
        rewards = (
            (rng.random(g * groups) < 0.5).astype(float)
            if binary
            else np.round(rng.normal(0, 2, g * groups), 3)
        )
        opts = {"scale": ["std", "none"][j % 2], "ddof": int(rng.integers(0, 2)),
                "eps": float(rng.choice([0.0, 1e-6, 1e-4]))}  # fmt: skip
        if g == 1 and opts["ddof"] == 1 and opts["scale"] == "std":
            pass  # a group of one is 0 by clause 9.1 whatever ddof
        got = sapo_ref.group_advantages(rewards, g, **opts)
        want = _f64(M.group_advantages(rewards.tolist(), g, **opts))
        c = compare("advantages", got, want, TOL["value"])
        assert c.ok, f"{c.message}; rewards={rewards.tolist()}, group_size={g}, {opts}"


@pytest.mark.clause("9.2")
def test_sequence_gate_diagnostics_match_mpmath() -> None:
    rng = np.random.default_rng([SEED, 200])
    for j in range(60):
        n, t = int(rng.integers(1, 5)), int(rng.integers(1, 7))
        mask = rng.random((n, t)) < 0.7
        logp = -rng.uniform(0.02, 4.0, (n, t))
        old = logp - rng.normal(0, 1, (n, t)) * math.exp(rng.uniform(-7, 0.7))
        logp = np.where(mask, logp, np.nan)
        tau = float(rng.uniform(0.1, 4)) if j % 2 else rng.uniform(0.1, 4, n).round(3)
        got = sapo_ref.sequence_gate_diagnostics(logp, old, mask, tau)
        want = M.sequence_gate_diagnostics(
            logp.tolist(),
            old.tolist(),
            mask.tolist(),
            tau if isinstance(tau, float) else tau.tolist(),
        )
        for key in ("var", "gap", "bound", "mean_log_ratio"):
            c = compare(key, getattr(got, key), _f64(want[key]), TOL["value"])
            assert c.ok, f"{c.message}; case {j}"
        # Eq. 21 holds exactly in the high-precision values.
        assert all(g <= b for g, b in zip(want["gap"], want["bound"]))
