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
4. a smoke check passes: the challenger loads through
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
"""

from __future__ import annotations

import io
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import (
    INVALID_PARAMETER_VALUE,
    RESOURCE_DOES_NOT_EXIST,
    ErrorCode,
)
from PIL import Image

from registry import integrity, models
from registry.register import (
    CHALLENGER,
    CHAMPION,
    EXTRACTOR_MODEL,
    INDEX_MODEL,
    INPUT_SPLIT_RUN,
    PREVIOUS,
    TAG_EVALUATE_RUN,
    TAG_EXTRACTOR_VERSION,
    TAG_FINGERPRINT,
    TAG_SOURCE_RUN,
    TAG_TEST_SPLIT,
    EvaluationMismatchError,
    RegisterConfig,
    RegistryError,
    check_evaluation,
    select_metrics,
    version_metric,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

TAG_PREVIOUS_CHAMPION = "previous_champion"
TAG_PROMOTED_AT = "promoted_at"
TAG_ROLLED_BACK_AT = "rolled_back_at"
TAG_ROLLED_BACK_TO = "rolled_back_to"
DEFAULT_MIN_DELTA = 1e-4
_MISSING = (ErrorCode.Name(RESOURCE_DOES_NOT_EXIST),)


class RegistryUnavailableError(RegistryError):
    """The tracking/registry store could not be read or written (unreachable, locked...)."""


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

    @property
    def delta(self) -> float | None:
        if self.challenger_value is None or self.champion_value is None:
            return None
        return self.challenger_value - self.champion_value

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "delta": self.delta}


@dataclass
class RollbackResult:
    from_version: str
    to_version: str
    extractor_version: str | None
    reason: str


# --- store access ------------------------------------------------------------------------------


def _store(what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call the store; anything but "not found" / "bad value" becomes RegistryUnavailableError."""
    try:
        return fn(*args, **kwargs)
    except MlflowException as exc:
        if exc.error_code in _MISSING:
            raise
        if exc.error_code == ErrorCode.Name(INVALID_PARAMETER_VALUE) and "locked" not in str(exc):
            raise
        raise RegistryUnavailableError(f"{what}: the registry store failed: {exc.message}") from exc
    except Exception as exc:  # sqlalchemy OperationalError, requests ConnectionError, OSError...
        raise RegistryUnavailableError(
            f"{what}: the registry store failed: {type(exc).__name__}: {exc}"
        ) from exc


def aliases(client: MlflowClient, name: str) -> dict[str, str] | None:
    """alias -> version of registered model ``name``; ``None`` when the model does not exist."""
    try:
        model = _store(f"read {name}", client.get_registered_model, name)
    except MlflowException as exc:
        if exc.error_code in _MISSING:
            return None
        raise RegistryUnavailableError(f"read {name}: {exc.message}") from exc
    return {str(k): str(v) for k, v in (model.aliases or {}).items()}


def _version(client: MlflowClient, name: str, version: str) -> ModelVersion:
    try:
        return _store(f"read {name} v{version}", client.get_model_version, name, version)
    except MlflowException as exc:
        raise RegistryError(f"{name} version {version} not found: {exc.message}") from exc


