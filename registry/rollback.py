"""Rollback: re-point ``champion`` (both models) at an earlier version (see :mod:`registry.promote`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from mlflow import MlflowClient

from registry.store import Undo, aliases, apply_writes, get_version, store_call, utc_now
from registry.tags import (
    CHALLENGER,
    CHAMPION,
    EXTRACTOR_MODEL,
    INDEX_MODEL,
    PREVIOUS,
    TAG_EXTRACTOR_VERSION,
    TAG_FINGERPRINT,
    TAG_PREVIOUS_CHAMPION,
    TAG_ROLLED_BACK_AT,
    TAG_ROLLED_BACK_TO,
    RegistryError,
)

log = logging.getLogger(__name__)


@dataclass
class RollbackResult:
    from_version: str
    to_version: str
    extractor_version: str | None
    reason: str


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
    client = client or store_call("connect to the registry", MlflowClient)
    index_aliases = aliases(client, index_name)
    current_v = (index_aliases or {}).get(CHAMPION)
    if index_aliases is None or current_v is None:
        raise RegistryError(f"{index_name} has no {CHAMPION!r}: nothing to roll back")
    current = get_version(client, index_name, current_v)
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
    target = get_version(client, index_name, target_v)
    if to_version is None and (target.tags or {}).get(TAG_ROLLED_BACK_AT):
        # going back to a version that was itself rolled back would flip-flop silently
        raise RegistryError(
            f"{index_name} v{target_v} (the champion before v{current_v}) was itself rolled back "
            f"at {target.tags[TAG_ROLLED_BACK_AT]}; pass to_version explicitly"
        )
    ext_v = (target.tags or {}).get(TAG_EXTRACTOR_VERSION)
    if ext_v is None:
        raise RegistryError(f"{index_name} v{target_v} has no {TAG_EXTRACTOR_VERSION} tag")
    extractor = get_version(client, extractor_name, ext_v)
    if (extractor.tags or {}).get(TAG_FINGERPRINT) != (target.tags or {}).get(TAG_FINGERPRINT):
        raise RegistryError(
            f"{extractor_name} v{ext_v} is not the extractor of {index_name} v{target_v}"
        )
    ext_aliases = aliases(client, extractor_name) or {}
    new_previous = (target.tags or {}).get(TAG_PREVIOUS_CHAMPION)

    def writes(undo: Undo) -> None:
        undo.set_tag(current, TAG_ROLLED_BACK_AT, utc_now())
        undo.set_tag(current, TAG_ROLLED_BACK_TO, target_v)
        if index_aliases.get(CHALLENGER) == current_v:  # do not let the next gate re-promote it
            undo.delete_alias(index_name, CHALLENGER, current_v)
        if new_previous is not None:
            undo.set_alias(index_name, PREVIOUS, new_previous, index_aliases.get(PREVIOUS))
        elif index_aliases.get(PREVIOUS) is not None:
            undo.delete_alias(index_name, PREVIOUS, index_aliases[PREVIOUS])
        undo.set_alias(extractor_name, CHAMPION, str(extractor.version), ext_aliases.get(CHAMPION))
        undo.set_alias(index_name, CHAMPION, target_v, current_v)

    apply_writes(client, writes, f"rollback of {index_name} v{current_v}")
    reason = f"{index_name} champion v{current_v} -> v{target_v} (extractor v{ext_v})"
    log.info("rollback: %s", reason)
    return RollbackResult(
        from_version=current_v, to_version=target_v, extractor_version=ext_v, reason=reason
    )
