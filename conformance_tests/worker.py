"""Where the function under test runs: in-process, or in one supervised worker per target.

The command never runs an implementation in its own process. Each target gets one worker
process (``multiprocessing`` "spawn": a fresh interpreter; messages are pickled over a pipe);
the command sends it a case, waits at most the per-case time limit, and judges the numbers
itself. Whatever the implementation does becomes a failing case with its reason, and the run
goes on:

- an exception (``SystemExit`` and ``KeyboardInterrupt`` included) is caught in the worker;
- an exit (``os._exit``), a signal (a segfault) or a hang ends the worker: the case fails
  ("worker exited with status 0 during case 2.1-00", "killed by SIGSEGV", "timed out after
  60 s"), and the worker is started again for the next case; after :data:`MAX_TIMEOUTS`
  time-outs or :data:`MAX_LOSSES` losses in a row, the target's remaining cases fail unrun
  (with that reason) rather than cost a time limit or a restart each.

The worker ignores SIGINT: Ctrl-C is the command's to handle. JAX targets get
``jax_enable_x64`` and the persistent compilation cache set in the worker before any array
exists, exactly as the command used to set them in its own process.

:class:`InProcess` runs the same calls without a process (the Python API and the pytest
plugin use it for a bare callable).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .cases import Materialized
from .drivers import ConformanceError, Outcome, discover_drivers, get_driver
from .targets import Target, UsageError, load_target

__all__ = [
    "DEFAULT_TIMEOUT",
    "MAX_LOSSES",
    "MAX_TIMEOUTS",
    "ImplError",
    "Failure",
    "CaseCalls",
    "gather",
    "WorkerLost",
    "WorkerInfo",
    "InProcess",
    "Worker",
    "WorkerPool",
    "configure_jax",
    "jax_cache_dir",
]

#: Per-case time limit in seconds (a first JAX compile of a configuration takes seconds).
DEFAULT_TIMEOUT = 60.0
#: Time allowed for a worker to start and import its framework and target.
START_TIMEOUT = 180.0
#: Worker losses in a row after which a target's remaining cases fail without being run.
MAX_LOSSES = 10
#: Time-outs in a row after which the same happens (each one costs the whole time limit).
MAX_TIMEOUTS = 3


@dataclass(frozen=True)
class Failure:
    """What went wrong in a call of the implementation: ``kind`` "raised" or "contract", a
    one-line ``text``, and the clause a contract failure breaks (6.5: an input modified)."""

    kind: str
    text: str
    clause: str | None = None
    #: Class names of a raised exception and its bases (an error case checks the type by name).
    types: tuple[str, ...] = ()


class ImplError(Exception):
    """The implementation raised or broke the contract on a case (the worker survived)."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.text)
        self.failure = failure


