"""Issue #17 point 1: the promotion gate cannot be fooled with the project's own commands.

An evaluation is accepted only for the runs it measured; a registered version's metrics never
change; the gate compares figures traced to their evaluate runs and needs a strict improvement;
rollback leaves aliases where a reader expects them and never flips back silently.
"""

# ruff: noqa: F811  (pytest fixtures imported from tests.test_registry)
from __future__ import annotations

import mlflow
import pytest

from registry.promote import TAG_ROLLED_BACK_AT, promote, rollback
from registry.register import EvaluationMismatchError, RegistryError, evaluation
from tests.test_registry import (  # noqa: F401  (fixtures)
    aliases,
    clone,
    env,
    names,
    pair,
    register,
    upstream_runs,
)


def test_evaluation_of_other_runs_is_refused(env) -> None:
    """The observed attack: baseline extract/index runs with the fine-tuned run's evaluation."""
    cfg = names()
    base_ex, base_ix, _ = upstream_runs(env, 0.362)
    _, _, tuned_ev = upstream_runs(env, 0.739)
    with pytest.raises(EvaluationMismatchError, match="measured extract run"):
        evaluation(tuned_ev, cfg, extract_run_id=base_ex, index_run_id=base_ix)
    with pytest.raises(EvaluationMismatchError):
        evaluation(tuned_ev, cfg, index_run_id=base_ix)


def test_evaluation_of_its_own_runs_is_accepted(env) -> None:
    ex, ix, ev = upstream_runs(env, 0.5)
    metrics, tags = evaluation(ev, names(), extract_run_id=ex, index_run_id=ix)
    assert metrics["map_at_r"] == 0.5 and tags["evaluate_run_id"] == ev


def test_registered_metrics_are_frozen(env, pair) -> None:
    cfg, client = names(), env.client()
    with mlflow.start_run(experiment_id=env.experiment_id) as upstream:
        pass
    rid = upstream.info.run_id
    first = register(env, cfg, 0.4, extractor_run_id=rid, index_run_id=rid)
    again = register(env, cfg, 0.4, extractor_run_id=rid, index_run_id=rid)  # a retry
    assert again.reused and again.index.tags == first.index.tags
    with pytest.raises(EvaluationMismatchError, match="frozen"):
        register(env, cfg, 0.9, extractor_run_id=rid, index_run_id=rid)
    now = client.get_model_version(cfg.index_name, str(first.index.version))
    assert now.tags["metric.map_at_r"] == first.index.tags["metric.map_at_r"]


def test_gate_refuses_a_tie_and_figures_it_cannot_trace(env, pair) -> None:
    cfg, client, base = names(), env.client(), pair[1]
    kw = {"index_name": cfg.index_name, "extractor_name": cfg.extractor_name, "smoke": False}
    clone(env, base, cfg, 0.5)
    assert promote(client, **kw).promoted
    clone(env, base, cfg, 0.5)
    tie = promote(client, **kw)
    assert not tie.promoted and "tie" in tie.reason

    forged = clone(env, base, cfg, 0.6)  # then someone rewrites its metric tag
    client.set_model_version_tag(
        cfg.index_name, str(forged.index.version), "metric.map_at_r", "0.99"
    )
    before = aliases(client, cfg.index_name)
    refused = promote(client, **kw)
    assert not refused.promoted and "measured 0.6" in refused.reason
    assert aliases(client, cfg.index_name) == before

    other = clone(env, base, cfg, 0.7)  # its evaluation names another index's extract run
    _, _, foreign_ev = upstream_runs(env, 0.7)
    client.set_model_version_tag(
        cfg.index_name, str(other.index.version), "evaluate_run_id", foreign_ev
    )
    refused = promote(client, **kw)
    assert not refused.promoted and "not trusted" in refused.reason


def test_rollback_aliases_and_no_flip_flop(env, pair) -> None:
    cfg, client, base = names(), env.client(), pair[1]
    kw = {"index_name": cfg.index_name, "extractor_name": cfg.extractor_name}
    v1 = clone(env, base, cfg, 0.5)
    assert promote(client, smoke=False, **kw).promoted
    v2 = clone(env, base, cfg, 0.6)
    assert promote(client, smoke=False, **kw).promoted
    assert aliases(client, cfg.index_name) == {
        "champion": str(v2.index.version),
        "previous": str(v1.index.version),
    }

    back = rollback(client, **kw)
    assert back.to_version == str(v1.index.version)
    assert aliases(client, cfg.index_name) == {"champion": str(v1.index.version)}
    rolled = client.get_model_version(cfg.index_name, str(v2.index.version))
    assert rolled.tags[TAG_ROLLED_BACK_AT] and rolled.tags["rolled_back_to"] == str(
        v1.index.version
    )

    with pytest.raises(RegistryError):  # a second rollback does not flip back to v2
        rollback(client, **kw)
    assert aliases(client, cfg.index_name)["champion"] == str(v1.index.version)

    client.set_registered_model_alias(cfg.index_name, "challenger", str(v2.index.version))
    again = promote(client, smoke=False, **kw)  # nor does the next gate
    assert not again.promoted and "rolled back" in again.reason
    assert aliases(client, cfg.index_name)["champion"] == str(v1.index.version)


def _probe(client, pair, value: float) -> None:
    """Log the out-of-domain probe figure on the evaluate run the version's figures trace to."""
    client.log_metric(pair.index.tags["evaluate_run_id"], "probe_map_at_r", value)


def test_gate_refuses_a_challenger_whose_probe_falls(env, pair) -> None:
    """Issue #16 section 3: with promote.probe_min_ratio set, a challenger better on the test split
    but worse than ratio x the champion on the out-of-domain probe is refused; off by default."""
    cfg, client, base = names(), env.client(), pair[1]
    kw = {"index_name": cfg.index_name, "extractor_name": cfg.extractor_name, "smoke": False}
    first = clone(env, base, cfg, 0.5)
    _probe(client, first, 0.20)
    assert promote(client, probe_min_ratio=0.97, **kw).promoted  # no champion: nothing to compare

    forgets = clone(env, base, cfg, 0.7)
    _probe(client, forgets, 0.18)  # 0.9x the champion's probe figure
    before = aliases(client, cfg.index_name)
    refused = promote(client, probe_min_ratio=0.97, **kw)
    assert not refused.promoted and "probe_min_ratio=0.97" in refused.reason
    assert refused.probe == {"challenger": 0.18, "champion": 0.20}
    assert aliases(client, cfg.index_name) == before
    assert promote(client, **kw).promoted  # the option is off by default

    unmeasured = clone(env, base, cfg, 0.8)  # its evaluation logged no probe figure
    refused = promote(client, probe_min_ratio=0.97, **kw)
    assert not refused.promoted and "logged no probe_map_at_r" in refused.reason
    assert aliases(client, cfg.index_name)["champion"] == str(forgets.index.version)
    assert unmeasured.index.version

    keeps = clone(env, base, cfg, 0.9)
    _probe(client, keeps, 0.176)  # 0.978x
    assert promote(client, probe_min_ratio=0.97, **kw).promoted
