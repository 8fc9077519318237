"""Framework drivers: the plugin interface that lets the suite run a loss in any framework.

A driver moves a case's inputs into its framework, calls the function, pulls a scalar
cotangent ``c`` back through the framework's **own** autodiff (``grad = vjp(c) / c``) and
brings the results back as NumPy. A framework is added by installing a package that declares
an entry point in the group ``sapo_conformance.drivers`` (``NAME = "module:DriverClass"``);
the four built-in drivers (numpy, torch, jax, mlx) are declared the same way and are also
the fallback when package metadata is missing.

A driver subclasses :class:`Driver` and implements its hooks only:

- class attributes ``name``, ``module`` (what must be importable) and ``dtypes``;
- ``unavailable()`` and ``device_unavailable(device)``: why it cannot run here, or None;
- ``versions() -> dict``: framework (and driver) versions, recorded in every report;
- ``to_array(a, dtype, device)``: a NumPy array as a framework array of ``dtype`` (a float
  dtype name, ``"bool"`` or ``"int64"``) on ``device``, always a fresh copy;
- ``to_numpy(x)``: a framework array (or scalar) as NumPy, float64 where NumPy holds the values
  (complex stays complex so that the suite can reject it);
- ``value_and_vjp(f, x, cotangent) -> (loss, grad, aux)``: ``f(x)`` is the function's raw
  output (a loss, or a tuple ``(loss, aux, ...)``); ``grad`` is the pullback of ``cotangent``
  to ``x`` by the framework's autodiff, ``aux`` the tuple's second item or None;
- ``value(f, x)``: the loss alone (for the finite-difference check);
- optionally ``value_and_vjp_many(f, xs, cotangent) -> (loss, grads, aux)``: the same with a
  list of inputs (``f(xs)``; ``[logp, ref_logp]`` for the KL penalty of clause 10.2), so that
  the gradient of ``ref_logp`` (clause 10.3) is checked too; a driver without it is still run
  on those cases, its ``ref_logp`` gradient unchecked.

The clause 10 arrays (``weights``, ``ref_logp``) reach the function as keywords; ``weights``
keeps bool and integer dtypes (clause 10.1), float weights and ``ref_logp`` take the case's.

The base class implements the rest once, for every driver (:meth:`Driver.run`,
:meth:`Driver.loss_at`): fresh input copies per call, the mask in the declared dtype, the
contract checks (a 0-d real loss, a real gradient of logp's shape) and clause 6.5 (every input
is compared after the call with a copy taken before: an implementation that writes into an
input fails by name).

>>> sorted(DRIVERS)
['jax', 'mlx', 'numpy', 'torch']
>>> d = NumpyDriver()
>>> d.to_numpy(d.to_array(np.array([True, False]), "float32", None)).tolist()
[1.0, 0.0]
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import numpy as np

from .cases import Materialized

__all__ = [
    "Outcome",
    "Driver",
    "DRIVERS",
    "ENTRY_POINT_GROUP",
    "DriverInfo",
    "discover_drivers",
    "get_driver",
    "ConformanceError",
    "split_output",
]

ENTRY_POINT_GROUP = "sapo_conformance.drivers"
_INPUTS = ("logp", "old_logp", "advantages", "mask")


class ConformanceError(Exception):
    """The function's output or behaviour breaks the calling contract (not a number mismatch).

    ``clause`` names the spec clause it breaks when there is one (6.5: an input modified)."""

    def __init__(self, message: str, clause: str | None = None) -> None:
        super().__init__(message)
        self.clause = clause


@dataclass(frozen=True)
class Outcome:
    """What a function produced on one case, as NumPy float64."""

    loss: float
    grad: np.ndarray
    metrics: dict[str, float] | None
    grad_dtype: str
    #: dL/d ref_logp through the framework's autodiff (clause 10.3); None where not taken.
    ref_grad: np.ndarray | None = None


def split_output(out: Any) -> tuple[Any, Any]:
    """``(loss, aux)`` of a function's raw output: a loss, or a tuple whose first item is the
    loss; ``aux`` is the second item when it is a dict (metrics), else None.

    >>> split_output((1.0, {"a": 2.0}))
    (1.0, {'a': 2.0})
    >>> split_output(3.0)
    (3.0, None)
    """
    if isinstance(out, (tuple, list)):
        if not out:
            raise ConformanceError("the function returned an empty tuple")
        extra = out[1] if len(out) > 1 and isinstance(out[1], dict) else None
        return out[0], extra
    return out, None


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    if a.shape != b.shape:
        return False
    if a.dtype.kind in "fc" and b.dtype.kind in "fc":
        return bool(np.array_equal(a, b, equal_nan=True))
    return bool(np.array_equal(a, b))


def _dtype_of(a: np.ndarray, dtype: str | None) -> str:
    """``dtype``, or the name of ``a``'s own dtype when None (bool stays bool)."""
    if dtype is not None:
        return dtype
    a = np.asarray(a)
    return "bool" if a.dtype == bool else "int64" if a.dtype.kind in "iu" else a.dtype.name


