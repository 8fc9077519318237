"""Framework drivers: convert a case's inputs, call the function, differentiate, return NumPy.

A driver calls ``fn(logp, old_logp, advantages, mask, **options)`` with its framework's arrays
(``mask`` boolean, the others in the case's dtype) and takes the gradient with respect to
``logp`` through the framework's own autodiff, pulling back a random scalar cotangent ``c``:
``grad = vjp(c) / c``. The function may return the loss or a tuple whose first item is the
loss and whose second, if a dict, holds metrics. NumPy has no autodiff: a numpy function
returns ``(loss, grad)`` or ``(loss, grad, metrics)``.

Frameworks are imported only when their driver runs. JAX computes float64 only when
``jax_enable_x64`` is on; the ``sapo-conformance`` command switches it on in its own process
(an application may; the library never does), elsewhere float64 is skipped with that reason.

>>> sorted(DRIVERS)
['jax', 'mlx', 'numpy', 'torch']
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .cases import Materialized

__all__ = ["Outcome", "Driver", "DRIVERS", "get_driver", "ConformanceError"]


class ConformanceError(Exception):
    """The function's output breaks the calling contract (not a number mismatch)."""


@dataclass(frozen=True)
class Outcome:
    """What a function produced on one case, as NumPy float64."""

    loss: float
    grad: np.ndarray
    metrics: dict[str, float] | None
    grad_dtype: str


def _scalar(x: Any) -> float:
    try:
        return float(x)
    except TypeError:
        return float(np.asarray(x))


def _split(out: Any) -> tuple[Any, Any]:
    if isinstance(out, (tuple, list)):
        if not out:
            raise ConformanceError("the function returned an empty tuple")
        extra = out[1] if len(out) > 1 and isinstance(out[1], dict) else None
        return out[0], extra
    return out, None


def _metrics(m: Any) -> dict[str, float] | None:
    if m is None:
        return None
    return {str(k): _scalar(v) for k, v in m.items()}


class Driver:
    """Base driver: ``name``, the dtypes its framework has, and :meth:`run`."""

    name = "base"
    module = ""
    dtypes: tuple[str, ...] = ()

    def unavailable(self) -> str | None:
        """Why this driver cannot run here, or None."""
        if importlib.util.find_spec(self.module) is None:
            return f"{self.module} is not installed"
        return None

    def dtype_unavailable(self, dtype: str) -> str | None:
        """Why this framework cannot run ``dtype`` here, or None."""
        return None if dtype in self.dtypes else f"{self.name} has no {dtype}"

    def run(self, fn: Callable, m: Materialized, options: dict, cotangent: float) -> Outcome:
        raise NotImplementedError

    def value(self, fn: Callable, m: Materialized, options: dict, logp: np.ndarray) -> float:
        """The loss alone at another ``logp`` (for the finite-difference check)."""
        raise NotImplementedError


class NumpyDriver(Driver):
    name = module = "numpy"
    dtypes = ("float64", "float32", "float16")

    def _call(self, fn, m, options, logp):
        out = fn(logp, m.old_logp, m.advantages, m.mask.copy(), **options)
        if not isinstance(out, (tuple, list)) or len(out) < 2:
            raise ConformanceError("a numpy implementation must return (loss, grad) or (loss, grad, metrics)")
        metrics = out[2] if len(out) > 2 else None
        return out[0], out[1], metrics

    def run(self, fn, m, options, cotangent):
        loss, grad, metrics = self._call(fn, m, options, m.logp.copy())
        grad = np.asarray(grad)
        return Outcome(_scalar(loss), grad.astype(np.float64), _metrics(metrics), grad.dtype.name)

    def value(self, fn, m, options, logp):
        return _scalar(self._call(fn, m, options, logp.astype(m.logp.dtype))[0])


class TorchDriver(Driver):
    name = module = "torch"
    dtypes = ("float64", "float32", "bfloat16", "float16")

    def _tensors(self, m: Materialized, logp: np.ndarray):
        import torch

        dt = getattr(torch, m.dtype)
        # bfloat16 values travel as float32 (NumPy has no bfloat16); the cast is exact.
        conv = lambda a: torch.from_numpy(np.array(a, np.float64 if m.dtype == "float64" else np.float32)).to(dt)
        return conv(logp), conv(m.old_logp), conv(m.advantages), torch.from_numpy(m.mask.copy())

    def run(self, fn, m, options, cotangent):
        import torch

        lp, old, adv, mask = self._tensors(m, m.logp)
        lp.requires_grad_(True)
        loss, metrics = _split(fn(lp, old, adv, mask, **options))
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ConformanceError(f"the loss must be a 0-d tensor; got {type(loss).__name__} "
                                   f"{tuple(getattr(loss, 'shape', ()))}")
        if loss.requires_grad:
            (g,) = torch.autograd.grad(loss.reshape(()), lp, torch.tensor(cotangent, dtype=loss.dtype),
                                       allow_unused=True)
        else:
            g = None
        g = torch.zeros_like(lp) if g is None else g
        if metrics is not None:
            metrics = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in metrics.items()}
        grad = g.detach().to(torch.float64).numpy() / cotangent
        return Outcome(_scalar(loss.detach().double()), grad, _metrics(metrics), str(g.dtype).split(".")[-1])

    def value(self, fn, m, options, logp):
        import torch

        with torch.no_grad():
            loss, _ = _split(fn(*self._tensors(m, logp), **options))
        return _scalar(loss.double())


