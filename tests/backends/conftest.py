"""The ONE backend fixture of the cross-backend tests: every concern is checked on every API.

``backend`` runs over the built-in targets of the conformance suite (``reference``,
``reference-strict``, ``torch``, ``jax``, ``mlx``), each a ``pytest.param`` with its framework's
marker. A backend is the suite's target (the function, its capabilities) plus the suite's
framework driver (conversion, autodiff); results are compared with the suite's one comparison
helper, :func:`sapo_conformance.compare.compare`, at the spec's tolerance for the dtype
(clause C.1). A framework that is not installed skips its tests with the reason; an adapter
that fails to import while its framework is installed is an error, and so is an unknown name.
A test module narrows the backends with ``BACKENDS = (...)`` (the adapters, for tracing and
autodiff).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from sapo_conformance.cases import Materialized
from sapo_conformance.compare import compare
from sapo_conformance.drivers import Driver, Outcome, get_driver
from sapo_conformance.runner import _metric_check as metric_check
from sapo_conformance.runner import cotangent_for
from sapo_conformance.targets import BUILTIN_TARGETS, Target, builtin_target, tolerance_for

import sapo_ref
from sapo_ref import Normalizer

#: Backends whose API is a framework adapter (they differentiate and may trace).
ADAPTERS: tuple[str, ...] = ("torch", "jax", "mlx")
_MARKS = {name: getattr(pytest.mark, name) for name in ADAPTERS}


@dataclass
class Backend:
    """One API under test: the suite's target and driver, and the package behind them.

    ``api`` is the raw ``policy_loss`` of the package, called with the framework's arrays
    (``reference-strict``: ``sapo_ref.policy_loss`` on ``array_api_strict`` arrays).
    """

    name: str
    target: Target
    driver: Driver
    module: ModuleType

    # ------------------------------------------------------------------ capabilities
    @property
    def dtypes(self) -> tuple[str, ...]:
        """The dtypes this backend runs here (its capabilities and the framework's)."""
        return tuple(d for d in self.target.dtypes if self.driver.dtype_unavailable(d) is None)

    @property
    def is_adapter(self) -> bool:
        return self.name in ADAPTERS

    def require_dtype(self, dtype: str) -> None:
        """Skip the test with the reason when ``dtype`` does not apply to this backend."""
        if dtype not in self.target.dtypes:
            pytest.skip(f"{self.name} does not claim {dtype}")
        why = self.driver.dtype_unavailable(dtype)
        if why:
            pytest.skip(why)

    def tolerance(self, dtype: str, kind: str):
        """The spec's (or the target's declared) tolerance ``kind`` for ``dtype`` (C.1)."""
        return tolerance_for(self.target, dtype, kind)

    # ------------------------------------------------------------------ arrays
    def to_array(self, a: Any, dtype: str | None = None) -> Any:
        """``a`` (NumPy) as this backend's array of ``dtype`` (None: ``a``'s own, ints as int64)."""
        a = np.asarray(a)
        if self.name == "reference-strict":
            import array_api_strict as xp

            return xp.asarray(a if dtype is None else a.astype(dtype))
        return self.driver.to_array(a, dtype, None)

    def native(self, a: np.ndarray) -> Any:
        """``a`` as this framework's array with exactly its dtype (int32, complex128 too)."""
        if self.name == "torch":
            import torch

            return torch.from_numpy(a.copy())
        if self.name == "jax":
            import jax.numpy as jnp

            return jnp.asarray(a)
        if self.name == "mlx":
            import mlx.core as mx

            return mx.array(a)
        return self.to_array(a)

    def to_numpy(self, x: Any) -> np.ndarray:
        """A backend array (or scalar) as a float64 (or bool) NumPy array."""
        if self.name == "reference-strict" and hasattr(x, "__dlpack__"):
            out = np.from_dlpack(x)
        else:
            out = np.asarray(self.driver.to_numpy(x))
        return out if out.dtype == bool else out.astype(np.float64)

    def dtype_name(self, x: Any) -> str:
        """The dtype of a backend array as a plain name (``float32``, ``bfloat16``)."""
        return self.driver.dtype_name(x)

    # ------------------------------------------------------------------ batch counts
    @property
    def distributed(self) -> ModuleType:
        """Where the batch counts live: ``sapo_ref.sharding`` or ``<adapter>.distributed``."""
        if not self.is_adapter:
            return importlib.import_module("sapo_ref.sharding")
        try:
            return importlib.import_module(f"sapo_{self.name}.distributed")
        except ImportError:  # sapo_jax.sharding is being renamed sapo_jax.distributed
            return importlib.import_module(f"sapo_{self.name}.sharding")

    def local_counts(self, mask: Any, *, count_empty_rows: bool = False) -> Normalizer:
        """A shard's own counts (n_k, R_k) from a backend mask (clause 3.8)."""
        if not self.is_adapter:
            return sapo_ref.normalizer(mask, count_empty_rows=count_empty_rows)
        got = self.distributed.local_counts(mask, count_empty_rows=count_empty_rows)
        return got if isinstance(got, Normalizer) else Normalizer(got[0], got[1])

    # ------------------------------------------------------------------ calls
    def api(self, *arrays: Any, **options: Any) -> Any:
        """The package's own ``policy_loss`` on backend arrays (errors are its own)."""
        return self.module.policy_loss(*arrays, **options)

    def loss(self, *arrays: Any, **options: Any) -> Any:
        """The loss alone, as a backend array (reference: a float)."""
        out = self.api(*arrays, **options)
        return out.loss if hasattr(out, "loss") else out[0]

    def run(
        self, m: Materialized, options: dict | None = None, cotangent: float | None = None
    ) -> Outcome:
        """Loss, gradient (random cotangent) and metrics on a materialised case (the driver)."""
        opts = dict(m.case.options if options is None else options)
        if cotangent is None:
            cotangent = cotangent_for(0, m.case.id)
        if self.target.metrics_option:  # opt-in metrics (sapo_torch): ask for them
            opts = {**opts, **self.target.metrics_option}
        with np.errstate(all="ignore"):
            return self.driver.run(self.target.fn, m, opts, cotangent)

    def value_and_vjp(self, f: Callable[[Any], Any], x: Any, cotangent: float) -> tuple[Any, Any]:
        """``(f(x), cotangent * df/dx)`` by the framework's autodiff (the driver's hook)."""
        loss, grad, _ = self.driver.value_and_vjp(f, x, cotangent)
        return loss, grad

    def traced(self, f: Callable[..., Any]) -> Callable[..., Any]:
        """``f`` under the framework's tracing compiler (jax.jit, torch.compile, mx.compile)."""
        if self.name == "jax":
            import jax

            return jax.jit(f)
        if self.name == "mlx":
            import mlx.core as mx

            return mx.compile(f)
        if self.name == "torch":
            import torch

            return torch.compile(f, backend="aot_eager", dynamic=False)
        pytest.skip(f"{self.name} has no tracing compiler")
        raise AssertionError  # pragma: no cover

    def traced_value_and_grad(self, f: Callable[..., Any]) -> Callable[..., tuple[Any, Any]]:
        """``(f(x, *rest), df/dx)`` with ``f`` under the framework's tracing compiler.

        jax.jit of jax.value_and_grad; torch.compile (aot_eager: fake tensors and AOTAutograd
        like inductor, without code generation) then autograd; mx.compile of mx.value_and_grad.
        """
        if self.name == "jax":
            import jax

            return jax.jit(jax.value_and_grad(f))
        if self.name == "mlx":
            import mlx.core as mx

            return mx.compile(mx.value_and_grad(f))
        if self.name == "torch":
            import torch

            compiled = torch.compile(f, backend="aot_eager", dynamic=False)

            def run(x, *rest):
                x = x.detach().clone().requires_grad_(True)
                y = compiled(x, *rest)
                (g,) = torch.autograd.grad(y, x, allow_unused=True)
                return y.detach(), torch.zeros_like(x) if g is None else g

            return run
        pytest.skip(f"{self.name} has no tracing compiler")
        raise AssertionError  # pragma: no cover

    # ------------------------------------------------------------------ comparison
    def assert_matches(self, m: Materialized, out: Outcome, *, metrics: bool = True) -> None:
        """Loss, gradient and metrics of ``out`` against the reference in ``m`` (clause C.1)."""
        vt, gt = self.tolerance(m.dtype, "value"), self.tolerance(m.dtype, "grad")
        checks = [
            compare("loss", out.loss, m.want_loss, vt),
            compare("grad", out.grad, m.want_grad, gt),
        ]
        if metrics and self.target.metrics:
            assert out.metrics is not None, f"{self.name} returned no metrics"
            checks.append(metric_check(m, out.metrics, vt))
        bad = [c.message for c in checks if not c.ok]
        assert not bad, f"{self.name} {m.dtype} case {m.case.id} {m.case.options}: " + "; ".join(
            bad
        )


def make_backend(name: str) -> Backend:
    """The backend ``name``; skip with the reason when its framework is missing."""
    if name not in BUILTIN_TARGETS:
        raise ValueError(f"unknown backend {name!r}; expected one of: {', '.join(BUILTIN_TARGETS)}")
    target = builtin_target(name)
    driver = get_driver(target.framework)
    missing = driver.unavailable()  # the framework itself is not installed: skip
    if missing is None and name == "reference-strict":
        missing = target.unavailable
    if missing:
        pytest.skip(f"{name}: {missing}")
    if target.unavailable:  # the framework is there but its adapter is broken: an error
        raise RuntimeError(f"backend {name}: {target.unavailable}")
    module = importlib.import_module("sapo_ref" if name.startswith("reference") else f"sapo_{name}")
    return Backend(name, target, driver, module)


def backend_params(names: tuple[str, ...] = BUILTIN_TARGETS) -> list[Any]:
    """``pytest.param`` per backend name, each with its framework's marker."""
    return [pytest.param(n, marks=[_MARKS[n]] if n in _MARKS else [], id=n) for n in names]


_CACHE: dict[str, Backend] = {}


def pytest_generate_tests(metafunc):
    # A test module may narrow the backends with BACKENDS = (...) (e.g. ADAPTERS).
    if "backend" in metafunc.fixturenames:
        names = getattr(metafunc.module, "BACKENDS", BUILTIN_TARGETS)
        metafunc.parametrize("backend", backend_params(names), indirect=True)


@pytest.fixture
def backend(request) -> Backend:
    """One API of ``BUILTIN_TARGETS`` (or the test module's ``BACKENDS``); skipped if missing."""
    name = request.param
    if name not in _CACHE:
        _CACHE[name] = make_backend(name)
    return _CACHE[name]