class WorkerLost(Exception):
    """The worker died or did not answer in time; ``reason`` says which and during what."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def describe(err: BaseException) -> Failure:
    """An exception of the implementation as a :class:`Failure` (kind, one-line text)."""
    if isinstance(err, ImplError):
        return err.failure
    if isinstance(err, SystemExit):
        return Failure("raised", f"the implementation called sys.exit({err.code!r}) (SystemExit)")
    if isinstance(err, KeyboardInterrupt):
        return Failure("raised", "the implementation raised KeyboardInterrupt")
    text = str(err).splitlines()[0] if str(err) else ""
    if isinstance(err, ConformanceError):
        return Failure("contract", f"{type(err).__name__}: {text}", err.clause)
    types = tuple(c.__name__ for c in type(err).__mro__)
    return Failure("raised", f"{type(err).__name__}: {text}", types=types)


@dataclass
class CaseCalls:
    """Every call one case makes, in one request: the main call, the loss at the
    finite-difference points (when asked and the main call was finite), and the call with
    the opt-in metrics option (when asked). Each is its result or the :class:`Failure`."""

    out: Outcome | Failure
    fd: list[float] | Failure | None = None
    extra: Outcome | Failure | None = None


def gather(
    executor: Any,
    m: Materialized,
    options: dict,
    cotangent: float,
    fd_points: list[np.ndarray] | None,
    extra_options: dict | None,
) -> CaseCalls:
    """The calls of one case through an executor's ``run`` and ``values`` (any object with
    those two methods and ``begin_case`` is an executor; a worker answers the whole
    :class:`CaseCalls` in one request)."""
    out = _attempt(lambda: executor.run(m, options, cotangent))
    if isinstance(out, Failure):
        return CaseCalls(out)
    calls = CaseCalls(out)
    if fd_points is not None and np.isfinite(out.loss) and np.all(np.isfinite(out.grad)):
        calls.fd = _attempt(lambda: executor.values(m, options, fd_points))
    if extra_options is not None:
        calls.extra = _attempt(lambda: executor.run(m, {**options, **extra_options}, cotangent))
    return calls


def _attempt(call: Any) -> Any:
    try:
        return call()
    except Exception as err:  # the implementation's; BaseException ends the whole request
        return describe(err)


@dataclass
class WorkerInfo:
    """What a worker found when it loaded its target."""

    unavailable: str | None = None
    capabilities: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    driver: str = ""
    device_unavailable: str | None = None
    dtype_unavailable: dict[str, str | None] = field(default_factory=dict)
    pid: int = 0


def jax_cache_dir() -> Path:
    """Where the command keeps JAX's persistent compilation cache."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sapo-conformance" / "jax"


def configure_jax(cache: bool) -> None:
    """Switch on float64 and the persistent compilation cache: before any JAX array exists.

    The command is an application: it may set JAX's global switches in its own (worker)
    process; ``sapo_jax`` itself never does.
    """
    import jax

    jax.config.update("jax_enable_x64", True)
    if cache:  # one XLA compile per configuration and dtype: keep them across runs
        jax.config.update("jax_compilation_cache_dir", str(jax_cache_dir()))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


class InProcess:
    """Runs a target's calls in this process (no isolation)."""

    def __init__(self, target: Target, device: str | None = None) -> None:
        self.target, self.device = target, device
        self.driver = get_driver(target.framework)

    def begin_case(self, label: str) -> None:
        pass

    def run(self, m: Materialized, options: dict, cotangent: float) -> Outcome:
        with np.errstate(all="ignore"):
            return self.driver.run(
                self.target.fn,
                m,
                options,
                cotangent,
                device=self.device,
                mask_dtype=self.target.mask_dtype,
            )

    def case(
        self,
        m: Materialized,
        options: dict,
        cotangent: float,
        fd_points: list[np.ndarray] | None,
        extra_options: dict | None,
    ) -> CaseCalls:
        """All the calls of one case (see :class:`CaseCalls`)."""
        return gather(self, m, options, cotangent, fd_points, extra_options)

    def values(self, m: Materialized, options: dict, points: list[np.ndarray]) -> list[float]:
        with np.errstate(all="ignore"):
            return [
                self.driver.loss_at(
                    self.target.fn,
                    m,
                    options,
                    p,
                    device=self.device,
                    mask_dtype=self.target.mask_dtype,
                )
                for p in points
            ]


# ----------------------------------------------------------------------------- the child


def _load(loader, framework, device, jax_cache, dtypes) -> tuple[WorkerInfo, Target]:
    if framework == "jax":
        configure_jax(jax_cache)
    info = WorkerInfo(pid=os.getpid())
    dinfo = discover_drivers().get(framework)
    info.driver = (
        f"{dinfo.source} ({dinfo.package} {dinfo.package_version})" if dinfo else framework
    )
    target = load_target(loader, framework)
    driver = get_driver(framework)
    info.unavailable = target.unavailable or driver.unavailable()
    if info.unavailable:
        return info, target
    info.capabilities = target.capabilities()
    info.versions = driver.versions()
    info.device_unavailable = driver.device_unavailable(device)
    info.dtype_unavailable = {d: driver.dtype_unavailable(d) for d in dtypes}
    return info, target


