"""The file protocol of sapo-conformance (export, a port's results, judge): schemas, round trips,
and that judging files gives the live run's verdicts, never a silent pass."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from sapo_conformance import builtin_target, generate_cases, golden_cases, run_suite
from sapo_conformance.cases import materialize, round_to
from sapo_conformance.protocol import (
    ProtocolError,
    export_cases,
    judge_dir,
    load_inputs,
    read_manifest,
    schema,
    write_result,
)

import sapo_ref

DTYPES = ["float64", "float32", "bfloat16"]
SETTINGS = {"seed": 0, "cases_per_clause": 1, "golden": False, "dtypes": DTYPES}


def _validator(name: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(schema(name))


#: The reference port takes the clause 10 terms and says so.
TERMS = {"weights": True, "kl_estimators": list(sapo_ref.KL_ESTIMATOR_NAMES)}


def _ref_logp_grad(ins: dict, options: dict) -> np.ndarray:
    """dL/d ref_logp = -(the KL part of dL/d logp), from the reference's own pieces."""
    lp, old, adv = (np.asarray(ins[k], np.float64) for k in ("logp", "old_logp", "advantages"))
    cfg = sapo_ref.resolve_config(**options, has_ref_logp=True)
    norm = sapo_ref.normalizer(ins["mask"])
    terms = {k: np.asarray(ins[k], np.float64) for k in ("weights", "ref_logp") if k in ins}
    ev = sapo_ref.evaluate(lp, old, adv, ins["mask"], cfg, norm, **terms)
    return np.zeros(lp.shape) if ev.kl_grad is None else -np.asarray(ev.kl_grad, np.float64)


def _reference_port(root: Path, entry: dict, **changes) -> dict:
    """What a correct port computes on an exported case (the reference on the loaded inputs)."""
    ins = load_inputs(root, entry)
    terms = {k: ins[k] for k in ("weights", "ref_logp") if k in ins}
    options = {
        k: float(v) if v in ("nan", "inf", "-inf") else v for k, v in entry["options"].items()
    }
    with np.errstate(all="ignore"):
        try:
            r = sapo_ref.policy_loss(
                ins["logp"], ins["old_logp"], ins["advantages"], ins["mask"], **options, **terms
            )
        except (ValueError, TypeError) as err:  # an error case (clause 10.4): refused
            return {"error": f"{type(err).__name__}: {err}"}
        fd = None
        if "fd_logp" in ins:
            fd = [
                float(
                    sapo_ref.policy_loss(
                        p, ins["old_logp"], ins["advantages"], ins["mask"], **options, **terms
                    ).loss
                )
                for p in ins["fd_logp"]
            ]
        ref_grad = _ref_logp_grad(ins, options) if "ref_logp" in ins else None
    out = {
        "loss": float(r.loss),
        "grad": np.asarray(r.grad, np.float64),
        "fd_losses": fd,
        "ref_grad": ref_grad,
    }
    out.update(changes)
    return out


def _write_error(root: Path, entry: dict, message: str, port: dict) -> None:
    doc = {"schema": "sapo-conformance-result/1", "case": entry["name"], "error": message}
    (root / "results" / f"{entry['name']}.json").write_text(json.dumps(dict(doc, port=port)))


def _answer_all(root: Path, port=_reference_port, skip=()) -> None:
    me = {"name": "refport", "capabilities": TERMS}
    (root / "results").mkdir(exist_ok=True)
    for entry in read_manifest(root)["cases"]:
        if entry["name"] in skip:
            continue
        out = port(root, entry)
        if "error" in out:
            _write_error(root, entry, out["error"], me)
            continue
        write_result(
            root,
            entry,
            out["loss"],
            out["grad"],
            fd_losses=out["fd_losses"],
            port=me,
            ref_grad=out.get("ref_grad"),
        )


@pytest.fixture(scope="module")
def cases():
    return generate_cases(seed=0, per_clause=1)


