r"""The documentation's figures, computed with sapo_ref's own public functions.

``python -m sapo_ref.plots OUTDIR`` (or ``sapo-ref plot OUTDIR``) writes three SVG files:

* ``gates.svg`` -- the per-token term :math:`f(r)\,A` and its gradient weight
  :math:`\partial(f A)/\partial r / A` against the ratio :math:`r`, for SAPO at several
  temperatures, GRPO's clip at :math:`\epsilon = 0.2` and GSPO's band
  :math:`[1 - 3\cdot10^{-4}, 1 + 4\cdot10^{-4}]`, with :math:`A > 0` and :math:`A < 0`
  (the idea of the SAPO paper's Figure 1);
* ``temperature.svg`` -- the gate weight :math:`w(r) = \operatorname{sech}^2(\tau(r-1)/2)`
  for :math:`\tau_\text{neg} \in \{0.95, 1, 1.05\}` against :math:`\tau_\text{pos} = 1`
  (the paper's temperature ablation);
* ``sequence_gate.svg`` -- the sequence-gate gap :math:`D_i` against :math:`\operatorname{Var}_i`
  on sampled log-ratios, with the bound :math:`\frac{\tau^2}{4}\operatorname{Var}_i`
  (paper section 4.1, eq. 17-21; :func:`sapo_ref.sequence_gate_diagnostics`).

Matplotlib is an optional dependency (extras ``plots`` and ``docs``) and is imported inside
the functions only, so ``import sapo_ref`` never imports it. The output is deterministic:
fixed seeds, no pyplot state, a fixed SVG hash salt and no date in the metadata, so a rerun
with the same matplotlib writes the same bytes.

>>> from sapo_ref.plots import FIGURES
>>> sorted(FIGURES)
['gates.svg', 'sequence_gate.svg', 'temperature.svg']
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import spec
from .diagnostics import sequence_gate_diagnostics
from .gates import clip_parts, sapo_parts

__all__ = [
    "FIGURES",
    "gate_curves",
    "temperature_curves",
    "sequence_gate_samples",
    "write_figures",
    "main",
]

#: Seed of the sampled log-ratios of ``sequence_gate.svg``.
SEED = 20251125
#: SAPO temperatures shown in ``gates.svg``.
GATE_TAUS: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
#: The temperature ablation of the paper (tau_neg; tau_pos = 1).
ABLATION_TAUS: tuple[float, ...] = (0.95, 1.0, 1.05)

_GRPO = spec.METHODS["grpo"].defaults
_GSPO = spec.METHODS["gspo"].defaults
_SAPO = spec.METHODS["sapo"].defaults


def _ratio_grid(lo: float = 1e-3, hi: float = 3.0, n: int = 1201) -> np.ndarray:
    grid = np.linspace(lo, hi, n)
    # Put r = 1 and the GSPO band edges on the grid so the narrow band is drawn, not skipped.
    edges = [
        1.0,
        1 - _GSPO["eps_low"],
        1 + _GSPO["eps_high"],
        1 - _GRPO["eps_low"],
        1 + _GRPO["eps_high"],
    ]
    return np.unique(np.concatenate([grid, np.array(edges)]))


def gate_curves(
    adv_sign: float, r: np.ndarray | None = None
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    r"""Term value :math:`f(r)A` and gradient weight :math:`\partial_r(fA)/A` for :math:`A = \pm 1`.

    Returns ``{label: (value, weight)}`` on the ratio grid ``r``; the weight is the SAPO gate
    weight :math:`w(r)` or the hard clip's indicator (eq. 24).

    >>> import math, numpy as np
    >>> value, weight = gate_curves(1.0, np.array([1.0, 1.5]))["SAPO τ=1"]
    >>> float(value[0]), float(weight[0])  # on-policy: f(1) = 2/tau, w(1) = 1
    (2.0, 1.0)
    >>> bool(abs(value[1] - 4 / (1 + math.exp(-0.5))) < 1e-12)  # (4/tau) sigmoid(tau (r - 1))
    True
    >>> bool(abs(weight[1] - 1 / math.cosh(0.25) ** 2) < 1e-12)  # sech^2(tau (r - 1) / 2)
    True
    """
    r = _ratio_grid() if r is None else np.asarray(r, dtype=np.float64)
    delta = np.log(r)
    adv = np.full_like(r, adv_sign)
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for tau in GATE_TAUS:
        parts = sapo_parts(delta, tau)
        out[f"SAPO τ={tau:g}"] = (adv_sign * parts.f, parts.w)
    for name, eps in (("GRPO", _GRPO), ("GSPO", _GSPO)):
        c = clip_parts(delta, adv, eps["eps_low"], eps["eps_high"])
        label = f"{name} ε=({eps['eps_low']:g}, {eps['eps_high']:g})"
        out[label] = (adv_sign * c.g, c.active.astype(np.float64))
    return out


def temperature_curves(r: np.ndarray | None = None) -> dict[float, np.ndarray]:
    r"""Gate weight :math:`w(r;\tau)` for each :math:`\tau` of the ablation (eq. 8).

    >>> import math, numpy as np
    >>> w = temperature_curves(np.array([1.0, 2.0]))
    >>> float(w[1.05][0]), bool(abs(w[1.05][1] - 1 / math.cosh(1.05 / 2) ** 2) < 1e-12)
    (1.0, True)
    >>> bool(w[1.05][1] < w[1.0][1] < w[0.95][1])  # a larger tau damps more off r = 1
    True
    """
    r = _ratio_grid(1e-3, 4.0) if r is None else np.asarray(r, dtype=np.float64)
    return {tau: sapo_parts(np.log(r), tau).w for tau in ABLATION_TAUS}


def sequence_gate_samples(
    rows: int = 400, max_len: int = 512, tau: float = 1.0, seed: int = SEED
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""``(Var_i, D_i, bound_i)`` of sampled rows of log-ratios (eq. 17-21).

    Row :math:`i` has a length :math:`L_i` uniform in :math:`[8, \text{max\_len}]` and log-ratios
    :math:`z_{it} \sim \mathcal N(\mu_i, \sigma_i^2)` with :math:`\sigma_i` log-uniform in
    :math:`[10^{-3}, 1]` and :math:`\mu_i \sim \mathcal N(0, 0.5^2)`; the rest of the row is padding
    (it holds NaN, which the diagnostics must ignore).

    >>> var, gap, bound = sequence_gate_samples(rows=50)
    >>> bool(np.all(gap <= bound + 1e-15))
    True
    """
    rng = np.random.default_rng(seed)
    lengths = rng.integers(8, max_len + 1, size=rows)
    sigma = 10.0 ** rng.uniform(-3.0, 0.0, size=rows)
    mu = rng.normal(0.0, 0.5, size=rows)
    z = mu[:, None] + sigma[:, None] * rng.standard_normal((rows, max_len))
    mask = np.arange(max_len)[None, :] < lengths[:, None]
    logp = rng.uniform(-8.0, -0.01, size=(rows, max_len))
    old = np.where(mask, logp - z, np.nan)  # padding holds NaN: masking is by selection
    d = sequence_gate_diagnostics(logp, old, mask, tau)
    return np.asarray(d.var), np.asarray(d.gap), np.asarray(d.bound)