def _dist_version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


class Driver:
    """Base driver: hooks to implement per framework (module doc), the suite's calls on top."""

    name = "base"
    module = ""
    dtypes: tuple[str, ...] = ()
    #: False for a framework without autodiff whose functions return their gradient themselves
    #: (NumPy): value_and_vjp then returns that gradient, not a pullback of the cotangent.
    gradient_is_pullback = True

    # ------------------------------------------------------------------ hooks

    def unavailable(self) -> str | None:
        """Why this driver cannot run here, or None."""
        if importlib.util.find_spec(self.module) is None:
            return f"{self.module} is not installed"
        return None

    def device_unavailable(self, device: str | None) -> str | None:
        """Why ``device`` cannot be used, or None (None and "cpu" mean the default device)."""
        if device in (None, "", "cpu"):
            return None
        return f"the {self.name} driver runs on the CPU only; there is no device {device!r}"

    def dtype_unavailable(self, dtype: str) -> str | None:
        """Why this framework cannot run ``dtype`` here, or None."""
        return None if dtype in self.dtypes else f"{self.name} has no {dtype}"

    def devices(self) -> list[str]:
        """Devices this framework can use here (for ``--list-frameworks``)."""
        return ["cpu"]

    def versions(self) -> dict[str, str]:
        """Versions of the framework (and of the driver's package), for the reports."""
        return {self.module: _dist_version(self.module)}

    def to_array(self, a: np.ndarray, dtype: str, device: str | None) -> Any:
        raise NotImplementedError

    def to_numpy(self, x: Any) -> np.ndarray:
        raise NotImplementedError

    def value_and_vjp(self, f: Callable, x: Any, cotangent: float) -> tuple[Any, Any, Any]:
        raise NotImplementedError

    def value(self, f: Callable, x: Any) -> Any:
        raise NotImplementedError

    def value_and_vjp_many(
        self, f: Callable, xs: list, cotangent: float
    ) -> tuple[Any, list[Any], Any]:
        """``value_and_vjp`` for a list of inputs (optional hook, see the module doc)."""
        raise NotImplementedError

    def has_many(self) -> bool:
        """Whether this driver pulls a cotangent back to several inputs (``ref_logp``)."""
        return type(self).value_and_vjp_many is not Driver.value_and_vjp_many

    def dtype_name(self, x: Any) -> str:
        """The dtype of a framework array as a plain name ("float32")."""
        return str(getattr(x, "dtype", type(x).__name__)).split(".")[-1]

    # ------------------------------------------------------------------ the suite's side

    def _inputs(
        self, m: Materialized, logp: np.ndarray, device: str | None, mask_dtype: str
    ) -> list:
        if mask_dtype == "float":
            mask = self.to_array(m.mask.astype(np.float64), m.dtype, device)
        elif mask_dtype == "int":
            mask = self.to_array(m.mask.astype(np.int64), "int64", device)
        else:
            mask = self.to_array(m.mask.copy(), "bool", device)
        return [
            self.to_array(np.array(a, np.float64), m.dtype, device)
            for a in (logp, m.old_logp, m.advantages)
        ] + [mask]

    def _keywords(self, m: Materialized, device: str | None) -> dict[str, Any]:
        """The clause 10 keyword arrays in the framework (fresh copies)."""
        out = {}
        for name, a in m.keyword_arrays().items():
            dtype = _dtype_of(a, None) if a.dtype.kind in "biu" else m.dtype
            out[name] = self.to_array(np.array(a, copy=True), dtype, device)
        return out

    def _snapshot(self, arrays: list) -> list[np.ndarray]:
        return [np.array(self.to_numpy(a), copy=True) for a in arrays]

    def _check_unmodified(
        self, arrays: list, before: list[np.ndarray], names: tuple[str, ...] = _INPUTS
    ) -> None:
        for name, arr, was in zip(names, arrays, before):
            if not _same(np.asarray(self.to_numpy(arr)), was):
                raise ConformanceError(
                    f"the implementation modified {name} in place (clause 6.5)", clause="6.5"
                )

    def _real(self, what: str, x: Any) -> np.ndarray:
        a = np.asarray(self.to_numpy(x))
        if np.iscomplexobj(a):
            raise ConformanceError(f"{what} is {a.dtype.name}: a {what} must be real")
        if a.dtype.kind not in "fiub":
            raise ConformanceError(f"{what} has dtype {a.dtype}: a {what} must be a real number")
        return a.astype(np.float64)

    def _loss(self, loss: Any) -> float:
        a = self._real("loss", loss)
        if a.size != 1:
            raise ConformanceError(f"the loss must be 0-d; got shape {tuple(a.shape)}")
        return float(a.reshape(()))

    def run(
        self,
        fn: Callable,
        m: Materialized,
        options: dict,
        cotangent: float,
        *,
        device: str | None = None,
        mask_dtype: str = "bool",
    ) -> Outcome:
        """Call ``fn`` on the case, differentiate with respect to ``logp`` (and ``ref_logp``
        where the driver can), check the contract."""
        arrays = self._inputs(m, m.logp, device, mask_dtype)
        kw = self._keywords(m, device)
        names = (*_INPUTS, *kw)
        before = self._snapshot(arrays + list(kw.values()))
        lp, old, adv, mask = arrays
        ref = kw.get("ref_logp")
        many = ref is not None and self.gradient_is_pullback and self.has_many()
        g_ref: Any = None
        if many:
            call = lambda xs: fn(xs[0], old, adv, mask, **options, **{**kw, "ref_logp": xs[1]})
            loss, (g, g_ref), aux = self.value_and_vjp_many(call, [lp, ref], cotangent)
        else:
            call1 = lambda x: fn(x, old, adv, mask, **options, **kw)
            loss, g, aux = self.value_and_vjp(call1, lp, cotangent)
        self._check_unmodified(arrays + list(kw.values()), before, names)
        value = self._loss(loss)
        grad = np.zeros(m.logp.shape) if g is None else self._real("gradient", g)
        if grad.shape != m.logp.shape:
            raise ConformanceError(f"the gradient has shape {grad.shape}; logp has {m.logp.shape}")
        ref_grad = None
        if many:
            ref_grad = np.zeros(m.logp.shape) if g_ref is None else self._real("gradient", g_ref)
            if ref_grad.shape != m.logp.shape:
                raise ConformanceError(
                    f"the ref_logp gradient has shape {ref_grad.shape}; ref_logp has {m.logp.shape}"
                )
            ref_grad = ref_grad / cotangent
        metrics = None
        if isinstance(aux, dict):
            metrics = {
                str(k): float(self._real(f"metric {k!r}", v).reshape(-1)[0]) for k, v in aux.items()
            }
        if self.gradient_is_pullback:
            grad = grad / cotangent
        dtype = "none" if g is None else self.dtype_name(g)
        return Outcome(value, grad, metrics, dtype, ref_grad)

    def loss_at(
        self,
        fn: Callable,
        m: Materialized,
        options: dict,
        logp: np.ndarray,
        *,
        device: str | None = None,
        mask_dtype: str = "bool",
    ) -> float:
        """The loss alone at another ``logp`` (for the finite-difference check)."""
        arrays = self._inputs(m, logp, device, mask_dtype)
        kw = self._keywords(m, device)
        before = self._snapshot(arrays + list(kw.values()))
        lp, old, adv, mask = arrays
        loss = self.value(lambda x: fn(x, old, adv, mask, **options, **kw), lp)
        self._check_unmodified(arrays + list(kw.values()), before, (*_INPUTS, *kw))
        return self._loss(loss)