class JaxDriver(Driver):
    name = module = "jax"
    dtypes = ("float64", "float32", "bfloat16", "float16")

    def dtype_unavailable(self, dtype):
        if dtype == "float64":
            import jax

            if not jax.config.jax_enable_x64:
                return "JAX float64 needs jax_enable_x64 (sapo-conformance enables it; pytest: set it in conftest)"
        return super().dtype_unavailable(dtype)

    def _arrays(self, m: Materialized, logp: np.ndarray):
        import jax.numpy as jnp

        dt = getattr(jnp, m.dtype)
        conv = lambda a: jnp.asarray(np.array(a, np.float64 if m.dtype == "float64" else np.float32)).astype(dt)
        return conv(logp), conv(m.old_logp), conv(m.advantages), jnp.asarray(m.mask)

    def run(self, fn, m, options, cotangent):
        import jax
        import jax.numpy as jnp

        lp, old, adv, mask = self._arrays(m, m.logp)

        def f(x):
            loss, metrics = _split(fn(x, old, adv, mask, **options))
            if jnp.shape(loss) != ():
                raise ConformanceError(f"the loss must be 0-d; got shape {jnp.shape(loss)}")
            return loss, metrics

        loss, pullback, metrics = jax.vjp(f, lp, has_aux=True)
        (g,) = pullback(jnp.asarray(cotangent, dtype=loss.dtype))
        grad = np.asarray(g.astype(jnp.float64 if m.dtype == "float64" else jnp.float32), np.float64) / cotangent
        return Outcome(_scalar(loss.astype(jnp.float32) if m.dtype != "float64" else loss), grad,
                       _metrics(metrics), str(g.dtype))

    def value(self, fn, m, options, logp):
        import jax

        lp, old, adv, mask = self._arrays(m, logp)
        # Through jax.vjp like run(): a jitted function compiles once per configuration, not twice.
        loss, _ = jax.vjp(lambda x: _split(fn(x, old, adv, mask, **options))[0], lp)
        return _scalar(loss)


class MlxDriver(Driver):
    name = module = "mlx"
    dtypes = ("float64", "float32", "bfloat16", "float16")

    def _arrays(self, m: Materialized, logp: np.ndarray):
        import mlx.core as mx

        dt = getattr(mx, m.dtype)

        def conv(a):
            if m.dtype == "float64":  # mx.array(float64 ndarray) would silently give float32
                return mx.array(np.asarray(a, np.float64), dtype=mx.float64)
            return mx.array(np.asarray(a, np.float32), dtype=mx.float32).astype(dt)

        return conv(logp), conv(m.old_logp), conv(m.advantages), mx.array(m.mask)

    @staticmethod
    def _np(x) -> np.ndarray:
        import mlx.core as mx

        if x.dtype in (mx.bfloat16, mx.float16):
            x = x.astype(mx.float32)
        return np.array(x, np.float64)

    def run(self, fn, m, options, cotangent):
        import mlx.core as mx

        lp, old, adv, mask = self._arrays(m, m.logp)
        loss, metrics = _split(fn(lp, old, adv, mask, **options))
        if not isinstance(loss, mx.array) or loss.size != 1:
            raise ConformanceError(f"the loss must be a 0-d mlx array; got {type(loss).__name__}")
        ct = mx.array(cotangent, dtype=mx.float32).astype(loss.dtype)
        _, (g,) = mx.vjp(lambda x: [_split(fn(x, old, adv, mask, **options))[0].reshape(())], [lp], [ct])
        dtype = str(g.dtype).split(".")[-1]
        metrics = None if metrics is None else {k: float(self._np(v)) for k, v in metrics.items()}
        return Outcome(float(self._np(loss)), self._np(g) / cotangent, metrics, dtype)

    def value(self, fn, m, options, logp):
        loss, _ = _split(fn(*self._arrays(m, logp), **options))
        return float(self._np(loss))


DRIVERS: dict[str, type[Driver]] = {
    "numpy": NumpyDriver,
    "torch": TorchDriver,
    "jax": JaxDriver,
    "mlx": MlxDriver,
}


def get_driver(framework: str) -> Driver:
    """The driver of ``framework``; ``ValueError`` listing the known names otherwise."""
    try:
        return DRIVERS[framework]()
    except KeyError:
        raise ValueError(f"unknown framework {framework!r}; expected one of: {', '.join(DRIVERS)}") from None