@pytest.fixture
def exported(tmp_path, cases):
    export_cases(tmp_path, cases, DTYPES, SETTINGS)
    return tmp_path


def test_schemas_are_valid_json_schemas():
    for name in ("export", "results"):
        jsonschema.Draft202012Validator.check_schema(schema(name))


def test_manifest_and_results_follow_their_schemas(exported):
    manifest = json.loads((exported / "manifest.json").read_text())
    _validator("export").validate(manifest)
    _answer_all(exported)
    results = sorted((exported / "results").glob("*.json"))
    assert len(results) == len(manifest["cases"])
    for path in results:
        _validator("results").validate(json.loads(path.read_text()))
    # Documents that break the schemas are rejected by them (the schemas can fail).
    assert not _validator("results").is_valid(
        {"schema": "sapo-conformance-result/1", "case": "x", "loss": 1.0}
    )
    assert not _validator("results").is_valid(
        {
            "schema": "sapo-conformance-result/1",
            "case": "x",
            "loss": 1.0,
            "grad": [[1.0]],
            "fd_loss": [1.0],
        }
    )
    bad = dict(manifest, byte_order="big")
    assert not _validator("export").is_valid(bad)


def test_exported_arrays_are_the_materialized_inputs_bit_for_bit(exported, cases):
    by_id = {c.id: c for c in cases}
    manifest = read_manifest(exported)
    index = [
        ln for ln in (exported / "index.txt").read_text().splitlines() if ln.startswith("case ")
    ]
    assert len(index) == len(manifest["cases"])
    for entry, line in zip(manifest["cases"], index):
        assert f"name={entry['name']} " in line
        m = materialize(by_id[entry["case"]], entry["dtype"])
        ins = load_inputs(exported, entry)
        for key in ("logp", "old_logp", "advantages"):
            want = np.asarray(getattr(m, key), np.float64)
            np.testing.assert_array_equal(ins[key].astype(np.float64), want)  # NaN garbage included
            # Stored values are exactly the dtype's: rounding them again changes nothing.
            np.testing.assert_array_equal(
                round_to(ins[key], entry["dtype"]).astype(np.float64), want
            )
        np.testing.assert_array_equal(ins["mask"], m.mask)
        assert ins["logp"].dtype == (np.float64 if entry["dtype"] == "float64" else np.float32)


@pytest.mark.clause("C.1")
def test_judging_a_correct_port_gives_the_live_runs_results(exported, cases):
    _answer_all(exported)
    suite, info = judge_dir(exported)
    live = run_suite([builtin_target("reference")], cases, DTYPES, seed=0)  # no bfloat16 in NumPy
    assert suite.passed and live.runs[0].dtype_skips.keys() == {"bfloat16"}
    key = lambda r: (r.case.id, r.dtype, r.status)
    judged = [key(r) for r in suite.results if r.dtype != "bfloat16"]
    assert sorted(judged) == sorted(map(key, live.results))
    fp = info["file_protocol"]
    assert fp["results_found"] == fp["cases"] and fp["results_missing"] == 0 and not fp["problems"]
    assert info["targets"] == ["refport"] and info["seed"] == 0
    # Directional checks ran wherever the live run does one (float64 smooth cases).
    fd_live = sum(any(c.name == "fd" for c in r.checks) for r in live.results)
    assert fd_live > 0
    assert sum(any(c.name == "fd" for c in r.checks) for r in suite.results) == fd_live
    assert set(fp["checks_not_done"]) == {"autodiff-cotangent", "finite-differences"}


def test_missing_results_fail_with_a_reason_never_pass(exported):
    manifest = read_manifest(exported)
    names = [e["name"] for e in manifest["cases"]]
    _answer_all(exported, skip=set(names[:3]))
    suite, info = judge_dir(exported)
    assert not suite.passed
    failed = {r.case.id for r in suite.failures}
    assert failed == {e["case"] for e in manifest["cases"][:3]}
    assert all("no result from the port" in r.reason for r in suite.failures)
    assert info["file_protocol"]["results_missing"] == 3