# ----------------------------------------------------------------------------- built-ins


class NumpyDriver(Driver):
    """NumPy has no autodiff: the function returns ``(loss, grad)`` or ``(loss, grad, metrics)``."""

    name = module = "numpy"
    dtypes = ("float64", "float32", "float16")
    gradient_is_pullback = False

    def versions(self) -> dict[str, str]:
        return {"numpy": np.__version__}

    def to_array(self, a, dtype, device):
        return np.array(
            a, dtype=np.dtype(_dtype_of(a, dtype))
        )  # a copy per call: a write cannot leak

    def to_numpy(self, x):
        a = np.asarray(x)
        return a if a.dtype.kind == "c" else a.astype(np.float64) if a.dtype.kind in "fiub" else a

    @staticmethod
    def _parts(out):
        if not isinstance(out, (tuple, list)) or len(out) < 2:
            raise ConformanceError(
                "a numpy implementation must return (loss, grad) or (loss, grad, metrics)"
            )
        return out[0], out[1], (out[2] if len(out) > 2 else None)

    def value_and_vjp(self, f, x, cotangent):
        return self._parts(f(x))  # the function's own gradient (gradient_is_pullback = False)

    def value(self, f, x):
        return self._parts(f(x))[0]


class TorchDriver(Driver):
    name = module = "torch"
    dtypes = ("float64", "float32", "bfloat16", "float16")

    def versions(self):
        import torch

        return {"torch": torch.__version__}

    def devices(self):
        import torch

        out = ["cpu"]
        if torch.cuda.is_available():
            out += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            out.append("mps")
        return out

    def device_unavailable(self, device):
        if device in (None, ""):
            return None
        import torch

        try:
            torch.zeros(1, device=device)
        except Exception as err:  # unknown type, not compiled in, no such index
            return f"torch device {device!r} is not available: {str(err).splitlines()[0]}"
        return None

    def to_array(self, a, dtype, device):
        import torch

        dtype = _dtype_of(a, dtype)
        if dtype in ("bool", "int64"):
            return torch.from_numpy(np.array(a, dtype=dtype)).to(device or "cpu")
        # bfloat16 values travel as float32 (NumPy has no bfloat16); the cast is exact.
        src = np.array(a, np.float64 if dtype == "float64" else np.float32)
        return torch.from_numpy(src).to(device=device or "cpu", dtype=getattr(torch, dtype))

    def to_numpy(self, x):
        import torch

        if not isinstance(x, torch.Tensor):
            return np.asarray(x)
        x = x.detach().cpu()
        if x.dtype in (torch.bfloat16, torch.float16):
            x = x.to(torch.float32)
        return x.numpy().copy()

    def value_and_vjp(self, f, x, cotangent):
        import torch

        x.requires_grad_(True)
        loss, aux = split_output(f(x))
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ConformanceError(
                f"the loss must be a 0-d tensor; got {type(loss).__name__} "
                f"{tuple(getattr(loss, 'shape', ()))}"
            )
        g = None
        if loss.requires_grad:
            ct = torch.tensor(cotangent, dtype=loss.dtype, device=loss.device)
            (g,) = torch.autograd.grad(loss.reshape(()), x, ct, allow_unused=True)
        return loss.detach(), g, aux

    def value_and_vjp_many(self, f, xs, cotangent):
        import torch

        for x in xs:
            x.requires_grad_(True)
        loss, aux = split_output(f(xs))
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ConformanceError(
                f"the loss must be a 0-d tensor; got {type(loss).__name__} "
                f"{tuple(getattr(loss, 'shape', ()))}"
            )
        grads: list = [None] * len(xs)
        if loss.requires_grad:
            ct = torch.tensor(cotangent, dtype=loss.dtype, device=loss.device)
            grads = list(torch.autograd.grad(loss.reshape(()), xs, ct, allow_unused=True))
        return loss.detach(), grads, aux

    def value(self, f, x):
        import torch

        with torch.no_grad():
            return split_output(f(x))[0]


