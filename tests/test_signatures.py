"""The four policy_loss APIs, the configuration resolver and the conformance contract agree.

Every ``policy_loss`` (sapo_ref, sapo_torch, sapo_jax, sapo_mlx) takes the four arrays
positionally and exactly the spec's keywords (the parameters of ``sapo_ref.resolve_config``,
plus the inputs it is only told about: ``normalizer``, ``weights`` and ``ref_logp``) as
keyword-only arguments with the same defaults, in the reference's order; the adapters add only
``metrics``, last. The conformance contract's options are a subset of those keywords.
"""

from __future__ import annotations

import importlib
import inspect

import pytest
from sapo_conformance.cases import CONTRACT_OPTIONS

import sapo_ref
from sapo_ref import spec

ARRAYS = ("logp", "old_logp", "advantages", "mask")
#: resolve_config's keywords that are not policy_loss's (it is told whether a normalizer or
#: reference log-probabilities came).
RESOLVER_ONLY = ("has_normalizer", "has_ref_logp")
#: policy_loss's inputs that the resolver is told about only (clauses 3.8, 10.1, 10.2).
INPUT_KEYWORDS = {"normalizer": None, "weights": None, "ref_logp": None}
#: What only an adapter takes, with its default.
ADAPTER_ONLY = {"metrics": False}
APIS = (
    pytest.param("sapo_ref", id="sapo_ref"),
    pytest.param("sapo_torch", marks=pytest.mark.torch, id="sapo_torch"),
    pytest.param("sapo_jax", marks=pytest.mark.jax, id="sapo_jax"),
    pytest.param("sapo_mlx", marks=pytest.mark.mlx, id="sapo_mlx"),
)


def spec_keywords() -> dict[str, object]:
    """The spec's keywords with their defaults: resolve_config's parameters plus the inputs
    (``normalizer``, ``weights``, ``ref_logp``)."""
    params = inspect.signature(sapo_ref.resolve_config).parameters
    out = {n: p.default for n, p in params.items() if n not in RESOLVER_ONLY}
    return out | INPUT_KEYWORDS


def _policy_loss(module: str):
    framework = {"sapo_torch": "torch", "sapo_jax": "jax", "sapo_mlx": "mlx"}.get(module)
    if framework:
        pytest.importorskip(framework)
    return importlib.import_module(module).policy_loss


def test_resolver_keywords_are_the_spec_data():
    """resolve_config takes the spec's options: its [defaults], every method's params (from
    [methods.*]), the aggregation's requirements (from [loss_aggs.*]), the KL coefficient (the
    one [domains.*] entry that is no method's parameter, clause 10.2) and nothing else."""
    kw = spec_keywords()
    data = spec.DATA
    params = {p for m in spec.METHODS.values() for p in m.params}
    required = {r for a in spec.LOSS_AGGS.values() for r in a.requires}
    others = set(spec.DOMAINS) - params - required
    assert others == {"kl_coef"}
    assert set(kw) == set(data["defaults"]) | params | required | others | set(INPUT_KEYWORDS)
    for name, value in data["defaults"].items():
        # None means "the default unless ...": count_empty_rows (false unless a normalizer fixed
        # it), kl_estimator (k3, and only with ref_logp)
        unset = name in ("count_empty_rows", "kl_estimator")
        assert kw[name] == (None if unset else value), name
    assert all(kw[p] is None for p in params | required | others)  # None: the default


@pytest.mark.parametrize("module", APIS)
def test_policy_loss_takes_exactly_the_spec_keywords(module):
    sig = inspect.signature(_policy_loss(module))
    params = list(sig.parameters.values())
    positional = [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert positional == list(ARRAYS), f"{module}: arrays {positional}"
    assert all(p.default is p.empty for p in params[: len(ARRAYS)])
    keywords = {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY}
    want = spec_keywords()
    if module != "sapo_ref":
        want |= ADAPTER_ONLY
    assert keywords == want, f"{module}: {keywords} != {want}"
    assert not [p for p in params if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    # The reference's order (a reader of one signature reads them all), the adapters' own last.
    reference = [
        n
        for n, p in inspect.signature(sapo_ref.policy_loss).parameters.items()
        if p.kind is p.KEYWORD_ONLY
    ]
    order = list(keywords)
    assert order[: len(reference)] == reference, f"{module}: {order} vs {reference}"
    assert order[len(reference) :] == ([] if module == "sapo_ref" else list(ADAPTER_ONLY))


def test_contract_options_are_spec_keywords():
    assert set(CONTRACT_OPTIONS) <= set(spec_keywords())
    assert "normalizer" not in CONTRACT_OPTIONS and "metrics" not in CONTRACT_OPTIONS
