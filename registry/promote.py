"""The promotion gate, and rollback: the only code that moves the ``champion`` alias.

:func:`promote` blesses the ``challenger`` index version (and the extractor version it was built
with) as ``champion`` only when (RELIABILITY 10):

1. both figures can be trusted (:func:`verified_metric`): each version's ``metric.<name>`` tag
   equals the metric of the evaluate run it names (``evaluate_run_id``), and that run measured
   the extract run the version's own index run was built from; both evaluations measured the
   same frozen test split (same split run, or the same ``test_split_hash``);
2. the challenger beats the champion *strictly*: ``delta > min_delta`` (``min_delta`` >= 0,
   default 1e-4 in ``configs/promote.yaml``), so a tie never promotes (no champion yet: promote);
3. the pair is consistent (the extractor version's fingerprint is the one the index records),
   and the challenger was never rolled back (``rolled_back_at``);
4. with ``probe_min_ratio`` set (off by default), the challenger's out-of-domain probe figure
   (``probe_map_at_r`` of its evaluate run) is at least that ratio of the champion's;
5. a smoke check passes: the challenger loads through
   :func:`registry.integrity.load_verified` (checksums against its version tags) and answers a
   query image with ranked, error-free results.

Aliases (both models move together):

* after a promotion: ``champion`` = the new version, ``previous`` = the old champion (also
  recorded as the new version's ``previous_champion`` tag), ``challenger`` removed: it always
  names an undecided candidate, and the next registration sets it again;
* after a rollback: ``champion`` = the target (by default the rolled-back version's
  ``previous_champion``), ``previous`` = the target's own ``previous_champion`` (where a further
  rollback would go) or removed; the rolled-back version gets ``rolled_back_at`` /
  ``rolled_back_to`` tags and loses ``challenger``. A second rollback therefore walks further
  back in history, never flips back: a version tagged ``rolled_back_at`` is refused as the
  implicit rollback target and as a challenger (only an explicit ``to_version`` brings it back).

Anything else changes nothing and says why in :class:`PromotionDecision`. The writes of a
promotion (a ``previous_champion`` tag and the ``previous``/``champion`` aliases on both models)
are undone in reverse order when one of them fails, so a store that becomes locked or
unreachable mid-way leaves the old champion in place. A store that cannot be read or written
raises :class:`RegistryUnavailableError`.

:func:`rollback` re-points ``champion`` (both models) at the version that was champion before the
current one (its ``previous_champion`` tag) or at an explicit version, and drops ``challenger``
from the version rolled back so the next scheduled gate does not promote it again.

Where things live: the checks in :mod:`registry.gate`, rollback in :mod:`registry.rollback`,
store access and self-undoing writes in :mod:`registry.store`; their public names are
re-exported here.
"""

from __future__ import annotations

import logging

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion

from registry.gate import (
    DEFAULT_MIN_DELTA,
    Candidate,
    Measured,
    PromoteConfig,
    PromotionDecision,
    UntrustedMetric,
    beats_champion,
    check_challenger,
    same_test_split,
    smoke_check,
    smoke_image_bytes,
    smoke_passes,
    verified_metric,
)
from registry.rollback import RollbackResult, rollback
from registry.store import (
    RegistryUnavailableError,
    Undo,
    aliases,
    apply_writes,
    store_call,
    utc_now,
)
from registry.tags import (
    CHALLENGER,
    CHAMPION,
    EXTRACTOR_MODEL,
    INDEX_MODEL,
    PREVIOUS,
    TAG_PREVIOUS_CHAMPION,
    TAG_PROMOTED_AT,
    TAG_ROLLED_BACK_AT,
    TAG_ROLLED_BACK_TO,
    RegistryError,
)

__all__ = [
    "DEFAULT_MIN_DELTA",
    "TAG_PREVIOUS_CHAMPION",
    "TAG_PROMOTED_AT",
    "TAG_ROLLED_BACK_AT",
    "TAG_ROLLED_BACK_TO",
    "Measured",
    "PromoteConfig",
    "PromotionDecision",
    "RegistryUnavailableError",
    "RollbackResult",
    "UntrustedMetric",
    "aliases",
    "promote",
    "promote_with_config",
    "rollback",
    "same_test_split",
    "smoke_check",
    "smoke_image_bytes",
    "verified_metric",
]

log = logging.getLogger(__name__)


