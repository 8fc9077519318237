r"""File protocol: certify a port written outside Python (C, C++, Rust, Julia, a GPU kernel).

A live run calls the implementation; a port that Python cannot call is certified in three steps
instead: ``sapo-conformance export DIR`` (:func:`export_cases`) writes the exact cases a live run
would use, the port's own program reads them and writes its results, and
``sapo-conformance judge DIR`` (:func:`judge_dir`) recomputes the reference from the exported
inputs and judges the results with the same tolerances, checks, deviation catalogue, report and
exit status as a live run (clause C.1): each case goes through
:func:`~sapo_conformance.runner.run_case` with an executor that replays the port's results.

Layout of ``DIR`` (schemas in ``sapo_conformance/schemas/``)::

    manifest.json              export, schema sapo-conformance-export/2 (export.schema.json)
    index.txt                  the same cases, one line each, for programs without a JSON parser
    cases/<name>/logp.bin      [N, T]  raw little-endian, row-major: one case in one dtype
    cases/<name>/old_logp.bin  [N, T]
    cases/<name>/advantages.bin  [N] or [N, T]
    cases/<name>/mask.bin      [N, T] uint8 0/1
    cases/<name>/fd_logp.bin   optional: [4, N, T] float64 points for the directional check
    cases/<name>/weights.bin   optional (clause 10.1): [N] or [N, T]; weights_storage says how
    cases/<name>/ref_logp.bin  optional (clause 10.2): [N, T], with options kl_coef, kl_estimator
    results/<name>.json        written by the port: schema sapo-conformance-result/1, or one
    results.json               file for every case: sapo-conformance-results/1 (results.schema.json)

Version 2 of the export (spec 0.2.0) adds those two inputs and error cases (``error``: the
port must refuse the call, clause 10.4); the judge still reads version 1 exports. A port that
does not declare the terms (capabilities ``weights``, ``kl_estimators``) has those cases
judged as skipped.

Arrays are stored as float64 for float64 cases and as float32 for float32, bfloat16 and float16
cases: the float32 values are exactly the values of the case's dtype (the inputs were rounded to
it), and clause 6.4 has a port compute low precision in float32 anyway. Invalid positions hold
what the live run passes there, NaN and infinities included (clause 6.1).

What a file-based run checks (recorded in the judge's settings under ``file_protocol``):

- ``loss`` and ``grad`` against the float64 reference on the same inputs: always; ``ref_grad``
  (the gradient of ``ref_logp``) where the port reports it;
- ``fd``, the directional derivative of the port's gradient along the live run's random
  direction against a fourth-order difference of its own loss, where the manifest gives
  ``fd_logp`` (float64, smooth cases) and the port reports its loss at those four points;
- ``metrics`` (clause 7.1) where the port reports them;
- the autodiff pull-back of a random upstream cotangent only where the port says its gradient
  is a vector-Jacobian product with the manifest's ``cotangent`` (``grad_is_vjp``); otherwise
  it is a check a file-based run cannot make, and neither can it difference the loss at points
  of its own choosing.

>>> import tempfile, sapo_ref
>>> from sapo_conformance.cases import generate_cases
>>> d = tempfile.mkdtemp()
>>> export_cases(d, generate_cases(0, 1, clauses=("2.1",)), ["float64"], {"seed": 0})
>>> entry = read_manifest(d)["cases"][0]
>>> entry["name"], entry["dtype"], entry["shape"]
('float64-2.1-00', 'float64', [4, 6])
>>> ins = load_inputs(d, entry)
>>> r = sapo_ref.policy_loss(ins["logp"], ins["old_logp"], ins["advantages"], ins["mask"], **entry["options"])
>>> write_result(d, entry, r.loss, r.grad)
>>> suite, info = judge_dir(d)
>>> suite.passed, [x.status for x in suite.results], info["file_protocol"]["results_found"]
(True, ['pass'], 1)
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import time
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

import sapo_ref
from sapo_ref import spec

from .cases import DTYPES, KL_ESTIMATORS, Case, Materialized, materialize
from .compare import Comparison
from .drivers import Outcome
from .runner import CaseResult, SuiteResult, TargetRun, applicable, cotangent_for, run_case
from .targets import Target

__all__ = [
    "EXPORT_SCHEMA",
    "RESULTS_SCHEMA",
    "RESULT_SCHEMA",
    "ProtocolError",
    "schema",
    "export_cases",
    "judge_dir",
    "read_manifest",
    "load_inputs",
    "write_result",
    "storage_dtype",
]

EXPORT_SCHEMA = "sapo-conformance-export/2"
#: Export versions the judge reads (version 1: spec 0.1.0's inputs only).
READABLE_EXPORTS = (EXPORT_SCHEMA, "sapo-conformance-export/1")
RESULTS_SCHEMA = "sapo-conformance-results/1"
RESULT_SCHEMA = "sapo-conformance-result/1"
_ARRAYS = ("logp", "old_logp", "advantages", "mask")
#: Number of points of the directional check (loss at logp + s v, s = the live run's 4 offsets).
FD_POINTS = 4


class ProtocolError(ValueError):
    """The export directory or a manifest is not what the protocol describes."""


def schema(name: str) -> dict[str, Any]:
    """A shipped JSON Schema: ``"export"`` (manifest.json) or ``"results"`` (what the port writes).

    >>> schema("export")["properties"]["schema"]["enum"][0]
    'sapo-conformance-export/2'
    """
    if name not in ("export", "results"):
        raise ValueError(f"schema name must be 'export' or 'results'; got {name!r}")
    path = resources.files(__package__).joinpath("schemas", f"{name}.schema.json")
    return json.loads(path.read_text(encoding="utf-8"))


def storage_dtype(dtype: str) -> str:
    """How a case of ``dtype`` is stored: float64 as float64, every other dtype as float32.

    >>> storage_dtype("bfloat16")
    'float32'
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    return "float64" if dtype == "float64" else "float32"


