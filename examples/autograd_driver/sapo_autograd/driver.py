"""The sapo-conformance driver for HIPS autograd (a plugin: see ``pyproject.toml``).

A driver says how to move arrays in and out of its framework and how to differentiate; the
base class :class:`sapo_conformance.drivers.Driver` does everything else (calling the function,
the cotangent, the checks). autograd differentiates NumPy code, so its arrays are NumPy arrays
and its only device is the CPU; NumPy has no bfloat16.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numpy as np
from sapo_conformance.drivers import Driver, split_output

__all__ = ["AutogradDriver"]


class AutogradDriver(Driver):
    """Runs a loss written with ``autograd.numpy``; the gradient is autograd's own VJP."""

    name = "autograd"
    module = "autograd"
    dtypes = ("float64", "float32", "float16")

    def versions(self) -> dict[str, str]:
        out = {"numpy": np.__version__}
        for dist in ("autograd", "sapo-conformance-autograd"):
            try:
                out[dist] = version(dist)
            except PackageNotFoundError:
                out[dist] = "not installed"
        return out

    def to_array(self, a: np.ndarray, dtype: str, device: str | None) -> np.ndarray:
        # A fresh copy per call (the base class checks that the function writes no input).
        return np.array(a, dtype=np.dtype(dtype))

    def to_numpy(self, x: Any) -> np.ndarray:
        from autograd.tracer import getval

        return np.asarray(getval(x))

    def value_and_vjp(self, f: Callable, x: np.ndarray, cotangent: float) -> tuple[Any, Any, Any]:
        """``f(x)`` is the function's raw output (a loss or a tuple ``(loss, aux, ...)``); the
        VJP pulls ``cotangent`` back to ``x`` through autograd's own tape."""
        from autograd.core import make_vjp

        aux: list[Any] = []

        def loss_only(z):
            loss, extra = split_output(f(z))
            aux.append(extra)
            return loss

        vjp, loss = make_vjp(loss_only, x)
        grad = vjp(np.asarray(cotangent, dtype=np.result_type(loss)))
        return loss, grad, aux[-1]

    def value(self, f: Callable, x: np.ndarray) -> Any:
        return split_output(f(x))[0]