# ------------------------------------------------------------------------------------------
# Drawing (matplotlib imported lazily)
# ------------------------------------------------------------------------------------------

_SVG_RC = {
    "svg.hashsalt": "sapo-ref",  # fixed ids: byte-identical reruns
    "svg.fonttype": "path",
    "font.size": 9,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
}


def _figure(ncols: int, nrows: int = 1, size: tuple[float, float] = (9.0, 3.4)) -> Any:
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure registry

    fig = Figure(figsize=size, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _save(fig: Any, path: Path) -> None:
    fig.savefig(path, format="svg", metadata={"Date": None, "Creator": None})


def _draw_gates(path: Path) -> None:
    fig, axes = _figure(2, 2, size=(9.0, 6.8))
    r = _ratio_grid()
    styles = {"GRPO": dict(color="tab:orange", lw=1.8), "GSPO": dict(color="tab:green", lw=1.8)}
    sapo_colors = ["#9ecae1", "#4292c6", "#08519c", "#08306b"]
    for row, sign in enumerate((1.0, -1.0)):
        curves = gate_curves(sign, r)
        ax_v, ax_w = axes[row]
        k = 0
        for label, (value, weight) in curves.items():
            if label.startswith("SAPO"):
                kw: dict[str, Any] = dict(color=sapo_colors[k], lw=1.5)
                k += 1
            else:
                kw = dict(styles[label.split()[0]], ls="--" if label.startswith("GSPO") else "-")
            ax_v.plot(r, value, label=label, **kw)
            ax_w.plot(r, weight, label=label, **kw)
        ax_v.plot(r, sign * r, color="grey", lw=0.8, ls=":", label="unclipped r·A")
        sgn = "A > 0" if sign > 0 else "A < 0"
        tau_side = "τ_pos" if sign > 0 else "τ_neg"
        ax_v.set_title(f"term f(r)·A, {sgn} (SAPO uses {tau_side})")
        ax_w.set_title(f"gradient weight ∂(f·A)/∂r ÷ A, {sgn}")
        ax_w.set_ylim(-0.05, 1.1)
        for ax in (ax_v, ax_w):
            ax.axvline(1.0, color="black", lw=0.5)
            ax.set_xlabel("ratio r = π_θ / π_old")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=4, fontsize=7, frameon=False)
    fig.suptitle(
        "Per-token term and gradient weight of SAPO, GRPO and GSPO (unified surrogate, eq. 10)"
    )
    _save(fig, path)