def _serve(conn: Any) -> None:
    """The worker's loop: answer requests until told to stop or the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C belongs to the command
    runner: InProcess | None = None
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        op = msg[0]
        try:
            if op == "stop":
                return
            if op == "init":
                _, loader, framework, device, jax_cache, dtypes = msg
                try:
                    info, target = _load(loader, framework, device, jax_cache, dtypes)
                except UsageError as err:
                    reply: tuple = ("usage", str(err))
                else:
                    if info.unavailable is None:
                        runner = InProcess(target, device)
                    reply = ("ok", info)
            elif op == "run":
                assert runner is not None
                reply = ("ok", runner.run(*msg[1:]))
            elif op == "values":
                assert runner is not None
                reply = ("ok", runner.values(*msg[1:]))
            elif op == "case":
                assert runner is not None
                reply = ("ok", runner.case(*msg[1:]))
            else:
                reply = ("error", Failure("contract", f"unknown request {op!r}"))
        except BaseException as err:  # SystemExit, KeyboardInterrupt: the implementation's
            reply = ("error", describe(err))
        try:
            conn.send(reply)
        except Exception as err:  # an unpicklable reply
            conn.send(("error", Failure("contract", f"the result cannot be sent back: {err}")))


# ----------------------------------------------------------------------------- the parent


def _exit_text(code: int | None) -> str:
    if code is None:
        return "stopped answering"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


class Worker:
    """The supervising side of one target's worker process (see the module doc)."""

    def __init__(
        self,
        target: Target,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        device: str | None = None,
        jax_cache: bool = True,
        dtypes: tuple[str, ...] = (),
    ) -> None:
        if target.loader is None:
            raise ValueError(f"target {target.name} cannot be rebuilt in a worker (no loader)")
        self.target, self.timeout, self.device = target, float(timeout), device
        self.jax_cache, self.dtypes = jax_cache, tuple(dtypes)
        self._proc: Any = None
        self._conn: Any = None
        self._deadline = 0.0
        self._label = "start-up"
        self.info: WorkerInfo | None = None
        self.load_error: WorkerLost | None = None
        self.losses = 0  # in a row
        self.timeouts = 0  # in a row
        self.last_loss = ""
        self.restarts = 0

    # -- process management
    def start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(
            target=_serve,
            args=(child,),
            daemon=True,
            name=f"sapo-conformance worker: {self.target.name}",
        )
        # "spawn" would re-import the caller's main script in the worker (running a script
        # without a __main__ guard twice); the worker needs nothing from it.
        main = sys.modules.get("__main__")
        sys.modules["__main__"] = types.ModuleType("__main__")
        try:
            proc.start()
        finally:
            if main is not None:
                sys.modules["__main__"] = main
        child.close()
        self._proc, self._conn = proc, parent
        self._send(
            (
                "init",
                self.target.loader,
                self.target.framework,
                self.device,
                self.jax_cache,
                self.dtypes,
            )
        )

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if proc is None:
            return
        if proc.is_alive():
            proc.kill()
        proc.join(5)

    def close(self) -> None:
        """Stop the worker (politely, then by force)."""
        if self._proc is not None and self._proc.is_alive() and self._conn is not None:
            try:
                self._conn.send(("stop",))
                self._proc.join(2)
            except (OSError, ValueError):
                pass
        self._kill()

    def _send(self, msg: tuple) -> None:
        try:
            self._conn.send(msg)
        except (OSError, ValueError):
            pass  # the worker is gone: _receive reports how

    def _lost(self, during: str, timed_out: float | None = None) -> WorkerLost:
        proc = self._proc
        if timed_out is not None:
            why = f"timed out after {timed_out:g} s during {during} (the worker was killed)"
            self._kill()
        else:
            if proc is not None:
                proc.join(5)
            why = (
                f"the worker {_exit_text(None if proc is None else proc.exitcode)} during {during}"
            )
            self._kill()
        self.losses += 1
        self.timeouts = self.timeouts + 1 if timed_out is not None else 0
        self.last_loss = why
        return WorkerLost(why)

    def _receive(self, deadline: float, limit: float) -> Any:
        conn = self._conn
        if conn is None:
            raise self._lost(self._label)
        try:
            ready = conn.poll(max(0.0, deadline - time.monotonic()))
        except (OSError, EOFError):
            raise self._lost(self._label) from None
        if not ready:
            raise self._lost(self._label, timed_out=limit)
        try:
            return conn.recv()
        except (EOFError, OSError):
            raise self._lost(self._label) from None

    def ready(self) -> WorkerInfo:
        """Wait for the start-up answer: the target loaded (or why not).

        :class:`UsageError` when the implementation cannot be imported or its capabilities are
        not valid; :class:`WorkerLost` when the worker died or hung while loading it.
        """
        if self.info is not None:
            return self.info
        if self.load_error is not None:  # loading it once killed or hung the worker: not again
            raise self.load_error
        if self._proc is None:
            self.start()
        self._label = f"start-up (importing {self.target.origin})"
        limit = max(START_TIMEOUT, self.timeout)
        try:
            status, payload = self._receive(time.monotonic() + limit, limit)
        except WorkerLost as err:
            self.load_error = err
            raise
        if status == "usage":
            self._kill()
            raise UsageError(payload)
        if status == "error":  # SystemExit or KeyboardInterrupt while importing
            self.load_error = WorkerLost(f"loading {self.target.origin} failed: {payload.text}")
            self._kill()
            raise self.load_error
        self.info = payload
        return payload

    def begin_case(self, label: str) -> None:
        """Start the time limit of one case (restarting a lost worker first)."""
        if self._proc is None:
            self.restarts += 1
            self.info = None
            self.start()
            self.ready()
        self._label = f"case {label}"
        self._deadline = time.monotonic() + self.timeout

    def _call(self, msg: tuple) -> Any:
        if self._proc is None:
            raise self._lost(self._label)
        self._send(msg)
        status, payload = self._receive(self._deadline, self.timeout)
        self.losses = self.timeouts = 0
        if status == "error":
            raise ImplError(payload)
        return payload

    @property
    def given_up(self) -> bool:
        """Too many losses in a row: the remaining cases are not worth a restart each."""
        return self.losses >= MAX_LOSSES or self.timeouts >= MAX_TIMEOUTS

    def run(self, m: Materialized, options: dict, cotangent: float) -> Outcome:
        return self._call(("run", m, options, cotangent))

    def case(
        self,
        m: Materialized,
        options: dict,
        cotangent: float,
        fd_points: list[np.ndarray] | None,
        extra_options: dict | None,
    ) -> CaseCalls:
        """All the calls of one case in one round trip (see :class:`CaseCalls`)."""
        return self._call(("case", m, options, cotangent, fd_points, extra_options))

    def values(self, m: Materialized, options: dict, points: list[np.ndarray]) -> list[float]:
        return self._call(("values", m, options, points))


class WorkerPool:
    """One :class:`Worker` per target, started together (their imports overlap)."""

    def __init__(
        self,
        targets: list[Target],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        device: str | None = None,
        jax_cache: bool = True,
        dtypes: tuple[str, ...] = (),
    ) -> None:
        self.timeout, self.device = timeout, device
        self.workers: dict[str, Worker] = {}
        for t in targets:
            if t.loader is not None and t.unavailable is None:
                self.workers[t.name] = Worker(
                    t, timeout=timeout, device=device, jax_cache=jax_cache, dtypes=dtypes
                )

    def start(self) -> None:
        for w in self.workers.values():
            w.start()

    def get(self, name: str) -> Worker | None:
        return self.workers.get(name)

    def close(self) -> None:
        for w in self.workers.values():
            w.close()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