class JaxDriver(Driver):
    name = module = "jax"
    dtypes = ("float64", "float32", "bfloat16", "float16")

    def versions(self):
        import jax

        return {"jax": jax.__version__, "jaxlib": _dist_version("jaxlib")}

    def devices(self):
        import jax

        return [f"{d.platform}:{d.id}" for d in jax.devices()]

    def dtype_unavailable(self, dtype):
        if dtype == "float64":
            import jax

            if not jax.config.jax_enable_x64:
                return "JAX float64 needs jax_enable_x64 (sapo-conformance enables it; pytest: set it in conftest)"
        return super().dtype_unavailable(dtype)

    @staticmethod
    def _device(device):
        import jax

        if device in (None, ""):
            return None
        platform, _, index = str(device).partition(":")
        devs = jax.devices(platform)
        return devs[int(index) if index else 0]

    def device_unavailable(self, device):
        if device in (None, ""):
            return None
        try:
            self._device(device)
        except Exception as err:  # RuntimeError: unknown platform; IndexError; ValueError
            return f"JAX device {device!r} is not available: {str(err).splitlines()[0]}"
        return None

    def to_array(self, a, dtype, device):
        import jax
        import jax.numpy as jnp

        dtype = _dtype_of(a, dtype)
        if dtype in ("bool", "int64"):
            arr = jnp.asarray(np.array(a, dtype=dtype))
        else:
            arr = jnp.asarray(np.array(a, np.float64 if dtype == "float64" else np.float32)).astype(
                getattr(jnp, dtype)
            )
        dev = self._device(device)
        return arr if dev is None else jax.device_put(arr, dev)

    def to_numpy(self, x):
        import jax.numpy as jnp

        a = jnp.asarray(x)
        if a.dtype in (jnp.bfloat16, jnp.float16):
            a = a.astype(jnp.float32)
        return np.array(a)

    def value_and_vjp(self, f, x, cotangent):
        import jax
        import jax.numpy as jnp

        def g(z):
            loss, aux = split_output(f(z))
            if jnp.shape(loss) != ():
                raise ConformanceError(f"the loss must be 0-d; got shape {jnp.shape(loss)}")
            return loss, aux

        loss, pullback, aux = jax.vjp(g, x, has_aux=True)
        (grad,) = pullback(jnp.asarray(cotangent, dtype=loss.dtype))
        return loss, grad, aux

    def value_and_vjp_many(self, f, xs, cotangent):
        import jax
        import jax.numpy as jnp

        def g(*zs):
            loss, aux = split_output(f(list(zs)))
            if jnp.shape(loss) != ():
                raise ConformanceError(f"the loss must be 0-d; got shape {jnp.shape(loss)}")
            return loss, aux

        loss, pullback, aux = jax.vjp(g, *xs, has_aux=True)
        grads = pullback(jnp.asarray(cotangent, dtype=loss.dtype))
        return loss, list(grads), aux

    def value(self, f, x):
        import jax

        # Through jax.vjp like run(): a jitted function compiles once per configuration, not twice.
        loss, _ = jax.vjp(lambda z: split_output(f(z))[0], x)
        return loss


