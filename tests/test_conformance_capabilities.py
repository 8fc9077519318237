"""Capabilities schema, declared limits, the driver plugin interface and its contract checks.

In-process and fast: the validation of every key, which cases each declared limit skips (and
that a limit never fails a case), ``count_empty_rows`` certified with the reference evaluated
the same way, and the base driver's checks (clause 6.5, a real loss) for every built-in driver.
"""

from __future__ import annotations

from importlib import metadata

import numpy as np
import pytest
from sapo_conformance import drivers
from sapo_conformance.capabilities import CapabilityError, declared_limits, validate
from sapo_conformance.cases import generate_cases, materialize
from sapo_conformance.cli import build_parser, method_defaults
from sapo_conformance.drivers import ConformanceError, Driver, discover_drivers, get_driver
from sapo_conformance.runner import applicable, cases_for, run_suite
from sapo_conformance.targets import Target, UsageError, builtin_target

import sapo_ref

# ----------------------------------------------------------------------------- schema


@pytest.mark.parametrize(
    "caps, message",
    [
        ({"methods": "sapo"}, "must be a list of names; got the string 'sapo'"),
        ({"methods": ["sapo", "ppo"]}, "unknown name 'ppo'"),
        ({"loss_aggs": 3}, "must be a list of names"),
        ({"dtypes": ["f64"]}, "unknown name 'f64'"),
        ({"dtypes": []}, "is empty"),
        ({"metrics": "yes"}, "must be True or False"),
        ({"metrics_option": ["metrics"]}, "must be a dict of keyword arguments"),
        ({"tolerance_deviations": {"f64": {"tolerance": "float32"}}}, "unknown dtype 'f64'"),
        ({"tolerance_deviations": {"float64": {"tolerance": "float8"}}}, "unknown row 'float8'"),
        ({"tolerance_deviations": {"float64": {"value": {"rtol": 1e-3}}}}, "{'rtol': number >= 0"),
        ({"tolerance_deviations": ["float64"]}, "must be a dict dtype -> deviation"),
        ({"count_empty_rows": True}, "must be one of: 'excluded', 'counted', 'both'"),
        ({"advantages": "token"}, "must be a list of names"),
        ({"norm_length": 512}, "must be one of: 'any', 'T'"),
        ({"temperatures": "tau_neg>tau_pos"}, "must be one of"),
        ({"mask_dtype": "float32"}, "must be one of: 'bool', 'float', 'int'"),
        ({"dtype": ["float64"]}, "unknown key 'dtype'; known keys: methods"),
        (["sapo"], "capabilities must be a dict"),
    ],
)
def test_invalid_capabilities_name_the_key(caps, message):
    with pytest.raises(CapabilityError) as err:
        validate(caps)
    assert message in str(err.value)


def test_target_reports_capability_errors_as_usage_errors():
    t = Target("mine", "numpy", None, "mine")
    with pytest.raises(UsageError, match="mine: capabilities\\['methods'\\]"):
        t.apply_capabilities({"methods": "sapo"})


def test_adapters_informational_keys_are_accepted_and_valid_keys_still_checked():
    validate({"package": "sapo_torch", "notes": ("x",), "methods": ["sapo"]})
    with pytest.raises(CapabilityError):
        validate({"package": "sapo_torch", "methods": "sapo"})
    assert validate({"anything": 1}, strict=False) == {}


def test_declared_limits_name_every_limit():
    t = Target("t", "numpy", None, "t")
    assert declared_limits(t) == (  # the clause 10 terms are opt-in
        "weights (clause 10.1) not declared: those cases are not run",
        "KL penalty (clause 10.2) not declared: those cases are not run",
    )
    t.apply_capabilities({"weights": True, "kl_estimators": list(sapo_ref.KL_ESTIMATOR_NAMES)})
    assert declared_limits(t) == ()
    t.apply_capabilities({"kl_estimators": ["k3", "low-var-k3"]})
    assert declared_limits(t) == ("kl_estimators: k3, low-var-k3 only",)
    t.apply_capabilities(
        {
            "methods": ["sapo"],
            "count_empty_rows": "counted",
            "advantages": ["sequence"],
            "norm_length": "T",
            "temperatures": "tau_neg>=tau_pos",
            "mask_dtype": "int",
            "metrics": False,
            "tolerance_deviations": {"float64": {"tolerance": "float32", "reason": "fast exp"}},
        }
    )
    text = "\n".join(t.declared_limits)
    for part in (
        "methods: sapo",
        "count_empty_rows: counted",
        "advantages: sequence only",
        "norm_length: the padded length T only",
        "temperatures: tau_neg >= tau_pos only",
        "mask passed as int",
        "metrics (clause 7.1) not compared",
        "fast exp",
    ):
        assert part in text