# ----------------------------------------------------------------------------- export


def _entry_name(case_id: str, dtype: str) -> str:
    # File names any file system and any language take: the case id with other characters as _.
    return f"{dtype}-" + re.sub(r"[^A-Za-z0-9._-]", "_", case_id)


def _encode(x: float) -> float | str:
    """A float for strict JSON: non-finite values as the strings "inf", "-inf", "nan"."""
    x = float(x)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


def _decode(x: Any) -> float:
    return float(x)  # float("inf"), float("nan") parse the strings of _encode


def _write_array(path: Path, a: np.ndarray, dtype: str) -> str:
    data = np.ascontiguousarray(np.asarray(a).astype(np.dtype(dtype).newbyteorder("<"))).tobytes()
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


class _Recorder:
    """A run_case executor that records where the directional check evaluates the loss.

    Its outcome passes every precondition of the check, so the points it records are the
    live run's own, bit for bit.
    """

    def __init__(self) -> None:
        self.points: list[np.ndarray] = []

    def begin_case(self, label: str) -> None:
        pass

    def run(self, m: Materialized, options: dict, cotangent: float) -> Outcome:
        return Outcome(0.0, np.zeros(m.mask.shape), None, "float64")

    def values(self, m: Materialized, options: dict, points: list[np.ndarray]) -> list[float]:
        self.points = [np.array(p, np.float64) for p in points]
        return [0.0] * len(points)


def _fd_points(m: Materialized, seed: int) -> list[np.ndarray]:
    """The inputs at which a live run's directional check evaluates the loss, in call order."""
    recorder = _Recorder()
    stand_in = Target("export", "numpy", None, "export", metrics=False)
    run_case(stand_in, m, seed, identify_deviations=False, executor=recorder)
    return recorder.points if len(recorder.points) == FD_POINTS else []


def _clear_previous(root: Path) -> None:
    if not root.exists():
        return
    if not root.is_dir():
        raise ProtocolError(f"export directory {root} is a file")
    if not any(root.iterdir()):
        return
    manifest = root / "manifest.json"
    try:
        ours = json.loads(manifest.read_text(encoding="utf-8")).get("schema") in READABLE_EXPORTS
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise ProtocolError(
            f"export directory {root} is not empty and holds no earlier export; "
            "give a new or empty directory"
        )
    for sub in ("cases", "results"):  # a stale result must never be judged against new cases
        shutil.rmtree(root / sub, ignore_errors=True)
    for name in ("manifest.json", "index.txt", "results.json"):
        (root / name).unlink(missing_ok=True)


