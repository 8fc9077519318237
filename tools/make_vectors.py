"""Write the golden vectors spec/vectors/<spec version>/*.json from tools/mpmath_reference.py.

Deterministic: every random draw comes from ``random.Random`` seeded with the group name
(string seeds hash with SHA-512, independent of PYTHONHASHSEED and of NumPy's stream policy);
inputs are rounded to a few decimals so that the files stay small and readable; expected
values are the 60-digit results correctly rounded to float64 and written with ``repr``
(shortest round-trip), non-finite floats as "nan"/"inf"/"-inf".

Spec 0.2.0 keeps every 0.1.0 group as it was (only the header's version changes) and adds the
``terms`` group (clause 10: per-token weights, the KL penalty).

Clip-method cases keep every ratio that matters (the token ratio for grpo, the sequence ratio
for gspo/gspo-token, at tokens with A != 0) at least 1e-3 (relative) away from the clip kinks
of clause 2.5; the generator refuses a case that breaks this. Likewise ``low-var-k3`` cases keep every k3
value 1e-3 (relative) away from its clip at 10.

    python tools/make_vectors.py            # (re)write the files
    python tools/make_vectors.py --check    # exit 1 if a committed file differs
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mpmath_reference as M

ROOT = Path(__file__).resolve().parents[1]
VERSION: str = M.SPEC["meta"]["version"]
OUT_DIR = ROOT / "spec" / "vectors" / VERSION
SCHEMA_ID = "sapo-ref-vectors/1"
GENERATOR = "tools/make_vectors.py + tools/mpmath_reference.py (mpmath, 60 digits)"
KINK_MARGIN = 1e-3
NAN, INF = math.nan, math.inf

METHODS = tuple(M.SPEC["methods"])
AGGS = tuple(M.SPEC["loss_aggs"])
METHOD_CLAUSES = {m: [M.SPEC["methods"][m]["clause"]] for m in METHODS}
METHOD_CLAUSES["sapo"].append("2.2")
METHOD_CLAUSES["grpo"].append("2.5")
AGG_CLAUSES = {a: M.SPEC["loss_aggs"][a]["clause"] for a in AGGS}
NORM_LENGTH = 8.0
CLIP = {m for m in METHODS if M.SPEC["methods"][m]["gate"] == "clip"}
SEQUENCE = {m for m in METHODS if M.SPEC["methods"][m]["ratio"] != "token"}


class KinkError(ValueError):
    """A clip-method case has a ratio within KINK_MARGIN of a clip kink."""


# ------------------------------------------------------------------------------------------
# Encoding
# ------------------------------------------------------------------------------------------
def _enc(x: Any) -> Any:
    """float64 or mpf -> strict-JSON value (mpf correctly rounded)."""
    if isinstance(x, (list, tuple)):
        return [_enc(v) for v in x]
    if isinstance(x, bool):
        return x
    v = float(x) if isinstance(x, (int, float)) else M.to_float64(x)
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return v


def _dump_case(case: dict[str, Any]) -> str:
    body = ",\n   ".join(
        f"{json.dumps(k)}: {json.dumps(v, separators=(',', ':'), allow_nan=False)}"
        for k, v in case.items()
    )
    return "  {" + body + "}"


def render(cases: list[dict[str, Any]]) -> str:
    """One vector file's text: header keys, then one case per block."""
    head = {"schema": SCHEMA_ID, "spec_version": VERSION, "generator": GENERATOR,
            "digits": M.DPS}  # fmt: skip
    lines = ["{"] + [f" {json.dumps(k)}: {json.dumps(v)}," for k, v in head.items()]
    lines.append(' "cases": [')
    lines.append(",\n".join(_dump_case(c) for c in cases))
    lines += [" ]", "}"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------
# Cases
# ------------------------------------------------------------------------------------------
def _params(method: str, options: dict[str, Any]) -> dict[str, Any]:
    p = {k: (None if v == "none" else v) for k, v in M.SPEC["methods"][method]["defaults"].items()}
    p.update({k: v for k, v in options.items() if k in p})
    return p


def check_kinks(logp, old_logp, adv, mask, options) -> None:
    """Raise KinkError when a clip case samples within KINK_MARGIN of a kink (clause 2.5)."""
    method = options["method"]
    if method not in CLIP:
        return
    p = _params(method, options)
    with M.mp.workdps(M.DPS):
        for i, row in enumerate(mask):
            cells = [t for t, v in enumerate(row) if v]
            deltas = [M.mpf(logp[i][t]) - M.mpf(old_logp[i][t]) for t in cells]
            if method in SEQUENCE and cells:
                mu = M.mpmath.fsum(deltas) / len(cells)
                deltas = [mu] * len(cells)
            for t, d in zip(cells, deltas):
                a = adv[i][t] if isinstance(adv[i], list) else adv[i]
                dist = M.kink_distance(d, a, p["eps_low"], p["eps_high"], p["dual_clip"])
                if dist < KINK_MARGIN:
                    raise KinkError(f"ratio at {(i, t)} is {float(dist):.2e} from a clip kink")


def check_kl_clip(logp, ref_logp, mask, options) -> None:
    """Raise KinkError when a low-var-k3 case has k3(u) within KINK_MARGIN of the clip."""
    if ref_logp is None or options.get("kl_estimator") != "low-var-k3":
        return
    with M.mp.workdps(M.DPS):
        for i, row in enumerate(mask):
            for t, valid in enumerate(row):
                if valid:
                    k3, _ = M.kl_estimate(M.mpf(ref_logp[i][t]) - M.mpf(logp[i][t]), "k3")
                    if abs(k3 / M.LOW_VAR_CLIP - 1) < KINK_MARGIN:
                        raise KinkError(f"k3 at {(i, t)} is {float(k3)!r}, near the clip")


def policy_case(cid: str, clauses: list[str], description: str, logp, old_logp, adv, mask,
                *, weights=None, ref_logp=None, **options: Any) -> dict[str, Any]:  # fmt: skip
    """One policy_loss case: inputs, the options it sets, and the mpmath results.

    ``weights`` and ``ref_logp`` (clause 10) are inputs; ``kl_coef`` and ``kl_estimator``
    options. With ``ref_logp`` the expected values include ``grad_ref_logp``.
    """
    options.setdefault("method", "sapo")
    options.setdefault("loss_agg", "seq-mean-token-mean")
    options = {"method": options.pop("method"), "loss_agg": options.pop("loss_agg"), **options}
    check_kinks(logp, old_logp, adv, mask, options)
    check_kl_clip(logp, ref_logp, mask, options)
    kw = dict(options)
    if "normalizer" in kw:
        kw["normalizer"] = (kw["normalizer"]["num_tokens"], kw["normalizer"]["num_rows"])
    res = M.policy_loss(logp, old_logp, adv, mask, weights=weights, ref_logp=ref_logp, **kw)
    method, agg = options["method"], options["loss_agg"]
    tags = METHOD_CLAUSES[method] + [AGG_CLAUSES[agg]] + clauses + ["7.1"]
    inputs = {
        "logp": _enc(logp),
        "old_logp": _enc(old_logp),
        "advantages": _enc(adv),
        "mask": [[bool(v) for v in r] for r in mask],
    }
    expected = {
        "loss": _enc(res.loss),
        "grad": _enc(res.grad),
        "metrics": {k: _enc(v) for k, v in res.metrics.items()},
    }
    if weights is not None:
        inputs["weights"] = _enc(weights)
    if ref_logp is not None:
        inputs["ref_logp"] = _enc(ref_logp)
        expected["grad_ref_logp"] = _enc(res.ref_grad)
    return {
        "id": cid,
        "kind": "policy_loss",
        "clauses": sorted(set(tags), key=_clause_key),
        "description": description,
        "inputs": inputs,
        "options": options,
        "expected": expected,
    }


def _clause_key(c: str) -> tuple:
    major, minor = c.split(".")
    return (major == "C", int(major) if major != "C" else 0, int(minor))


def _agg_options(agg: str) -> dict[str, Any]:
    return {"norm_length": NORM_LENGTH} if agg == "seq-mean-token-sum-norm" else {}


def _r4(x: float) -> float:
    return round(x, 4)


def random_batch(rng: random.Random, n: int, t: int, *, scale: float = 0.4,
                 per_token: bool = False, holes: bool = True,
                 garbage: bool = False) -> tuple[list, list, list, list]:  # fmt: skip
    """A ragged batch: right-padded rows (with an interior hole sometimes), log-ratios of
    standard deviation ``scale``; invalid slots hold ordinary numbers or, with ``garbage``,
    NaN / +-inf / +-1e30 (in logp, old_logp and per-token advantages)."""
    mask = []
    for _ in range(n):
        length = rng.randint(1, t)
        row = [j < length for j in range(t)]
        if holes and length > 2 and rng.random() < 0.4:
            row[rng.randint(1, length - 2)] = False
        mask.append(row)
    logp = [[_r4(-rng.uniform(0.02, 4.0)) for _ in range(t)] for _ in range(n)]
    old = [[_r4(lp - rng.gauss(0.0, scale)) for lp in row] for row in logp]
    if per_token:
        adv: list = [[round(rng.gauss(0.0, 1.0), 3) for _ in range(t)] for _ in range(n)]
        # Sign changes within a row: row 0 alternates its signs.
        adv[0] = [abs(a) * (1 if j % 2 == 0 else -1) or 0.5 for j, a in enumerate(adv[0])]
    else:
        adv = [round(rng.gauss(0.0, 1.0), 3) or 0.25 for _ in range(n)]
    if garbage:
        junk = [NAN, INF, -INF, 1e30, -1e30]
        for i in range(n):
            for j in range(t):
                if not mask[i][j]:
                    logp[i][j] = rng.choice(junk)
                    old[i][j] = rng.choice(junk)
                    if per_token:
                        adv[i][j] = rng.choice(junk)
    return logp, old, adv, mask


def sampled(rng: random.Random, make: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Draw until the case keeps clear of clip kinks."""
    for _ in range(200):
        try:
            return make()
        except KinkError:
            continue
    raise RuntimeError("could not sample a case away from the clip kinks")


# ------------------------------------------------------------------------------------------
# Groups
# ------------------------------------------------------------------------------------------
def group_methods() -> list[dict[str, Any]]:
    """Every method x aggregation, per-sequence and per-token advantages, ragged masks."""
    rng = random.Random("sapo-ref-vectors/methods")
    cases = []
    for method in METHODS:
        for agg in AGGS:
            for per_token in (False, True):
                kind = "adv-token" if per_token else "adv-seq"
                cases.append(sampled(rng, lambda: policy_case(
                    f"{method}/{agg}/{kind}",
                    ["1.2", "1.3", "1.5", "3.1"] + (["1.4"] if method in SEQUENCE else []),
                    f"{method}, {agg}, {'per-token' if per_token else 'per-sequence'} "
                    "advantages, ragged mask with holes, default parameters",
                    *random_batch(rng, rng.randint(2, 4), rng.randint(3, 6), per_token=per_token),
                    method=method, loss_agg=agg, **_agg_options(agg))))  # fmt: skip
    return cases


def group_special() -> list[dict[str, Any]]:
    """Empty rows, a fully masked batch, zero advantages, on-policy, temperatures."""
    rng = random.Random("sapo-ref-vectors/special")
    cases = []
    for method in METHODS:
        for cer in (False, True):
            aggs = ["seq-mean-token-mean"] + (
                ["token-mean", "seq-mean-token-sum-norm"] if method in ("sapo", "gspo") else []
            )
            for agg in aggs:

                def make():
                    lp, old, adv, mask = random_batch(rng, 4, 5, garbage=True)
                    empty = rng.randint(0, 3)
                    mask[empty] = [False] * 5
                    lp[empty] = [rng.choice([NAN, INF, 1e30]) for _ in range(5)]
                    return policy_case(
                        f"{method}/empty-row/count_empty_rows={str(cer).lower()}/{agg}", ["1.2", "3.6"],
                        f"row {empty} is empty (holding garbage); count_empty_rows={cer}",
                        lp, old, adv, mask, method=method, loss_agg=agg,
                        count_empty_rows=cer, **_agg_options(agg))  # fmt: skip

                cases.append(sampled(rng, make))
    for method in METHODS:
        for cer, agg in ((None, "seq-mean-token-mean"), (True, "seq-mean-token-sum")):
            lp, old, adv, _ = random_batch(rng, 3, 4, garbage=True, per_token=True)
            mask = [[False] * 4 for _ in range(3)]
            lp = [[rng.choice([NAN, INF, -INF, 1e30]) for _ in range(4)] for _ in range(3)]
            adv = [[rng.choice([NAN, INF, -1e30]) for _ in range(4)] for _ in range(3)]
            extra = {} if cer is None else {"count_empty_rows": cer}
            cases.append(policy_case(
                f"{method}/fully-masked/{agg}", ["1.2", "3.6", "3.7", "6.1"],
                "no valid token (garbage everywhere): loss 0, gradient 0, empty metrics 0",
                lp, old, adv, mask, method=method, loss_agg=agg, **extra))  # fmt: skip
    for method in METHODS:
        # Clause 5.1: A = 0 gives term 0 and gradient 0, r = inf included.
        lp = [[-0.5, -1.25, -2.0, -0.75], [-1.0, -0.25, -3.5, -0.5]]
        old = [[-INF, -1.0, -1.5, -0.5], [-1.0625, -0.5, -3.0, -9.0]]
        mask = [[True, True, True, False], [True, True, True, True]]
        adv = [0.0, 0.0] if method in SEQUENCE else [[0.0, 0.0, 0.0, 0.0], [0.0, 1.5, -0.75, 0.0]]
        cases.append(sampled(rng, lambda: policy_case(
            f"{method}/zero-advantage", ["5.1", "1.3"],
            "A = 0 at every token with an infinite ratio (and at others): term and gradient 0",
            lp, old, adv, mask, method=method)))  # fmt: skip
    for method, opts in (("sapo", {}), ("sapo", {"tau_pos": 0.3, "tau_neg": 3.0}),
                         ("sapo-seq", {"tau_pos": 2.0, "tau_neg": 0.7}), ("grpo", {}),
                         ("gspo", {"eps_low": 0.2, "eps_high": 0.2}),
                         ("gspo-token", {"eps_low": 0.2, "eps_high": 0.28})):  # fmt: skip
        lp, _, adv, mask = random_batch(rng, 3, 5, per_token=method != "sapo-seq")
        tag = "-".join(f"{k}={v}" for k, v in opts.items()) or "defaults"
        cases.append(policy_case(
            f"{method}/on-policy/{tag}", ["5.2", "2.2"],
            "delta = 0 everywhere: the gradient is the unclipped one, -c_it A_it",
            lp, [row[:] for row in lp], adv, mask, method=method, **opts))  # fmt: skip
    for method in ("sapo", "sapo-seq"):
        for tp, tn in ((0.5, 2.0), (2.0, 0.5), (1e-6, 1e6), (1e6, 1e-6), (1.0, 0.95)):
            for per_token in (False, True):
                lp, old, adv, mask = random_batch(rng, 3, 5, per_token=per_token)
                cases.append(policy_case(
                    f"{method}/tau_pos={tp}-tau_neg={tn}/{'adv-token' if per_token else 'adv-seq'}",
                    ["1.6", "4.1", "8.4"],
                    f"temperatures by the sign of A_it: tau_pos={tp}, tau_neg={tn}",
                    lp, old, adv, mask, method=method, tau_pos=tp, tau_neg=tn,
                    loss_agg=rng.choice(AGGS[:3])))  # fmt: skip
    return cases


def group_masking() -> list[dict[str, Any]]:
    """Garbage (NaN, +-inf, +-1e30) at invalid positions changes nothing (clause 6.1)."""
    rng = random.Random("sapo-ref-vectors/masking")
    cases = []
    for method in METHODS:
        for per_token in (False, True):
            kind = "adv-token" if per_token else "adv-seq"
            cases.append(sampled(rng, lambda: policy_case(
                f"{method}/masked-garbage/{kind}", ["1.2", "6.1"],
                "invalid positions of logp, old_logp (and per-token advantages) hold NaN, "
                "+-inf and +-1e30",
                *random_batch(rng, 4, 6, per_token=per_token, garbage=True),
                method=method, loss_agg=rng.choice(AGGS[:3]))))  # fmt: skip
    return cases


def _rows(deltas: list[list[float]], base: float = -0.25) -> tuple[list, list, list]:
    """logp, old_logp and mask with the given exact log-ratios (None = invalid slot).

    A positive delta comes from a very unlikely behaviour token (old_logp = base - delta), a
    negative one from an unlikely current token (logp = base + delta): realistic log-probs
    and, with dyadic deltas, exact float64 differences.
    """
    logp, old, mask = [], [], []
    for row in deltas:
        lr, orow, mrow = [], [], []
        for d in row:
            if d is None:
                lr.append(NAN), orow.append(-1e30), mrow.append(False)
            elif d >= 0:
                lr.append(base), orow.append(base - d), mrow.append(True)
            else:
                lr.append(round(base + d, 6)), orow.append(base), mrow.append(True)
        logp.append(lr), old.append(orow), mask.append(mrow)
    return logp, old, mask


def group_extreme() -> list[dict[str, Any]]:
    """Extreme valid log-ratios (clauses 5.3, 5.4, 6.2, 6.3): |delta| in the hundreds, +-inf."""
    cases = []
    sapo_rows = [[300.0, -300.0, 700.0, -700.0, INF, -INF],
                 [40.0, -40.0, 5.5, -5.5, 1e-12, -1e-12],
                 [0.75, 80.0, -INF, 2.5, None, None]]  # fmt: skip
    adv_tok = [[1.5, -1.0, -0.5, 2.0, -1.25, 0.75],
               [-0.5, 0.5, 1.0, -1.0, 2.0, -2.0],
               [1.0, -1.0, 0.5, -0.25, NAN, INF]]  # fmt: skip
    for agg in ("seq-mean-token-mean", "token-mean"):
        lp, old, mask = _rows(sapo_rows)
        cases.append(policy_case(
            f"sapo/extreme-log-ratios/{agg}", ["5.3", "6.2", "6.3", "1.3"],
            "token log-ratios +-300, +-700, +-inf, +-40, +-5.5, +-1e-12: exact limits, no clamp",
            lp, old, adv_tok, mask, method="sapo", loss_agg=agg))  # fmt: skip
    lp, old, mask = _rows(sapo_rows)
    cases.append(policy_case(
        "sapo/extreme-log-ratios/tau_pos=4.0-tau_neg=0.25", ["5.3", "1.6"],
        "extreme log-ratios with other temperatures", lp, old, adv_tok, mask,
        method="sapo", tau_pos=4.0, tau_neg=0.25))  # fmt: skip
    seq_rows = [[INF, 0.5, -0.25, None], [-INF, 1.0, 2.0, 3.0], [300.0, 300.0, -100.0, None],
                [-350.0, -350.0, -350.0, 5.0]]  # fmt: skip
    for per_token in (False, True):
        lp, old, mask = _rows(seq_rows)
        adv = ([[1.0, -0.5, 0.75, NAN], [-1.0, 1.0, -0.25, 0.5], [2.0, -1.0, 1.0, INF],
                [-0.5, 0.5, -2.0, 1.0]] if per_token else [1.5, -0.75, -1.0, 0.5])  # fmt: skip
        kind = "adv-token" if per_token else "adv-seq"
        cases.append(policy_case(
            f"sapo-seq/extreme-log-ratios/{kind}", ["5.3", "1.4", "6.3"],
            "sequence log-ratios +inf, -inf, +166.67, -261.25", lp, old, adv, mask,
            method="sapo-seq"))  # fmt: skip
    # Clipped methods, bounded: +inf with A > 0 (clipped), -inf, -300 with A > 0, +300 clipped.
    lp, old, mask = _rows([[INF, -INF, -300.0, 0.5], [300.0, -INF, 0.125, -0.375]])
    adv = [[1.0, -1.0, 2.0, -0.5], [0.5, 1.5, -1.0, 1.0]]
    for opts in ({}, {"dual_clip": 3.0}):
        tag = "dual_clip=3.0" if opts else "no-dual"
        cases.append(policy_case(
            f"grpo/extreme-bounded/{tag}", ["5.4", "6.3", "2.6"],
            "infinite and +-300 log-ratios where the GRPO term is bounded: finite limits",
            lp, old, adv, mask, method="grpo", **opts))  # fmt: skip
    # A < 0 and a huge finite ratio: the unclipped term r A is huge but finite.
    lp, old, mask = _rows([[300.0, 0.0625, -0.125], [700.0, None, 0.25]])
    cases.append(policy_case(
        "grpo/extreme-large-finite", ["5.4", "6.2"],
        "A < 0 at r = e^300 and e^700: the term r A is huge and finite (no clamp)",
        lp, old, [[-0.5, 1.0, -1.0], [-1e-3, 0.0, 1.0]], mask, method="grpo",
        loss_agg="token-mean"))  # fmt: skip
    # A < 0 with e^delta past the largest float64 while c * A * r is finite (the overflow band).
    lp, old, mask = _rows([[710.0, 0.0625], [712.0, -0.125]])
    cases.append(policy_case(
        "grpo/overflow-band-finite", ["5.4", "6.3"],
        "A < 0 at r = e^710 and e^712: r overflows float64 but c A r does not; exact finite values",
        lp, old, [[-0.5, 1.0], [-1e-3, 1.0]], mask, method="grpo",
        loss_agg="token-mean"))  # fmt: skip
    # A < 0 and r = inf without dual clip: loss +inf, gradient +inf at that token.
    lp, old, mask = _rows([[INF, 0.0625, -0.125], [-0.25, 0.5, None]])
    for opts in ({}, {"dual_clip": 3.0}):
        tag = "dual_clip=3.0" if opts else "no-dual"
        cases.append(policy_case(
            f"grpo/inf-ratio-negative-advantage/{tag}", ["5.4", "2.6"],
            "A < 0 at r = inf: loss and gradient +inf without dual clip; c A and 0 with it",
            lp, old, [[-1.0, 0.5, 1.0], [-0.5, 1.0, 2.0]], mask, method="grpo",
            **opts))  # fmt: skip
    seq = [[INF, 0.125, -0.25, None], [-INF, 0.5, 0.25, 1.0], [300.0, 300.0, 301.0, None],
           [0.0625, -0.5, None, None]]  # fmt: skip
    for method in ("gspo", "gspo-token"):
        for per_token in (False, True):
            for opts in ({}, {"dual_clip": 2.5}):
                lp, old, mask = _rows(seq)
                adv = ([[-1.0, 0.5, -0.5, 0.0], [1.0, -1.0, 0.5, -2.0], [-0.25, 0.5, -1.0, 0.0],
                        [1.0, -1.0, 0.0, 0.0]] if per_token
                       else [-1.0, 1.0, -0.25, 0.75])  # fmt: skip
                kind = "adv-token" if per_token else "adv-seq"
                tag = "dual_clip=2.5" if opts else "no-dual"
                cases.append(policy_case(
                    f"{method}/extreme-log-ratios/{kind}/{tag}", ["5.4", "1.4", "2.6"],
                    "sequence log-ratios +inf (A < 0: +inf gradient "
                    + ("to every valid token of the row" if method == "gspo"
                       else "at each A < 0 token only") + " unless dual clip), -inf, 300.33",
                    lp, old, adv, mask, method=method, **opts))  # fmt: skip
    return cases


def group_clip() -> list[dict[str, Any]]:
    """Dual clip, clip-higher, eps_low >= 1, zero widths, GSPO defaults (clauses 2.4-2.8)."""
    ln = lambda r: _r4(math.log(r))
    cases = []
    ratios = [[0.5, 0.9, 2.0, 4.0, 10.0, 1.1], [4.0, 1.25, 0.75, 0.85, 1.3, 1.15]]
    lp, old, mask = _rows([[ln(r) for r in row] for row in ratios])
    adv = [[-1.0, -0.5, -2.0, -1.5, -0.25, 1.0], [1.0, 1.5, -1.0, -0.5, 0.75, -2.0]]
    for opts, clauses, what in (
        ({"dual_clip": 3.0}, ["2.6"], "dual clip c = 3 (A < 0: r = 4, 10 held at c A)"),
        ({"eps_low": 0.2, "eps_high": 0.28}, ["2.4"], "clip-higher eps_high 0.28 > eps_low 0.2"),
        ({"eps_low": 0.28, "eps_high": 0.2}, ["2.4"], "eps_high < eps_low"),
        ({"eps_low": 0.2, "eps_high": 0.28, "dual_clip": 5.0}, ["2.4", "2.6"],
         "clip-higher and dual clip c = 5"),
        ({"eps_low": 1.5, "eps_high": 0.5}, ["2.4"], "eps_low >= 1: no lower bound"),
        ({"eps_low": 0.0, "eps_high": 0.0}, ["2.4"], "zero widths: only r = 1 passes"),
    ):  # fmt: skip
        tag = "-".join(f"{k}={v}" for k, v in opts.items())
        for agg in ("seq-mean-token-mean", "token-mean"):
            cases.append(policy_case(
                f"grpo/{tag}/{agg}", clauses + ["2.5"], what, lp, old, adv, mask,
                method="grpo", loss_agg=agg, **opts))  # fmt: skip
    lp, old, mask = _rows([[-INF, -5.0, ln(0.5)], [-INF, ln(1.5), None]])
    cases.append(policy_case(
        "grpo/eps_low=1.5/zero-ratio", ["2.4", "5.4"],
        "eps_low >= 1 with r = 0 and r = e^-5 at A < 0: no lower clip, gradient r A",
        lp, old, [[-1.0, -1.0, -0.5], [1.0, -2.0, 0.0]], mask, method="grpo",
        eps_low=1.5, eps_high=0.2))  # fmt: skip
    seq = [[ln(3.0), ln(3.0), ln(3.0)], [ln(1.5), ln(1.5), None], [ln(0.5), ln(0.5), ln(0.5)],
           [ln(1.25), ln(1.25), ln(1.25)]]  # fmt: skip
    for method in ("gspo", "gspo-token"):
        for opts in ({"eps_low": 0.2, "eps_high": 0.28, "dual_clip": 2.0},
                     {"eps_low": 0.2, "eps_high": 0.28}):  # fmt: skip
            for per_token in (False, True):
                lp, old, mask = _rows(seq)
                adv = ([[-1.0, 0.5, -0.5], [-1.0, 1.0, 0.0], [-0.5, 1.0, 0.25],
                        [1.0, -1.0, 2.0]] if per_token else [-1.0, -0.5, -0.75, 1.0])  # fmt: skip
                tag = "-".join(f"{k}={v}" for k, v in opts.items())
                kind = "adv-token" if per_token else "adv-seq"
                cases.append(policy_case(
                    f"{method}/{tag}/{kind}", ["2.4", "2.6", "2.7"],
                    "sequence ratios 3, 1.5, 0.5, 1.25 against clip-higher"
                    + (" and dual clip c = 2" if "dual_clip" in opts else ""),
                    lp, old, adv, mask, method=method, **opts))  # fmt: skip
    # GSPO paper defaults: the band [0.9997, 1.0004] is narrower than the kink margin, so the
    # sequence ratios sit just outside it on either side.
    seq = [[0.002, 0.003, 0.001], [-0.002, -0.003, -0.001], [0.004, -0.001, None]]
    lp, old, mask = _rows(seq)
    for method in ("gspo", "gspo-token"):
        for adv in ([1.0, 1.0, -1.0], [-1.0, -1.0, 1.0]):
            cases.append(policy_case(
                f"{method}/paper-defaults/adv={adv[0]:+g}", ["2.7", "4.1"],
                "GSPO-paper eps 3e-4 / 4e-4 with s = e^0.002, e^-0.002, e^0.0015",
                lp, old, adv, mask, method=method))  # fmt: skip
    return cases


def group_shards() -> list[dict[str, Any]]:
    """A shard given the global counts is its exact share of the global batch (clause 3.8)."""
    rng = random.Random("sapo-ref-vectors/shards")
    cases = []
    for method, agg in (
        ("sapo", "seq-mean-token-mean"),
        ("sapo", "token-mean"),
        ("gspo", "seq-mean-token-sum"),
        ("grpo", "seq-mean-token-sum-norm"),
    ):

        def make():
            lp, old, adv, mask = random_batch(rng, 4, 5, per_token=method == "sapo")
            mask[3] = [False] * 5  # an empty row in the second shard
            n = sum(sum(r) for r in mask)
            rows = sum(1 for r in mask if any(r))
            out = []
            for s, (a, b) in enumerate(((0, 2), (2, 4))):
                out.append(policy_case(
                    f"{method}/{agg}/shard-{s}-of-2", ["3.8"],
                    f"rows {a}..{b - 1} of a 4-row batch with the global counts ({n} tokens, "
                    f"{rows} rows)", lp[a:b], old[a:b], adv[a:b], mask[a:b], method=method,
                    loss_agg=agg, normalizer={"num_tokens": float(n), "num_rows": float(rows)},
                    **_agg_options(agg)))  # fmt: skip
            out.append(
                policy_case(
                    f"{method}/{agg}/unsharded",
                    ["3.8"],
                    "the same 4-row batch in one piece",
                    lp,
                    old,
                    adv,
                    mask,
                    method=method,
                    loss_agg=agg,
                    **_agg_options(agg),
                )
            )
            return out

        for _ in range(200):
            try:
                cases += make()
                break
            except KinkError:
                continue
    return cases


def _tool_case(cid, kind, clauses, description, inputs, options, expected) -> dict[str, Any]:
    return {"id": cid, "kind": kind, "clauses": clauses, "description": description,
            "inputs": {k: _enc(v) if k != "mask" else [[bool(x) for x in r] for r in v]
                       for k, v in inputs.items()},
            "options": options, "expected": {k: _enc(v) for k, v in expected.items()}}  # fmt: skip


def group_tools() -> list[dict[str, Any]]:
    """group_advantages (clause 9.1) and sequence_gate_diagnostics (clause 9.2)."""
    rng = random.Random("sapo-ref-vectors/tools")
    cases = []
    for cid, rewards, g, opts in (
        ("binary-g3", [1.0, 0.0, 0.0, 1.0, 1.0, 0.0], 3, {}),
        ("ints-g3", [1.0, 0.0, 0.0, 1.0, 2.0, 2.0], 3, {}),
        ("binary-g4-ddof0-eps1e-4", [1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0], 4,
         {"ddof": 0, "eps": 1e-4}),
        ("scale-none", [0.5, 0.25, 1.0, 0.0, 0.75, 0.25], 3, {"scale": "none"}),
        ("group-of-one", [0.5, -1.0, 2.0], 1, {}),
        ("equal-rewards", [3.0, 3.0, 3.0, 1.0, 0.0, 0.0], 3, {"eps": 0.0}),
        ("random-g4", [round(rng.uniform(-1, 1), 3) for _ in range(8)], 4, {}),
    ):  # fmt: skip
        cases.append(_tool_case(
            f"group_advantages/{cid}", "group_advantages", ["9.1"],
            f"group-normalised advantages, group_size={g}, options {opts or 'default'}",
            {"rewards": rewards}, {"group_size": g, **opts},
            {"advantages": M.group_advantages(rewards, g, **opts)}))  # fmt: skip
    for cid, tau in (("tau=1.0", 1.0), ("tau=1.05", 1.05), ("tau-per-row", [1.0, 1.05, 0.5, 2.0])):
        lp, old, _, mask = random_batch(rng, 4, 6, scale=0.3, garbage=True)
        mask[2] = [False] * 6
        mask[3] = [True] + [False] * 5
        d = M.sequence_gate_diagnostics(lp, old, mask, tau)
        cases.append(_tool_case(
            f"sequence_gate_diagnostics/{cid}", "sequence_gate_diagnostics", ["9.2"],
            "Var_i, D_i and the bound tau^2/4 Var_i; row 2 empty, row 3 one token; garbage "
            "at invalid slots", {"logp": lp, "old_logp": old, "mask": mask}, {"tau": tau},
            d))  # fmt: skip
    return cases


# ------------------------------------------------------------------------------------------
# Spec 0.2.0: per-token weights and the KL penalty (clause 10)
# ------------------------------------------------------------------------------------------
ESTIMATORS = M.KL_ESTIMATORS


def random_weights(rng: random.Random, n: int, t: int, *, per_token: bool,
                   kind: str = "fractional", garbage: bool = False, mask=None) -> list:  # fmt: skip
    """Weights [N] or [N, T]: ``fractional`` in [0, 2] with some exact zeros (truncated IS),
    ``binary`` 0/1 (entropy or tool masks), ``large`` up to 1e150; with ``garbage`` and a mask,
    invalid slots hold NaN, +-inf or -1 (weights are only checked at valid tokens)."""

    def draw() -> float:
        if kind == "binary":
            return float(rng.random() < 0.7)
        if kind == "large":
            return float(f"1e{rng.choice([3, 6, 12, 40, 150])}") * rng.choice([1.0, 2.5])
        return 0.0 if rng.random() < 0.2 else round(rng.uniform(0.0, 2.0), 3)

    if not per_token:
        return [draw() for _ in range(n)]
    w = [[draw() for _ in range(t)] for _ in range(n)]
    if garbage:
        for i in range(n):
            for j in range(t):
                if not mask[i][j]:
                    w[i][j] = rng.choice([NAN, INF, -INF, -1.0])
    return w


def random_ref(rng: random.Random, logp, mask, *, scale: float = 0.3,
               garbage: bool = False) -> list:  # fmt: skip
    """Reference log-probs near logp (u of standard deviation ``scale``), 4 decimals, <= 0;
    with ``garbage``, invalid slots hold NaN or +-inf."""
    ref = [[min(0.0, _r4(lp + rng.gauss(0.0, scale))) if math.isfinite(lp) else -1.0
            for lp in row] for row in logp]  # fmt: skip
    if garbage:
        for i, row in enumerate(mask):
            for j, valid in enumerate(row):
                if not valid:
                    ref[i][j] = rng.choice([NAN, INF, -INF])
    return ref


def _u_rows(us: list[list[float | None]], base: float = -0.5) -> tuple[list, list]:
    """logp and ref_logp with the given log-ratios u = ref - logp (None = invalid slot).

    ``u > 0`` lowers logp (logp = base - u), ``u < 0`` lowers ref (ref = base + u): log-probs
    stay <= 0, and the float64 difference ref - logp is exact for dyadic u or |u| < |base|."""
    logp, ref = [], []
    for row in us:
        lr, rr = [], []
        for u in row:
            if u is None:
                lr.append(NAN), rr.append(NAN)
            elif u >= 0:
                lr.append(base - u), rr.append(base)
            else:
                lr.append(base), rr.append(base + u)
        logp.append(lr), ref.append(rr)
    return logp, ref


def _kl(est: str, beta: float) -> dict[str, Any]:
    return {"kl_coef": beta, "kl_estimator": est}


def group_terms() -> list[dict[str, Any]]:
    """Clause 10: weights and the KL penalty with every method, aggregation and estimator."""
    rng = random.Random("sapo-ref-vectors/terms")
    cases: list[dict[str, Any]] = []
    # 10.1: weights with every method x aggregation, [N] and [N, T], fractional with zeros.
    for method in METHODS:
        for j, agg in enumerate(AGGS):
            per_token_w = (j + METHODS.index(method)) % 2 == 0
            shape = "w-token" if per_token_w else "w-row"

            def make():
                lp, old, adv, mask = random_batch(rng, 3, 5, per_token=j % 2 == 1)
                w = random_weights(rng, 3, 5, per_token=per_token_w)
                return policy_case(
                    f"{method}/{agg}/weights/{shape}", ["10.1", "10.3", "3.1"],
                    f"{method}, {agg}: detached weights {'[N, T]' if per_token_w else '[N]'} in "
                    "[0, 2] with zeros scale the policy term, not the counts",
                    lp, old, adv, mask, weights=w, method=method, loss_agg=agg,
                    **_agg_options(agg))  # fmt: skip

            cases.append(sampled(rng, make))
    # 10.1: 0/1 and large weights, all-zero weights, garbage weights at invalid slots.
    for method in METHODS:
        for kind in ("binary", "large", "zeros"):

            def make():
                lp, old, adv, mask = random_batch(rng, 4, 5, per_token=True, garbage=True)
                if kind == "zeros":
                    w = [[0.0] * 5 for _ in range(4)]
                else:
                    w = random_weights(rng, 4, 5, per_token=True, kind=kind, garbage=True,
                                       mask=mask)  # fmt: skip
                return policy_case(
                    f"{method}/weights-{kind}/masked-garbage", ["10.1", "10.4", "6.1"],
                    {"binary": "0/1 weights (an entropy or tool mask)",
                     "large": "weights up to 2.5e150",
                     "zeros": "all weights 0: loss 0 and gradient 0, the counts unchanged"}[kind]
                    + "; NaN, +-inf, -1 weights and garbage inputs at invalid slots",
                    lp, old, adv, mask, weights=w, method=method,
                    loss_agg=rng.choice(AGGS[:3]))  # fmt: skip

            cases.append(sampled(rng, make))
    # 10.1: a weight of 0 removes an infinite term (A < 0 at r = inf, no dual clip).
    lp, old, mask = _rows([[INF, 0.0625, -0.125], [-0.25, 0.5, None]])
    for w0 in (0.0, 0.5):
        cases.append(policy_case(
            f"grpo/weights/inf-ratio-negative-advantage/w={w0}", ["10.1", "5.4"],
            "A < 0 at r = inf: a weight 0 removes the infinite term (loss finite, gradient 0 "
            "there), a weight 0.5 keeps it (+inf)",
            lp, old, [[-1.0, 0.5, 1.0], [-0.5, 1.0, 2.0]], mask,
            weights=[[w0, 1.5, 0.25], [1.0, 2.0, NAN]], method="grpo"))  # fmt: skip
    # 10.2: every estimator with every method, aggregations in turn, weights in half the cases.
    for e, est in enumerate(ESTIMATORS):
        for k, method in enumerate(METHODS):
            agg = AGGS[(e + k) % len(AGGS)]
            with_w = (e + k) % 2 == 0

            def make():
                lp, old, adv, mask = random_batch(rng, 3, 5, per_token=k % 2 == 0,
                                                  garbage=True)  # fmt: skip
                ref = random_ref(rng, lp, mask, scale=2.0 if est == "low-var-k3" else 0.5,
                                 garbage=True)  # fmt: skip
                w = random_weights(rng, 3, 5, per_token=True) if with_w else None
                beta = rng.choice([0.001, 0.04, 0.1, 1.0])
                return policy_case(
                    f"{method}/{agg}/kl={est}" + ("/weights" if with_w else ""),
                    ["10.2", "10.3", "6.1"] + (["10.1"] if with_w else []),
                    f"KL penalty {est}, beta={beta}, u = ref_logp - logp of scale "
                    f"{2.0 if est == 'low-var-k3' else 0.5}"
                    + (", with per-token weights" if with_w else "")
                    + "; garbage at invalid slots of every input",
                    lp, old, adv, mask, weights=w, ref_logp=ref, method=method, loss_agg=agg,
                    **_agg_options(agg), **_kl(est, beta))  # fmt: skip

            cases.append(sampled(rng, make))
    # 10.5: u near 0, where k3's naive formula loses its digits; both signs.
    tiny = [
        [1e-8, -1e-8, 3e-6, -3e-6],
        [1e-4, -1e-4, 1e-3, -1e-3],
        [2.0**-40, -(2.0**-40), 0.0, None],
    ]
    for est in ESTIMATORS:
        lp, ref = _u_rows(tiny)
        mask = [[u is not None for u in row] for row in tiny]
        old = [[_r4(x + 0.125) if math.isfinite(x) else 0.0 for x in row] for row in lp]
        cases.append(policy_case(
            f"sapo/kl={est}/u-near-zero", ["10.2", "10.3", "10.5"],
            f"{est} at u = +-1e-8, +-3e-6, +-1e-4, +-1e-3, +-2^-40, 0: k3 = u^2/2 + ... to full "
            "precision", lp, old, [[1.0, -0.5, 0.75, -1.25], [0.5, -1.0, 1.5, -0.25],
                                   [1.0, -1.0, 0.5, NAN]], mask,
            ref_logp=ref, method="sapo", loss_agg="token-mean", **_kl(est, 0.25)))  # fmt: skip
    # 10.5: large |u|: low-var clip on both sides, k3 = e^700 finite, k3 past overflow (+inf),
    # k2 past overflow; u = -800 (k3 = 799 finite).
    big = [[20.0, -20.0, 700.0], [-800.0, 3.5, -12.0], [5.0, -0.5, None]]
    for est in ESTIMATORS:
        for row0, tag in ((big[0], "finite"), ([20.0, -20.0, 800.0], "overflow")):
            us = [row0] + big[1:]
            lp, ref = _u_rows(us)
            mask = [[u is not None for u in row] for row in us]
            old = [[-0.5] * 3 for _ in us]
            cases.append(policy_case(
                f"sapo/kl={est}/large-u/{tag}", ["10.2", "10.3", "10.5"],
                f"{est} at u = +-20, {row0[2]:g}, -800, 3.5, -12, 5, -0.5: "
                + ("k3 = e^700 finite" if tag == "finite" else "k3(800) exceeds float64: +inf")
                + "; low-var-k3 clipped at 10 (gradient 0) where k3 > 10",
                lp, old, [[1.0, -1.0, 0.5], [-0.5, 1.0, -1.0], [0.25, 0.75, NAN]], mask,
                ref_logp=ref, method="sapo", **_kl(est, 0.05)))  # fmt: skip
    lp, old = [[-1e200, -0.5], [-0.5, -2.0]], [[-0.5, -0.5], [-1.0, -1.5]]
    for est in ESTIMATORS:
        cases.append(policy_case(
            f"grpo/kl={est}/huge-u", ["10.5", "10.2"],
            f"{est} at u = 1e200 (logp = -1e200): k2, k3 overflow to +inf, k1 = -1e200",
            lp, old, [1.0, -1.0], [[True, True], [True, True]],
            ref_logp=[[-0.5, -0.75], [-0.25, -2.5]], method="grpo", loss_agg="token-mean",
            **_kl(est, 0.5)))  # fmt: skip
    # 10.5: infinite log-probs: ref_logp = -inf (u = -inf) and logp = -inf (u = +inf).
    for est in ESTIMATORS:
        for where in ("ref_logp", "logp"):
            us = [[-INF if where == "ref_logp" else INF, 0.5, -0.25], [1.5, None, -2.0]]
            lp, ref = _u_rows(us)
            mask = [[u is not None for u in row] for row in us]
            old = [[-0.75, -0.25, -0.5], [-1.25, 0.0, -0.625]]
            for method in ("sapo", "gspo"):
                cases.append(policy_case(
                    f"{method}/kl={est}/{where}=-inf", ["10.2", "10.3", "10.5"],
                    f"{est} with {where} = -inf at a valid token (u = "
                    f"{'-inf' if where == 'ref_logp' else '+inf'})",
                    lp, old, [0.5, -1.0], mask, ref_logp=ref, method=method,
                    **_kl(est, 0.125)))  # fmt: skip
    # 10.5: an infinite policy term (grpo, A < 0 at r = inf) beside logp = -inf elsewhere:
    # k1 adds -inf to +inf (undefined: NaN), the other estimators +inf.
    for est in ESTIMATORS:
        cases.append(policy_case(
            f"grpo/kl={est}/infinite-policy-term-and-logp=-inf", ["10.5", "5.4", "10.2"],
            "A < 0 at r = inf (policy term +inf) and logp = -inf at another token (u = +inf): "
            + ("k1 = -inf there, so the loss is inf - inf: NaN" if est == "k1"
               else "the loss is +inf"),
            [[-0.25, -INF, -0.5], [-0.5, -0.25, -1.0]], [[-INF, -0.5, -0.25], [-0.25, -0.75, -1.0]],
            [[-1.0, 0.5, 1.0], [-0.5, 1.0, 2.0]], [[True] * 3, [True] * 3],
            ref_logp=[[-0.25, -0.5, -0.75], [-0.5, -0.5, -1.5]], method="grpo",
            **_kl(est, 0.5)))  # fmt: skip
    # 10.2: beta = 0 turns the term off exactly, infinite k included; beta at its maximum.
    for est in ESTIMATORS:
        us = [[-INF, 0.5, -0.25], [1.5, 30.0, -2.0]]
        lp, ref = _u_rows(us)
        old = [[-0.75, -0.25, -0.5], [-1.25, -0.5, -0.625]]
        for beta in (0.0, 1e6):
            if beta and est != "low-var-k3":
                us2 = [[0.25, 0.5, -0.25], [1.5, 3.0, -2.0]]
                lp, ref = _u_rows(us2)
            cases.append(policy_case(
                f"grpo/kl={est}/kl_coef={beta:g}", ["10.2", "10.3"],
                "beta = 0: the KL term adds exactly nothing (k = inf at ref_logp = -inf "
                "included), kl_ref/mean still reported" if beta == 0 else
                "beta = 1e6, the top of its domain",
                lp, old, [[1.0, -0.5, 0.25], [-1.0, 2.0, 0.5]],
                [[True] * 3, [True] * 3], ref_logp=ref, method="grpo",
                loss_agg="seq-mean-token-sum", **_kl(est, beta)))  # fmt: skip
    # 3.6 with the terms: an empty row (garbage weights and ref_logp), count_empty_rows.
    for method in ("sapo", "gspo-token"):
        for cer in (False, True):

            def make():
                lp, old, adv, mask = random_batch(rng, 4, 5, garbage=True)
                mask[1] = [False] * 5
                ref = random_ref(rng, lp, mask, garbage=True)
                w = random_weights(rng, 4, 5, per_token=True, garbage=True, mask=mask)
                return policy_case(
                    f"{method}/weights+kl=k3/empty-row/count_empty_rows={str(cer).lower()}",
                    ["10.1", "10.2", "3.6", "6.1"],
                    "row 1 empty (garbage weights and ref_logp there), weights and k3",
                    lp, old, adv, mask, weights=w, ref_logp=ref, method=method,
                    count_empty_rows=cer, **_kl("k3", 0.04))  # fmt: skip

            cases.append(sampled(rng, make))
    for method in ("sapo", "grpo"):
        lp = [[NAN, INF, -INF], [1e30, NAN, 0.0]]
        cases.append(policy_case(
            f"{method}/weights+kl=k2/fully-masked", ["10.1", "10.2", "3.7", "6.1"],
            "no valid token, garbage everywhere: loss 0, gradients 0, kl_ref/mean and "
            "weights/mean 0", lp, [[INF, NAN, 0.0], [-INF, 1.0, NAN]], [[NAN, INF, 1.0],
                                                                        [0.0, -INF, NAN]],
            [[False] * 3, [False] * 3], weights=[[NAN, -1.0, INF], [0.5, -INF, NAN]],
            ref_logp=[[-INF, INF, NAN], [NAN, -INF, 0.0]], method=method,
            **_kl("k2", 0.1)))  # fmt: skip
    # 3.8 with the terms: shards with the global counts sum to the whole.
    for method, agg, est in (("sapo", "seq-mean-token-mean", "k3"), ("gspo", "token-mean", "k1"),
                             ("grpo", "seq-mean-token-sum-norm", "low-var-k3"),
                             ("sapo-seq", "seq-mean-token-sum", "k2")):  # fmt: skip

        def make():
            lp, old, adv, mask = random_batch(rng, 4, 5, per_token=method == "sapo")
            mask[3] = [False] * 5
            ref = random_ref(rng, lp, mask, scale=1.5)
            w = random_weights(rng, 4, 5, per_token=method != "gspo")
            n = sum(sum(r) for r in mask)
            rows = sum(1 for r in mask if any(r))
            out = []
            for s, (a, b) in enumerate(((0, 2), (2, 4))):
                out.append(policy_case(
                    f"{method}/{agg}/weights+kl={est}/shard-{s}-of-2", ["3.8", "10.1", "10.2"],
                    f"rows {a}..{b - 1} of a 4-row batch with weights and {est}, given the "
                    f"global counts ({n} tokens, {rows} rows)", lp[a:b], old[a:b], adv[a:b],
                    mask[a:b], weights=w[a:b], ref_logp=ref[a:b], method=method,
                    loss_agg=agg, normalizer={"num_tokens": float(n), "num_rows": float(rows)},
                    **_agg_options(agg), **_kl(est, 0.2)))  # fmt: skip
            out.append(policy_case(
                f"{method}/{agg}/weights+kl={est}/unsharded", ["3.8", "10.1", "10.2"],
                "the same 4-row batch in one piece", lp, old, adv, mask, weights=w,
                ref_logp=ref, method=method, loss_agg=agg, **_agg_options(agg),
                **_kl(est, 0.2)))  # fmt: skip
            return out

        for _ in range(200):
            try:
                cases += make()
                break
            except KinkError:
                continue
        else:
            raise RuntimeError("could not sample a shard case away from the kinks")
    return cases


GROUPS: dict[str, Callable[[], list[dict[str, Any]]]] = {
    "methods": group_methods,
    "special": group_special,
    "masking": group_masking,
    "extreme": group_extreme,
    "clip": group_clip,
    "shards": group_shards,
    "tools": group_tools,
}
if VERSION != "0.1.0":  # spec 0.1.0's files stay as published
    GROUPS["terms"] = group_terms


def render_all(groups: list[str] | None = None) -> dict[str, str]:
    """File name -> text for the chosen groups (all by default)."""
    return {f"{g}.json": render(GROUPS[g]()) for g in (groups or list(GROUPS))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare instead of writing")
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    args = ap.parse_args(argv)
    files = render_all()
    bad = 0
    if not args.check:
        args.out.mkdir(parents=True, exist_ok=True)
        for stale in {p.name for p in args.out.glob("*.json")} - set(files):
            (args.out / stale).unlink()
    for name, text in files.items():
        path = args.out / name
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                print(f"differs: {path}")
                bad += 1
        else:
            path.write_text(text, encoding="utf-8")
    n = sum(t.count('"id":') for t in files.values())
    size = sum(len(t.encode()) for t in files.values())
    print(f"{len(files)} files, {n} cases, {size / 1024:.0f} KiB" + (", stale" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