def _draw_temperature(path: Path) -> None:
    fig, axes = _figure(2)
    ax_w, ax_d = axes[0]
    r = _ratio_grid(1e-3, 4.0)
    curves = temperature_curves(r)
    colors = {0.95: "tab:red", 1.0: "black", 1.05: "tab:blue"}
    for tau, w in curves.items():
        role = "τ_pos = τ_neg" if tau == 1.0 else f"τ_neg = {tau:g}"
        ax_w.plot(r, w, color=colors[tau], lw=1.4, label=f"w(r; τ={tau:g})  [{role}]")
        if tau != 1.0:
            ax_d.plot(r, w - curves[1.0], color=colors[tau], lw=1.4, label=f"τ_neg = {tau:g}")
    ax_d.axhline(0.0, color="black", lw=0.8, label="τ_neg = τ_pos = 1")
    ax_w.set_title("gate weight w(r) = sech²(τ(r−1)/2)")
    ax_d.set_title("w(r; τ_neg) − w(r; τ_pos = 1)")
    for ax in (ax_w, ax_d):
        ax.set_xlabel("ratio r")
        ax.axvline(1.0, color="black", lw=0.5)
        ax.legend(fontsize=7)
    fig.suptitle("Temperature ablation: τ_neg ∈ {0.95, 1, 1.05} against τ_pos = 1")
    _save(fig, path)


def _draw_sequence_gate(path: Path) -> None:
    fig, axes = _figure(1, size=(5.6, 4.2))
    ax = axes[0][0]
    tau = 1.0
    var, gap, _bound = sequence_gate_samples(tau=tau)
    keep = (var > 0) & (gap > 0)  # log axes
    ax.scatter(
        var[keep], gap[keep], s=7, color="tab:blue", alpha=0.6, lw=0, label="rows: (Var_i, D_i)"
    )
    xs = np.geomspace(var[keep].min(), var[keep].max(), 50)
    ax.plot(xs, tau * tau / 4.0 * xs, color="tab:red", lw=1.5, label="bound τ²/4 · Var_i (eq. 21)")
    ax.axvline(0.02, color="grey", ls=":", lw=1.0, label="Var = 0.02 (paper's typical maximum)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("Var_i  (variance of the row's log-ratios)")
    ax.set_ylabel("D_i = |mean_t g(z_it) − g(μ_i)|")
    ax.set_title(f"Sequence-gate approximation, τ = {tau:g}, {int(keep.sum())} sampled rows")
    ax.legend(fontsize=7, loc="upper left")
    _save(fig, path)


#: File name -> drawing function.
FIGURES: dict[str, Callable[[Path], None]] = {
    "gates.svg": _draw_gates,
    "temperature.svg": _draw_temperature,
    "sequence_gate.svg": _draw_sequence_gate,
}


def write_figures(outdir: str | Path) -> list[Path]:
    """Write every figure of :data:`FIGURES` into ``outdir`` (created if missing).

    Raises ``ImportError`` with the install command when matplotlib is missing.
    """
    try:
        import matplotlib
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the figures need matplotlib: pip install 'sapo-ref[plots]'") from exc
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with matplotlib.rc_context(_SVG_RC):
        for name, draw in FIGURES.items():
            path = out / name
            draw(path)
            written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m sapo_ref.plots OUTDIR``."""
    parser = argparse.ArgumentParser(
        prog="python -m sapo_ref.plots", description="Write the documentation's figures (SVG)."
    )
    parser.add_argument(
        "outdir", help="folder to write gates.svg, temperature.svg, sequence_gate.svg"
    )
    args = parser.parse_args(argv)
    for path in write_figures(args.outdir):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