class MlxDriver(Driver):
    name = module = "mlx"
    dtypes = ("float64", "float32", "bfloat16", "float16")

    def versions(self):
        return {"mlx": _dist_version("mlx")}

    def devices(self):
        import mlx.core as mx

        return ["cpu"] + (["gpu"] if mx.is_available(mx.gpu) else [])

    def device_unavailable(self, device):
        if device in (None, ""):
            return None
        import mlx.core as mx

        if device not in ("cpu", "gpu"):
            return f"MLX device {device!r} is not a device name (cpu or gpu)"
        if not mx.is_available(getattr(mx, device)):
            return f"MLX device {device!r} is not available here"
        return None

    def to_array(self, a, dtype, device):
        import mlx.core as mx

        dtype = _dtype_of(a, dtype)
        if device not in (
            None,
            "",
        ):  # MLX arrays live in unified memory; ops run on the default device
            mx.set_default_device(getattr(mx, device))
        if dtype in ("bool", "int64"):
            return mx.array(np.array(a, dtype=dtype))
        if dtype == "float64":  # mx.array(float64 ndarray) would silently give float32
            return mx.array(np.asarray(a, np.float64), dtype=mx.float64)
        return mx.array(np.asarray(a, np.float32), dtype=mx.float32).astype(getattr(mx, dtype))

    def to_numpy(self, x):
        import mlx.core as mx

        if not isinstance(x, mx.array):
            return np.asarray(x)
        if x.dtype in (mx.bfloat16, mx.float16):
            x = x.astype(mx.float32)
        return np.array(x)

    def value_and_vjp(self, f, x, cotangent):
        import mlx.core as mx

        loss, aux = split_output(f(x))
        if not isinstance(loss, mx.array) or loss.size != 1:
            raise ConformanceError(f"the loss must be a 0-d mlx array; got {type(loss).__name__}")
        ct = mx.array(cotangent, dtype=mx.float32).astype(loss.dtype)
        _, (g,) = mx.vjp(lambda z: [split_output(f(z))[0].reshape(())], [x], [ct])
        return loss, g, aux

    def value_and_vjp_many(self, f, xs, cotangent):
        import mlx.core as mx

        loss, aux = split_output(f(xs))
        if not isinstance(loss, mx.array) or loss.size != 1:
            raise ConformanceError(f"the loss must be a 0-d mlx array; got {type(loss).__name__}")
        ct = mx.array(cotangent, dtype=mx.float32).astype(loss.dtype)
        _, grads = mx.vjp(lambda *zs: [split_output(f(list(zs)))[0].reshape(())], xs, [ct])
        return loss, list(grads), aux

    def value(self, f, x):
        return split_output(f(x))[0]


