"""The two worked ports of examples/ pass the suite, and a deliberately broken copy of each is
rejected with the right deviation named (issue 14).

The C port is built with the system C compiler and judged through the file protocol; the
autograd port runs live through its driver plugin. Each part skips, with the reason, where its
compiler or framework is missing (tools/certify_examples.sh installs the plugin in its venv).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from sapo_conformance import generate_cases, golden_cases, run_suite
from sapo_conformance.protocol import export_cases, judge_dir
from sapo_conformance.targets import Target
from sapo_conformance.verdict import diagnose

ROOT = Path(__file__).resolve().parents[1]
C_PORT = ROOT / "examples" / "c_port"
C_DTYPES = ["float64", "float32", "bfloat16", "float16"]
CC = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")

needs_cc = pytest.mark.skipif(CC is None, reason="no C compiler (cc or gcc) on PATH")


def _build(out: Path, bug: str | None = None) -> Path:
    flags = [f"-DSAPO_BUG_{bug}"] if bug else []
    cmd = [
        CC,
        "-O2",
        "-std=c99",
        "-Wall",
        "-Werror",
        *flags,
        "-o",
        str(out),
        str(C_PORT / "sapo.c"),
        str(C_PORT / "run_cases.c"),
        "-lm",
    ]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return out


@pytest.fixture(scope="module")
def c_export(tmp_path_factory):
    """One export (one random case per clause and the golden vectors, four dtypes) to copy."""
    root = tmp_path_factory.mktemp("c_export") / "cases"
    cases = generate_cases(seed=0, per_clause=1) + golden_cases()
    export_cases(root, cases, C_DTYPES, {"seed": 0, "cases_per_clause": 1, "golden": True})
    return root


def _certify_c(binary: Path, export: Path, work: Path):
    """Copy the export, run the port on it, judge it; (suite, settings, seconds)."""
    target = work / "run"
    shutil.copytree(export, target)
    start = time.perf_counter()
    subprocess.run([str(binary), str(target)], check=True, capture_output=True, text=True)
    suite, settings = judge_dir(target)
    return suite, settings, time.perf_counter() - start


@needs_cc
@pytest.mark.clause("C.1", "6.1", "6.2", "6.3", "5.3", "5.4", "3.6", "3.7")
def test_c_port_passes_every_case_in_every_dtype(tmp_path, c_export):
    suite, settings, seconds = _certify_c(_build(tmp_path / "run_cases"), c_export, tmp_path)
    assert suite.passed, [(r.case.id, r.dtype, r.messages) for r in suite.failures[:5]]
    ran = {r.dtype for r in suite.results if r.status == "pass"}
    assert ran == set(C_DTYPES)
    fp = settings["file_protocol"]
    assert fp["results_missing"] == 0 and fp["port"]["name"] == "c_port"
    assert any(c.name == "fd" for r in suite.results for c in r.checks)  # directional check ran
    assert all(v.complete and not v.deviations for v in diagnose(suite))
    print(f"C port: {len(suite.results)} case x dtype results judged in {seconds:.2f} s")


@needs_cc
@pytest.mark.parametrize(
    ("bug", "deviation"),
    [
        ("CLAMP20", "log-ratio-clamp"),
        ("COUNT_EMPTY_ROWS", "empty-rows-counted"),
        ("TOKEN_MEAN", "token-mean-always"),
    ],
)
def test_a_broken_c_port_is_rejected_with_the_deviation_named(tmp_path, c_export, bug, deviation):
    suite, _, _ = _certify_c(_build(tmp_path / f"run_{bug}", bug), c_export, tmp_path)
    assert not suite.passed
    verdicts = [v for v in diagnose(suite) if v.failures]
    assert verdicts
    assert all(deviation in v.names and v.complete for v in verdicts), [v.line for v in verdicts]


@needs_cc
@pytest.mark.clause("8.4")
def test_the_c_port_refuses_a_parameter_its_method_does_not_take(tmp_path, c_export):
    work = tmp_path / "run"
    shutil.copytree(c_export, work)
    index = (work / "index.txt").read_text().splitlines()
    k = next(i for i, ln in enumerate(index) if " method=grpo " in ln and ln.startswith("case "))
    index[k] += " tau_pos=2.0"
    (work / "index.txt").write_text("\n".join(index) + "\n")
    subprocess.run(
        [str(_build(tmp_path / "run_cases")), str(work)], check=True, capture_output=True
    )
    suite, _ = judge_dir(work)
    assert len(suite.failures) == 1
    assert "tau_pos: not a parameter of this method" in suite.failures[0].reason


# ----------------------------------------------------------------------------- autograd plugin


def _autograd_driver_or_skip() -> None:
    if (
        importlib.util.find_spec("autograd") is None
        or importlib.util.find_spec("sapo_autograd") is None
    ):
        pytest.skip(
            "autograd or the sapo_autograd plugin is not installed "
            "(pip install autograd -e examples/autograd_driver; tools/certify_examples.sh does)"
        )
    from sapo_conformance.drivers import get_driver

    try:
        get_driver("autograd")
    except ValueError as err:
        pytest.skip(f"the suite does not find the autograd driver plugin: {err}")


def _autograd_run(fn, dtypes=("float64", "float32", "float16")):
    cases = generate_cases(seed=0, per_clause=1) + golden_cases()
    target = Target(
        "sapo_autograd.loss:policy_loss", "autograd", fn, "examples/autograd_driver", metrics=False
    )
    return run_suite([target], cases, list(dtypes), seed=0)


@pytest.mark.clause("C.1", "6.1", "6.3", "2.8")
def test_autograd_port_passes_through_its_plugin():
    _autograd_driver_or_skip()
    from sapo_autograd.loss import policy_loss

    start = time.perf_counter()
    suite = _autograd_run(policy_loss)
    assert suite.passed, [(r.case.id, r.dtype, r.messages) for r in suite.failures[:5]]
    assert {r.dtype for r in suite.results if r.status == "pass"} == {
        "float64",
        "float32",
        "float16",
    }
    assert any(c.name == "fd" for r in suite.results for c in r.checks)
    print(f"autograd port: {len(suite.results)} results in {time.perf_counter() - start:.2f} s")


def _clamped(logp, old_logp, advantages, mask, **options):
    """The port with verl's +-20 clamp of the log-ratio (clause 6.2 broken on purpose)."""
    import autograd.numpy as anp
    from sapo_autograd.loss import policy_loss

    old = np.where(np.asarray(mask) != 0, np.asarray(old_logp, np.float64), 0.0).astype(
        old_logp.dtype
    )
    lp = anp.where(np.asarray(mask) != 0, logp, 0.0)
    return policy_loss(old + anp.clip(lp - old, -20.0, 20.0), old, advantages, mask, **options)


def _token_mean(logp, old_logp, advantages, mask, **options):
    """The port always aggregating by token-mean (clause 3.1 broken on purpose)."""
    from sapo_autograd.loss import policy_loss

    options = {k: v for k, v in options.items() if k != "norm_length"}
    return policy_loss(logp, old_logp, advantages, mask, **{**options, "loss_agg": "token-mean"})


@pytest.mark.parametrize(
    ("broken", "deviation"), [(_clamped, "log-ratio-clamp"), (_token_mean, "token-mean-always")]
)
def test_a_broken_autograd_port_is_rejected_with_the_deviation_named(broken, deviation):
    _autograd_driver_or_skip()
    suite = _autograd_run(broken, dtypes=("float64",))
    assert not suite.passed
    verdicts = [v for v in diagnose(suite) if v.failures]
    assert verdicts and all(deviation in v.names for v in verdicts), [v.line for v in verdicts]