def export_cases(
    dir: str | Path, cases: list[Case], dtypes: list[str], settings: dict[str, Any]
) -> None:
    """Write ``cases`` in every dtype of ``dtypes`` as a live run would use them (module doc).

    ``settings`` is what the command line built: ``seed`` (of the directional check and the
    cotangents), and optionally ``methods`` / ``loss_aggs`` (cases outside them are recorded as
    skipped, as for a target that does not claim them), ``cases_per_clause``, ``golden``.
    A non-empty ``dir`` must hold an earlier export, which is replaced (its results included).
    """
    root = Path(dir)
    for d in dtypes:
        storage_dtype(d)  # raises on an unknown dtype
    _clear_previous(root)
    (root / "cases").mkdir(parents=True, exist_ok=True)
    (root / "results").mkdir(exist_ok=True)
    seed = int(settings.get("seed", 0))
    claim = Target(
        "port",
        "numpy",
        None,
        "export",
        methods=tuple(settings.get("methods") or sapo_ref.METHOD_NAMES),
        loss_aggs=tuple(settings.get("loss_aggs") or sapo_ref.LOSS_AGG_NAMES),
        weights=True,  # every case is exported; the judge skips what the port does not declare
        kl_estimators=KL_ESTIMATORS,
    )
    entries: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    names: set[str] = set()
    for dtype in dtypes:
        for case in cases:
            if dtype not in case.dtypes:  # as run_suite: not a skip, not a case
                continue
            m = materialize(case, dtype)
            why = m if isinstance(m, str) else applicable(claim, case)
            if why:
                skipped.append(
                    {"case": case.id, "dtype": dtype, "clauses": list(case.clauses), "reason": why}
                )
                continue
            name = _entry_name(case.id, dtype)
            if name in names:
                raise ProtocolError(
                    f"two cases map to the file name {name!r}; case ids must differ"
                )
            names.add(name)
            entries.append(_export_one(root, name, m, seed))
    _json_dump(
        root / "manifest.json",
        {
            "schema": EXPORT_SCHEMA,
            "spec_version": spec.VERSION,
            "sapo_ref_version": sapo_ref.__version__,
            "tool_version": _tool_version(),
            "seed": seed,
            "settings": {**settings, "dtypes": list(dtypes)},
            "byte_order": "little",
            "cases": entries,
            "skipped": skipped,
        },
    )
    (root / "index.txt").write_text(_index(entries), encoding="utf-8")


def _export_one(root: Path, name: str, m: Materialized, seed: int) -> dict[str, Any]:
    case = m.case
    folder = root / "cases" / name
    folder.mkdir()
    store = storage_dtype(m.dtype)
    arrays = {
        "logp": (m.logp, store),
        "old_logp": (m.old_logp, store),
        "advantages": (m.advantages, store),
        "mask": (m.mask, "uint8"),
    }
    extra: dict[str, Any] = {}
    if m.weights is not None:
        w = m.weights
        wstore = "uint8" if w.dtype == bool else "int64" if w.dtype.kind in "iu" else store
        arrays["weights"] = (w, wstore)
        extra.update({"weights_shape": list(w.shape), "weights_storage": wstore})
    if m.ref_logp is not None:
        arrays["ref_logp"] = (m.ref_logp, store)
        extra["ref_logp_shape"] = list(m.ref_logp.shape)
    if case.error is not None:
        extra["error"] = case.error
    points = _fd_points(m, seed) if case.error is None else []
    if points:
        arrays["fd_logp"] = (np.stack(points), "float64")
    files, digests = {}, {}
    for key, (a, dt) in arrays.items():
        rel = f"cases/{name}/{key}.bin"
        digests[key] = _write_array(root / rel, a, dt)
        files[key] = rel
    return {
        "name": name,
        "case": case.id,
        "dtype": m.dtype,
        "storage": store,
        "clauses": list(case.clauses),
        "shape": list(m.logp.shape),
        "advantages_shape": list(m.advantages.shape),
        "options": {k: _encode(v) if isinstance(v, float) else v for k, v in case.options.items()},
        "cotangent": cotangent_for(seed, case.id),
        "fd": bool(points),
        "files": files,
        "sha256": digests,
        **extra,
    }