#: The built-in drivers (also declared as entry points in sapo-ref's pyproject.toml).
DRIVERS: dict[str, type[Driver]] = {
    "numpy": NumpyDriver,
    "torch": TorchDriver,
    "jax": JaxDriver,
    "mlx": MlxDriver,
}


@dataclass
class DriverInfo:
    """A framework driver found by discovery: its class, or why it could not be loaded."""

    name: str
    source: str  # "module:Class" of the entry point
    cls: type[Driver] | None = None
    error: str | None = None
    package: str = "sapo-ref"
    package_version: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


_DISCOVERED: dict[str, DriverInfo] | None = None


def discover_drivers(refresh: bool = False) -> dict[str, DriverInfo]:
    """Every driver of the entry-point group, with the built-ins as the fallback.

    A plugin whose import fails is kept with the reason (``error``), never dropped silently.
    """
    global _DISCOVERED
    if _DISCOVERED is not None and not refresh:
        return _DISCOVERED
    found: dict[str, DriverInfo] = {}
    try:
        eps = list(metadata.entry_points(group=ENTRY_POINT_GROUP))
    except Exception:  # broken metadata: the built-ins still work
        eps = []
    for ep in eps:
        if ep.name in found:
            continue
        dist = getattr(ep, "dist", None)
        info = DriverInfo(
            ep.name,
            ep.value,
            package=getattr(dist, "name", "") or "",
            package_version=getattr(dist, "version", "") or "",
        )
        try:
            cls = ep.load()
            if not (isinstance(cls, type) and issubclass(cls, Driver)):
                raise TypeError(f"{ep.value} is not a subclass of sapo_conformance.drivers.Driver")
            info.cls = cls
        except Exception as err:
            info.error = f"the plugin {ep.value} cannot be loaded: {type(err).__name__}: {err}"
        found[ep.name] = info
    for name, cls in DRIVERS.items():
        stale = (
            name in found
            and found[name].cls is None
            and found[name].source.startswith("sapo_conformance.")
        )
        if name not in found or stale:
            from . import __version__

            found[name] = DriverInfo(
                name,
                f"{cls.__module__}:{cls.__name__}",
                cls,
                package="sapo-ref",
                package_version=__version__,
            )
    _DISCOVERED = found
    return found


def get_driver(framework: str) -> Driver:
    """The driver of ``framework``; ``ValueError`` listing the known names otherwise."""
    if framework in DRIVERS:  # no metadata scan for the built-ins
        return DRIVERS[framework]()
    info = discover_drivers().get(framework)
    if info is None:
        raise ValueError(
            f"unknown framework {framework!r}; expected one of: {', '.join(discover_drivers())}"
        )
    if info.cls is None:
        raise ValueError(f"framework {framework!r}: {info.error}")
    return info.cls()