def _uses_terms(entry: dict) -> bool:
    """An exported case of the clause 10 terms (weights, the KL penalty, their errors)."""
    keys = set(entry["files"]) | set(entry["options"]) | set(entry)
    return bool(keys & {"weights", "ref_logp", "kl_coef", "kl_estimator", "error"})


def test_no_results_at_all_fails_every_case(exported):
    """Every case fails, except those of terms the port does not declare: skipped, with why."""
    suite, info = judge_dir(exported)
    assert not suite.passed
    entries = read_manifest(exported)["cases"]
    terms = [e for e in entries if _uses_terms(e)]
    assert terms and len(suite.failures) == len(entries) - len(terms)
    skips = [r for r in suite.results if r.status == "skip" and "clause 10" in r.reason]
    assert len(skips) == len(terms)
    assert info["file_protocol"]["results_found"] == 0


@pytest.mark.clause("1.7")
def test_a_wrong_port_is_rejected_with_the_deviation_named(exported):
    def flipped(root, entry):
        out = _reference_port(root, entry)
        if "error" in out:
            return out
        return dict(out, loss=-out["loss"], grad=-out["grad"])

    _answer_all(exported, port=flipped)
    suite, _ = judge_dir(exported)
    assert not suite.passed
    named = [r for r in suite.failures if any(d.id == "sign-flipped" for d in r.deviations)]
    assert len(named) >= len(suite.failures) // 2 > 0


def test_the_directional_check_catches_a_gradient_inconsistent_with_the_loss(exported):
    # Right gradient, but the losses at the fd points come from a different loss (2x):
    # only the directional check can see it.
    def inconsistent(root, entry):
        out = _reference_port(root, entry)
        if out.get("fd_losses") is not None:
            out["fd_losses"] = [2.0 * v for v in out["fd_losses"]]
        return out

    _answer_all(exported, port=inconsistent)
    suite, _ = judge_dir(exported)
    fd_failures = [r for r in suite.failures if any(c.name == "fd" and not c.ok for c in r.checks)]
    assert fd_failures
    assert all(all(c.ok for c in r.checks if c.name in ("loss", "grad")) for r in fd_failures)


def test_inputs_changed_after_export_fail_the_case(exported):
    _answer_all(exported)
    entry = read_manifest(exported)["cases"][0]
    path = exported / entry["files"]["logp"]
    data = bytearray(path.read_bytes())
    data[0] ^= 1
    path.write_bytes(bytes(data))
    suite, _ = judge_dir(exported)
    bad = list(suite.failures)
    assert len(bad) == 1 and "changed after the export" in bad[0].reason


def test_port_errors_vjp_results_and_inline_gradients(exported):
    entries = read_manifest(exported)["cases"]
    outs = [_reference_port(exported, e) for e in entries]
    # Two cases with a finite non-zero gradient: a cotangent (never 1) changes their numbers.
    vjp, unflagged = [
        k
        for k, o in enumerate(outs)
        if k and "grad" in o and np.all(np.isfinite(o["grad"])) and np.any(o["grad"])
    ][:2]
    items = []
    for k, (entry, out) in enumerate(zip(entries, outs)):
        if "error" in out:  # an error case: skipped (this port declares no clause 10 terms)
            items.append({"case": entry["name"], "error": out["error"]})
            continue
        item = {
            "case": entry["name"],
            "loss": out["loss"] if np.isfinite(out["loss"]) else str(out["loss"]),
        }
        if k == 0:
            item = {"case": entry["name"], "error": "not implemented"}
        elif k in (vjp, unflagged):  # a vector-Jacobian product with the manifest's cotangent
            item["grad"] = (entry["cotangent"] * out["grad"]).tolist()
            item["grad_is_vjp"] = k == vjp
        else:  # inline values, non-finite ones as strings
            item["grad"] = [
                [v if np.isfinite(v) else str(v) for v in row] for row in out["grad"].tolist()
            ]
        items.append(item)
    doc = {
        "schema": "sapo-conformance-results/1",
        "port": {"name": "inline", "language": "Python"},
        "cases": items,
    }
    _validator("results").validate(doc)
    (exported / "results.json").write_text(json.dumps(doc))
    suite, info = judge_dir(exported)
    status = {(r.case.id, r.dtype): r for r in suite.results}
    get = lambda k: status[(entries[k]["case"], entries[k]["dtype"])]
    assert get(0).status == "fail" and "not implemented" in get(0).reason
    assert get(vjp).status == "pass", (get(vjp).messages, get(vjp).reason)
    assert get(unflagged).status == "fail"
    assert len(suite.failures) == 2
    assert info["targets"] == ["inline"] and info["file_protocol"]["checks_done"]["grad_vjp"] == 1


