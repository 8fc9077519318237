"""``sapo-conformance`` cannot be made to pass by an implementation it did not check (issue 11).

Each hostile implementation is a small module written to ``tmp_path``; the command runs it in
its supervised worker process. Every test asserts the exit status, that the reports were
written, and that the reason names the cause. Runs are kept to seconds: numpy framework,
``--quick``, one method, float64 where the dtype does not matter.
"""

from __future__ import annotations

import json
import sys
import textwrap

import jsonschema
import pytest
from sapo_conformance.cli import main
from sapo_conformance.report import json_schema

HOSTILE = textwrap.dedent(
    '''
    """Hostile and limited implementations (numpy contract: return (loss, grad))."""
    import os
    import signal
    import sys
    import time

    import numpy as np
    import sapo_ref


    def good(logp, old_logp, advantages, mask, **options):
        r = sapo_ref.policy_loss(logp, old_logp, advantages, mask, **options)
        return r.loss, r.grad


    def sys_exit0(*args, **options):
        sys.exit(0)


    def sys_exit3(*args, **options):
        sys.exit(3)


    def os_exit0(*args, **options):
        os._exit(0)


    def keyboard_interrupt(*args, **options):
        raise KeyboardInterrupt


    def segfault(*args, **options):
        os.kill(os.getpid(), signal.SIGSEGV)


    def never_returns(*args, **options):
        time.sleep(3600)


    def exits_on_grpo(logp, old_logp, advantages, mask, **options):
        if options.get("method") == "grpo":
            os._exit(0)
        return good(logp, old_logp, advantages, mask, **options)


    def modifies_old_logp(logp, old_logp, advantages, mask, **options):
        out = good(logp, old_logp, advantages, mask, **options)
        old_logp += 1.0  # after computing: the numbers are right, the caller's array is not
        return out


    def complex_loss(logp, old_logp, advantages, mask, **options):
        loss, grad = good(logp, old_logp, advantages, mask, **options)
        return np.complex128(loss) + 0j, grad


    def methods_string(*args, **options):
        return good(*args, **options)


    methods_string.sapo_capabilities = {"methods": "sapo"}


    def dtype_typo(*args, **options):
        return good(*args, **options)


    dtype_typo.sapo_capabilities = {"dtypes": ["f64"]}


    def not_iterable(*args, **options):
        return good(*args, **options)


    not_iterable.sapo_capabilities = {"loss_aggs": 3}


    def unknown_key(*args, **options):
        return good(*args, **options)


    unknown_key.sapo_capabilities = {"method": ["sapo"]}


    def sapo_only(logp, old_logp, advantages, mask, **options):
        if options.get("method", "sapo") != "sapo":
            raise NotImplementedError(options["method"])
        return good(logp, old_logp, advantages, mask, **options)


    sapo_only.sapo_capabilities = {"methods": ["sapo"]}


    def counts_empty_rows(logp, old_logp, advantages, mask, **options):
        options.pop("count_empty_rows", None)
        return good(logp, old_logp, advantages, mask, count_empty_rows=True, **options)


    def counts_empty_rows_declared(*args, **options):
        return counts_empty_rows(*args, **options)


    counts_empty_rows_declared.sapo_capabilities = {"count_empty_rows": "counted"}


    def both_ways(*args, **options):
        return good(*args, **options)


    both_ways.sapo_capabilities = {"count_empty_rows": "both"}


    def float_mask(logp, old_logp, advantages, mask, **options):
        if mask.dtype != logp.dtype:
            raise TypeError(f"mask must be {logp.dtype}; got {mask.dtype}")
        return good(logp, old_logp, advantages, mask.astype(bool), **options)


    def float_mask_declared(*args, **options):
        return float_mask(*args, **options)


    float_mask_declared.sapo_capabilities = {"mask_dtype": "float"}


    def sequence_advantages(logp, old_logp, advantages, mask, **options):
        if advantages.ndim != 1:
            raise ValueError("advantages must be [N]")
        return good(logp, old_logp, advantages, mask, **options)


    sequence_advantages.sapo_capabilities = {
        "advantages": ["sequence"], "temperatures": "tau_neg>=tau_pos", "norm_length": "T"}


    def with_own_metrics(logp, old_logp, advantages, mask, **options):
        loss, grad = good(logp, old_logp, advantages, mask, **options)
        return loss, grad, {"my_metric": 1.0}
    '''
)

