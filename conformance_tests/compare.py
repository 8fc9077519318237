r"""The one comparison helper of the suite (clause C.1).

.. math::

    |got - want| \le atol\cdot scale + rtol\,|want|,\qquad scale = \max(1, \max|want|)

elementwise over the finite entries of ``want``. The relative error reported is
:math:`|got - want| / (|want| + atol\cdot scale/rtol)`, which is at most ``rtol`` exactly when
the element passes (tiny ``want`` values do not blow it up); where ``want`` is non-finite, ``got`` must be
the same non-finite value; a non-finite ``got`` where ``want`` is finite always fails. Shape is
checked before values.

>>> from sapo_ref.spec import Tolerance
>>> c = compare("grad", np.array([1.0, 2.0]), np.array([1.0, 2.1]), Tolerance(rtol=1e-3, atol=0.0))
>>> c.ok, c.mismatches, c.worst_index
(False, 1, (1,))
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sapo_ref.spec import Tolerance

__all__ = ["Comparison", "compare"]


@dataclass(frozen=True)
class Comparison:
    """Outcome of :func:`compare`: counts, the worst element and a one-line message."""

    name: str
    ok: bool
    mismatches: int
    total: int
    worst_abs: float
    worst_rel: float
    worst_index: tuple[int, ...]
    got_at_worst: float
    want_at_worst: float
    message: str


def _fmt(x: float) -> str:
    return f"{x:.17g}" if np.isfinite(x) else str(x)


def compare(
    name: str, got: np.ndarray | float, want: np.ndarray | float, tol: Tolerance
) -> Comparison:
    """Compare ``got`` with ``want`` under ``tol``; see the module docstring."""
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    if got.shape != want.shape:
        return Comparison(
            name,
            False,
            want.size,
            want.size,
            np.inf,
            np.inf,
            (),
            np.nan,
            np.nan,
            f"{name}: shape {got.shape} != expected {want.shape}",
        )
    fin = np.isfinite(want)
    scale = max(1.0, float(np.max(np.abs(want[fin]), initial=0.0)))
    with np.errstate(all="ignore"):
        err = np.abs(got - want)
        bound = tol.atol * scale + tol.rtol * np.abs(want)
        bad_fin = fin & ~(err <= bound)  # NaN err (non-finite got) is bad
        same_nonfinite = (got == want) | (np.isnan(got) & np.isnan(want))
        bad_nonfin = ~fin & ~same_nonfinite
        bad = bad_fin | bad_nonfin
        err = np.where(fin, err, np.where(bad_nonfin, np.inf, 0.0))
        err = np.where(np.isnan(err), np.inf, err)
        # Relative error with the criterion's absolute floor: passes iff rel <= rtol.
        floor = tol.atol * scale / tol.rtol if tol.rtol > 0 else 0.0
        denom = np.abs(want) + floor
        rel = np.where(
            fin & (denom > 0), err / np.where(denom > 0, denom, 1.0), np.where(err > 0, np.inf, 0.0)
        )
        excess = np.where(
            bad, np.where(np.isfinite(err), err / np.maximum(bound, 1e-300), np.inf), 0.0
        )
    total = int(want.size)
    mismatches = int(bad.sum())
    if want.size == 0:
        return Comparison(name, True, 0, 0, 0.0, 0.0, (), 0.0, 0.0, f"{name}: empty")
    key = excess if mismatches else err
    flat = int(np.argmax(key))
    idx = tuple(int(i) for i in np.unravel_index(flat, want.shape)) if want.ndim else ()
    worst_abs = float(err.max())
    worst_rel = float(rel.max())
    g, w = float(got.reshape(-1)[flat]), float(want.reshape(-1)[flat])
    if mismatches:
        where = f" at {list(idx)}" if idx else ""
        msg = (
            f"{name}: {mismatches}/{total} mismatched{where}: got {_fmt(g)}, want {_fmt(w)} "
            f"(abs err {worst_abs:.3g}, rel err {worst_rel:.3g}; rtol={tol.rtol:g}, "
            f"atol={tol.atol:g}*scale {scale:.3g})"
        )
    else:
        msg = f"{name}: ok (worst abs {worst_abs:.3g}, rel {worst_rel:.3g})"
    return Comparison(
        name, mismatches == 0, mismatches, total, worst_abs, worst_rel, idx, g, w, msg
    )
