"""The promotion gate's checks: trusted figures, the same frozen test split, a strict improvement,
a consistent pair and a smoke check (see :mod:`registry.promote` for the rules)."""

from __future__ import annotations

import io
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from PIL import Image

from registry import integrity, models
from registry.evaluation import check_evaluation
from registry.register import RegisterConfig
from registry.store import RegistryUnavailableError, get_version, store_call
from registry.tags import (
    CHAMPION,
    EXTRACTOR_MODEL,
    INDEX_MODEL,
    INPUT_SPLIT_RUN,
    TAG_EVALUATE_RUN,
    TAG_EXTRACTOR_VERSION,
    TAG_FINGERPRINT,
    TAG_ROLLED_BACK_AT,
    TAG_SOURCE_RUN,
    TAG_TEST_SPLIT,
    EvaluationMismatchError,
    RegistryError,
    recorded_matches,
    select_metrics,
    version_metric,
)

log = logging.getLogger(__name__)

DEFAULT_MIN_DELTA = 1e-4


@dataclass
class PromoteConfig:
    """Gate thresholds (``configs/promote.yaml``).

    ``metric``: version tag ``metric.<metric>`` compared; ``higher_is_better`` its direction;
    ``min_delta``: the challenger must beat the champion by *more* than this (``delta >
    min_delta``; a tie never promotes, and 1e-4 keeps float noise from promoting either).
    ``metric_prefixes``: how the evaluate run names the metric (as in ``RegisterConfig``), to
    check each version's recorded figure against the run that measured it.
    ``smoke_check``: load the challenger and query it once before moving any alias.
    ``require_same_test_split``: refuse unless both evaluations measured the same test split.
    ``extends_index``: the challenger only adds images to the champion's index with the same
    extractor version (see :func:`promote`): it must not regress, instead of beating.
    ``probe_min_ratio``: when set, the challenger's out-of-domain probe figure ``probe_metric``
    (logged by the evaluate step with ``evaluate.probe_dir``) must be at least this ratio of the
    champion's (1.0: the probe may not fall); an evaluation without it is refused. None: off.
    """

    metric: str = "map_at_r"
    min_delta: float = DEFAULT_MIN_DELTA
    metric_prefixes: list[str] = field(
        default_factory=lambda: list(RegisterConfig().metric_prefixes)
    )
    higher_is_better: bool = True
    smoke_check: bool = True
    smoke_k: int = 3
    require_same_test_split: bool = True
    extends_index: bool = False
    probe_metric: str = "probe_map_at_r"
    probe_min_ratio: float | None = None
    index_name: str = INDEX_MODEL
    extractor_name: str = EXTRACTOR_MODEL


@dataclass
class PromotionDecision:
    promoted: bool
    reason: str
    metric: str
    challenger_version: str | None = None
    champion_version: str | None = None  # the champion before the decision
    challenger_value: float | None = None
    champion_value: float | None = None
    extractor_version: str | None = None  # the challenger's extractor version
    smoke: dict[str, Any] = field(default_factory=dict)
    probe: dict[str, float] = field(default_factory=dict)  # challenger/champion probe figures
    extension: bool = False  # passed by the index-extension rule (not worse, same extractor)

    @property
    def delta(self) -> float | None:
        if self.challenger_value is None or self.champion_value is None:
            return None
        return self.challenger_value - self.champion_value

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "delta": self.delta}