def _index(entries: list[dict[str, Any]]) -> str:
    lines = [
        f"# {EXPORT_SCHEMA} index: the cases of manifest.json, one per line, key=value fields.",
        "# n, t: shape [N, T]; adv: 'row' for advantages [N], 'token' for [N, T]; storage: float64",
        "# or float32 (little-endian); options follow as given (absent ones take the spec's",
        "# defaults, clauses 4.1-4.2); fd_logp is '-' when the case has no directional check.",
        "# Clause 10 (spec 0.2.0): weights (wshape 'row' [N] or 'token' [N, T], wstorage float64,",
        "# float32, uint8 or int64) and ref_logp are '-' when absent; error names the exception an",
        "# error case must raise (a port reports an error result), '-' for every other case.",
    ]
    for e in entries:
        n, t = e["shape"]
        fields = [
            f"name={e['name']}",
            f"dtype={e['dtype']}",
            f"storage={e['storage']}",
            f"n={n}",
            f"t={t}",
            f"adv={'row' if len(e['advantages_shape']) == 1 else 'token'}",
            f"cotangent={e['cotangent']!r}",
        ]
        fields += [
            f"{k}={v!r}" if isinstance(v, float) else f"{k}={v}" for k, v in e["options"].items()
        ]
        fields += [f"{k}={e['files'].get(k, '-')}" for k in (*_ARRAYS, "fd_logp")]
        wshape = e.get("weights_shape")
        fields += [
            f"weights={e['files'].get('weights', '-')}",
            "wshape=" + ("-" if wshape is None else _layout(wshape, e["shape"])),
            f"wstorage={e.get('weights_storage', '-')}",
            f"ref_logp={e['files'].get('ref_logp', '-')}",
            f"error={e.get('error', '-')}",
        ]
        lines.append("case " + " ".join(fields))
    return "\n".join(lines) + "\n"


def _layout(shape: list[int], full: list[int]) -> str:
    """'row' for [N], 'token' for [N, T], else the shape itself (an error case's)."""
    if shape == full[:1]:
        return "row"
    return "token" if shape == full else "x".join(map(str, shape))


def _tool_version() -> str:
    from . import __version__

    return __version__


def _json_dump(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1, allow_nan=False) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------- reading (port side)


def read_manifest(dir: str | Path) -> dict[str, Any]:
    """The manifest of an export, validated against the export schema when jsonschema is there."""
    path = Path(dir) / "manifest.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ProtocolError(
            f"{path} does not exist: run `sapo-conformance export {dir}` first"
        ) from None
    except ValueError as err:
        raise ProtocolError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict) or data.get("schema") not in READABLE_EXPORTS:
        raise ProtocolError(
            f"{path}: schema must be one of {', '.join(READABLE_EXPORTS)}; got "
            f"{data.get('schema') if isinstance(data, dict) else data!r}"
        )
    problem = _schema_problem(data, "export")
    if problem:
        raise ProtocolError(f"{path} does not follow {EXPORT_SCHEMA}: {problem}")
    return data


def _read_array(root: Path, rel: str, dtype: str, shape: list[int]) -> np.ndarray:
    a = np.fromfile(root / rel, dtype=np.dtype(dtype).newbyteorder("<"))
    if a.size != math.prod(shape):
        raise ProtocolError(f"{rel}: {a.size} {dtype} values, expected shape {shape}")
    return a.reshape(shape).astype(np.dtype(dtype))


def load_inputs(dir: str | Path, entry: dict[str, Any]) -> dict[str, np.ndarray]:
    """One exported case's arrays: logp, old_logp, advantages (storage dtype), mask (bool),
    fd_logp [4, N, T] float64 when the case has a directional check, and the clause 10 inputs
    it passes: weights (bool, int64 or the storage dtype) and ref_logp."""
    root = Path(dir)
    n, t = entry["shape"]
    shapes = {
        "logp": [n, t],
        "old_logp": [n, t],
        "advantages": entry["advantages_shape"],
        "mask": [n, t],
        "fd_logp": [FD_POINTS, n, t],
        "weights": entry.get("weights_shape"),
        "ref_logp": entry.get("ref_logp_shape"),
    }
    dtypes = {"mask": "uint8", "fd_logp": "float64", "weights": entry.get("weights_storage")}
    out = {}
    for key, rel in entry["files"].items():
        out[key] = _read_array(root, rel, dtypes.get(key) or entry["storage"], shapes[key])
    out["mask"] = out["mask"] != 0
    if entry.get("weights_storage") == "uint8":
        out["weights"] = out["weights"] != 0
    return out