# ----------------------------------------------------------------------------- limits skip


CASES = generate_cases(seed=0, per_clause=2)


def test_each_limit_skips_exactly_the_cases_outside_it():
    t = Target(
        "t",
        "numpy",
        None,
        "t",
        advantages=("sequence",),
        norm_length="T",
        temperatures="tau_neg>=tau_pos",
        weights=True,
        kl_estimators=("k1", "k3"),
    )
    for c in CASES:
        why = applicable(t, c)
        soft_swapped = False
        if c.error is None:
            cfg = sapo_ref.resolve_config(**c.options, has_ref_logp=c.ref_logp is not None)
            soft_swapped = cfg.is_soft and cfg.tau_neg < cfg.tau_pos
        kl = c.ref_logp is not None or bool({"kl_coef", "kl_estimator"} & set(c.options))
        estimator = c.options.get("kl_estimator", "k3")
        outside = (
            np.ndim(c.advantages) == 2
            or (c.options.get("norm_length") not in (None, c.mask.shape[1]))
            or soft_swapped
            or (kl and c.error is None and estimator not in ("k1", "k3"))
        )
        assert (why is not None) == outside, (c.id, why)


@pytest.mark.clause("10.1", "10.2", "10.4")
def test_undeclared_terms_skip_their_cases_and_errors_with_the_reason():
    """A target that declares neither weights nor a KL estimator gets no case that passes them,
    nor their error cases (clause 10.4); every other case still applies."""
    t = Target("t", "numpy", None, "t")
    for c in CASES:
        why = applicable(t, c)
        kl = c.ref_logp is not None or {"kl_coef", "kl_estimator"} & set(c.options)
        if c.weights is not None:
            assert why and "weights (clause 10.1)" in why, (c.id, why)
        elif kl:
            assert why and "KL penalty (clause 10.2)" in why, (c.id, why)
        else:
            assert why is None, (c.id, why)
    assert not any(c.error for c in CASES if applicable(t, c) is None)  # each uses a term


def test_counted_runs_every_case_with_the_option_and_the_reference_agrees():
    t = Target("t", "numpy", None, "t", count_empty_rows="counted")
    counted = cases_for(t, CASES)
    assert len(counted) == len(CASES)
    assert all(c.options.get("count_empty_rows") is True for c in counted)
    empty = next(
        c
        for c in counted
        if (~c.mask.any(axis=1)).any() and c.mask.any() and c.loss_agg != "token-mean"
    )
    m = materialize(empty, "float64")
    want = sapo_ref.policy_loss(m.logp, m.old_logp, m.advantages, m.mask, **empty.options)
    assert m.want_loss == want.loss  # the reference evaluated with count_empty_rows=True
    plain = sapo_ref.policy_loss(
        m.logp,
        m.old_logp,
        m.advantages,
        m.mask,
        **{k: v for k, v in empty.options.items() if k != "count_empty_rows"},
    )
    assert plain.loss != want.loss  # the case does tell the two apart


def test_both_adds_a_counted_copy_of_cases_with_an_empty_row():
    t = Target("t", "numpy", None, "t", count_empty_rows="both")
    both = cases_for(t, CASES)
    extra = [c for c in both if c.id.endswith("+counted")]
    assert extra and len(both) == len(CASES) + len(extra)
    assert all((~c.mask.any(axis=1)).any() for c in extra)


def test_a_limit_never_fails_a_case():
    def seq_only(logp, old_logp, advantages, mask, **options):
        if np.ndim(advantages) == 2:
            raise AssertionError("per-token advantages")
        r = sapo_ref.policy_loss(logp, old_logp, advantages, mask, **options)
        return r.loss, r.grad

    t = Target("seq_only", "numpy", seq_only, "test", advantages=("sequence",))
    res = run_suite([t], CASES, ["float64"])
    assert res.passed, [r.reason for r in res.failures]
    assert any("advantages per token" in r.reason for r in res.results if r.status == "skip")


# ----------------------------------------------------------------------------- drivers


def _ref(logp, old_logp, advantages, mask, **options):
    r = sapo_ref.policy_loss(
        np.asarray(logp), np.asarray(old_logp), np.asarray(advantages), np.asarray(mask), **options
    )
    return r.loss, r.grad


def _case():
    c = next(c for c in CASES if c.id.startswith("2.1-"))
    return materialize(c, "float64")