def promote(
    client: MlflowClient | None = None,
    metric: str = "map_at_r",
    min_delta: float = DEFAULT_MIN_DELTA,
    *,
    higher_is_better: bool = True,
    smoke: bool = True,
    smoke_k: int = 3,
    smoke_image: bytes | None = None,
    require_same_test_split: bool = True,
    index_name: str = INDEX_MODEL,
    extractor_name: str = EXTRACTOR_MODEL,
    metric_prefixes: list[str] | None = None,
    extends_index: bool = False,
    probe_min_ratio: float | None = None,
    probe_metric: str = "probe_map_at_r",
) -> PromotionDecision:
    """Move ``champion`` to the ``challenger`` pair if it passes the gate; see the module doc.

    ``extends_index``: the challenger is the champion's index with new images added, built with
    the champion's own extractor version (the improve job's add path); it then only has to not
    regress on the frozen test split (a bigger gallery cannot be expected to score higher), and
    this relaxation applies only when the extractor versions really are the same.

    ``probe_min_ratio`` (None: off): the challenger's out-of-domain probe figure ``probe_metric``,
    read from its evaluate run, must also be at least this ratio of the champion's.

    Returns the decision (``promoted`` False with a reason when the gate refuses). Raises
    :class:`RegistryUnavailableError` when the store cannot be read or written (nothing changed).
    """
    client = client or store_call("connect to the registry", MlflowClient)
    decision = PromotionDecision(promoted=False, reason="", metric=metric)
    if not min_delta >= 0:
        raise RegistryError(f"min_delta must be >= 0 (a strict improvement), got {min_delta}")
    cfg = PromoteConfig(
        metric=metric,
        min_delta=min_delta,
        higher_is_better=higher_is_better,
        smoke_check=smoke,
        smoke_k=smoke_k,
        require_same_test_split=require_same_test_split,
        extends_index=extends_index,
        probe_metric=probe_metric,
        probe_min_ratio=probe_min_ratio,
        index_name=index_name,
        extractor_name=extractor_name,
    )
    if metric_prefixes is not None:
        cfg.metric_prefixes = metric_prefixes

    index_aliases = aliases(client, index_name)
    if index_aliases is None:
        decision.reason = f"no registered model {index_name!r}"
        return decision
    challenger_v = index_aliases.get(CHALLENGER)
    champion_v = index_aliases.get(CHAMPION)
    decision.challenger_version, decision.champion_version = challenger_v, champion_v
    if challenger_v is None:
        decision.reason = f"{index_name} has no {CHALLENGER!r} alias"
        return decision
    candidate = check_challenger(client, cfg, decision, challenger_v)
    if candidate is None:
        return decision
    if champion_v is not None and not beats_champion(client, cfg, decision, champion_v, candidate):
        return decision
    if smoke and not smoke_passes(cfg, decision, challenger_v, smoke_image):
        return decision

    _move_aliases(client, cfg, candidate, index_aliases)
    decision.promoted = True
    if champion_v is None:
        decision.reason = f"no champion yet: {index_name} v{challenger_v} promoted"
    elif decision.extension:
        decision.reason = (
            f"index extension {metric}={decision.challenger_value:.6g} is not worse than champion "
            f"{decision.champion_value:.6g} (same extractor v{decision.extractor_version}): "
            f"v{challenger_v} replaces v{champion_v}"
        )
    else:
        decision.reason = (
            f"challenger {metric}={decision.challenger_value:.6g} > champion "
            f"{decision.champion_value:.6g} + {min_delta:g}: v{challenger_v} replaces v{champion_v}"
        )
    log.info("%s", decision.reason)
    return decision


def _move_aliases(
    client: MlflowClient, cfg: PromoteConfig, candidate: Candidate, index_aliases: dict[str, str]
) -> None:
    """The writes of a promotion (module doc), undone in reverse order if one fails."""
    index_name, extractor_name = cfg.index_name, cfg.extractor_name
    challenger: ModelVersion = candidate.index
    challenger_v, extractor_v = index_aliases[CHALLENGER], candidate.extractor_version
    champion_v = index_aliases.get(CHAMPION)
    ext_aliases = aliases(client, extractor_name) or {}
    old_ext_champion = ext_aliases.get(CHAMPION)

    def writes(undo: Undo) -> None:
        if champion_v is not None:
            undo.set_tag(challenger, TAG_PREVIOUS_CHAMPION, champion_v)
            undo.set_alias(index_name, PREVIOUS, champion_v, index_aliases.get(PREVIOUS))
        if old_ext_champion is not None and old_ext_champion != extractor_v:
            undo.set_alias(extractor_name, PREVIOUS, old_ext_champion, ext_aliases.get(PREVIOUS))
        undo.set_tag(challenger, TAG_PROMOTED_AT, utc_now())
        # the candidate is decided: `challenger` names only undecided ones (module doc)
        if ext_aliases.get(CHALLENGER) == extractor_v:
            undo.delete_alias(extractor_name, CHALLENGER, extractor_v)
        undo.delete_alias(index_name, CHALLENGER, challenger_v)
        undo.set_alias(extractor_name, CHAMPION, extractor_v, old_ext_champion)
        undo.set_alias(index_name, CHAMPION, challenger_v, champion_v)  # the commit point

    apply_writes(client, writes, f"promotion of {index_name} v{challenger_v}")


def promote_with_config(
    cfg: PromoteConfig, client: MlflowClient | None = None
) -> PromotionDecision:
    return promote(
        client,
        cfg.metric,
        cfg.min_delta,
        higher_is_better=cfg.higher_is_better,
        smoke=cfg.smoke_check,
        smoke_k=cfg.smoke_k,
        require_same_test_split=cfg.require_same_test_split,
        index_name=cfg.index_name,
        extractor_name=cfg.extractor_name,
        metric_prefixes=cfg.metric_prefixes,
        extends_index=cfg.extends_index,
        probe_min_ratio=cfg.probe_min_ratio,
        probe_metric=cfg.probe_metric,
    )
