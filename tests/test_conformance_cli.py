"""The ``sapo-conformance`` command and the pytest plugin: exit codes, reports, usage errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jsonschema
import pytest
from sapo_conformance.cli import main
from sapo_conformance.report import json_schema

import sapo_ref

THIRD_PARTY = textwrap.dedent(
    '''
    """Third-party implementations for the CLI tests (numpy contract: return (loss, grad))."""
    import numpy as np
    import sapo_ref

    def good(logp, old_logp, advantages, mask, **options):
        r = sapo_ref.policy_loss(logp, old_logp, advantages, mask, **options)
        return r.loss, r.grad

    def flipped(logp, old_logp, advantages, mask, **options):
        r = sapo_ref.policy_loss(logp, old_logp, advantages, mask, **options)
        return -r.loss, -r.grad

    def sapo_only(logp, old_logp, advantages, mask, **options):
        if options.get("method", "sapo") != "sapo":
            raise NotImplementedError(options["method"])
        r = sapo_ref.policy_loss(logp, old_logp, advantages, mask, **options)
        return r.loss, r.grad

    sapo_only.sapo_capabilities = {"methods": ["sapo"], "dtypes": ["float64", "float32"]}

    NOT_CALLABLE = 3
    '''
)


@pytest.fixture
def third_party(tmp_path, monkeypatch):
    (tmp_path / "thirdparty_sapo.py").write_text(THIRD_PARTY)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("thirdparty_sapo", None)
    return tmp_path


QUICK = ["--quick", "--no-progress"]


def test_reference_passes_and_writes_valid_reports(tmp_path):
    j, md = tmp_path / "r.json", tmp_path / "r.md"
    code = main(
        ["--target", "reference,reference-strict", *QUICK, "--json", str(j), "--markdown", str(md)]
    )
    assert code == 0
    data = json.loads(j.read_text())
    jsonschema.validate(data, json_schema())
    assert data["passed"] is True and data["totals"]["fail"] == 0 and data["totals"]["pass"] > 0
    assert {t["name"] for t in data["targets"]} == {"reference", "reference-strict"}
    assert "# sapo-conformance report" in md.read_text()
    assert data["cases_per_clause"]["2.1"] >= 1


def test_third_party_failure_exits_1_with_clause_deviation_and_repro(third_party, tmp_path):
    j = tmp_path / "r.json"
    code = main(
        ["--impl", "thirdparty_sapo:flipped", "--framework", "numpy", *QUICK, "--json", str(j)]
    )
    assert code == 1
    data = json.loads(j.read_text())
    jsonschema.validate(data, json_schema())
    assert data["passed"] is False
    f = data["failures"][0]
    assert "sign-flipped" in {d["id"] for d in f["deviations"]}
    assert f["clauses"]
    # The repro is runnable: it rebuilds the inputs and calls the implementation.
    code_text = f["repro"]
    out = subprocess.run(
        [sys.executable, "-c", code_text],
        capture_output=True,
        text=True,
        cwd=third_party,
        env={**os.environ, "PYTHONPATH": str(third_party)},
    )
    assert out.returncode == 0, out.stderr
    assert "loss" in out.stdout


def test_third_party_correct_exits_0(third_party):
    assert main(["--impl", "thirdparty_sapo:good", "--framework", "numpy", *QUICK]) == 0


def test_capabilities_attribute_and_method_restriction(third_party, tmp_path):
    j = tmp_path / "r.json"
    assert (
        main(
            [
                "--impl",
                "thirdparty_sapo:sapo_only",
                "--framework",
                "numpy",
                *QUICK,
                "--json",
                str(j),
            ]
        )
        == 0
    )
    data = json.loads(j.read_text())
    t = data["targets"][0]
    assert t["methods"] == ["sapo"] and "float16" in t["dtype_skips"]
    # Without the attribute, --methods restricts the cases instead.
    assert (
        main(
            [
                "--impl",
                "thirdparty_sapo:good",
                "--framework",
                "numpy",
                "--methods",
                "grpo",
                "--loss-agg",
                "token-mean",
                *QUICK,
            ]
        )
        == 0
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--impl", "no_such_module_xyz:fn", "--framework", "numpy"], "cannot import module"),
        (["--impl", "thirdparty_sapo:nope", "--framework", "numpy"], "has no attribute"),
        (["--impl", "thirdparty_sapo:NOT_CALLABLE", "--framework", "numpy"], "not callable"),
        (["--impl", "thirdparty_sapo", "--framework", "numpy"], "MODULE:ATTR"),
        (["--impl", "thirdparty_sapo:good"], "needs --framework"),
        (["--impl", "thirdparty_sapo:good", "--framework", "tensorflow"], "unknown framework"),
        (["--framework", "torch"], "needs --impl"),
        (["--target", "paddle"], "unknown target"),
        (["--target", "reference", "--dtypes", "float8"], "unknown dtype"),
        (["--target", "reference", "--methods", "ppo"], "unknown name"),
        (["--target", "reference", "--loss-agg", "mean"], "unknown name"),
    ],
)
def test_usage_errors_exit_2(third_party, capsys, argv, message):
    assert main(argv + QUICK) == 2
    assert message in capsys.readouterr().err


def test_argparse_errors_exit_2():
    with pytest.raises(SystemExit) as exc:
        main(["--cases-per-clause", "many"])
    assert exc.value.code == 2


def test_console_script_runs_from_the_install(tmp_path):
    exe = Path(sys.executable).parent / "sapo-conformance"
    if not exe.exists():
        pytest.skip("console script not installed next to this interpreter")
    out = subprocess.run(
        [str(exe), "--target", "reference", "--quick", "--no-progress"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "PASS" in out.stdout


def _pytest(args, cwd, extra_path):
    env = {**os.environ, "PYTHONPATH": str(extra_path)}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--pyargs",
            "sapo_conformance",
            *args,
        ],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
    )


def test_pytest_plugin_items_per_clause_and_dtype(third_party, tmp_path):
    ok = _pytest(
        [
            "--sapo-impl",
            "thirdparty_sapo:good",
            "--sapo-framework",
            "numpy",
            "--sapo-cases-per-clause",
            "1",
            "--sapo-dtypes",
            "float64,float32",
        ],
        tmp_path,
        third_party,
    )
    assert ok.returncode == 0, ok.stdout[-3000:]
    assert " passed" in ok.stdout
    bad = _pytest(
        [
            "--sapo-impl",
            "thirdparty_sapo:flipped",
            "--sapo-framework",
            "numpy",
            "--sapo-cases-per-clause",
            "1",
            "--sapo-dtypes",
            "float64",
        ],
        tmp_path,
        third_party,
    )
    assert bad.returncode == 1
    assert "thirdparty_sapo:flipped-2.1-float64" in bad.stdout
    assert "sign-flipped" in bad.stdout  # same diagnosis as the CLI


def test_pytest_fixture_check(third_party):
    import thirdparty_sapo
    from sapo_conformance.pytest_plugin import ConformanceFixture

    res = ConformanceFixture().check(
        thirdparty_sapo.good, "numpy", dtypes=["float64"], cases_per_clause=1
    )
    assert res.passed
    with pytest.raises(pytest.fail.Exception, match="conformance failures"):
        ConformanceFixture().check(
            "thirdparty_sapo:flipped", "numpy", dtypes=["float64"], cases_per_clause=1
        )


def test_import_and_plugin_pull_in_no_framework(tmp_path):
    """The plugin loads in every pytest run: importing the package must import no framework."""
    code = (
        "import sys, json, sapo_conformance, sapo_conformance.pytest_plugin, sapo_conformance.cli; "
        "print(json.dumps(sorted(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    leaked = sorted(
        m for m in json.loads(out.stdout) if m.split(".")[0] in ("torch", "jax", "jaxlib", "mlx")
    )
    assert not leaked, leaked


def test_a_requested_target_outside_the_requested_dtypes_is_a_usage_error(capsys):
    assert main(["--target", "reference", "--dtypes", "bfloat16", *QUICK]) == 2
    assert "declare no dtype among --dtypes bfloat16" in capsys.readouterr().err


def test_nothing_checked_is_not_a_pass():
    from sapo_conformance import builtin_target, generate_cases, run_suite

    res = run_suite([builtin_target("reference")], generate_cases(0, 1), ["bfloat16"])
    assert not res.failures and not res.passed
    assert res.unchecked() == ["0 cases checked in total"]
    t = builtin_target("reference")
    t.requested = True
    t.methods = ("gspo",)  # a requested target whose cases are all outside what it declares
    res = run_suite([t], [c for c in generate_cases(0, 1) if c.method == "sapo"], ["float64"])
    assert not res.passed
    assert res.unchecked()[0].startswith("target reference float64: 0 cases checked:")


def test_export_and_judge_subcommands(tmp_path):
    from sapo_conformance.protocol import load_inputs, read_manifest, write_result

    d = tmp_path / "port"
    assert main(["export", str(d), "--quick", "--dtypes", "float64", "--methods", "sapo"]) == 0
    manifest = read_manifest(d)
    # a port of spec 0.1.0's inputs: the clause 10 cases (terms it does not declare) are skipped
    plain = [e for e in manifest["cases"] if not {"weights", "ref_logp"} & set(e["files"])]
    plain = [e for e in plain if "error" not in e and "kl_coef" not in e["options"]]
    plain = [e for e in plain if "kl_estimator" not in e["options"]]
    for entry in plain:
        ins = load_inputs(d, entry)
        r = sapo_ref.policy_loss(
            ins["logp"], ins["old_logp"], ins["advantages"], ins["mask"], **entry["options"]
        )
        write_result(d, entry, r.loss, r.grad)
    j = tmp_path / "judge.json"
    assert main(["judge", str(d), "--json", str(j), "--no-progress"]) == 0
    data = json.loads(j.read_text())
    jsonschema.validate(data, json_schema())
    assert data["passed"] and data["totals"]["pass"] == len(plain) < len(manifest["cases"])
    (d / "results" / f"{plain[0]['name']}.json").unlink()
    assert main(["judge", str(d), "--json", str(j), "--no-progress"]) == 1
    assert main(["judge", str(tmp_path / "nowhere"), "--no-progress"]) == 2