@pytest.mark.clause("6.5")
@pytest.mark.parametrize("which", ["logp", "old_logp", "advantages", "mask"])
def test_numpy_driver_names_the_modified_input(which):
    def writes(logp, old_logp, advantages, mask, **options):
        out = _ref(logp, old_logp, advantages, mask, **options)
        arr = {"logp": logp, "old_logp": old_logp, "advantages": advantages, "mask": mask}[which]
        arr.flat[0] = not arr.flat[0] if arr.dtype == bool else arr.flat[0] + 1.0
        return out

    m = _case()
    with pytest.raises(
        ConformanceError, match=f"modified {which} in place \\(clause 6.5\\)"
    ) as err:
        get_driver("numpy").run(writes, m, dict(m.case.options), 0.75)
    assert err.value.clause == "6.5"
    # every call gets fresh copies: the case's own arrays are untouched
    assert np.array_equal(m.old_logp, materialize(m.case, "float64").old_logp, equal_nan=True)


@pytest.mark.clause("6.5")
def test_torch_driver_names_the_modified_input():
    torch = pytest.importorskip("torch")

    def writes(logp, old_logp, advantages, mask, **options):
        loss, _ = _ref(logp.detach(), old_logp, advantages, mask, **options)
        advantages.mul_(2.0)
        return (logp * 0).sum() + torch.tensor(loss, dtype=logp.dtype)

    m = _case()
    with pytest.raises(ConformanceError, match="modified advantages in place"):
        get_driver("torch").run(writes, m, dict(m.case.options), 0.75)


def test_complex_loss_is_a_contract_error():
    def cplx(*args, **options):
        loss, grad = _ref(*args, **options)
        return np.complex128(loss), grad

    m = _case()
    with pytest.raises(ConformanceError, match="loss is complex128: a loss must be real"):
        get_driver("numpy").run(cplx, m, dict(m.case.options), 0.75)


@pytest.mark.parametrize(
    "mask_dtype, want", [("bool", np.bool_), ("float", np.float32), ("int", np.int64)]
)
def test_mask_is_passed_in_the_declared_dtype(mask_dtype, want):
    seen = []

    def spy(logp, old_logp, advantages, mask, **options):
        seen.append(mask.dtype)
        return _ref(logp, old_logp, advantages, mask.astype(bool), **options)

    c = next(c for c in CASES if c.id.startswith("2.1-"))
    m = materialize(c, "float32")
    get_driver("numpy").run(spy, m, dict(c.options), 0.75, mask_dtype=mask_dtype)
    assert seen == [np.dtype(want)]


def test_builtin_drivers_discovered_and_a_broken_plugin_listed(monkeypatch):
    found = discover_drivers(refresh=True)
    assert {"numpy", "torch", "jax", "mlx"} <= set(found)
    assert all(found[n].cls is not None for n in ("numpy", "torch", "jax", "mlx"))

    broken = metadata.EntryPoint("brokenfw", "no_such_module_xyz:Driver", drivers.ENTRY_POINT_GROUP)
    real = metadata.entry_points

    def fake(**kw):
        eps = list(real(**kw))
        return eps + [broken] if kw.get("group") == drivers.ENTRY_POINT_GROUP else eps

    monkeypatch.setattr(metadata, "entry_points", fake)
    try:
        found = discover_drivers(refresh=True)
        assert found["brokenfw"].cls is None and "cannot be loaded" in found["brokenfw"].error
        with pytest.raises(ValueError, match="brokenfw"):
            get_driver("brokenfw")
    finally:
        monkeypatch.undo()
        discover_drivers(refresh=True)


def test_a_plugin_driver_implements_hooks_only():
    class ListDriver(Driver):
        """A toy framework whose arrays are NumPy arrays and whose autodiff is the reference's."""

        name, module, dtypes = "toy", "numpy", ("float64",)

        def to_array(self, a, dtype, device):
            return np.array(a, dtype=dtype)

        def to_numpy(self, x):
            return np.asarray(x, dtype=np.float64)

        def value_and_vjp(self, f, x, cotangent):
            loss, grad = f(x)
            return loss, grad * cotangent, None

        def value(self, f, x):
            return f(x)[0]

    m = _case()
    out = ListDriver().run(_ref, m, dict(m.case.options), 1.25)
    np.testing.assert_allclose(out.grad, m.want_grad, rtol=1e-12, atol=1e-15)


def test_method_defaults_in_help_come_from_the_spec():
    text = method_defaults()
    from sapo_ref import spec

    for m in spec.DATA["methods"].values():
        for k, v in m.get("defaults", {}).items():
            assert f"{k}={v}" in text
    assert "gspo: eps_low=0.0003, eps_high=0.0004" in text
    assert "gspo: eps_low=0.0003" in " ".join(build_parser().format_help().split())


def test_reference_declares_its_dtypes_only():
    assert declared_limits(builtin_target("reference")) == ("dtypes: float64, float32, float16",)