def write_result(
    dir: str | Path,
    entry: dict[str, Any],
    loss: float,
    grad: np.ndarray,
    metrics: dict[str, float] | None = None,
    fd_losses: list[float] | None = None,
    port: dict[str, Any] | None = None,
    ref_grad: np.ndarray | None = None,
) -> None:
    """Write ``results/<name>.json`` and its float64 gradient file(s), as a port would.

    For Python-side tests and tools; a port in another language writes the same files.
    """
    root = Path(dir)
    (root / "results").mkdir(exist_ok=True)
    rel = f"results/{entry['name']}.grad.bin"
    _write_array(root / rel, np.asarray(grad, np.float64), "float64")
    data: dict[str, Any] = {
        "schema": RESULT_SCHEMA,
        "case": entry["name"],
        "loss": _encode(loss),
        "grad": {"file": rel, "dtype": "float64"},
    }
    if ref_grad is not None:
        rel_ref = f"results/{entry['name']}.ref_grad.bin"
        _write_array(root / rel_ref, np.asarray(ref_grad, np.float64), "float64")
        data["ref_grad"] = {"file": rel_ref, "dtype": "float64"}
    if metrics is not None:
        data["metrics"] = {k: _encode(v) for k, v in metrics.items()}
    if fd_losses is not None:
        data["fd_losses"] = [_encode(v) for v in fd_losses]
    if port:
        data["port"] = port
    _json_dump(root / "results" / f"{entry['name']}.json", data)


# ----------------------------------------------------------------------------- judge


def _schema_problem(data: Any, name: str) -> str | None:
    """Why ``data`` breaks the named schema, or None (also None when jsonschema is absent)."""
    try:
        import jsonschema
    except ImportError:  # a runtime without the test extra: the judge's own checks still apply
        return None
    err = jsonschema.exceptions.best_match(
        jsonschema.Draft202012Validator(schema(name)).iter_errors(data)
    )
    if err is None:
        return None
    where = "/".join(str(p) for p in err.absolute_path)
    return f"{err.message}" + (f" (at {where})" if where else "")


def _read_results(root: Path) -> tuple[dict[str, dict], dict[str, Any], list[str]]:
    """Results by case name, the port's description, and the problems met on the way."""
    found: dict[str, dict] = {}
    port: dict[str, Any] = {}
    problems: list[str] = []
    files = [root / "results.json"] if (root / "results.json").is_file() else []
    files += (
        sorted(p for p in (root / "results").glob("*.json")) if (root / "results").is_dir() else []
    )
    for path in files:
        rel = path.relative_to(root).as_posix()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as err:
            problems.append(f"{rel}: not valid JSON ({err})")
            continue
        problem = _schema_problem(data, "results")
        if problem:
            problems.append(f"{rel}: does not follow the results schema: {problem}")
            continue
        items = data["cases"] if data.get("schema") == RESULTS_SCHEMA else [data]
        port = {**port, **data.get("port", {})}
        for item in items:
            if item["case"] in found:
                problems.append(
                    f"{rel}: a second result for case {item['case']!r} (the first is kept)"
                )
                continue
            found[item["case"]] = {**item, "_file": rel}
    return found, port, problems


def _grad_of(root: Path, result: dict, shape: list[int], key: str = "grad") -> np.ndarray:
    g = result[key]
    if isinstance(g, dict):
        return _read_array(root, g["file"], g["dtype"], shape)
    arr = np.array([[_decode(v) for v in row] for row in g], np.float64)
    if list(arr.shape) != list(shape):
        raise ProtocolError(f"{key}: shape {list(arr.shape)}, expected {shape}")
    return arr


class _Replay:
    """A run_case executor holding one case's results: what the port reported, as a live run's
    outcome and as its losses at the directional check's points."""

    def __init__(
        self, root: Path, entry: dict, result: dict, inputs: dict[str, np.ndarray]
    ) -> None:
        grad = _grad_of(root, result, entry["shape"])
        if result.get("grad_is_vjp"):
            grad = grad / entry["cotangent"]  # the port pulled back the manifest's cotangent
        metrics = result.get("metrics")
        if metrics is not None:
            metrics = {k: _decode(v) for k, v in metrics.items()}
        dtype = result["grad"]["dtype"] if isinstance(result["grad"], dict) else "float64"
        ref_grad = None
        if "ref_grad" in result and "ref_logp" in inputs:
            ref_grad = _grad_of(root, result, entry["shape"], "ref_grad").astype(np.float64)
            if result.get("grad_is_vjp"):
                ref_grad = ref_grad / entry["cotangent"]
        self.outcome = Outcome(
            _decode(result["loss"]), grad.astype(np.float64), metrics, dtype, ref_grad
        )
        self.points = list(inputs.get("fd_logp", []))
        self.fd_losses = [_decode(v) for v in result.get("fd_losses", [])]

    def begin_case(self, label: str) -> None:
        pass

    def run(self, m: Materialized, options: dict, cotangent: float) -> Outcome:
        return self.outcome

    def values(self, m: Materialized, options: dict, points: list[np.ndarray]) -> list[float]:
        out = []
        for p in points:
            x = np.asarray(p, np.float64)
            hits = [
                v
                for q, v in zip(self.points, self.fd_losses)
                if np.array_equal(x, q, equal_nan=True)
            ]
            if not hits:
                raise LookupError(
                    "the port reported no loss at this point (not an exported fd_logp point)"
                )
            out.append(hits[0])
        return out


