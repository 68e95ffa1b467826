"""The promotion gate, and rollback: the only code that moves the ``champion`` alias.

:func:`promote` blesses the ``challenger`` index version (and the extractor version it was built
with) as ``champion`` only when (RELIABILITY 10):

1. its frozen test-split metric (version tag ``metric.<name>``) matches or beats the champion's by
   at least ``min_delta`` (no champion yet: promote), on the same test split when both record one;
2. the pair is consistent (the extractor version's fingerprint is the one the index records);
3. a smoke check passes: the challenger loads with :func:`mlflow.pyfunc.load_model` and answers a
   query image with ranked, error-free results.

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
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import mlflow
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

from registry import models
from registry.register import (
    CHALLENGER,
    CHAMPION,
    EXTRACTOR_MODEL,
    INDEX_MODEL,
    PREVIOUS,
    TAG_EXTRACTOR_VERSION,
    TAG_FINGERPRINT,
    TAG_TEST_SPLIT,
    RegistryError,
    version_metric,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

TAG_PREVIOUS_CHAMPION = "previous_champion"
TAG_PROMOTED_AT = "promoted_at"
TAG_ROLLED_BACK_AT = "rolled_back_at"
_MISSING = (ErrorCode.Name(RESOURCE_DOES_NOT_EXIST),)


class RegistryUnavailableError(RegistryError):
    """The tracking/registry store could not be read or written (unreachable, locked...)."""


@dataclass
class PromoteConfig:
    """Gate thresholds (``configs/promote.yaml``).

    ``metric``: version tag ``metric.<metric>`` compared; ``higher_is_better`` its direction;
    ``min_delta``: the challenger must beat the champion by at least this (0 = match or beat).
    ``smoke_check``: load the challenger and query it once before moving any alias.
    ``require_same_test_split``: refuse when both versions record different test splits.
    """

    metric: str = "map_at_r"
    min_delta: float = 0.0
    higher_is_better: bool = True
    smoke_check: bool = True
    smoke_k: int = 3
    require_same_test_split: bool = True
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
    model = mlflow.pyfunc.load_model(model_uri)
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
    delta = challenger - champion if higher else champion - challenger
    return delta >= min_delta - 1e-12


def promote(
    client: MlflowClient | None = None,
    metric: str = "map_at_r",
    min_delta: float = 0.0,
    *,
    higher_is_better: bool = True,
    smoke: bool = True,
    smoke_k: int = 3,
    smoke_image: bytes | None = None,
    require_same_test_split: bool = True,
    index_name: str = INDEX_MODEL,
    extractor_name: str = EXTRACTOR_MODEL,
) -> PromotionDecision:
    """Move ``champion`` to the ``challenger`` pair if it passes the gate; see the module doc.

    Returns the decision (``promoted`` False with a reason when the gate refuses). Raises
    :class:`RegistryUnavailableError` when the store cannot be read or written (nothing changed).
    """
    client = client or _store("connect to the registry", MlflowClient)
    decision = PromotionDecision(promoted=False, reason="", metric=metric)

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
        split_a = (challenger.tags or {}).get(TAG_TEST_SPLIT)
        split_b = (champion.tags or {}).get(TAG_TEST_SPLIT)
        if require_same_test_split and split_a and split_b and split_a != split_b:
            decision.reason = "challenger and champion were evaluated on different test splits"
            return decision
        if not _better(
            decision.challenger_value, decision.champion_value, min_delta, higher_is_better
        ):
            decision.reason = (
                f"challenger {metric}={decision.challenger_value:.6g} does not beat champion "
                f"{decision.champion_value:.6g} by min_delta={min_delta:g}"
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
        undo.set_alias(extractor_name, CHAMPION, extractor_v, old_ext_champion)
        undo.set_alias(index_name, CHAMPION, challenger_v, champion_v)  # the commit point

    _apply(client, writes, f"promotion of {index_name} v{challenger_v}")
    decision.promoted = True
    if champion_v is None:
        decision.reason = f"no champion yet: {index_name} v{challenger_v} promoted"
    else:
        decision.reason = (
            f"challenger {metric}={decision.challenger_value:.6g} >= champion "
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