TORCH_HOSTILE = textwrap.dedent(
    """
    import numpy as np
    import sapo_ref
    import torch


    def modifies_mask(logp, old_logp, advantages, mask, **options):
        # the reference's loss and gradient on a torch graph (independent of sapo_torch)
        r = sapo_ref.policy_loss(*(t.detach().cpu().numpy() for t in (logp, old_logp, advantages, mask)),
                                 **options)
        valid = mask.clone()
        x = torch.where(valid, logp, torch.zeros_like(logp))
        g = torch.as_tensor(np.asarray(r.grad), dtype=logp.dtype)
        loss = (x * g).sum() - (x.detach() * g).sum() + torch.tensor(float(r.loss), dtype=logp.dtype)
        mask[:, 0] = ~mask[:, 0]
        return loss
    """
)


@pytest.fixture
def hostile(tmp_path, monkeypatch):
    (tmp_path / "hostile_sapo.py").write_text(HOSTILE)
    (tmp_path / "hostile_torch.py").write_text(TORCH_HOSTILE)
    (tmp_path / "exits_on_import.py").write_text(
        "import sys\nsys.exit(0)\ndef fn(*a, **k):\n    pass\n"
    )
    (tmp_path / "os_exits_on_import.py").write_text("import os\nos._exit(0)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("hostile_sapo", "hostile_torch", "exits_on_import", "os_exits_on_import"):
        sys.modules.pop(name, None)
    return tmp_path


FAST = ["--quick", "--no-progress", "--methods", "sapo,grpo", "--dtypes", "float64"]


def _run(tmp_path, argv):
    """Run the command; the exit status and the JSON report (validated) it wrote."""
    j, md = tmp_path / "out" / "r.json", tmp_path / "out" / "r.md"
    code = main([*argv, "--json", str(j), "--markdown", str(md)])
    assert j.is_file() and md.is_file(), "the reports must always be written"
    data = json.loads(j.read_text())
    jsonschema.validate(data, json_schema())
    assert md.read_text().startswith("# sapo-conformance report")
    return code, data


def _messages(data) -> str:
    return "\n".join(m for f in data["failures"] for m in f["messages"]) + "\n".join(
        data["unchecked"]
    )


def _impl(name, framework="numpy"):
    return ["--impl", f"hostile_sapo:{name}" if ":" not in name else name, "--framework", framework]


@pytest.mark.parametrize(
    "fn, reason",
    [
        ("sys_exit0", "called sys.exit(0)"),
        ("sys_exit3", "called sys.exit(3)"),
        ("keyboard_interrupt", "raised KeyboardInterrupt"),
        ("os_exit0", "worker exited with status 0 during case"),
        ("segfault", "killed by SIGSEGV"),
    ],
)
def test_exits_and_crashes_fail_with_the_reason(hostile, fn, reason):
    code, data = _run(hostile, [*_impl(fn), *FAST])
    assert code == 1
    assert data["passed"] is False and data["totals"]["pass"] == 0 and data["totals"]["fail"] > 0
    assert reason in _messages(data)


def test_a_crash_on_some_cases_restarts_the_worker_and_the_run_goes_on(hostile):
    code, data = _run(
        hostile, [*_impl("exits_on_grpo"), "--quick", "--no-progress", "--dtypes", "float64"]
    )
    assert code == 1
    failed = {f["options"].get("method") for f in data["failures"]}
    assert failed == {"grpo"}, failed
    assert data["totals"]["pass"] > 0  # the cases after each crash ran and passed
    assert data["targets"][0]["worker_restarts"] >= 1
    assert "worker exited with status 0 during case" in _messages(data)


def test_a_hang_times_out_and_nothing_passes(hostile):
    code, data = _run(
        hostile, [*_impl("never_returns"), *FAST, "--methods", "sapo", "--timeout", "2"]
    )
    assert code == 1 and data["totals"]["pass"] == 0
    text = _messages(data)
    assert "timed out after 2 s during case" in text
    # after three losses in a row the remaining cases fail unrun instead of costing 2 s each
    assert "not run: the worker was lost 3 times in a row" in text


@pytest.mark.parametrize("module", ["exits_on_import:fn", "os_exits_on_import:fn"])
def test_a_module_that_exits_on_import_fails_the_run(hostile, module):
    code, data = _run(hostile, [*_impl(module), *FAST])
    assert code == 1 and data["passed"] is False
    t = data["targets"][0]
    assert t["status"] == "error"
    assert "sys.exit(0)" in t["reason"] or "exited with status 0" in t["reason"]
    assert any("could not be loaded" in u for u in data["unchecked"])


@pytest.mark.clause("6.5")
def test_numpy_input_modified_fails_clause_6_5_by_name(hostile):
    code, data = _run(hostile, [*_impl("modifies_old_logp"), *FAST])
    assert code == 1
    assert all(f["clauses"] == ["6.5"] for f in data["failures"])
    assert "the implementation modified old_logp in place (clause 6.5)" in _messages(data)
    assert not any(m.startswith("fd:") for f in data["failures"] for m in f["messages"])
    row = [r for r in data["clauses"] if r["clause"] == "6.5"]
    assert row and row[0]["status"] == "fail"


@pytest.mark.clause("6.5")
def test_torch_input_modified_fails_clause_6_5_by_name(hostile):
    pytest.importorskip("torch")
    code, data = _run(
        hostile, ["--impl", "hostile_torch:modifies_mask", "--framework", "torch", *FAST]
    )
    assert code == 1
    assert "the implementation modified mask in place (clause 6.5)" in _messages(data)


def test_correct_implementation_passes_clause_6_5_on_every_case(hostile):
    code, data = _run(hostile, [*_impl("good"), *FAST])
    assert code == 0
    row = next(r for r in data["clauses"] if r["clause"] == "6.5")
    assert row["status"] == "pass" and row["passed"] == data["totals"]["pass"]


def test_complex_loss_is_a_contract_failure(hostile):
    code, data = _run(hostile, [*_impl("complex_loss"), *FAST])
    assert code == 1 and data["totals"]["pass"] == 0
    assert "loss is complex128: a loss must be real" in _messages(data)


@pytest.mark.parametrize(
    "fn, message",
    [
        (
            "methods_string",
            "capabilities['methods'] must be a list of names; got the string 'sapo'",
        ),
        ("dtype_typo", "capabilities['dtypes']: unknown name 'f64'"),
        ("not_iterable", "capabilities['loss_aggs'] must be a list of names"),
        ("unknown_key", "unknown key 'method'; known keys: methods, loss_aggs, dtypes"),
    ],
)
def test_invalid_capabilities_exit_2_naming_the_key(hostile, capsys, fn, message):
    assert main([*_impl(fn), *FAST]) == 2
    assert message in capsys.readouterr().err


def test_capabilities_disjoint_from_the_request_exit_2(hostile, capsys):
    assert main([*_impl("sapo_only"), "--quick", "--no-progress", "--methods", "grpo"]) == 2
    err = capsys.readouterr().err
    assert "declare no method among --methods grpo" in err and "declares: sapo" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--cases-per-clause", "0", "--no-golden"], "nothing to check"),
        (["--seed", "-1"], "--seed must be >= 0"),
        (["--timeout", "0"], "--timeout must be a positive number"),
    ],
)
def test_flags_validated_before_the_run(hostile, capsys, argv, message):
    assert main([*_impl("good"), "--no-progress", *argv]) == 2
    assert message in capsys.readouterr().err