def _placeholder_case(item: dict[str, Any]) -> Case:
    z = np.zeros((1, 1))
    return Case(
        item["case"],
        tuple(item["clauses"]),
        z,
        z,
        z[0],
        z > 0,
        {},
        fd=False,
        dtypes=(item["dtype"],),
    )


def _verify(root: Path, entry: dict[str, Any]) -> str | None:
    for key, rel in entry["files"].items():
        path = root / rel
        if not path.is_file():
            return f"exported input {rel} is missing"
        if hashlib.sha256(path.read_bytes()).hexdigest() != entry["sha256"][key]:
            return f"exported input {rel} changed after the export"
    return None


def judge_dir(dir: str | Path) -> tuple[SuiteResult, dict[str, Any]]:
    """Judge a port's results in ``dir`` (module doc): the suite result and the run's settings.

    The reference is recomputed from the exported inputs (never read from the port); every
    exported case without a valid result fails with the reason, none passes silently. The
    returned dict is the export's settings plus ``file_protocol``: the port's description, the
    counts of results found and missing, the problems met, and which checks ran on how many
    cases and which a file-based run cannot make.

    Raises :class:`ProtocolError` when ``dir`` holds no valid manifest.
    """
    start = time.perf_counter()
    root = Path(dir)
    manifest = read_manifest(root)
    seed = int(manifest["seed"])
    results_by_name, port, problems = _read_results(root)
    name = str(port.get("name") or "port")
    target = Target(name, "file", None, f"file port {name} ({root})", metrics=True)
    target.apply_capabilities(port.get("capabilities"))
    cases: dict[str, Case] = {}
    results: list[CaseResult] = []
    counts = {"loss": 0, "grad": 0, "fd": 0, "fd_applicable": 0, "metrics": 0, "grad_vjp": 0}
    for entry in manifest["cases"]:
        res, case = _judge_one(
            root,
            entry,
            results_by_name.get(entry["name"]),
            target,
            seed,
            problems,
            counts,
        )
        cases.setdefault(case.id, case)
        results.append(res)
    for item in manifest.get("skipped", []):
        case = cases.get(item["case"]) or _placeholder_case(item)
        cases.setdefault(case.id, case)
        results.append(CaseResult(target.name, item["dtype"], case, "skip", reason=item["reason"]))
    known = {e["name"] for e in manifest["cases"]}
    unknown = sorted(set(results_by_name) - known)
    if unknown:
        problems.append(
            f"results for cases the manifest does not hold (ignored): {', '.join(unknown[:10])}"
        )
    seconds = time.perf_counter() - start
    suite = SuiteResult(
        [TargetRun(target, seconds=seconds)], results, list(cases.values()), seed, seconds
    )
    info = dict(manifest["settings"])
    info.update({"seed": seed, "targets": [name]})
    info["file_protocol"] = {
        "export": str(root),
        "exported_with": {
            "spec_version": manifest["spec_version"],
            "tool_version": manifest["tool_version"],
            "sapo_ref_version": manifest["sapo_ref_version"],
        },
        "port": port,
        "cases": len(manifest["cases"]),
        "results_found": sum(1 for e in manifest["cases"] if e["name"] in results_by_name),
        "results_missing": sum(1 for e in manifest["cases"] if e["name"] not in results_by_name),
        "problems": problems,
        "checks_done": {
            "loss": counts["loss"],
            "grad": counts["grad"],
            "fd": f"{counts['fd']} of {counts['fd_applicable']} cases with fd_logp points",
            "metrics": counts["metrics"],
            "grad_vjp": counts["grad_vjp"],
        },
        "checks_not_done": {
            "autodiff-cotangent": (
                "the port reports its gradient; only a live run pulls a random upstream cotangent "
                "back through a framework's autodiff (done here only for results with grad_is_vjp)"
            ),
            "finite-differences": (
                "the suite cannot evaluate the port's loss at points of its choosing; the "
                "directional check runs only at the exported fd_logp points the port evaluated"
            ),
        },
    }
    return suite, info