def smoke_image_bytes(size: int = 64) -> bytes:
    """A deterministic PNG (colour gradient with a square) to query a model with."""
    y, x = np.mgrid[0:size, 0:size]
    arr = np.stack([x * 255 // size, y * 255 // size, (x + y) * 127 // size], axis=-1).astype(
        np.uint8
    )
    arr[size // 4 : size // 2, size // 4 : size // 2] = (250, 20, 20)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def smoke_check(model_uri: str, image: bytes | None = None, k: int = 3) -> dict[str, Any]:
    """Load ``model_uri`` as pyfunc and query one image; raises ``RegistryError`` on a bad answer."""
    t0 = time.perf_counter()
    model = integrity.load_verified(model_uri)
    load_s = time.perf_counter() - t0
    query = pd.DataFrame({models.IMAGE_COLUMN: [image or smoke_image_bytes()]})
    t1 = time.perf_counter()
    out = model.predict(query, params={"k": k})
    query_ms = (time.perf_counter() - t1) * 1000.0
    if not isinstance(out, pd.DataFrame):
        raise RegistryError(f"smoke check: expected a DataFrame, got {type(out).__name__}")
    missing = [c for c in models.RESULT_COLUMNS if c not in out.columns]
    if missing:
        raise RegistryError(f"smoke check: result lacks columns {missing}")
    errors = [e for e in out.get(models.ERROR, pd.Series(dtype=object)) if e is not None]
    if errors:
        raise RegistryError(f"smoke check: the query failed: {errors[0]}")
    if out.empty:
        raise RegistryError("smoke check: no results for the query image")
    scores = pd.to_numeric(out[models.SCORE], errors="coerce")
    if not np.isfinite(scores.to_numpy(dtype=float)).all():
        raise RegistryError("smoke check: non-finite scores")
    return {"load_s": load_s, "query_ms": query_ms, "results": len(out)}


# --- the gate ----------------------------------------------------------------------------------


def _better(challenger: float, champion: float, min_delta: float, higher: bool) -> bool:
    """Strict: the improvement must exceed ``min_delta``; equal figures never pass."""
    delta = challenger - champion if higher else champion - challenger
    return delta > min_delta


def _not_worse(challenger: float, champion: float, higher: bool) -> bool:
    """An index extension (same extractor, more images) must only not regress."""
    delta = challenger - champion if higher else champion - challenger
    return delta >= 0


class UntrustedMetric(RegistryError):
    """A version's recorded figure cannot be traced to the evaluation of its own runs."""


@dataclass
class Measured:
    """A figure :func:`verified_metric` traced to its evaluate run, and what that run measured."""

    value: float
    evaluate_run: str
    split: str | None
    split_run: str | None
    test_split_hash: str | None


def verified_metric(
    client: MlflowClient, version: ModelVersion, metric: str, prefixes: list[str]
) -> Measured:
    """The version's ``metric.<metric>``, once checked against the run that measured it.

    Raises :class:`UntrustedMetric` when the version names no evaluate run, when that run did not
    measure the extract run behind the version's own index run (``source_run_id``), or when its
    metric differs from the tag.
    """
    tags = version.tags or {}
    label = f"{version.name} v{version.version}"
    recorded = version_metric(version, metric)
    if recorded is None:
        raise UntrustedMetric(f"{label} has no metric tag metric.{metric}")
    eval_id, index_run = tags.get(TAG_EVALUATE_RUN), tags.get(TAG_SOURCE_RUN)
    if not eval_id or not index_run:
        raise UntrustedMetric(
            f"{label} records no {TAG_EVALUATE_RUN}/{TAG_SOURCE_RUN}: its metric.{metric} "
            "cannot be traced to an evaluation of its own runs"
        )
    try:
        check_evaluation(client, eval_id, index_run_id=index_run)
    except EvaluationMismatchError as exc:
        raise UntrustedMetric(f"{label}: {exc}") from exc
    run = store_call(f"read evaluate run {eval_id}", client.get_run, eval_id)
    measured = select_metrics(run.data.metrics, prefixes, [metric]).get(metric)
    if measured is None or not recorded_matches(recorded, measured):
        raise UntrustedMetric(
            f"{label} records metric.{metric}={recorded!r}, but its evaluate run {eval_id} "
            f"measured {measured!r}"
        )
    return Measured(
        value=measured,
        evaluate_run=eval_id,
        split=run.data.params.get("evaluate.split") or run.data.params.get("split"),
        split_run=run.data.tags.get(INPUT_SPLIT_RUN),
        test_split_hash=tags.get(TAG_TEST_SPLIT),
    )


def same_test_split(a: Measured, b: Measured) -> str | None:
    """None when both evaluations measured the same frozen split, else why not."""
    if a.split and b.split and a.split != b.split:
        return f"the evaluations measured different splits ({a.split!r} vs {b.split!r})"
    if a.split_run and a.split_run == b.split_run:
        return None
    if a.test_split_hash and b.test_split_hash:
        if a.test_split_hash == b.test_split_hash:
            return None
        return "challenger and champion were evaluated on different test splits"
    return (
        f"cannot tell that evaluate runs {a.evaluate_run} and {b.evaluate_run} measured the same "
        "frozen test split (no common split run, no test split hash on both)"
    )


@dataclass
class Candidate:
    """The challenger pair once its own checks passed: the index version, its trusted figure and
    the version of its extractor."""

    index: ModelVersion
    measured: Measured
    extractor_version: str


def check_challenger(
    client: MlflowClient, cfg: PromoteConfig, decision: PromotionDecision, challenger_v: str
) -> Candidate | None:
    """The challenger's own checks (its figure, rollback history, extractor pair); ``None`` with
    ``decision.reason`` set when one fails. Fills the challenger fields of ``decision``."""
    challenger = get_version(client, cfg.index_name, challenger_v)
    decision.challenger_value = version_metric(challenger, cfg.metric)
    decision.extractor_version = (challenger.tags or {}).get(TAG_EXTRACTOR_VERSION)
    if decision.champion_version == challenger_v:
        decision.champion_value = decision.challenger_value
        decision.reason = f"version {challenger_v} is already {CHAMPION}"
        return None
    if decision.challenger_value is None:
        decision.reason = f"challenger v{challenger_v} has no metric tag metric.{cfg.metric}"
        return None
    if (challenger.tags or {}).get(TAG_ROLLED_BACK_AT):
        decision.reason = (
            f"challenger v{challenger_v} was rolled back at "
            f"{challenger.tags[TAG_ROLLED_BACK_AT]}: register a new version to try it again"
        )
        return None
    try:
        ours = verified_metric(client, challenger, cfg.metric, cfg.metric_prefixes)
    except UntrustedMetric as exc:
        decision.reason = f"challenger figures not trusted: {exc}"
        return None
    decision.challenger_value = ours.value  # the full figure (the tag is rounded)
    if decision.extractor_version is None:
        decision.reason = f"challenger v{challenger_v} has no {TAG_EXTRACTOR_VERSION} tag"
        return None
    extractor = get_version(client, cfg.extractor_name, decision.extractor_version)
    extractor_v = str(extractor.version)
    if (extractor.tags or {}).get(TAG_FINGERPRINT) != (challenger.tags or {}).get(TAG_FINGERPRINT):
        decision.reason = (
            f"{cfg.extractor_name} v{extractor_v} is not the extractor of "
            f"{cfg.index_name} v{challenger_v} (fingerprints differ)"
        )
        return None
    return Candidate(challenger, ours, extractor_v)


def beats_champion(
    client: MlflowClient,
    cfg: PromoteConfig,
    decision: PromotionDecision,
    champion_v: str,
    candidate: Candidate,
) -> bool:
    """Whether the candidate beats champion ``champion_v`` on the same frozen test split (or, for
    an index extension with the same extractor, does not regress); else ``decision.reason``."""
    metric, ours, extractor_v = cfg.metric, candidate.measured, candidate.extractor_version
    champion = get_version(client, cfg.index_name, champion_v)
    decision.champion_value = version_metric(champion, metric)
    if decision.champion_value is None:
        decision.reason = (
            f"champion v{champion_v} has no metric tag metric.{metric}: cannot compare"
        )
        return False
    try:
        theirs = verified_metric(client, champion, metric, cfg.metric_prefixes)
    except UntrustedMetric as exc:
        decision.reason = f"champion figures not trusted: {exc}"
        return False
    decision.champion_value = theirs.value
    why = same_test_split(ours, theirs) if cfg.require_same_test_split else None
    if why is not None:
        decision.reason = why
        return False
    same_extractor = (champion.tags or {}).get(TAG_EXTRACTOR_VERSION) == extractor_v
    if same_extractor and cfg.extends_index:
        if not _not_worse(ours.value, theirs.value, cfg.higher_is_better):
            decision.reason = (
                f"index extension {metric}={ours.value:.6g} is worse than champion "
                f"{theirs.value:.6g} (same extractor v{extractor_v})"
            )
            return False
        decision.extension = True
    elif not _better(ours.value, theirs.value, cfg.min_delta, cfg.higher_is_better):
        tie = " (a tie)" if ours.value == theirs.value else ""
        decision.reason = (
            f"challenger {metric}={ours.value:.6g} does not beat champion "
            f"{theirs.value:.6g} by more than min_delta={cfg.min_delta:g}{tie}"
        )
        return False
    if cfg.probe_min_ratio is not None:
        why = probe_falls(client, cfg, decision, ours, theirs)
        if why is not None:
            decision.reason = why
            return False
    return True


def probe_falls(
    client: MlflowClient,
    cfg: PromoteConfig,
    decision: PromotionDecision,
    ours: Measured,
    theirs: Measured,
) -> str | None:
    """None when the challenger's probe figure is at least ``probe_min_ratio`` x the champion's
    (both read from the evaluate runs their test figures were traced to), else why not. A run
    that logged no probe figure cannot pass: the gate asked for a check it cannot make."""
    assert cfg.probe_min_ratio is not None
    name = cfg.probe_metric
    values: dict[str, float] = {}
    for who, measured in (("challenger", ours), ("champion", theirs)):
        run = store_call(
            f"read evaluate run {measured.evaluate_run}", client.get_run, measured.evaluate_run
        )
        value = run.data.metrics.get(name)
        if value is None or not np.isfinite(value):
            return (
                f"probe_min_ratio is set but the {who}'s evaluate run {measured.evaluate_run} "
                f"logged no {name} (evaluate with evaluate.probe_dir set)"
            )
        values[who] = float(value)
    decision.probe = values
    floor = cfg.probe_min_ratio * values["champion"]
    higher = cfg.higher_is_better
    if (values["challenger"] < floor) if higher else (values["challenger"] > floor):
        return (
            f"challenger {name}={values['challenger']:.6g} falls below probe_min_ratio="
            f"{cfg.probe_min_ratio:g} x champion {values['champion']:.6g} on the out-of-domain probe"
        )
    return None


def smoke_passes(
    cfg: PromoteConfig, decision: PromotionDecision, challenger_v: str, image: bytes | None
) -> bool:
    """Run :func:`smoke_check` on the challenger; a failure sets ``decision.reason``. A store that
    is unavailable raises (nothing changed)."""
    uri = f"models:/{cfg.index_name}/{challenger_v}"
    try:
        decision.smoke = smoke_check(uri, image, cfg.smoke_k)
    except RegistryUnavailableError:
        raise
    except Exception as exc:  # any failure to load or answer blocks the promotion
        decision.reason = f"smoke check failed: {type(exc).__name__}: {exc}"
        log.warning("promotion refused: %s", decision.reason)
        return False
    return True