def test_report_paths_validated_before_the_run(hostile, capsys):
    folder = hostile / "a_folder"
    folder.mkdir()
    assert main([*_impl("never_returns"), *FAST, "--json", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "--json:" in err and "is a directory" in err
    blocker = hostile / "a_file"
    blocker.write_text("")
    # never_returns: an error only after the run would take the whole --timeout; it is immediate
    assert main([*_impl("never_returns"), *FAST, "--markdown", str(blocker / "sub" / "r.md")]) == 2
    assert "--markdown: cannot create the folder" in capsys.readouterr().err


def test_declared_counted_empty_rows_certified_with_that_option(hostile):
    code, data = _run(
        hostile, [*_impl("counts_empty_rows"), "--quick", "--no-progress", "--dtypes", "float64"]
    )
    assert code == 1 and "3.6" in {c for f in data["failures"] for c in f["clauses"]}
    code, data = _run(
        hostile,
        [*_impl("counts_empty_rows_declared"), "--quick", "--no-progress", "--dtypes", "float64"],
    )
    assert code == 0
    limits = data["targets"][0]["declared_limits"]
    assert any(lim.startswith("count_empty_rows: counted") for lim in limits)


def test_both_ways_runs_cases_with_empty_rows_twice(hostile):
    code, data = _run(
        hostile, [*_impl("both_ways"), "--quick", "--no-progress", "--dtypes", "float64"]
    )
    assert code == 0
    assert data["totals"]["pass"] > 25  # the counted copies of cases with an empty row


def test_mask_dtype_float(hostile):
    code, data = _run(hostile, [*_impl("float_mask"), *FAST])
    assert code == 1 and "mask must be float64; got bool" in _messages(data)
    code, data = _run(hostile, [*_impl("float_mask_declared"), *FAST])
    assert code == 0 and "mask passed as float" in data["targets"][0]["declared_limits"]


def test_declared_limits_skip_with_a_reason_and_are_reported(hostile):
    code, data = _run(
        hostile, [*_impl("sequence_advantages"), "--quick", "--no-progress", "--dtypes", "float64"]
    )
    assert code == 0 and data["totals"]["skip"] > 0
    limits = data["targets"][0]["declared_limits"]
    assert "advantages: sequence only" in limits
    assert "temperatures: tau_neg >= tau_pos only" in limits
    md = (hostile / "out" / "r.md").read_text()
    assert "declared limits: " in md and "advantages: sequence only" in md


def test_a_returned_dict_is_compared_as_metrics_only_when_declared(hostile):
    code, data = _run(hostile, [*_impl("with_own_metrics"), *FAST])
    assert code == 0
    assert not [
        r for r in data["clauses"] if r["clause"] == "7.1"
    ]  # the 7.1 row counts metric comparisons only
    assert "metrics (clause 7.1) not compared" in data["targets"][0]["declared_limits"]


def test_list_frameworks(capsys):
    assert main(["--list-frameworks"]) == 0
    out = capsys.readouterr().out
    for name in ("numpy", "torch", "jax", "mlx"):
        assert name in out
    assert "installed" in out and "float64" in out


def test_device_cpu_runs_and_is_recorded(tmp_path):
    code, data = _run(tmp_path, ["--target", "reference", "--device", "cpu", *FAST])
    assert code == 0
    t = data["targets"][0]
    assert t["device"] == "cpu" and t["isolation"] == "worker process" and t["versions"]["numpy"]


@pytest.mark.parametrize(
    "argv, reason",
    [
        (["--target", "reference", "--device", "gpu"], "runs on the CPU only"),
        (["--target", "torch", "--device", "cuda:7"], "torch device 'cuda:7' is not available"),
        (["--target", "jax", "--device", "tpu"], "JAX device 'tpu' is not available"),
        (["--target", "mlx", "--device", "metal"], "MLX device 'metal' is not a device name"),
    ],
)
def test_absent_device_is_a_skip_with_the_reason_not_a_pass(tmp_path, argv, reason):
    if argv[1] != "reference":
        pytest.importorskip(argv[1])
    code, data = _run(tmp_path, [*argv, *FAST])
    assert code == 1  # nothing was checked
    t = data["targets"][0]
    assert t["status"] == "skipped" and reason in t["reason"]
    assert any(reason in u for u in data["unchecked"])


def test_a_script_without_a_main_guard_runs_once(tmp_path):
    """The workers never re-run the caller's script (multiprocessing "spawn" would)."""
    import subprocess

    script = tmp_path / "certify.py"
    log = tmp_path / "ran.log"
    script.write_text(
        "from sapo_conformance.cli import main\n"
        f"open({str(log)!r}, 'a').write('x')\n"
        "raise SystemExit(main(['--target', 'reference', '--quick', '--no-progress', '--dtypes', 'float64']))\n"
    )
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert log.read_text() == "x"


def test_ctrl_c_exits_130_and_still_writes_the_reports(hostile):
    import signal
    import subprocess
    import time

    j = hostile / "int.json"
    code = (
        f"import sys; sys.path.insert(0, {str(hostile)!r}); from sapo_conformance.cli import main; "
        "sys.exit(main(['--impl', 'hostile_sapo:never_returns', '--framework', 'numpy', '--quick', "
        f"'--no-progress', '--timeout', '60', '--json', {str(j)!r}]))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    time.sleep(5)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    assert proc.returncode == 130
    data = json.loads(j.read_text())
    assert data["interrupted"] is True and data["passed"] is False
    assert data["unchecked"] == ["the run was interrupted before its end"]
