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
from sapo_conformance.drivers import Driver

__all__ = ["AutogradDriver"]


class AutogradDriver(Driver):
    """Runs a loss written with ``autograd.numpy``; the gradient is autograd's own VJP."""

    name = "autograd"
    module = "autograd"
    dtypes = ("float64", "float32", "float16")

    def device_unavailable(self, device: str | None) -> str | None:
        if device in (None, "", "cpu"):
            return None
        return f"autograd computes with NumPy on the CPU only; there is no device {device!r}"

    def versions(self) -> dict[str, str]:
        out = {"numpy": np.__version__}
        for dist in ("autograd", "sapo-conformance-autograd"):
            try:
                out[dist] = version(dist)
            except PackageNotFoundError:
                out[dist] = "not installed"
        return out

    def to_array(self, a: np.ndarray, dtype: str, device: str | None) -> np.ndarray:
        return np.array(
            a, dtype=np.dtype(dtype)
        )  # a copy: the function may not write the suite's arrays

    def to_numpy(self, x: Any) -> np.ndarray:
        from autograd.tracer import getval

        return np.asarray(getval(x))

    def value_and_vjp(self, f: Callable, x: np.ndarray, cotangent: float) -> tuple[Any, Any, Any]:
        """``f(x)`` returns the loss or ``(loss, aux)``; the VJP pulls ``cotangent`` back to ``x``."""
        from autograd.core import make_vjp

        aux: list[Any] = []

        def loss_only(z):
            out = f(z)
            if isinstance(out, (tuple, list)):
                aux.append(out[1] if len(out) > 1 else None)
                return out[0]
            aux.append(None)
            return out

        vjp, loss = make_vjp(loss_only, x)
        grad = vjp(np.asarray(cotangent, dtype=np.result_type(loss)))
        return loss, grad, aux[-1]

    def value(self, f: Callable, x: np.ndarray) -> Any:
        out = f(x)
        return out[0] if isinstance(out, (tuple, list)) else out