def test_an_invalid_result_file_fails_its_case_and_is_reported(exported):
    _answer_all(exported)
    entry = read_manifest(exported)["cases"][0]
    (exported / "results" / f"{entry['name']}.json").write_text(
        '{"schema": "sapo-conformance-result/1"'
    )
    suite, info = judge_dir(exported)
    assert [r.case.id for r in suite.failures] == [entry["case"]]
    assert any("not valid JSON" in p for p in info["file_protocol"]["problems"])


def test_golden_vectors_export_and_judge(tmp_path):
    export_cases(tmp_path, golden_cases(), ["float64", "float32"], {"seed": 3})
    manifest = read_manifest(tmp_path)
    assert manifest["cases"] and all(e["dtype"] == "float64" for e in manifest["cases"])
    assert all(
        e["name"].replace(".", "").replace("-", "").replace("_", "").isalnum()
        for e in manifest["cases"]
    )
    _answer_all(tmp_path)
    suite, _ = judge_dir(tmp_path)
    assert suite.passed


def test_export_directory_rules(tmp_path, cases):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ProtocolError, match="not empty"):
        export_cases(tmp_path, cases[:2], ["float64"], {"seed": 0})
    fresh = tmp_path / "exp"
    export_cases(fresh, cases[:2], ["float64"], {"seed": 0})
    _answer_all(fresh)
    export_cases(fresh, cases[2:4], ["float64"], {"seed": 0})  # re-export: stale results go
    assert not list((fresh / "results").glob("*.json"))
    with pytest.raises(ProtocolError, match="export"):
        judge_dir(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="dtype"):
        export_cases(tmp_path / "x", cases[:1], ["float8"], {"seed": 0})


def test_methods_outside_the_settings_are_recorded_as_skips(tmp_path, cases):
    export_cases(tmp_path, cases, ["float64"], {"seed": 0, "methods": ["sapo"], "loss_aggs": None})
    manifest = read_manifest(tmp_path)
    assert {e["options"].get("method", "sapo") for e in manifest["cases"]} == {"sapo"}
    assert any("not supported" in s["reason"] for s in manifest["skipped"])
    _answer_all(tmp_path)
    suite, _ = judge_dir(tmp_path)
    assert suite.passed and any(r.status == "skip" for r in suite.results)


def test_cli_export_and_judge_exit_status(tmp_path, capsys):
    from sapo_conformance import cli

    if "export DIR" not in (cli.__doc__ or ""):
        pytest.skip("sapo-conformance has no export/judge subcommands yet")
    folder = tmp_path / "exp"
    args = ["--quick", "--dtypes", "float64", "--methods", "sapo"]
    assert cli.main(["export", str(folder), *args]) == 0
    assert cli.main(["judge", str(folder), "--no-progress"]) == 1  # no results at all
    _answer_all(folder)
    report = tmp_path / "r.json"
    assert cli.main(["judge", str(folder), "--no-progress", "--json", str(report)]) == 0
    data = json.loads(report.read_text())
    assert data["passed"] and data["settings"]["file_protocol"]["results_missing"] == 0
    assert cli.main(["judge", str(tmp_path / "nothing-here"), "--no-progress"]) == 2
