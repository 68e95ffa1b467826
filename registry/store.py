"""Registry store access for the gate and rollback: reads that tell "missing" from "unavailable",
and alias/tag writes that undo themselves in reverse order when a later write fails."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import (
    INVALID_PARAMETER_VALUE,
    RESOURCE_DOES_NOT_EXIST,
    ErrorCode,
)

from registry.tags import RegistryError

log = logging.getLogger(__name__)

T = TypeVar("T")

_MISSING = (ErrorCode.Name(RESOURCE_DOES_NOT_EXIST),)


class RegistryUnavailableError(RegistryError):
    """The tracking/registry store could not be read or written (unreachable, locked...)."""


def store_call(what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
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
        model = store_call(f"read {name}", client.get_registered_model, name)
    except MlflowException as exc:
        if exc.error_code in _MISSING:
            return None
        raise RegistryUnavailableError(f"read {name}: {exc.message}") from exc
    return {str(k): str(v) for k, v in (model.aliases or {}).items()}


def get_version(client: MlflowClient, name: str, version: str) -> ModelVersion:
    try:
        return store_call(f"read {name} v{version}", client.get_model_version, name, version)
    except MlflowException as exc:
        raise RegistryError(f"{name} version {version} not found: {exc.message}") from exc


class Undo:
    """Registry writes with their inverses, undone in reverse order if a later write fails."""

    def __init__(self, client: MlflowClient) -> None:
        self.client = client
        self.steps: list[tuple[str, Callable[[], Any]]] = []

    def set_alias(self, name: str, alias: str, version: str, old: str | None) -> None:
        store_call(
            f"set {name}@{alias}", self.client.set_registered_model_alias, name, alias, version
        )
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
        store_call(f"delete {name}@{alias}", self.client.delete_registered_model_alias, name, alias)
        self.steps.append(
            (f"{name}@{alias}", lambda: self.client.set_registered_model_alias(name, alias, old))
        )

    def set_tag(self, mv: ModelVersion, key: str, value: str) -> None:
        name, version = mv.name, str(mv.version)
        old = (mv.tags or {}).get(key)
        store_call(
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


def apply_writes(client: MlflowClient, writes: Callable[[Undo], None], what: str) -> None:
    undo = Undo(client)
    try:
        writes(undo)
    except Exception as exc:
        left = undo.undo()
        detail = f"; NOT reverted (fix by hand): {left}" if left else "; earlier writes reverted"
        if isinstance(exc, RegistryUnavailableError):
            raise RegistryUnavailableError(f"{what} aborted: {exc}{detail}") from exc
        raise RegistryError(f"{what} aborted: {exc}{detail}") from exc


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