class _Undo:
    """Registry writes with their inverses, undone in reverse order if a later write fails."""

    def __init__(self, client: MlflowClient) -> None:
        self.client = client
        self.steps: list[tuple[str, Callable[[], Any]]] = []

    def set_alias(self, name: str, alias: str, version: str, old: str | None) -> None:
        _store(f"set {name}@{alias}", self.client.set_registered_model_alias, name, alias, version)
        if old is None:
            self.steps.append(
                (f"{name}@{alias}", lambda: self.client.delete_registered_model_alias(name, alias))
            )
        else:
            self.steps.append(
                (
                    f"{name}@{alias}",
                    lambda: self.client.set_registered_model_alias(name, alias, old),
                )
            )

    def delete_alias(self, name: str, alias: str, old: str) -> None:
        _store(f"delete {name}@{alias}", self.client.delete_registered_model_alias, name, alias)
        self.steps.append(
            (f"{name}@{alias}", lambda: self.client.set_registered_model_alias(name, alias, old))
        )

    def set_tag(self, mv: ModelVersion, key: str, value: str) -> None:
        name, version = mv.name, str(mv.version)
        old = (mv.tags or {}).get(key)
        _store(
            f"tag {name} v{version}", self.client.set_model_version_tag, name, version, key, value
        )
        if old is None:
            self.steps.append(
                (
                    f"{name} v{version} {key}",
                    lambda: self.client.delete_model_version_tag(name, version, key),
                )
            )
        else:
            self.steps.append(
                (
                    f"{name} v{version} {key}",
                    lambda: self.client.set_model_version_tag(name, version, key, old),
                )
            )

    def undo(self) -> list[str]:
        """Revert what was done; returns what could not be reverted (store still down)."""
        failed = []
        for what, step in reversed(self.steps):
            try:
                step()
            except Exception as exc:  # keep undoing the rest; report below
                log.error("could not undo %s: %s", what, exc)
                failed.append(what)
        self.steps.clear()
        return failed


def _apply(client: MlflowClient, writes: Callable[[_Undo], None], what: str) -> None:
    undo = _Undo(client)
    try:
        writes(undo)
    except Exception as exc:
        left = undo.undo()
        detail = f"; NOT reverted (fix by hand): {left}" if left else "; earlier writes reverted"
        if isinstance(exc, RegistryUnavailableError):
            raise RegistryUnavailableError(f"{what} aborted: {exc}{detail}") from exc
        raise RegistryError(f"{what} aborted: {exc}{detail}") from exc