def _option(v: Any) -> Any:
    """An exported option: the strings "nan", "inf", "-inf" stand for those floats."""
    return _decode(v) if v in ("nan", "inf", "-inf") else v


def _judge_error(target: Target, entry: dict, case: Case, result: dict) -> CaseResult:
    """An error case (clause 10.4): the port must have refused the call."""
    ok = "error" in result
    got = f"an error: {result['error']}" if ok else f"loss {result.get('loss')!r}"
    msg = (
        f"error: expected the call to fail with {case.error} (clause 10.4); the port reported {got}"
    )
    check = Comparison("error", ok, int(not ok), 1, 0.0, 0.0, (), np.nan, np.nan, msg)
    res = CaseResult(target.name, entry["dtype"], case, "pass" if ok else "fail", checks=[check])
    if not ok:
        res.failed_clauses = tuple(case.clauses)
    return res


def _judge_one(root, entry, result, target, seed, problems, counts) -> tuple[CaseResult, Case]:
    clauses = tuple(entry["clauses"])
    inputs = None
    why = _verify(root, entry)
    if why is None:
        try:
            inputs = load_inputs(root, entry)
        except ProtocolError as err:
            why = str(err)
    if inputs is None:
        case = _placeholder_case(
            {"case": entry["case"], "clauses": clauses, "dtype": entry["dtype"]}
        )
        return CaseResult(
            target.name,
            entry["dtype"],
            case,
            "fail",
            reason=f"export: {why}",
            failed_clauses=clauses,
        ), case
    has_fd = "fd_logp" in inputs
    counts["fd_applicable"] += has_fd
    supplied_fd = result is not None and len(result.get("fd_losses", [])) == FD_POINTS
    w = inputs.get("weights")
    case = Case(
        entry["case"],
        clauses,
        inputs["logp"].astype(np.float64),
        inputs["old_logp"].astype(np.float64),
        inputs["advantages"].astype(np.float64),
        inputs["mask"],
        {k: _option(v) for k, v in entry["options"].items()},
        fd=has_fd and supplied_fd,
        dtypes=(entry["dtype"],),
        weights=None if w is None else w if w.dtype.kind in "biu" else w.astype(np.float64),
        ref_logp=None if "ref_logp" not in inputs else inputs["ref_logp"].astype(np.float64),
        error=entry.get("error"),
    )
    fail = lambda reason: (
        CaseResult(
            target.name,
            entry["dtype"],
            case,
            "fail",
            reason=reason,
            failed_clauses=clauses,
        ),
        case,
    )
    why = applicable(target, case)
    if why:  # outside what the port declares: skipped whatever it wrote
        return CaseResult(target.name, entry["dtype"], case, "skip", reason=why), case
    if result is None:
        return fail(
            f"no result from the port for case {entry['name']} "
            f"(expected results/{entry['name']}.json or an item of results.json)"
        )
    if case.error is not None:
        return _judge_error(target, entry, case, result), case
    if "error" in result:
        return fail(f"the port reported an error: {result['error']}")
    if "loss" not in result or "grad" not in result:
        return fail(f"{result['_file']}: a result needs loss and grad (or error)")
    if has_fd and "fd_losses" in result and not supplied_fd:
        problems.append(
            f"{entry['name']}: fd_losses needs {FD_POINTS} values; the directional check was not run"
        )
    m = materialize(case, entry["dtype"])
    if isinstance(m, str):  # the export wrote only applicable cases: the files were edited
        return fail(f"export: the exported inputs no longer form a valid case ({m})")
    try:
        replay = _Replay(root, entry, result, inputs)
    except (ProtocolError, OSError, ValueError) as err:
        return fail(f"{result['_file']}: {err}")
    res = run_case(target, m, seed, executor=replay)
    counts["loss"] += 1
    counts["grad"] += 1
    counts["fd"] += any(c.name == "fd" for c in res.checks)
    counts["metrics"] += res.metrics_compared
    counts["grad_vjp"] += bool(result.get("grad_is_vjp"))
    return res, case