# --- smoke check -------------------------------------------------------------------------------


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
    run = _store(f"read evaluate run {eval_id}", client.get_run, eval_id)
    measured = select_metrics(run.data.metrics, prefixes, [metric]).get(metric)
    if measured is None or not math.isclose(measured, recorded, rel_tol=1e-9, abs_tol=1e-12):
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
) -> PromotionDecision:
    """Move ``champion`` to the ``challenger`` pair if it passes the gate; see the module doc.

    ``extends_index``: the challenger is the champion's index with new images added, built with
    the champion's own extractor version (the improve job's add path); it then only has to not
    regress on the frozen test split (a bigger gallery cannot be expected to score higher), and
    this relaxation applies only when the extractor versions really are the same.

    Returns the decision (``promoted`` False with a reason when the gate refuses). Raises
    :class:`RegistryUnavailableError` when the store cannot be read or written (nothing changed).
    """
    client = client or _store("connect to the registry", MlflowClient)
    decision = PromotionDecision(promoted=False, reason="", metric=metric)
    if not min_delta >= 0:
        raise RegistryError(f"min_delta must be >= 0 (a strict improvement), got {min_delta}")
    prefixes = metric_prefixes if metric_prefixes is not None else PromoteConfig().metric_prefixes

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
    challenger = _version(client, index_name, challenger_v)
    decision.challenger_value = version_metric(challenger, metric)
    decision.extractor_version = (challenger.tags or {}).get(TAG_EXTRACTOR_VERSION)
    if champion_v == challenger_v:
        decision.champion_value = decision.challenger_value
        decision.reason = f"version {challenger_v} is already {CHAMPION}"
        return decision
    if decision.challenger_value is None:
        decision.reason = f"challenger v{challenger_v} has no metric tag metric.{metric}"
        return decision
    if (challenger.tags or {}).get(TAG_ROLLED_BACK_AT):
        decision.reason = (
            f"challenger v{challenger_v} was rolled back at "
            f"{challenger.tags[TAG_ROLLED_BACK_AT]}: register a new version to try it again"
        )
        return decision
    try:
        ours = verified_metric(client, challenger, metric, prefixes)
    except UntrustedMetric as exc:
        decision.reason = f"challenger figures not trusted: {exc}"
        return decision
    if decision.extractor_version is None:
        decision.reason = f"challenger v{challenger_v} has no {TAG_EXTRACTOR_VERSION} tag"
        return decision
    extractor = _version(client, extractor_name, decision.extractor_version)
    extractor_v = str(extractor.version)
    if (extractor.tags or {}).get(TAG_FINGERPRINT) != (challenger.tags or {}).get(TAG_FINGERPRINT):
        decision.reason = (
            f"{extractor_name} v{extractor_v} is not the extractor of "
            f"{index_name} v{challenger_v} (fingerprints differ)"
        )
        return decision

    champion: ModelVersion | None = None
    if champion_v is not None:
        champion = _version(client, index_name, champion_v)
        decision.champion_value = version_metric(champion, metric)
        if decision.champion_value is None:
            decision.reason = (
                f"champion v{champion_v} has no metric tag metric.{metric}: cannot compare"
            )
            return decision
        try:
            theirs = verified_metric(client, champion, metric, prefixes)
        except UntrustedMetric as exc:
            decision.reason = f"champion figures not trusted: {exc}"
            return decision
        why = same_test_split(ours, theirs) if require_same_test_split else None
        if why is not None:
            decision.reason = why
            return decision
        same_extractor = (champion.tags or {}).get(TAG_EXTRACTOR_VERSION) == extractor_v
        if same_extractor and extends_index:
            if not _not_worse(ours.value, theirs.value, higher_is_better):
                decision.reason = (
                    f"index extension {metric}={ours.value:.6g} is worse than champion "
                    f"{theirs.value:.6g} (same extractor v{extractor_v})"
                )
                return decision
        elif not _better(ours.value, theirs.value, min_delta, higher_is_better):
            tie = " (a tie)" if ours.value == theirs.value else ""
            decision.reason = (
                f"challenger {metric}={ours.value:.6g} does not beat champion "
                f"{theirs.value:.6g} by more than min_delta={min_delta:g}{tie}"
            )
            return decision

    if smoke:
        uri = f"models:/{index_name}/{challenger_v}"
        try:
            decision.smoke = smoke_check(uri, smoke_image, smoke_k)
        except RegistryUnavailableError:
            raise
        except Exception as exc:  # any failure to load or answer blocks the promotion
            decision.reason = f"smoke check failed: {type(exc).__name__}: {exc}"
            log.warning("promotion refused: %s", decision.reason)
            return decision

    ext_aliases = aliases(client, extractor_name) or {}
    old_ext_champion = ext_aliases.get(CHAMPION)

    def writes(undo: _Undo) -> None:
        if champion_v is not None:
            undo.set_tag(challenger, TAG_PREVIOUS_CHAMPION, champion_v)
            undo.set_alias(index_name, PREVIOUS, champion_v, index_aliases.get(PREVIOUS))
        if old_ext_champion is not None and old_ext_champion != extractor_v:
            undo.set_alias(extractor_name, PREVIOUS, old_ext_champion, ext_aliases.get(PREVIOUS))
        undo.set_tag(challenger, TAG_PROMOTED_AT, _now())
        # the candidate is decided: `challenger` names only undecided ones (module doc)
        if ext_aliases.get(CHALLENGER) == extractor_v:
            undo.delete_alias(extractor_name, CHALLENGER, extractor_v)
        undo.delete_alias(index_name, CHALLENGER, challenger_v)
        undo.set_alias(extractor_name, CHAMPION, extractor_v, old_ext_champion)
        undo.set_alias(index_name, CHAMPION, challenger_v, champion_v)  # the commit point

    _apply(client, writes, f"promotion of {index_name} v{challenger_v}")
    decision.promoted = True
    if champion_v is None:
        decision.reason = f"no champion yet: {index_name} v{challenger_v} promoted"
    else:
        decision.reason = (
            f"challenger {metric}={decision.challenger_value:.6g} > champion "
            f"{decision.champion_value:.6g} + {min_delta:g}: v{challenger_v} replaces v{champion_v}"
        )
    log.info("%s", decision.reason)
    return decision


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
    )


def rollback(
    client: MlflowClient | None = None,
    to_version: str | int | None = None,
    *,
    index_name: str = INDEX_MODEL,
    extractor_name: str = EXTRACTOR_MODEL,
) -> RollbackResult:
    """Re-point ``champion`` (index and its extractor) at ``to_version``, by default the version
    that was champion before the current one. Raises :class:`RegistryError` when there is no
    champion or nothing to roll back to, :class:`RegistryUnavailableError` when the store fails.
    """
    client = client or _store("connect to the registry", MlflowClient)
    index_aliases = aliases(client, index_name)
    current_v = (index_aliases or {}).get(CHAMPION)
    if index_aliases is None or current_v is None:
        raise RegistryError(f"{index_name} has no {CHAMPION!r}: nothing to roll back")
    current = _version(client, index_name, current_v)
    target_v = (
        str(to_version)
        if to_version is not None
        else (current.tags or {}).get(TAG_PREVIOUS_CHAMPION)
    )
    if target_v is None:
        raise RegistryError(
            f"{index_name} v{current_v} records no previous champion; pass to_version explicitly"
        )
    if target_v == current_v:
        raise RegistryError(f"{index_name} v{current_v} is already {CHAMPION}")
    target = _version(client, index_name, target_v)
    if to_version is None and (target.tags or {}).get(TAG_ROLLED_BACK_AT):
        # going back to a version that was itself rolled back would flip-flop silently
        raise RegistryError(
            f"{index_name} v{target_v} (the champion before v{current_v}) was itself rolled back "
            f"at {target.tags[TAG_ROLLED_BACK_AT]}; pass to_version explicitly"
        )
    ext_v = (target.tags or {}).get(TAG_EXTRACTOR_VERSION)
    if ext_v is None:
        raise RegistryError(f"{index_name} v{target_v} has no {TAG_EXTRACTOR_VERSION} tag")
    extractor = _version(client, extractor_name, ext_v)
    if (extractor.tags or {}).get(TAG_FINGERPRINT) != (target.tags or {}).get(TAG_FINGERPRINT):
        raise RegistryError(
            f"{extractor_name} v{ext_v} is not the extractor of {index_name} v{target_v}"
        )
    ext_aliases = aliases(client, extractor_name) or {}
    new_previous = (target.tags or {}).get(TAG_PREVIOUS_CHAMPION)

    def writes(undo: _Undo) -> None:
        undo.set_tag(current, TAG_ROLLED_BACK_AT, _now())
        undo.set_tag(current, TAG_ROLLED_BACK_TO, target_v)
        if index_aliases.get(CHALLENGER) == current_v:  # do not let the next gate re-promote it
            undo.delete_alias(index_name, CHALLENGER, current_v)
        if new_previous is not None:
            undo.set_alias(index_name, PREVIOUS, new_previous, index_aliases.get(PREVIOUS))
        elif index_aliases.get(PREVIOUS) is not None:
            undo.delete_alias(index_name, PREVIOUS, index_aliases[PREVIOUS])
        undo.set_alias(extractor_name, CHAMPION, str(extractor.version), ext_aliases.get(CHAMPION))
        undo.set_alias(index_name, CHAMPION, target_v, current_v)

    _apply(client, writes, f"rollback of {index_name} v{current_v}")
    reason = f"{index_name} champion v{current_v} -> v{target_v} (extractor v{ext_v})"
    log.info("rollback: %s", reason)
    return RollbackResult(
        from_version=current_v, to_version=target_v, extractor_version=ext_v, reason=reason
    )


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
